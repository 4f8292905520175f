"""IPv6 (RFC 8200): header and extension-header walking, fragment reassembly and fragmentation.

Inbound (guest → stack): `parse_ipv6` checks the version and the payload length (Ethernet
padding beyond it is trimmed), then walks the extension headers with bounds: hop-by-hop (first
only), destination options, routing and fragment, at most `MAX_EXTENSION_HEADERS` of them.
Options are walked too, and their type's top two bits decide an unknown option's fate
(RFC 8200 4.2). What is merely malformed raises `Ipv6Error` (a drop counter name); what RFC
8200 answers with an ICMPv6 parameter problem raises its subclass `Ipv6ParamProblem`, which
carries the code and the pointer (offset from the start of the IPv6 header) that the caller
puts into `icmpv6.build_error`. An upper-layer protocol the caller does not serve
(`upper_protocols`) is such a parameter problem (code 1, unrecognised next header).

A fragment stops the walk: the packet comes back with `fragment` set and the fragment's data
as its payload, and goes to the `Reassembler`. The reassembler rebuilds the datagram (the
unfragmentable part of the first fragment, the fragment header removed) and parses it again,
so callers see one shape whether a datagram came whole or in pieces. Its bounds: overlapping
fragments discard the whole datagram (RFC 5722); a byte budget per datagram and one global
count what is actually held, each fragment charged `FRAGMENT_OVERHEAD` on top of its data so
that zero-length fragments are not free; at most `max_datagrams` partial datagrams; each
expires `timeout` seconds after its first fragment (a deadline heap, lazily cleaned and
compacted when stale entries dominate), and
`expire` hands back the first fragment of each so the caller can send "fragment reassembly
time exceeded". An atomic fragment (offset 0, M clear: RFC 6946) is processed on its own,
never mixed with a queue of the same identification.

Outbound (stack → guest): `build_header`/`build_ipv6` fill a header from a precompiled struct
(flow label and traffic class are passed through); `fragment` splits a datagram larger than
the guest's MTU at 8-byte boundaries, each fragment with a fragment header. It never loops
over payload bytes in Python.
"""

from __future__ import annotations

import heapq
import struct
from dataclasses import dataclass, field

HEADER = struct.Struct("!IHBB16s16s")  # version/class/flow, payload length, next, hops, src, dst
HEADER_LEN = 40
FRAGMENT_HEADER = struct.Struct("!BBHI")  # next header, reserved, offset|res|M, identification
FRAGMENT_HEADER_LEN = 8
MIN_MTU = 1280  # RFC 8200 5: every IPv6 link carries at least this
MAX_PAYLOAD = 65535
MAX_ERROR_QUOTE = MIN_MTU - HEADER_LEN - 8  # an ICMPv6 error's quote within 1280 bytes

# Next header values.
NH_HOP_BY_HOP = 0
NH_TCP = 6
NH_UDP = 17
NH_ROUTING = 43
NH_FRAGMENT = 44
NH_ESP = 50
NH_AH = 51
NH_ICMPV6 = 58
NH_NONE = 59
NH_DEST_OPTS = 60

EXTENSION_HEADERS = frozenset({NH_HOP_BY_HOP, NH_ROUTING, NH_FRAGMENT, NH_DEST_OPTS})
UPPER_PROTOCOLS = frozenset({NH_TCP, NH_UDP, NH_ICMPV6})
MAX_EXTENSION_HEADERS = 8  # Linux accepts more, but no legitimate guest sends this many
# The least of each upper-layer header a first fragment must carry (RFC 7112).
_MIN_UPPER_LEN = {NH_TCP: 20, NH_UDP: 8, NH_ICMPV6: 4}

# Parameter problem codes (RFC 4443 3.4, RFC 7112).
PP_ERRONEOUS_FIELD = 0
PP_UNRECOGNIZED_NEXT_HEADER = 1
PP_UNRECOGNIZED_OPTION = 2
PP_INCOMPLETE_CHAIN = 3

OPT_PAD1 = 0
OPT_PADN = 1

UNSPECIFIED = bytes(16)
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
ALL_ROUTERS = bytes.fromhex("ff020000000000000000000000000002")
ALL_DHCP_SERVERS = bytes.fromhex("ff020000000000000000000000010002")  # ff02::1:2


class Ipv6Error(ValueError):
    """A malformed IPv6 packet; `args[0]` is the counter name for the reason."""


class Ipv6ParamProblem(Ipv6Error):
    """A packet RFC 8200 answers with an ICMPv6 parameter problem (`code`, `pointer`)."""

    def __init__(self, reason: str, code: int, pointer: int) -> None:
        super().__init__(reason)
        self.code = code
        self.pointer = pointer


@dataclass(slots=True, frozen=True)
class FragmentInfo:
    ident: int
    offset: int  # in bytes
    more: bool
    header_offset: int  # where the fragment header starts: the unfragmentable part ends here
    next_header: int  # the next header field of the fragment header


@dataclass(slots=True)
class Ipv6Packet:
    src: bytes
    dst: bytes
    next_header: int  # the upper-layer protocol (or NH_FRAGMENT's next header, for fragments)
    hop_limit: int
    traffic_class: int
    flow_label: int
    header: bytes  # fixed header and extension headers as received (up to the payload)
    payload: bytes | memoryview  # the upper-layer message, or the fragment's data
    fragment: FragmentInfo | None = None
    raw: bytes | memoryview = b""  # the whole packet (no Ethernet padding): ICMPv6 errors quote it
    reassembled: bool = False  # rebuilt from fragments (atomic ones too): NDP must refuse it

    @property
    def is_fragment(self) -> bool:
        return self.fragment is not None

    @property
    def ttl(self) -> int:
        """The hop limit, under the name the transport layer reads for either family."""
        return self.hop_limit

    @property
    def quote(self) -> bytes:
        """What an ICMPv6 error about this packet quotes: as much of it as fits 1280 bytes
        (RFC 4443 2.4(c)), the header chain and the transport ports included."""
        return bytes(self.raw[:MAX_ERROR_QUOTE])


def is_multicast(addr: bytes) -> bool:
    return addr[0] == 0xFF


def is_link_local(addr: bytes) -> bool:
    return addr[0] == 0xFE and addr[1] & 0xC0 == 0x80


def solicited_node(addr: bytes) -> bytes:
    """ff02::1:ffXX:XXXX for `addr` (RFC 4291 2.7.1): where neighbour solicitations go."""
    return bytes.fromhex("ff0200000000000000000001ff") + addr[13:]


def multicast_mac(addr: bytes) -> bytes:
    """33:33 + the low 32 bits of the group (RFC 2464 7)."""
    return b"\x33\x33" + addr[12:]


def eui64_interface_id(mac: bytes) -> bytes:
    """Modified EUI-64 interface identifier of a MAC (RFC 4291 appendix A)."""
    return bytes([mac[0] ^ 0x02]) + mac[1:3] + b"\xff\xfe" + mac[3:6]


def link_local_from_mac(mac: bytes) -> bytes:
    return b"\xfe\x80" + bytes(6) + eui64_interface_id(mac)


def forward_hop_limit(hop_limit: int) -> int | None:
    """The hop limit after this hop, or None when the packet must die (time exceeded, code 0)."""
    return hop_limit - 1 if hop_limit > 1 else None


def parse_ipv6(
    data: bytes | memoryview, upper_protocols: frozenset[int] = UPPER_PROTOCOLS
) -> Ipv6Packet:
    n = len(data)
    if n < HEADER_LEN:
        raise Ipv6Error("ipv6_truncated")
    vtf, plen, nh, hops, src, dst = HEADER.unpack_from(data)
    if vtf >> 28 != 6:
        raise Ipv6Error("ipv6_bad_version")
    if plen == 0 and nh == NH_HOP_BY_HOP:
        raise Ipv6Error("ipv6_jumbogram")  # RFC 2675: never on a link of ours
    end = HEADER_LEN + plen
    if end > n:
        raise Ipv6Error("ipv6_bad_payload_length")
    if is_multicast(src):
        raise Ipv6Error("ipv6_multicast_source")
    raw = data if end == n else data[:end]  # no copy unless Ethernet padding follows
    nh_ptr = 6  # where the field naming the current header is, for parameter problems
    off = HEADER_LEN
    count = 0
    frag: FragmentInfo | None = None
    while nh in EXTENSION_HEADERS:
        count += 1
        if count > MAX_EXTENSION_HEADERS:
            raise Ipv6Error("ipv6_too_many_extensions")
        if nh == NH_HOP_BY_HOP and off != HEADER_LEN:
            raise Ipv6ParamProblem("ipv6_misplaced_hop_by_hop", PP_UNRECOGNIZED_NEXT_HEADER, nh_ptr)
        if nh == NH_FRAGMENT:
            frag = _fragment_header(data, off, end, plen)
            if frag.offset == 0:
                _check_first_fragment(data, off + FRAGMENT_HEADER_LEN, end, frag.next_header)
            header = bytes(data[: off + FRAGMENT_HEADER_LEN])
            return Ipv6Packet(
                src, dst, frag.next_header, hops, (vtf >> 20) & 0xFF, vtf & 0xFFFFF, header,
                data[off + FRAGMENT_HEADER_LEN : end], frag, raw,
            )  # fmt: skip
        if off + 2 > end:
            raise Ipv6Error("ipv6_truncated_extension")
        ext_len = (data[off + 1] + 1) * 8
        if off + ext_len > end:
            raise Ipv6Error("ipv6_truncated_extension")
        if nh == NH_ROUTING:
            if data[off + 3]:  # segments left: we are the final destination of nothing routed
                raise Ipv6ParamProblem("ipv6_routing_header", PP_ERRONEOUS_FIELD, off + 2)
        else:
            _walk_options(data, off, off + ext_len, dst)
        nh_ptr = off
        nh = data[off]
        off += ext_len
    if nh != NH_NONE and nh not in upper_protocols:
        raise Ipv6ParamProblem("ipv6_unknown_next_header", PP_UNRECOGNIZED_NEXT_HEADER, nh_ptr)
    return Ipv6Packet(
        src, dst, nh, hops, (vtf >> 20) & 0xFF, vtf & 0xFFFFF, bytes(data[:off]),
        data[off:end], None, raw,
    )  # fmt: skip


def _fragment_header(data: bytes | memoryview, off: int, end: int, plen: int) -> FragmentInfo:
    if off + FRAGMENT_HEADER_LEN > end:
        raise Ipv6Error("ipv6_truncated_extension")
    nh, _res, offset_flags, ident = FRAGMENT_HEADER.unpack_from(data, off)
    offset = offset_flags & 0xFFF8
    more = bool(offset_flags & 1)
    frag_len = end - off - FRAGMENT_HEADER_LEN
    if more and frag_len % 8:
        # RFC 8200 4.5: a non-final fragment not a multiple of 8 long; point at payload length
        raise Ipv6ParamProblem("ipv6_fragment_not_aligned", PP_ERRONEOUS_FIELD, 4)
    if off - HEADER_LEN + offset + frag_len > MAX_PAYLOAD:
        raise Ipv6ParamProblem("ipv6_fragment_too_big", PP_ERRONEOUS_FIELD, off + 2)
    if more and frag_len == 0:
        raise Ipv6Error("ipv6_fragment_empty")
    return FragmentInfo(ident, offset, more, off, nh)


def _check_first_fragment(data: bytes | memoryview, off: int, end: int, nh: int) -> None:
    """RFC 7112: the first fragment holds the whole header chain and the upper-layer header."""
    for _ in range(MAX_EXTENSION_HEADERS):
        if nh == NH_FRAGMENT:
            raise Ipv6Error("ipv6_nested_fragment")
        if nh not in EXTENSION_HEADERS:
            break
        if off + 2 > end or off + (data[off + 1] + 1) * 8 > end:
            raise Ipv6ParamProblem("ipv6_incomplete_chain", PP_INCOMPLETE_CHAIN, 0)
        nh, off = data[off], off + (data[off + 1] + 1) * 8
    else:
        raise Ipv6Error("ipv6_too_many_extensions")
    if off + _MIN_UPPER_LEN.get(nh, 0) > end:
        raise Ipv6ParamProblem("ipv6_incomplete_chain", PP_INCOMPLETE_CHAIN, 0)


def _walk_options(data: bytes | memoryview, start: int, end: int, dst: bytes) -> None:
    """Hop-by-hop or destination options (RFC 8200 4.2): TLVs, unknown ones by their action bits."""
    i = start + 2
    while i < end:
        kind = data[i]
        if kind == OPT_PAD1:
            i += 1
            continue
        if i + 2 > end or i + 2 + data[i + 1] > end:
            raise Ipv6Error("ipv6_bad_option_length")
        if kind != OPT_PADN:
            action = kind >> 6
            if action == 1:
                raise Ipv6Error("ipv6_unknown_option")
            if action == 2 or (action == 3 and not is_multicast(dst)):
                raise Ipv6ParamProblem("ipv6_unknown_option", PP_UNRECOGNIZED_OPTION, i)
            if action == 3:
                raise Ipv6Error("ipv6_unknown_option")
            # action 0 (skip) also covers options we know but have no use for (router alert)
        i += 2 + data[i + 1]


def build_header(
    src: bytes,
    dst: bytes,
    next_header: int,
    payload_len: int,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    """Just the 40-byte header, for callers that join header and payload themselves."""
    vtf = 0x60000000 | (traffic_class & 0xFF) << 20 | (flow_label & 0xFFFFF)
    return HEADER.pack(vtf, payload_len, next_header, hop_limit, src, dst)


def build_ipv6(
    src: bytes,
    dst: bytes,
    next_header: int,
    payload: bytes | bytearray,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    hdr = build_header(src, dst, next_header, len(payload), hop_limit, traffic_class, flow_label)
    return hdr + payload


def fragment(
    src: bytes,
    dst: bytes,
    next_header: int,
    payload: bytes,
    mtu: int,
    ident: int,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> list[bytes]:
    """The datagram as one packet if it fits `mtu`, else as fragments of at most `mtu`."""
    if HEADER_LEN + len(payload) <= mtu:
        return [build_ipv6(src, dst, next_header, payload, hop_limit, traffic_class, flow_label)]
    if mtu < MIN_MTU:
        raise ValueError(f"MTU {mtu} is below IPv6's minimum {MIN_MTU}")
    if len(payload) > MAX_PAYLOAD - FRAGMENT_HEADER_LEN:
        raise ValueError(f"datagram of {len(payload)} bytes is too big for IPv6")
    step = (mtu - HEADER_LEN - FRAGMENT_HEADER_LEN) & ~7
    out = []
    view = memoryview(payload)
    total = len(payload)
    for off in range(0, total, step):
        chunk = view[off : off + step]
        more = 1 if off + step < total else 0
        hdr = build_header(
            src, dst, NH_FRAGMENT, FRAGMENT_HEADER_LEN + len(chunk), hop_limit,
            traffic_class, flow_label,
        )  # fmt: skip
        out.append(hdr + FRAGMENT_HEADER.pack(next_header, 0, off | more, ident) + chunk)
    return out


# Charged per fragment on top of its data: the dict entry and the bytes object it takes.
FRAGMENT_OVERHEAD = 128


@dataclass(slots=True)
class _Partial:
    deadline: float
    unfragmentable: bytes | None = None  # fixed header + extensions before the fragment header
    first: bytes | None = None  # the first fragment as received, quoted by time exceeded
    next_header: int = 0
    pieces: dict[int, bytes] = field(default_factory=dict)  # offset in bytes -> data
    total: int | None = None  # fragmentable length, known once the last fragment arrived
    received: int = 0  # data bytes
    charged: int = 0  # bytes counted against the budgets


class Reassembler:
    """Joins IPv6 fragments; bounded by bytes held (global and per datagram), count and time."""

    def __init__(
        self,
        max_bytes: int = 4 << 20,
        timeout: float = 60.0,  # RFC 8200 4.5: 60 s
        max_datagrams: int = 256,
        max_datagram_bytes: int = 256 << 10,
        upper_protocols: frozenset[int] = UPPER_PROTOCOLS,
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_datagrams = max_datagrams
        self.max_datagram_bytes = max_datagram_bytes
        self.upper_protocols = upper_protocols
        self._partials: dict[tuple[bytes, bytes, int], _Partial] = {}
        self._deadlines: list[tuple[float, int, tuple[bytes, bytes, int]]] = []
        self._seq = 0
        self._held = 0
        self.stats = {
            "fragments": 0,
            "reassembled": 0,
            "atomic": 0,
            "duplicates": 0,
            "overlap_dropped": 0,
            "timeout_dropped": 0,
            "memory_dropped": 0,
            "datagram_budget_dropped": 0,
            "too_many_dropped": 0,
            "too_big_dropped": 0,
            "malformed_dropped": 0,
        }

    def __len__(self) -> int:
        return len(self._partials)

    @property
    def held_bytes(self) -> int:
        return self._held

    def add(self, pkt: Ipv6Packet, now: float) -> Ipv6Packet | None:
        """Feed a fragment (a packet with `fragment` set); the whole datagram once complete.

        The datagram returned is parsed again, so it can raise `Ipv6Error`/`Ipv6ParamProblem`
        for a header chain that only the reassembled packet shows."""
        frag = pkt.fragment
        if frag is None:
            return pkt
        self.stats["fragments"] += 1
        data = bytes(pkt.payload)
        if frag.offset == 0 and not frag.more:
            self.stats["atomic"] += 1  # RFC 6946: on its own, whatever else shares its ident
            return self._rebuild(pkt.header[: frag.header_offset], frag.next_header, data)
        key = (pkt.src, pkt.dst, frag.ident)
        offset, end = frag.offset, frag.offset + len(data)
        part = self._partials.get(key)
        if part is None:
            if len(self._partials) >= self.max_datagrams:
                self._evict_oldest()
                if len(self._partials) >= self.max_datagrams:
                    self.stats["too_many_dropped"] += 1
                    return None
            part = _Partial(deadline=now + self.timeout)
            self._partials[key] = part
            self._seq += 1
            heapq.heappush(self._deadlines, (part.deadline, self._seq, key))
        if not frag.more:
            if (part.total is not None and part.total != end) or any(
                o + len(d) > end for o, d in part.pieces.items()
            ):  # two different ends, or data already held beyond this end
                return self._overlap(key)
            part.total = end
        elif part.total is not None and end > part.total:
            return self._overlap(key)
        for o, d in part.pieces.items():
            if (offset < o + len(d) and o < end) or (o == offset and not data):
                if o == offset and d == data:
                    self.stats["duplicates"] += 1  # an exact duplicate is harmless
                    return None
                return self._overlap(key)
        cost = len(data) + FRAGMENT_OVERHEAD
        if offset == 0:
            unfrag = pkt.header[: frag.header_offset]
            quote = bytes(pkt.raw[: MIN_MTU - HEADER_LEN - 8])
            cost += len(unfrag) + len(quote)
        if part.charged + cost > self.max_datagram_bytes:
            self.stats["datagram_budget_dropped"] += 1
            self._drop(key)
            return None
        if self._held + cost > self.max_bytes:
            self._evict_oldest(cost, keep=key)
            if self._held + cost > self.max_bytes:
                self.stats["memory_dropped"] += 1
                self._drop(key)
                return None
        part.pieces[offset] = data
        part.received += len(data)
        part.charged += cost
        self._held += cost
        if offset == 0:
            part.unfragmentable, part.first, part.next_header = unfrag, quote, frag.next_header
        if part.total is None or part.received != part.total or part.unfragmentable is None:
            return None
        self._drop(key)
        payload = b"".join(part.pieces[o] for o in sorted(part.pieces))
        return self._rebuild(part.unfragmentable, part.next_header, payload)

    def _rebuild(self, unfragmentable: bytes, next_header: int, payload: bytes) -> Ipv6Packet:
        plen = len(unfragmentable) - HEADER_LEN + len(payload)
        if plen > MAX_PAYLOAD:
            self.stats["too_big_dropped"] += 1
            raise Ipv6Error("ipv6_reassembled_too_big")
        head = bytearray(unfragmentable)
        head[4:6] = plen.to_bytes(2, "big")
        # The fragment header's next header replaces it in the header chain: patch the field
        # that named the fragment header (the fixed header's or the last extension's).
        ptr, nh, off = 6, head[6], HEADER_LEN
        while off < len(head) and nh in EXTENSION_HEADERS:
            ptr, nh, off = off, head[off], off + (head[off + 1] + 1) * 8
        head[ptr] = next_header
        try:
            pkt = parse_ipv6(bytes(head) + payload, self.upper_protocols)
        except Ipv6Error:
            self.stats["malformed_dropped"] += 1
            raise
        self.stats["reassembled"] += 1
        pkt.reassembled = True
        return pkt

    def expire(self, now: float) -> list[bytes]:
        """Forget datagrams past their deadline; their first fragments (for time exceeded)."""
        quotes = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, _seq, key = heapq.heappop(self._deadlines)
            part = self._partials.get(key)
            if part is None or part.deadline != deadline:
                continue  # already gone (or a newer datagram under the same key)
            self._drop(key)
            self.stats["timeout_dropped"] += 1
            if part.first is not None:
                quotes.append(part.first)
        return quotes

    def next_deadline(self) -> float | None:
        while self._deadlines:
            deadline, _seq, key = self._deadlines[0]
            part = self._partials.get(key)
            if part is not None and part.deadline == deadline:
                return deadline
            heapq.heappop(self._deadlines)
        return None

    def _overlap(self, key: tuple[bytes, bytes, int]) -> None:
        self.stats["overlap_dropped"] += 1
        self._drop(key)
        return None

    def _drop(self, key: tuple[bytes, bytes, int]) -> None:
        part = self._partials.pop(key, None)
        if part is not None:
            self._held -= part.charged
            self._maybe_compact()

    def _maybe_compact(self) -> None:
        """Bound the heap by the live partials: entries leave only from the front, so one
        long-lived partial would pin every later stale entry; rebuild it when stale entries
        dominate (as the IPv4 reassembler does)."""
        if len(self._deadlines) > 2 * len(self._partials) + 64:
            partials = self._partials
            self._deadlines = [
                e for e in self._deadlines if (p := partials.get(e[2])) is not None
                and p.deadline == e[0]
            ]  # fmt: skip
            heapq.heapify(self._deadlines)

    def _evict_oldest(self, need: int = 0, keep: tuple[bytes, bytes, int] | None = None) -> None:
        """Drop the partial datagrams closest to their deadline until `need` more bytes fit
        (`need` 0: until one more datagram fits)."""
        for key in sorted(self._partials, key=lambda k: self._partials[k].deadline):
            if need and self._held + need <= self.max_bytes:
                return
            if not need and len(self._partials) < self.max_datagrams:
                return
            if key == keep:
                continue
            self._drop(key)
            self.stats["memory_dropped" if need else "too_many_dropped"] += 1
