"""Ethernet: header codec and the learning switch's CAM table.

The switch has one port per link (a guest) plus the gateway, which is not a port but the
stack itself. Source MACs are learned per port; broadcast and multicast go to every other
port and to the gateway; unicast to the gateway MAC goes to the gateway only; unicast to a
learned MAC goes to its port; unicast to an unknown MAC is dropped and counted (flooding it
would leak one guest's traffic to all others). The CAM table ages its entries and, with
port security, bounds the MACs per port and refuses a MAC another port holds.
"""

from __future__ import annotations

import struct
from collections import Counter, OrderedDict

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
    """MAC → port, learned from source addresses, bounded in entries and per port.

    `learn(mac, port, now)` says whether a frame with that source may pass. Entries age: a
    MAC not seen for `max_age` seconds may be replaced (by a new MAC on a full port or table)
    or move to another port; a fresh one stays where it is (forwarding to a quiet guest keeps
    working, aging only makes room). With `secure` (port security), a MAC held fresh by one
    port cannot be taken by another (MAC theft) and a port learns at most `max_per_port`
    MACs (a guest spraying random MACs cannot fill the table for everyone); refusals are
    counted in `stats` by reason and the frame is dropped. Without it (setups that bridge
    many MACs through one port), MACs move freely and only `max_entries` bounds the table.
    """

    __slots__ = (
        "_ports",
        "_seen",
        "last_refusal",
        "max_age",
        "max_entries",
        "max_per_port",
        "secure",
        "stats",
    )

    REFRESH = 1.0  # a MAC's last-seen time moves at most this often (the per-frame cost)

    def __init__(
        self,
        max_entries: int = 4096,
        max_per_port: int = 0,
        max_age: float = 300.0,
        secure: bool = False,
        stats: Counter[str] | None = None,
    ) -> None:
        self._ports: dict[bytes, int] = {}
        # Per port: MAC → last seen, least recently seen first.
        self._seen: dict[int, OrderedDict[bytes, float]] = {}
        self.max_entries = max_entries
        self.max_per_port = max_per_port if secure else 0
        self.max_age = max_age
        self.secure = secure
        # mac_learned, mac_moved, mac_aged_out; mac_theft_dropped (a MAC another port holds
        # fresh), port_mac_limit_dropped (a new MAC on a port at its limit), cam_full_dropped
        # (a new MAC with the whole table fresh). May be the switch's own counters.
        self.stats: Counter[str] = Counter() if stats is None else stats
        self.last_refusal = ""  # the counter of the latest refusal, for the caller's log

    def learn(self, mac: bytes, port: int, now: float = 0.0) -> bool:
        """Record `mac` as seen on `port`; False when the frame must be dropped."""
        old = self._ports.get(mac)
        if old == port:
            seen = self._seen[port]
            if now - seen[mac] >= self.REFRESH:
                seen[mac] = now
                seen.move_to_end(mac)
            return True
        stats = self.stats
        if old is not None:
            if self.secure and now - self._seen[old][mac] < self.max_age:
                stats["mac_theft_dropped"] += 1
                self.last_refusal = "mac_theft_dropped"
                return False
            del self._seen[old][mac]
            del self._ports[mac]
            stats["mac_moved"] += 1
        seen = self._seen.get(port)
        if seen is None:
            seen = self._seen[port] = OrderedDict()
        if self.max_per_port and len(seen) >= self.max_per_port:
            oldest, last = next(iter(seen.items()))
            if now - last < self.max_age:
                stats["port_mac_limit_dropped"] += 1
                self.last_refusal = "port_mac_limit_dropped"
                return False
            self._age_out(oldest, port)
        if len(self._ports) >= self.max_entries and not self._age_out_oldest(now):
            stats["cam_full_dropped"] += 1
            self.last_refusal = "cam_full_dropped"
            return False
        self._ports[mac] = port
        seen[mac] = now
        stats["mac_learned"] += 1
        return True

    def _age_out(self, mac: bytes, port: int) -> None:
        del self._seen[port][mac]
        del self._ports[mac]
        self.stats["mac_aged_out"] += 1

    def _age_out_oldest(self, now: float) -> bool:
        """Make room in a full table: the least recently seen MAC goes if it has aged."""
        best: tuple[float, bytes, int] | None = None
        for port, seen in self._seen.items():  # one look per port: the oldest is first
            if seen:
                mac, last = next(iter(seen.items()))
                if best is None or last < best[0]:
                    best = (last, mac, port)
        if best is None or now - best[0] < self.max_age:
            return False
        self._age_out(best[1], best[2])
        return True

    def lookup(self, mac: bytes) -> int | None:
        return self._ports.get(mac)

    def forget_port(self, port: int) -> list[bytes]:
        gone = list(self._seen.pop(port, ()))
        for m in gone:
            del self._ports[m]
        return gone

    def macs(self, port: int) -> list[bytes]:
        return list(self._seen.get(port, ()))

    def __len__(self) -> int:
        return len(self._ports)
