"""IPv4 (RFC 791): header validation, fragment reassembly and fragmentation.

Inbound (guest → stack): `parse_ipv4` checks version, header length, total length (Ethernet
padding beyond it is trimmed) and the header checksum; anything wrong raises `Ipv4Error`
with a short reason that becomes a drop counter. Fragments go to the `Reassembler`, which
copies each out of its frame, charges it its length plus a fixed overhead (and each partial
datagram an overhead of its own) against `max_bytes`, holds at most `max_partials` partial
datagrams and forgets one after `timeout` seconds (Linux's ipfrag_time is 30 s) from a
deadline heap. Zero-length and overlapping fragments drop the whole datagram, as Linux does
(and RFC 5722 requires for IPv6): overlaps are how fragment attacks smuggle headers.

Outbound (stack → guest): `build_ipv4` fills a header from a precompiled struct;
`fragment` splits a datagram larger than the guest's MTU at 8-byte boundaries.
It never loops over payload bytes in Python.
"""

from __future__ import annotations

import heapq
import struct
from dataclasses import dataclass, field

from netferry.hostd.stack.checksum import checksum, ones_sum

HEADER = struct.Struct("!BBHHHBBH4s4s")
HEADER_LEN = 20

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

FLAG_DF = 0x4000
FLAG_MF = 0x2000
OFFSET_MASK = 0x1FFF


class Ipv4Error(ValueError):
    """A malformed IPv4 packet; `args[0]` is the counter name for the reason."""


@dataclass(slots=True)
class Ipv4Packet:
    src: bytes
    dst: bytes
    proto: int
    ttl: int
    ident: int
    flags_offset: int
    tos: int
    header: bytes  # the header as received (options included): ICMP errors quote it
    payload: bytes | memoryview

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags_offset & (FLAG_MF | OFFSET_MASK))

    @property
    def raw(self) -> bytes:
        return self.header + self.payload

    @property
    def quote(self) -> bytes:
        """What an ICMP error about this packet quotes: its header and 8 bytes of payload."""
        return self.header + bytes(self.payload[:8])


def parse_ipv4(data: bytes | memoryview) -> Ipv4Packet:
    n = len(data)
    if n < HEADER_LEN:
        raise Ipv4Error("ipv4_truncated")
    ver_ihl, tos, total, ident, flags_offset, ttl, proto, _csum, src, dst = HEADER.unpack_from(data)
    if ver_ihl >> 4 != 4:
        raise Ipv4Error("ipv4_bad_version")
    hlen = (ver_ihl & 0x0F) * 4
    if hlen < HEADER_LEN or hlen > n:
        raise Ipv4Error("ipv4_bad_header_length")
    if total < hlen or total > n:
        raise Ipv4Error("ipv4_bad_total_length")
    header = bytes(data[:hlen])
    if ones_sum(header) != 0xFFFF:
        raise Ipv4Error("ipv4_bad_checksum")
    if flags_offset & 0x8000:
        raise Ipv4Error("ipv4_reserved_flag")
    # The payload is a slice of `data`: a view (no copy) when `data` is a memoryview.
    return Ipv4Packet(src, dst, proto, ttl, ident, flags_offset, tos, header, data[hlen:total])


def build_header(
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    ident: int = 0,
    ttl: int = 64,
    tos: int = 0,
    flags_offset: int = 0,
) -> bytes:
    """Just the 20-byte header, for callers that join header and payload themselves."""
    header = HEADER.pack(
        0x45, tos, HEADER_LEN + payload_len, ident, flags_offset, ttl, proto, 0, src, dst
    )
    return header[:10] + checksum(header).to_bytes(2, "big") + header[12:]


def build_ipv4(
    src: bytes,
    dst: bytes,
    proto: int,
    payload: bytes | bytearray,
    ident: int = 0,
    ttl: int = 64,
    tos: int = 0,
    flags_offset: int = 0,
) -> bytes:
    return build_header(src, dst, proto, len(payload), ident, ttl, tos, flags_offset) + payload


def fragment(
    src: bytes,
    dst: bytes,
    proto: int,
    payload: bytes,
    mtu: int,
    ident: int,
    ttl: int = 64,
    tos: int = 0,
) -> list[bytes]:
    """The datagram as one packet if it fits `mtu`, else as fragments of at most `mtu`."""
    if HEADER_LEN + len(payload) <= mtu:
        return [build_ipv4(src, dst, proto, payload, ident, ttl, tos)]
    step = (mtu - HEADER_LEN) & ~7
    if step <= 0:
        raise ValueError(f"MTU {mtu} too small to fragment")
    out = []
    view = memoryview(payload)
    for off in range(0, len(payload), step):
        chunk = view[off : off + step]
        more = FLAG_MF if off + step < len(payload) else 0
        out.append(build_ipv4(src, dst, proto, bytes(chunk), ident, ttl, tos, more | (off >> 3)))
    return out


# What a held fragment and a partial datagram cost beyond their data (Python objects, dict
# slots, the heap entry), charged against the budget so that empty or tiny fragments are
# not free: 300,000 zero-length fragments once took 300 MiB while counting as 0 bytes.
FRAGMENT_OVERHEAD = 128
PARTIAL_OVERHEAD = 640


@dataclass(slots=True)
class _Partial:
    first_header: bytes | None = None
    pieces: dict[int, bytes] = field(default_factory=dict)  # offset in bytes -> data (a copy)
    total: int | None = None  # payload length, known once the last fragment arrived
    size: int = 0  # payload bytes held
    charge: int = PARTIAL_OVERHEAD  # what this partial costs against the budget
    deadline: float = 0.0


_Key = tuple[bytes, bytes, int, int]


class Reassembler:
    """Joins IPv4 fragments; bounded by what it holds, by partial datagrams and by time.

    Every fragment is copied out of its frame (a view would keep a 64 KiB frame alive for
    an 8-byte fragment) and charged its length plus `FRAGMENT_OVERHEAD`; every partial
    datagram is charged `PARTIAL_OVERHEAD`. The sum never exceeds `max_bytes` and there
    are at most `max_partials` partial datagrams: a new one evicts the oldest. Deadlines sit
    in a heap (oldest first, as every partial lives `timeout`), so a flush touches only
    the expired ones; entries of partials that completed early are skipped when reached,
    and the heap is rebuilt when they outnumber the live ones."""

    def __init__(
        self, max_bytes: int = 4 << 20, timeout: float = 30.0, max_partials: int = 4096
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_partials = max_partials
        self._partials: dict[_Key, _Partial] = {}
        self._deadlines: list[tuple[float, int, _Key, _Partial]] = []
        self._seq = 0
        self._held = 0
        self._counts = {
            "fragments": 0,
            "reassembled": 0,
            "overlap_dropped": 0,
            "timeout_dropped": 0,
            "memory_dropped": 0,
            "partials_dropped": 0,  # evicted for a new one at `max_partials`
            "empty_dropped": 0,  # zero-length fragments (Linux discards the datagram too)
            "too_big_dropped": 0,
        }

    def __len__(self) -> int:
        return len(self._partials)

    @property
    def stats(self) -> dict[str, int]:
        """The counters, and what is held now (`held_bytes`, `partials`)."""
        return dict(self._counts, held_bytes=self._held, partials=len(self._partials))

    @property
    def held_bytes(self) -> int:
        """What the partial datagrams cost against `max_bytes`, overheads included."""
        return self._held

    def add(self, pkt: Ipv4Packet, now: float) -> Ipv4Packet | None:
        """Feed a fragment; returns the whole datagram once complete."""
        stats = self._counts
        stats["fragments"] += 1
        key = (pkt.src, pkt.dst, pkt.proto, pkt.ident)
        offset = (pkt.flags_offset & OFFSET_MASK) * 8
        more = bool(pkt.flags_offset & FLAG_MF)
        data = pkt.payload
        end = offset + len(data)
        if end > 65535 - HEADER_LEN:
            stats["too_big_dropped"] += 1
            self._drop(key)
            return None
        if not data:
            stats["empty_dropped"] += 1
            self._drop(key)
            return None
        if more and len(data) % 8:
            stats["overlap_dropped"] += 1  # a non-final fragment must be 8-byte aligned
            self._drop(key)
            return None
        cost = len(data) + FRAGMENT_OVERHEAD
        part = self._partials.get(key)
        if part is None:
            if cost + PARTIAL_OVERHEAD > self.max_bytes:
                stats["memory_dropped"] += 1
                return None
            if len(self._partials) >= self.max_partials:
                self._evict_oldest(None, "partials_dropped")
            if self._held + cost + PARTIAL_OVERHEAD > self.max_bytes:
                self._make_room(cost + PARTIAL_OVERHEAD, None)
            part = _Partial(deadline=now + self.timeout)
            self._partials[key] = part
            self._held += PARTIAL_OVERHEAD
            self._seq += 1
            heapq.heappush(self._deadlines, (part.deadline, self._seq, key, part))
        elif self._held + cost > self.max_bytes:
            self._make_room(cost, key)
            if self._held + cost > self.max_bytes:
                stats["memory_dropped"] += 1
                self._drop(key)
                return None
        if not more:
            if (part.total is not None and part.total != end) or any(
                o + len(d) > end for o, d in part.pieces.items()
            ):  # two different ends, or data already held beyond this end
                stats["overlap_dropped"] += 1
                self._drop(key)
                return None
            part.total = end
        for o, d in part.pieces.items():
            if offset < o + len(d) and o < end:
                if o == offset and d == data:
                    return None  # an exact duplicate is harmless
                stats["overlap_dropped"] += 1
                self._drop(key)
                return None
        if part.total is not None and end > part.total:
            stats["overlap_dropped"] += 1
            self._drop(key)
            return None
        part.pieces[offset] = bytes(data)  # a copy: never a view into the whole frame
        part.size += len(data)
        part.charge += cost
        self._held += cost
        if offset == 0:
            part.first_header = pkt.header
        if part.total is None or part.size != part.total or part.first_header is None:
            return None
        del self._partials[key]
        self._held -= part.charge
        payload = b"".join(part.pieces[o] for o in sorted(part.pieces))
        stats["reassembled"] += 1
        self._maybe_compact()
        return Ipv4Packet(
            pkt.src, pkt.dst, pkt.proto, pkt.ttl, pkt.ident, 0, pkt.tos, part.first_header, payload
        )

    def expire(self, now: float) -> int:
        heap = self._deadlines
        gone = 0
        while heap and heap[0][0] <= now:
            _, _, key, part = heapq.heappop(heap)
            if self._partials.get(key) is part:
                self._drop(key)
                gone += 1
        self._counts["timeout_dropped"] += gone
        return gone

    def next_deadline(self) -> float | None:
        heap = self._deadlines
        while heap and self._partials.get(heap[0][2]) is not heap[0][3]:
            heapq.heappop(heap)  # a partial that completed or was dropped early
        return heap[0][0] if heap else None

    def _drop(self, key: _Key) -> None:
        part = self._partials.pop(key, None)
        if part is not None:
            self._held -= part.charge
            self._maybe_compact()

    def _maybe_compact(self) -> None:
        """Bound the heap by the live partials: rebuild it when stale entries dominate."""
        if len(self._deadlines) > 2 * len(self._partials) + 64:
            self._deadlines = [e for e in self._deadlines if self._partials.get(e[2]) is e[3]]
            heapq.heapify(self._deadlines)

    def _evict_oldest(self, keep: _Key | None, reason: str) -> bool:
        """Drop the oldest partial datagram other than `keep`; False when there is none."""
        heap = self._deadlines
        while heap:
            _, _, key, part = heap[0]
            if self._partials.get(key) is not part:
                heapq.heappop(heap)
                continue
            if key == keep:
                return False  # `keep` is the oldest: nothing older to give way
            heapq.heappop(heap)
            self._drop(key)
            self._counts[reason] += 1
            return True
        return False

    def _make_room(self, need: int, keep: _Key | None) -> None:
        while self._held + need > self.max_bytes and self._evict_oldest(keep, "memory_dropped"):
            pass
