"""Ethernet: header codec and the learning switch's CAM table.

The switch has one port per link (a guest) plus the gateway, which is not a port but the
stack itself. Source MACs are learned per port; broadcast and multicast go to every other
port and to the gateway; unicast to the gateway MAC goes to the gateway only; unicast to a
learned MAC goes to its port; unicast to an unknown MAC is dropped and counted (flooding it
would leak one guest's traffic to all others).
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("!6s6sH")
HEADER_LEN = 14

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_VLAN = 0x8100

BROADCAST = b"\xff" * 6
ZERO_MAC = b"\x00" * 6


def is_multicast(mac: bytes) -> bool:
    """Group address (broadcast included): the I/G bit of the first octet."""
    return bool(mac[0] & 1)


def mac_to_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """'5a:94:ef:e4:0c:ee' or '5A-94-EF-E4-0C-EE' → 6 bytes; ValueError names the input."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"bad MAC address {text!r}: expected six hex pairs like 5a:94:ef:e4:0c:ee")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"bad MAC address {text!r}: not hexadecimal") from None


def build_frame(dst: bytes, src: bytes, ethertype: int, payload: bytes | bytearray) -> bytes:
    return HEADER.pack(dst, src, ethertype) + payload


class CamTable:
    """MAC → port, learned from source addresses; a MAC that moves is re-learned."""

    __slots__ = ("_ports", "max_entries")

    def __init__(self, max_entries: int = 4096) -> None:
        self._ports: dict[bytes, int] = {}
        self.max_entries = max_entries

    def learn(self, mac: bytes, port: int) -> bool:
        """Record `mac` on `port`; True when this is new (or moved) information."""
        old = self._ports.get(mac)
        if old == port:
            return False
        if old is None and len(self._ports) >= self.max_entries:
            return False  # bounded: a guest spraying random MACs cannot grow us without limit
        self._ports[mac] = port
        return True

    def lookup(self, mac: bytes) -> int | None:
        return self._ports.get(mac)

    def forget_port(self, port: int) -> list[bytes]:
        gone = [m for m, p in self._ports.items() if p == port]
        for m in gone:
            del self._ports[m]
        return gone

    def macs(self, port: int) -> list[bytes]:
        return [m for m, p in self._ports.items() if p == port]

    def __len__(self) -> int:
        return len(self._ports)
