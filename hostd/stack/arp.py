"""ARP (RFC 826) for the gateway: answers for the addresses the stack owns and learns guests.

The gateway answers requests for its own address and for its virtual addresses (the host
loopback address .254), never for guests' addresses (a guest answers for itself, so two
guests can talk directly through the switch). A valid ARP packet teaches the neighbour
table the sender's IP → MAC, which is how replies find their way back to a guest; the
network layer first checks the sender against the port the frame came from (no claims to
the gateway's addresses, none to an address whose entry lives on another port: see
`Network._arp_sender_allowed`). The table itself is a plain bounded map.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

ARP_PACKET = struct.Struct("!HHBBH6s4s6s4s")
ARP_LEN = ARP_PACKET.size  # 28
OP_REQUEST = 1
OP_REPLY = 2


class ArpError(ValueError):
    pass


@dataclass(slots=True)
class ArpPacket:
    op: int
    sender_mac: bytes
    sender_ip: bytes
    target_mac: bytes
    target_ip: bytes


def parse_arp(data: bytes | memoryview) -> ArpPacket:
    if len(data) < ARP_LEN:
        raise ArpError("truncated ARP packet")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = ARP_PACKET.unpack_from(data)
    if htype != 1 or ptype != 0x0800 or hlen != 6 or plen != 4:
        raise ArpError("ARP for something other than Ethernet/IPv4")
    if op not in (OP_REQUEST, OP_REPLY):
        raise ArpError(f"ARP opcode {op}")
    return ArpPacket(op, sha, spa, tha, tpa)


def build_arp(op: int, sender_mac: bytes, sender_ip: bytes, target_mac: bytes, target_ip: bytes):
    return ARP_PACKET.pack(1, 0x0800, 6, 4, op, sender_mac, sender_ip, target_mac, target_ip)


class NeighbourTable:
    """IPv4 → MAC for guests, learned from ARP, DHCP and IP traffic; bounded."""

    __slots__ = ("_macs", "lookup", "max_entries")

    def __init__(self, max_entries: int = 4096) -> None:
        self._macs: dict[bytes, bytes] = {}
        self.max_entries = max_entries
        # lookup(ip) -> MAC or None: the dict's own get (the receive path calls it per frame)
        self.lookup: Callable[[bytes], bytes | None] = self._macs.get

    def learn(self, ip: bytes, mac: bytes) -> None:
        if ip == b"\x00\x00\x00\x00":
            return
        if ip in self._macs or len(self._macs) < self.max_entries:
            self._macs[ip] = mac

    def forget_macs(self, macs: list[bytes]) -> None:
        gone = set(macs)
        for ip in [ip for ip, m in self._macs.items() if m in gone]:
            del self._macs[ip]

    def items(self) -> list[tuple[bytes, bytes]]:
        return list(self._macs.items())
