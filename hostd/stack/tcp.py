"""Sans-IO TCP connection endpoint (RFC 9293), the peer of a guest kernel's TCP.

Theory of operation
===================

What it owns. One `TcpConnection` is one TCP connection between a guest (the *remote*,
usually a Linux kernel) and an address the guest connected to that hostd impersonates (the
*local* side). It owns the whole TCP state for that 4-tuple: sequence numbers, the send
buffer (bytes the host application gave us that the guest has not acknowledged yet), the
receive buffer (in-order bytes the guest sent that the application has not read yet), the
out-of-order store, the retransmission / persist / TIME_WAIT timers, congestion control,
and a queue of events for the application. It owns no socket, no clock and no task: the
caller feeds it parsed segments plus a `now` timestamp and collects the segments it wants
sent, the earliest timer deadline and events. Everything is deterministic: the same calls
with the same `now` values produce the same bytes.

How data moves.

* Guest -> host: the adapter parses an IPv4 or IPv6 packet, verifies the TCP checksum
  (`verify_segment_checksum`), `TcpSegment.parse`s it and calls `receive_segment`. In-order
  payload is appended to the receive buffer (copied; the caller's memoryview is not kept),
  out-of-order payload goes to a bounded store of merged runs and is spliced in when the
  hole fills. A `DataReceived` event says `read()` has bytes; `read()` frees receive buffer
  space, which reopens the window we advertise.
* Host -> guest: `send()` copies bytes into one `bytearray` whose first byte is always the
  oldest unacknowledged byte; ACKs delete from its front (O(1) in CPython). The
  `segments_to_send()` call cuts segments out of it through a memoryview (one copy per
  segment, when header and payload are joined), limited by the guest's advertised window,
  the congestion window and the effective MSS.
* Internally every sequence number is an unbounded integer *offset* from our ISN (send
  side) or the guest's ISN (receive side); wire values are `(isn + offset) & 0xFFFFFFFF`,
  and incoming wire values are mapped back with a signed 32-bit difference against a
  nearby reference. So modulo 2**32 arithmetic happens only at the edges, and comparisons
  inside are plain integer comparisons.

Who owns it. The transport layer (hostd/stack/transport.py) keeps connections by 4-tuple
and sets three typed fields: `key` (that 4-tuple), `app` (the `TcpApplication` driving the
connection from the host side: a NAT host socket, a gateway service, a port forward, a
tunnel; it gets every event through `on_event`) and `syn_quote` (what an ICMP error about
a failed dial quotes). Before each output it calls `set_offload` with the offload of the
port the guest sits on now, so segments follow the port they leave by.

Call pattern. For each batch of received segments: `receive_segment` for each, then
`segments_to_send` once (the pure ACK for the batch is coalesced there), then drain
`next_event`. After `send`/`read`/`close`/`abort`: `segments_to_send`. Whenever
`get_timer()` is reached: `handle_timer(now)` then `segments_to_send(now)`.

What it must never do. Send beyond the guest's advertised (scaled) window, except the one
segment a retransmission timeout forces (as Linux does; it doubles as a window probe);
shrink the right edge of the window it advertised; accept more than its buffers allow (the
send buffer, the receive buffer and the out-of-order store are all bounded); accept a RST
that is not exactly at `RCV.NXT` (RFC 5961); advertise options it does not implement
(timestamps, ECN); hold a reference to caller-owned buffers; do I/O or read a clock.

Supported: MSS, window scaling, SACK (both ways: we send SACK blocks for out-of-order data
and skip SACKed data when retransmitting in recovery), RFC 6298 RTO with Karn's rule,
NewReno fast retransmit / recovery (RFC 6582), zero-window probing, half-close, simultaneous
open/close, TIME_WAIT with SYN reuse. Not supported: timestamps/PAWS, ECN, urgent data
(URG is ignored, the data is delivered inline), TCP Fast Open, keepalive.
"""

from __future__ import annotations

import enum
import random
import struct
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from netferry.hostd.stack.checksum import checksum, ones_sum, verify_transport_v4

__all__ = [
    "ACK",
    "CWR",
    "ECE",
    "FIN",
    "PSH",
    "RST",
    "SYN",
    "URG",
    "Closed",
    "Connected",
    "ConnectionFailed",
    "ConnectionReset",
    "DataReceived",
    "PeerClosed",
    "SendSpaceAvailable",
    "TcpApplication",
    "TcpConnection",
    "TcpError",
    "TcpEvent",
    "TcpOptions",
    "TcpParseError",
    "TcpSegment",
    "TcpState",
    "TcpStateError",
    "TcpStats",
    "build_options",
    "build_reset_reply",
    "build_segment",
    "seq_diff",
    "verify_segment_checksum",
]

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

PROTO_TCP = 6
_MASK = 0xFFFFFFFF
_HALF = 0x80000000
_HDR = struct.Struct("!HHIIBBHHH")
_U16 = struct.Struct("!H")
_U32X2 = struct.Struct("!II")
_MAX_WSCALE = 14
_DEFAULT_PEER_MSS = 536  # RFC 9293 3.7.1: assumed when the SYN has no MSS option
_MIN_MSS = 64  # refuse absurdly small MSS values (Linux clamps similarly)
_MAX_SACK_BLOCKS = 4  # 4 * 8 + 2 + 2 NOPs = 36 <= 40 option bytes (no timestamps)
_MAX_OOO_RUNS = 4096  # bounds per-run object overhead in the out-of-order store

_rng = random.Random()


class TcpError(Exception):
    """Base class of errors raised by this module."""


class TcpParseError(TcpError, ValueError):
    """A segment is truncated or its data offset is impossible."""


class TcpStateError(TcpError, RuntimeError):
    """An application call that the connection's state does not allow."""


def seq_diff(a: int, b: int) -> int:
    """Signed distance `a - b` between two 32-bit sequence numbers (RFC 1982 style)."""
    return ((a - b + _HALF) & _MASK) - _HALF


# --------------------------------------------------------------------------- segments


@dataclass(frozen=True, slots=True)
class TcpOptions:
    """The TCP options this module understands; unknown options are skipped.

    `wscale` is already clamped to 14 (RFC 7323 2.3). `sack_blocks` are raw 32-bit
    (left, right) sequence numbers. `timestamps` is (TSval, TSecr); parsed, never used."""

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    sack_blocks: tuple[tuple[int, int], ...] = ()
    timestamps: tuple[int, int] | None = None


NO_OPTIONS = TcpOptions()


def _parse_options(opts: bytes | memoryview) -> TcpOptions:
    # Lenient like Linux's tcp_parse_options: a malformed option ends parsing, it does not
    # make the segment invalid.
    mss = wscale = None
    ts = None
    sackp = False
    blocks: list[tuple[int, int]] = []
    i = 0
    n = len(opts)
    while i < n:
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= n:
            break
        olen = opts[i + 1]
        if olen < 2 or i + olen > n:
            break
        if kind == 2 and olen == 4:
            mss = (opts[i + 2] << 8) | opts[i + 3]
        elif kind == 3 and olen == 3:
            wscale = min(opts[i + 2], _MAX_WSCALE)
        elif kind == 4 and olen == 2:
            sackp = True
        elif kind == 5 and olen >= 10 and (olen - 2) % 8 == 0:
            for j in range(i + 2, i + olen, 8):
                blocks.append(_U32X2.unpack_from(opts, j))
        elif kind == 8 and olen == 10:
            ts = _U32X2.unpack_from(opts, i + 2)
        i += olen
    return TcpOptions(mss, wscale, sackp, tuple(blocks), ts)


@dataclass(frozen=True, slots=True)
class TcpSegment:
    """A parsed TCP segment. `window` is the raw 16-bit field (unscaled). `payload` is a
    slice of the parsed buffer (bytes for bytes input, memoryview for memoryview input)."""

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    options: TcpOptions = NO_OPTIONS
    payload: bytes | memoryview = b""
    urgent: int = 0

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> TcpSegment:
        """Parse a TCP header + payload. Does not verify the checksum (that needs the IP
        addresses: see `verify_segment_checksum`). Raises `TcpParseError`."""
        n = len(data)
        if n < 20:
            raise TcpParseError(f"truncated TCP header: {n} bytes")
        sport, dport, seq, ack, off, flags, window, _csum, urg = _HDR.unpack_from(data, 0)
        hlen = (off >> 4) << 2
        if hlen < 20:
            raise TcpParseError(f"bad TCP data offset {hlen}")
        if hlen > n:
            raise TcpParseError(f"TCP data offset {hlen} beyond segment of {n} bytes")
        options = _parse_options(data[20:hlen]) if hlen > 20 else NO_OPTIONS
        payload = data[hlen:] if n > hlen else b""
        return cls(sport, dport, seq, ack, flags, window, options, payload, urg)

    @property
    def seg_len(self) -> int:
        """Sequence space consumed: payload length plus one for each of SYN and FIN."""
        return len(self.payload) + (self.flags & SYN and 1) + (self.flags & FIN)

    def __repr__(self) -> str:
        names = "".join(c for c, f in zip("FSRPAUEC", range(8), strict=True) if self.flags >> f & 1)
        return (
            f"TcpSegment({self.src_port}->{self.dst_port} [{names}] seq={self.seq} "
            f"ack={self.ack} win={self.window} len={len(self.payload)} {self.options})"
        )


def build_options(
    *,
    mss: int | None = None,
    wscale: int | None = None,
    sack_permitted: bool = False,
    sack_blocks: tuple[tuple[int, int], ...] | list[tuple[int, int]] = (),
    timestamps: tuple[int, int] | None = None,
) -> bytes:
    """Encode options, NOP-padded to a multiple of 4 bytes, in Linux's order."""
    parts: list[bytes] = []
    if mss is not None:
        parts.append(struct.pack("!BBH", 2, 4, min(mss, 0xFFFF)))
    if sack_permitted:
        parts.append(b"\x01\x01\x04\x02")
    if timestamps is not None:
        parts.append(struct.pack("!BBBBII", 1, 1, 8, 10, *timestamps))
    if wscale is not None:
        parts.append(struct.pack("!BBBB", 1, 3, 3, wscale))
    if sack_blocks:
        parts.append(struct.pack("!BBBB", 1, 1, 5, 2 + 8 * len(sack_blocks)))
        parts.extend(_U32X2.pack(left & _MASK, right & _MASK) for left, right in sack_blocks)
    return b"".join(parts)


def _build(
    pseudo: int,
    src_port: int,
    dst_port: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: bytes,
    payload: bytes | memoryview,
    urgent: int = 0,
    partial: bool = False,
) -> bytes:
    # `pseudo` is the ones' sum of src+dst addresses plus the protocol number; the length
    # word is added here. Summing header and payload separately avoids concatenating twice.
    # `partial` (checksum offload, virtio-net NEEDS_CSUM): the field holds only the folded
    # pseudo header sum and the guest kernel finishes it (CHECKSUM_PARTIAL): no payload sum.
    olen = len(options)
    hlen = 20 + olen
    off = (hlen >> 2) << 4
    s = pseudo + hlen + len(payload)
    if partial:
        s = (s & 0xFFFF) + (s >> 16)
        csum = (s & 0xFFFF) + (s >> 16)
    else:
        hdr = _HDR.pack(src_port, dst_port, seq, ack, off, flags, window, 0, urgent)
        csum = checksum(payload, s + ones_sum(hdr + options))
    hdr = _HDR.pack(src_port, dst_port, seq, ack, off, flags, window, csum, urgent)
    return b"".join((hdr, options, payload))


def _complete_checksum(seg: bytes) -> bytes:
    """A partial-checksum segment (the field holds the folded pseudo header sum) made whole:
    summing it as it is adds the pseudo header, so the complement is the full checksum."""
    csum = checksum(seg)
    return b"".join((seg[:16], _U16.pack(csum), seg[18:]))


def build_segment(
    src_ip: bytes,
    dst_ip: bytes,
    src_port: int,
    dst_port: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: bytes = b"",
    payload: bytes | memoryview = b"",
    *,
    urgent: int = 0,
) -> bytes:
    """A full TCP segment (header, options zero-padded to 4 bytes, payload) whose checksum
    covers the pseudo header for `src_ip` -> `dst_ip`: IPv4 (4-byte addresses) or IPv6
    (16-byte ones; RFC 8200 8.1's pseudo header sums to the same words: the addresses, the
    length and the protocol)."""
    if len(options) & 3:
        options = bytes(options) + b"\x00" * (4 - (len(options) & 3))
    if len(options) > 40:
        raise ValueError(f"TCP options too long: {len(options)} bytes")
    pseudo = ones_sum(bytes(src_ip) + bytes(dst_ip)) + PROTO_TCP
    return _build(
        pseudo,
        src_port,
        dst_port,
        seq & _MASK,
        ack & _MASK,
        flags & 0xFF,
        window & 0xFFFF,
        options,
        payload,
        urgent,
    )


def verify_segment_checksum(src_ip: bytes, dst_ip: bytes, data: bytes | memoryview) -> bool:
    """True when the TCP checksum of `data` (a whole segment) is valid for the addresses."""
    return verify_transport_v4(src_ip, dst_ip, PROTO_TCP, data)


def build_reset_reply(local_ip: bytes, remote_ip: bytes, seg: TcpSegment) -> bytes | None:
    """The RST answering `seg` (sent by `remote_ip` to `local_ip`) when no connection owns
    its 4-tuple (RFC 9293 3.10.7.1), or None for an incoming RST (never answer a RST)."""
    if seg.flags & RST:
        return None
    if seg.flags & ACK:
        return build_segment(local_ip, remote_ip, seg.dst_port, seg.src_port, seg.ack, 0, RST, 0)
    return build_segment(
        local_ip, remote_ip, seg.dst_port, seg.src_port, 0, seg.seq + seg.seg_len, RST | ACK, 0
    )


# --------------------------------------------------------------------------- send buffer


class _SendBuffer:
    """Bytes given to `send` and not yet acknowledged, as a deque of immutable chunks.

    A single bytearray made every `send` of a large buffer memmove the whole live region
    (CPython grows a bytearray with a consumed front by moving it): a third of hostd's time
    at 2 Gbit/s. Chunks are stored without copying when they are `bytes`, a segment is a
    zero-copy view when it lies in one chunk, and an ACK drops whole chunks."""

    __slots__ = ("_chunks", "_head", "_len")

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._head = 0  # bytes of _chunks[0] already acknowledged
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __enter__(self) -> _SendBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def append(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self._chunks.append(data if type(data) is bytes else bytes(data))
            self._len += len(data)

    def __getitem__(self, key: slice) -> bytes | memoryview:
        start, stop = key.start, key.stop
        if start >= stop:
            return b""
        pos = -self._head
        pieces: list[bytes | memoryview] = []
        for chunk in self._chunks:
            end = pos + len(chunk)
            if end > start:
                a = start - pos if start > pos else 0
                b = stop - pos if stop < end else len(chunk)
                piece = memoryview(chunk)[a:b] if (a or b != len(chunk)) else chunk
                if stop <= end and not pieces:
                    return piece  # inside one chunk: no copy
                pieces.append(piece)
                if stop <= end:
                    break
            pos = end
        return b"".join(pieces)

    def drop_front(self, n: int) -> None:
        self._len -= n
        n += self._head
        chunks = self._chunks
        while chunks and n >= len(chunks[0]):
            n -= len(chunks.popleft())
        self._head = n

    def clear(self) -> None:
        self._chunks.clear()
        self._head = 0
        self._len = 0


# --------------------------------------------------------------------------- events


@dataclass(slots=True)
class TcpEvent:
    """Base class of the events `TcpConnection.next_event` returns."""


@dataclass(slots=True)
class Connected(TcpEvent):
    """The three-way handshake completed (state ESTABLISHED or later)."""


@dataclass(slots=True)
class DataReceived(TcpEvent):
    """`length` new in-order bytes became readable. Consecutive arrivals coalesce into the
    event still waiting in the queue; always `read()` until `readable()` is 0."""

    length: int


@dataclass(slots=True)
class SendSpaceAvailable(TcpEvent):
    """After `send` accepted less than offered, at least a quarter of the send buffer is
    free again (`space` bytes at the time of the event)."""

    space: int


@dataclass(slots=True)
class PeerClosed(TcpEvent):
    """The guest sent FIN and every byte before it has arrived: after reading what is
    `readable()`, no more data will come. We may keep sending until `close()`."""


@dataclass(slots=True)
class ConnectionReset(TcpEvent):
    """An established connection died. `reason`: "reset" (the guest sent an acceptable
    RST) or "timeout" (retransmissions or window probes exhausted; we sent RST)."""

    reason: str


@dataclass(slots=True)
class ConnectionFailed(TcpEvent):
    """The handshake never completed. `reason`: "refused" (RST answered our SYN), "reset"
    (the guest reset during its own handshake) or "timeout" (SYN / SYN-ACK retries
    exhausted)."""

    reason: str


@dataclass(slots=True)
class Closed(TcpEvent):
    """Final event: state is CLOSED and all timers are gone; after draining
    `segments_to_send` once more the object may be dropped."""


# --------------------------------------------------------------------------- state


class TcpState(enum.Enum):
    CLOSED = "CLOSED"
    LISTEN = "LISTEN"  # from_syn: the guest's SYN is recorded, accept()/refuse() pending
    SYN_SENT = "SYN_SENT"
    SYN_RECEIVED = "SYN_RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN_WAIT_1"
    FIN_WAIT_2 = "FIN_WAIT_2"
    CLOSE_WAIT = "CLOSE_WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST_ACK"
    TIME_WAIT = "TIME_WAIT"

    # Members are singletons compared by identity; Enum's own hash is Python code that
    # every `state in _SOME_SET` test on the per-segment path would run.
    __hash__ = object.__hash__


_S = TcpState
_SYNCHRONIZED = frozenset(
    {
        _S.ESTABLISHED,
        _S.FIN_WAIT_1,
        _S.FIN_WAIT_2,
        _S.CLOSE_WAIT,
        _S.CLOSING,
        _S.LAST_ACK,
        _S.TIME_WAIT,
    }
)
_RECEIVES_DATA = frozenset({_S.ESTABLISHED, _S.FIN_WAIT_1, _S.FIN_WAIT_2})
_MAY_SEND = frozenset({_S.ESTABLISHED, _S.CLOSE_WAIT, _S.FIN_WAIT_1, _S.CLOSING, _S.LAST_ACK})
_APP_MAY_SEND = frozenset({_S.LISTEN, _S.SYN_SENT, _S.SYN_RECEIVED, _S.ESTABLISHED, _S.CLOSE_WAIT})


@dataclass(slots=True)
class TcpStats:
    """Counters. `bytes_out` counts every payload byte put on the wire (retransmissions
    included), `bytes_in` the payload bytes accepted into the receive stream."""

    segments_in: int = 0
    segments_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    retransmits: int = 0  # segments sent again (timeout, fast retransmit, go-back-N)
    fast_retransmits: int = 0  # entries into fast recovery
    timeouts: int = 0  # retransmission timer expiries
    window_probes: int = 0
    dup_segments: int = 0  # segments whose payload we already had
    ooo_segments: int = 0  # segments stored out of order
    dropped_segments: int = 0  # unacceptable (out of window, bad ACK, no ACK flag...)
    challenge_acks: int = 0


# --------------------------------------------------------------------------- connection


class TcpApplication(Protocol):
    """What drives a connection from the host side (a NAT host socket, a gateway service
    such as DNS over TCP, a port forward): it gets every event of its connection."""

    def on_event(self, event: TcpEvent) -> None: ...


class TcpConnection:
    """One TCP connection; see the module docstring for the call pattern.

    Constructor parameters beyond the brief: `rto_initial`/`rto_min`/`rto_max` (seconds,
    RFC 6298 with Linux's 200 ms floor), `max_retries` (RTO expiries or unanswered window
    probes in a row before giving up, like Linux's tcp_retries2), `syn_retries` (SYN or
    SYN-ACK retransmissions before `ConnectionFailed`), `initial_cwnd` (segments),
    `ack_delay` (seconds an ACK for in-order data may wait for a reply to ride on: RFC 9293
    3.8.6.3 delayed ACK; 0 acknowledges at once)."""

    def __init__(
        self,
        local_ip: bytes,
        local_port: int,
        remote_ip: bytes,
        remote_port: int,
        *,
        now: float,
        mss: int = 1460,
        recv_buffer: int = 4 << 20,
        send_buffer: int = 4 << 20,
        isn: int | None = None,
        time_wait: float = 60.0,
        rto_initial: float = 1.0,
        rto_min: float = 0.2,
        rto_max: float = 120.0,
        max_retries: int = 15,
        syn_retries: int = 6,
        initial_cwnd: int = 10,
        partial_checksum: bool = False,
        gso_max: int = 0,
        ack_delay: float = 0.0,
    ) -> None:
        if len(local_ip) not in (4, 16) or len(remote_ip) != len(local_ip):
            raise ValueError("addresses must be both IPv4 (4 bytes) or both IPv6 (16 bytes)")
        if recv_buffer < 1 or send_buffer < 1:
            raise ValueError("buffers must be positive")
        self.local_ip = bytes(local_ip)
        self.local_port = local_port
        self.remote_ip = bytes(remote_ip)
        self.remote_port = remote_port
        self.stats = TcpStats()
        # Set by the transport layer that owns the connection: its 4-tuple there (guest ip,
        # guest port, local ip, local port), the application driving it, and for a passive
        # open the SYN's IP header + 8 bytes (what an ICMP error about the dial quotes).
        self.key: tuple[bytes, int, bytes, int] = (remote_ip, remote_port, local_ip, local_port)
        self.app: TcpApplication | None = None
        self.syn_quote = b""
        # The pseudo header's constant words (the length is added per segment); the same for
        # IPv6, whose 32-bit length and next header sum to the same words as IPv4's.
        self._pseudo = ones_sum(self.local_ip + self.remote_ip) + PROTO_TCP
        self._mss = max(_MIN_MSS, min(mss, 0xFFFF))
        self._recv_buffer = recv_buffer
        self._send_buffer = send_buffer
        self._time_wait = time_wait
        self._rto_min = rto_min
        self._rto_max = rto_max
        self._max_retries = max_retries
        self._syn_retries = syn_retries
        self._initial_cwnd = initial_cwnd
        # Offload toward the guest (virtio-net header on the link): segments carry only the
        # pseudo header checksum, and new data goes out in segments of up to `gso_max` bytes
        # that the guest kernel treats as GRO super-packets of MSS-sized segments.
        self._partial = partial_checksum
        self._gso_max = gso_max
        self.offload = partial_checksum  # read per output by the transport layer
        self._now = now  # latest time seen; stamps ACKs that read() makes pending

        self._state = TcpState.CLOSED
        self._opened = False  # distinguishes a fresh CLOSED object from a finished one
        self._closed_emitted = False
        self._events: deque[TcpEvent] = deque()
        self._out: list[bytes] = []  # prebuilt segments (RSTs, immediate dup ACKs)

        # Send side, offsets from our ISN: SYN at 0, first data byte at 1.
        self._iss = (_rng.getrandbits(32) if isn is None else isn) & _MASK
        self._snd_una = 0
        self._snd_nxt = 0
        self._snd_max = 0  # highest offset sent + 1 (snd_nxt can fall back after an RTO)
        self._snd_wnd = 0  # scaled window, relative to snd_una
        self._max_snd_wnd = 0
        self._wl1 = -1  # receive offset of the segment that last updated snd_wnd
        self._wl2 = -1  # send offset acked by it
        self._snd_wscale = 0  # shift applied to the guest's window field
        self._peer_mss = _DEFAULT_PEER_MSS
        self._smss = min(self._mss, _DEFAULT_PEER_MSS)
        self._sack_ok = False
        self._sndbuf = _SendBuffer()
        self._buf_off = 1  # offset of _sndbuf[0]
        self._fin_off: int | None = None  # offset of our FIN once close() was called
        self._send_blocked = False

        # Receive side, offsets from the guest's ISN: SYN at 0, first data byte at 1.
        self._irs = 0
        self._rcv_nxt = 0
        self._rcv_adv = 0  # right edge of the window we advertised (never moves left)
        self._rcv_wscale = 0
        self._rcvbuf = bytearray()
        self._ooo_starts: list[int] = []  # sorted starts of disjoint, non-touching runs
        self._ooo_data: list[bytearray] = []
        self._ooo_bytes = 0
        self._last_ooo: tuple[int, int] | None = None  # run holding the newest ooo segment
        self._rfin_off: int | None = None  # guest FIN seen beyond a hole
        self._ack_pending = False
        self._ack_due: float | None = None
        self._ack_delay = ack_delay
        self._unacked_segments = 0  # in-order data segments since our last ACK
        self._syn_opts: TcpOptions = NO_OPTIONS

        # Timers and RTT (RFC 6298).
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._rto = rto_initial
        self._backoff = 0
        self._retries = 0
        self._rtt_off: int | None = None  # Karn: the one segment being timed
        self._rtt_time = 0.0
        self._rtx_deadline: float | None = None
        self._persist_deadline: float | None = None
        self._persist_backoff = 0
        self._probes = 0
        self._force_send = False  # persist expiry: send what fits even if tiny
        self._probe_pending = False
        self._tw_deadline: float | None = None
        self._syn_pending = False

        # Congestion control (NewReno, RFC 5681 / 6582) and SACK scoreboard.
        self._cwnd = initial_cwnd * self._smss
        self._ssthresh = 1 << 62
        self._dupacks = 0
        self._in_recovery = False
        self._recover = 0
        self._rexmit: list[tuple[int, int]] = []  # ranges to resend regardless of windows
        self._rexmit_hi = 0  # highest offset retransmitted in this recovery
        self._sacked: list[list[int]] = []  # disjoint sorted [start, end) offsets > snd_una

    def set_offload(self, partial_checksum: bool, gso_max: int) -> None:
        """Follow the port the guest sits on now: offload (partial checksums, segments of
        up to `gso_max`) or plain. Segments already built for an offload port get their
        checksum completed, as a plain port needs it."""
        if self._partial and not partial_checksum and self._out:
            self._out = [_complete_checksum(seg) for seg in self._out]
        self._partial = partial_checksum
        self._gso_max = gso_max
        self.offload = partial_checksum  # read per output by the transport layer

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_syn(
        cls,
        local_ip: bytes,
        local_port: int,
        remote_ip: bytes,
        remote_port: int,
        syn: TcpSegment,
        *,
        now: float,
        **kw: object,
    ) -> TcpConnection:
        """Passive open: record the guest's SYN (ISN, MSS, window scale, SACK-permitted).
        Nothing is sent until `accept()` (queues the SYN-ACK) or `refuse()` (queues RST)."""
        if syn.flags & (SYN | ACK | RST) != SYN:
            raise ValueError(f"not an initial SYN: {syn!r}")
        conn = cls(local_ip, local_port, remote_ip, remote_port, now=now, **kw)  # type: ignore[arg-type]
        conn._opened = True
        conn._state = TcpState.LISTEN
        conn._irs = syn.seq
        conn._rcv_nxt = 1
        conn._syn_opts = syn.options
        conn._set_peer_syn_options(syn.options)
        conn._snd_wnd = syn.window  # windows in SYNs are never scaled
        conn._max_snd_wnd = syn.window
        conn._wl1 = 0
        conn._wl2 = 0
        return conn

    def _our_wscale(self) -> int:
        ws = 0
        while ws < _MAX_WSCALE and (self._recv_buffer >> ws) > 0xFFFF:
            ws += 1
        return ws

    def _set_peer_syn_options(self, opts: TcpOptions) -> None:
        self._peer_mss = max(_MIN_MSS, opts.mss) if opts.mss else _DEFAULT_PEER_MSS
        self._smss = min(self._peer_mss, self._mss)
        self._cwnd = self._initial_cwnd * self._smss
        self._sack_ok = opts.sack_permitted
        if opts.wscale is not None:
            # Scaling applies only when both SYNs carry the option (RFC 7323 2.2); for a
            # passive open we always echo it, for an active open we always offered it.
            self._snd_wscale = opts.wscale
            self._rcv_wscale = self._our_wscale()
        else:
            self._snd_wscale = 0
            self._rcv_wscale = 0

    def accept(self, now: float) -> None:
        """The host dial succeeded: queue the SYN-ACK (state SYN_RECEIVED)."""
        if self._state is not TcpState.LISTEN:
            raise TcpStateError(f"accept() in state {self._state.name}")
        self._state = TcpState.SYN_RECEIVED
        self._syn_pending = True

    def refuse(self, now: float) -> None:
        """The host dial was refused: queue RST|ACK for the guest's SYN, state CLOSED."""
        if self._state is not TcpState.LISTEN:
            raise TcpStateError(f"refuse() in state {self._state.name}")
        self._out.append(
            self._segment(0, RST | ACK, window=0, seq=0)  # seq is ignored with RST|ACK
        )
        self._to_closed()

    def connect(self, now: float) -> None:
        """Active open (port forwarding into the guest): queue a SYN offering MSS, window
        scale and SACK; it is retransmitted with backoff up to `syn_retries` times, then
        `ConnectionFailed("timeout")`."""
        if self._opened:
            raise TcpStateError(f"connect() on a used connection ({self._state.name})")
        self._opened = True
        self._state = TcpState.SYN_SENT
        self._syn_pending = True

    # ------------------------------------------------------------------ app interface

    @property
    def state(self) -> TcpState:
        return self._state

    @property
    def effective_mss(self) -> int:
        """Largest payload we put in one segment: min(guest's MSS, our mss)."""
        return self._smss

    def send_space(self) -> int:
        if self._state not in _APP_MAY_SEND or self._fin_off is not None:
            return 0
        return max(0, self._send_buffer - len(self._sndbuf))

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Queue application bytes for the guest; returns how many were accepted (possibly
        0: backpressure, wait for `SendSpaceAvailable`). Raises `TcpStateError` after
        `close()` or once the connection is dead."""
        if self._state not in _APP_MAY_SEND or self._fin_off is not None:
            raise TcpStateError(f"send() in state {self._state.name} (closed={self._fin_off})")
        n = len(data)
        space = self._send_buffer - len(self._sndbuf)
        if n > space:
            n = max(space, 0)
            self._send_blocked = True
            data = memoryview(data)[:n]
        if n:
            self._sndbuf.append(data)
        return n

    def notify_send_space(self) -> None:
        """Ask for a `SendSpaceAvailable` once the guest's ACKs free room (an application
        that only sends what `send_space` allows never overruns, so never gets blocked)."""
        if self._state in _APP_MAY_SEND and self._fin_off is None:
            self._send_blocked = True

    def readable(self) -> int:
        return len(self._rcvbuf)

    def read(self, max_bytes: int = -1) -> bytes:
        """Take up to `max_bytes` (all if negative) in-order bytes. Freeing buffer space
        may queue a window update (sent by the next `segments_to_send`)."""
        buf = self._rcvbuf
        n = len(buf) if max_bytes < 0 else min(max_bytes, len(buf))
        if n <= 0:
            return b""
        if n == len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            with memoryview(buf) as mv:
                data = mv[:n].tobytes()
            del buf[:n]
        if self._state in _RECEIVES_DATA:
            cur = max(0, self._rcv_adv - self._rcv_nxt)
            new = self._window_to_offer(cur)
            grow = new - cur
            # Update when the guest may be stalled (window below one segment) or when the
            # window grew a lot; otherwise the ACKs for its data carry the new window.
            if grow > 0 and (cur < self._smss or grow >= self._recv_buffer // 2):
                self._want_ack(self._now)
        return data

    def close(self) -> None:
        """Half-close: FIN after everything queued so far. Later `send` raises."""
        st = self._state
        if st is TcpState.LISTEN:
            self.refuse(self._now)
            return
        if st is TcpState.CLOSED and not self._opened:
            self._opened = True
            self._to_closed()
            return
        # SYN_SENT: unlike RFC 9293's CLOSE there (delete the TCB), what the application
        # queued is still delivered: a forwarded client that sends and shuts down before
        # the guest answered the SYN must not lose its bytes. FIN once established.
        if self._fin_off is not None or st not in _APP_MAY_SEND:
            return
        self._fin_off = self._buf_off + len(self._sndbuf)
        if st is TcpState.ESTABLISHED:
            self._state = TcpState.FIN_WAIT_1
        elif st is TcpState.CLOSE_WAIT:
            self._state = TcpState.LAST_ACK
        # SYN_SENT, SYN_RECEIVED: FIN_WAIT_1 once the handshake completes (`_establish`).

    def abort(self) -> None:
        """Reset the connection now (RST queued where the guest has state), state CLOSED."""
        st = self._state
        if st is TcpState.LISTEN:
            self.refuse(self._now)
            return
        if (st in _SYNCHRONIZED and st is not TcpState.TIME_WAIT) or st is TcpState.SYN_RECEIVED:
            self._out.append(self._rst_segment())
        self._opened = True
        self._to_closed()

    def next_event(self) -> TcpEvent | None:
        return self._events.popleft() if self._events else None

    # ------------------------------------------------------------------ timers

    def get_timer(self) -> float | None:
        """Earliest deadline: retransmission (also SYN/SYN-ACK), persist probe, TIME_WAIT
        expiry, or a pending ACK (already due: call `segments_to_send`)."""
        best: float | None = None
        for t in (
            self._rtx_deadline,
            self._persist_deadline,
            self._tw_deadline,
            self._ack_due if self._ack_pending else None,
        ):
            if t is not None and (best is None or t < best):
                best = t
        return best

    def handle_timer(self, now: float) -> None:
        self._now = now
        if self._tw_deadline is not None and now >= self._tw_deadline:
            self._tw_deadline = None
            self._to_closed()
            return
        if self._rtx_deadline is not None and now >= self._rtx_deadline:
            if self._state is TcpState.SYN_SENT or self._state is TcpState.SYN_RECEIVED:
                self._on_syn_timeout(now)
            else:
                self._on_rto(now)
        if self._persist_deadline is not None and now >= self._persist_deadline:
            self._on_persist(now)

    def _cur_rto(self) -> float:
        return min(self._rto * (1 << self._backoff), self._rto_max)

    def _on_syn_timeout(self, now: float) -> None:
        self._retries += 1
        self.stats.timeouts += 1
        if self._retries > self._syn_retries:
            self._rtx_deadline = None
            self._events.append(ConnectionFailed("timeout"))
            self._to_closed()
            return
        self._backoff += 1
        self._rtt_off = None  # Karn: a retransmitted SYN gives no RTT sample
        self._syn_pending = True
        self._rtx_deadline = None  # re-armed when the SYN goes out

    def _on_rto(self, now: float) -> None:
        if self._snd_una >= self._snd_max or self._state not in _SYNCHRONIZED:
            self._rtx_deadline = None
            return
        self._retries += 1
        self.stats.timeouts += 1
        if self._retries > self._max_retries:
            self._give_up()
            return
        smss = self._smss
        flight = self._snd_max - self._snd_una
        self._ssthresh = max(flight // 2, 2 * smss)
        self._cwnd = smss
        self._in_recovery = False
        self._dupacks = 0
        self._recover = self._snd_max
        self._sacked.clear()  # RFC 2018: the guest may renege; forget SACK after a timeout
        self._rtt_off = None
        # Resend the first segment whatever the windows say (it doubles as a window probe,
        # as in Linux), then go back N: the rest follows as ACKs open cwnd.
        first_end = min(self._snd_max, self._snd_una + smss)
        self._rexmit = [(self._snd_una, first_end)]
        self._snd_nxt = first_end
        self._backoff += 1
        self._rtx_deadline = now + self._cur_rto()

    def _on_persist(self, now: float) -> None:
        self._persist_deadline = None
        self._probes += 1
        if self._probes > self._max_retries:
            self._give_up()
            return
        self.stats.window_probes += 1
        if self._snd_una + self._snd_wnd > self._snd_nxt:
            self._force_send = True  # a window too small for sender SWS avoidance
        else:
            self._probe_pending = True
        self._persist_backoff += 1
        self._persist_deadline = now + min(
            max(self._rto, self._rto_min) * (1 << self._persist_backoff), self._rto_max
        )

    def _give_up(self) -> None:
        self._out.append(self._rst_segment())
        self._events.append(ConnectionReset("timeout"))
        self._to_closed()

    def _to_closed(self) -> None:
        self._state = TcpState.CLOSED
        self._rtx_deadline = None
        self._persist_deadline = None
        self._tw_deadline = None
        self._ack_pending = False
        self._syn_pending = False
        self._probe_pending = False
        self._rexmit.clear()
        self._sndbuf.clear()
        self._ooo_starts.clear()
        self._ooo_data.clear()
        self._ooo_bytes = 0
        if not self._closed_emitted:
            self._closed_emitted = True
            self._events.append(Closed())

    def _enter_time_wait(self, now: float) -> None:
        self._state = TcpState.TIME_WAIT
        self._rtx_deadline = None
        self._persist_deadline = None
        self._rexmit.clear()
        self._tw_deadline = now + self._time_wait

    def accepts_new_syn(self, syn: TcpSegment) -> bool:
        """Whether the demultiplexer may drop this TIME_WAIT connection and start a new
        one from `syn` (a SYN whose sequence number is beyond the old stream, as Linux)."""
        return (
            self._state is TcpState.TIME_WAIT
            and syn.flags & (SYN | ACK | RST) == SYN
            and seq_diff(syn.seq, (self._irs + self._rcv_nxt) & _MASK) > 0
        )

    # ------------------------------------------------------------------ output

    def _want_ack(self, now: float) -> None:
        if not self._ack_pending or self._ack_due > now:  # type: ignore[operator]
            self._ack_pending = True
            self._ack_due = now

    def _want_delayed_ack(self, now: float, size: int) -> None:
        """ACK in-order data after `ack_delay` unless a reply carries it first; at once for
        a full-sized segment or the second one since our last ACK (RFC 9293 3.8.6.3)."""
        self._unacked_segments += 1
        if not self._ack_delay or size >= self._smss or self._unacked_segments >= 2:
            self._want_ack(now)
        elif not self._ack_pending:
            self._ack_pending = True
            self._ack_due = now + self._ack_delay

    def _window_to_offer(self, cur: int) -> int:
        # Receiver SWS avoidance (RFC 9293 3.8.6.2.2): move the right edge only by at least
        # min(buffer/2, MSS); never move it left.
        free = self._recv_buffer - len(self._rcvbuf)
        if free - cur >= min(self._recv_buffer >> 1, self._smss):
            return free
        return cur

    def _advertise(self) -> int:
        """Raw window field for the next segment; records the right edge it implies."""
        nxt = self._rcv_nxt
        cur = self._rcv_adv - nxt
        if cur < 0:
            cur = 0
        wnd = self._window_to_offer(cur)
        ws = self._rcv_wscale
        raw = wnd >> ws
        if (raw << ws) < cur:
            raw = (cur + (1 << ws) - 1) >> ws  # rounding must not retract the edge
        if raw > 0xFFFF:
            raw = 0xFFFF
        edge = nxt + (raw << ws)
        if edge > self._rcv_adv:
            self._rcv_adv = edge
        return raw

    def _segment(
        self,
        seq_off: int,
        flags: int,
        payload: bytes | memoryview = b"",
        options: bytes = b"",
        *,
        window: int | None = None,
        seq: int | None = None,
    ) -> bytes:
        if flags & ACK:
            self._ack_pending = False
            self._unacked_segments = 0
        if window is None:
            window = self._advertise()
        st = self.stats
        st.segments_out += 1
        if payload:
            st.bytes_out += len(payload)
        return _build(
            self._pseudo,
            self.local_port,
            self.remote_port,
            (self._iss + seq_off) & _MASK if seq is None else seq,
            (self._irs + self._rcv_nxt) & _MASK if flags & ACK else 0,
            flags,
            window,
            options,
            payload,
            partial=self._partial,
        )

    def _rst_segment(self) -> bytes:
        # Linux accepts a RST only at exactly its RCV.NXT; snd_max is our best guess. If the
        # guest missed some of our data it answers with a challenge ACK, which the CLOSED
        # state answers with a RST at the ACKed sequence number.
        return self._segment(self._snd_max, RST | ACK, window=0)

    def _syn_options(self) -> bytes:
        if self._state is TcpState.SYN_SENT:
            return build_options(mss=self._mss, wscale=self._our_wscale(), sack_permitted=True)
        peer = self._syn_opts
        return build_options(
            mss=self._mss,
            wscale=self._rcv_wscale if peer.wscale is not None else None,
            sack_permitted=peer.sack_permitted,
        )

    def _sack_option(self) -> bytes:
        if not self._sack_ok or not self._ooo_starts:
            return b""
        blocks: list[tuple[int, int]] = []
        first = self._last_ooo
        if first is not None:
            i = bisect_left(self._ooo_starts, first[0] + 1) - 1
            if i >= 0:
                s = self._ooo_starts[i]
                e = s + len(self._ooo_data[i])
                if s <= first[0] < e:
                    blocks.append((s, e))
        for s, d in zip(self._ooo_starts, self._ooo_data, strict=True):
            if len(blocks) >= _MAX_SACK_BLOCKS:
                break
            if blocks and blocks[0][0] == s:
                continue
            blocks.append((s, s + len(d)))
        base = self._irs
        return build_options(sack_blocks=[(base + s, base + e) for s, e in blocks])

    def segments_to_send(self, now: float) -> list[bytes]:
        """Drain everything that should go to the guest now: full TCP segments, checksum
        filled for local_ip -> remote_ip, ready for an IPv4 header (protocol 6)."""
        out = self._out
        self._out = []
        self._now = now
        st = self._state
        if st is TcpState.SYN_SENT or st is TcpState.SYN_RECEIVED:
            if self._ack_pending:
                # Before the handshake completes the SYN-ACK is our only ACK.
                self._ack_pending = False
                if st is TcpState.SYN_RECEIVED:
                    self._syn_pending = True
            if self._syn_pending:
                self._send_syn(now, out)
            return out
        if st in _MAY_SEND:
            self._send_data(now, out)
        if self._ack_pending:
            if st is TcpState.CLOSED or st is TcpState.LISTEN:
                self._ack_pending = False
            elif self._ack_due <= now:  # type: ignore[operator]
                out.append(self._segment(self._snd_nxt, ACK, options=self._sack_option()))
        return out

    def _send_syn(self, now: float, out: list[bytes]) -> None:
        self._syn_pending = False
        flags = SYN if self._state is TcpState.SYN_SENT else SYN | ACK
        window = min(self._recv_buffer, 0xFFFF)  # never scaled in a SYN
        if self._state is TcpState.SYN_RECEIVED:
            self._rcv_adv = max(self._rcv_adv, self._rcv_nxt + window)
        out.append(self._segment(0, flags, options=self._syn_options(), window=window))
        self._snd_nxt = max(self._snd_nxt, 1)
        self._snd_max = max(self._snd_max, 1)
        if self._retries == 0 and self._rtt_off is None:
            self._rtt_off = 1
            self._rtt_time = now
        if self._rtx_deadline is None:
            self._rtx_deadline = now + self._cur_rto()

    def _send_data(self, now: float, out: list[bytes]) -> None:
        buf = self._sndbuf
        buf_off = self._buf_off
        data_end = buf_off + len(buf)
        fin_off = self._fin_off
        end = data_end if fin_off is None else fin_off + 1
        if not self._rexmit and self._snd_nxt >= end and not self._probe_pending:
            self._persist_deadline = None
            self._persist_backoff = 0
            return
        st = self.stats
        mss = self._smss
        gso = self._gso_max > mss
        smss = self._gso_max if gso else mss
        una = self._snd_una
        with buf as mv:
            # 1. Retransmissions chosen by RTO / fast recovery: they ignore both windows.
            if self._rexmit:
                for s, e in self._rexmit:
                    s = max(s, self._snd_una)
                    e = min(e, self._snd_max)
                    if s >= e:
                        continue
                    de = min(e, data_end)
                    flags = ACK
                    if fin_off is not None and s <= fin_off < e:
                        flags |= FIN
                    if de > s:
                        payload = mv[s - buf_off : de - buf_off]
                        if de == data_end:
                            flags |= PSH
                    else:
                        payload = b""
                    out.append(self._segment(s, flags, payload))
                    st.retransmits += 1
                    if self._rtx_deadline is None:
                        self._rtx_deadline = now + self._cur_rto()
                self._rexmit.clear()
            # 2. New data (or go-back-N resends below snd_max) within min(rwnd, cwnd).
            nxt = self._snd_nxt
            wnd_edge = una + self._snd_wnd
            cwnd_edge = una + self._cwnd
            force = self._force_send
            self._force_send = False
            while nxt < end:
                data_left = data_end - nxt
                if data_left > 0:
                    n = smss if data_left > smss else data_left
                    room = (wnd_edge if wnd_edge < cwnd_edge else cwnd_edge) - nxt
                    if room < n:
                        if gso and room >= mss:
                            n = room - room % mss  # whole MSS segments the windows allow
                        elif force and wnd_edge > nxt:
                            n = min(n, wnd_edge - nxt)
                            force = False
                        elif room <= 0 or cwnd_edge < wnd_edge:
                            break  # window closed, or cwnd-limited: ACKs will clock us
                        elif room < self._max_snd_wnd >> 1:
                            break  # sender SWS avoidance; the persist timer backs it up
                        else:
                            n = room
                    e = nxt + n
                    flags = ACK
                    if e == data_end:
                        flags |= PSH
                        if fin_off is not None and wnd_edge > e:
                            flags |= FIN
                    payload = mv[nxt - buf_off : e - buf_off]
                else:
                    # Only the FIN is left; it needs one byte of window (older Linux drops
                    # a bare FIN at a zero window).
                    if wnd_edge <= nxt and not force:
                        break
                    n = 0
                    e = nxt
                    flags = ACK | FIN
                    payload = b""
                if flags & FIN:
                    e += 1
                out.append(self._segment(nxt, flags, payload))
                if nxt < self._snd_max:
                    st.retransmits += 1
                    if self._rtt_off is not None and self._rtt_off > nxt:
                        self._rtt_off = None  # Karn
                elif self._rtt_off is None:
                    self._rtt_off = e
                    self._rtt_time = now
                nxt = e
                if nxt > self._snd_max:
                    self._snd_max = nxt
                if self._rtx_deadline is None:
                    self._rtx_deadline = now + self._cur_rto()
            self._snd_nxt = nxt
        if self._probe_pending:
            # Zero-window probe as Linux sends it: an old sequence number with no data makes
            # the guest answer with an ACK that carries its current window.
            self._probe_pending = False
            out.append(self._segment(self._snd_una - 1, ACK))
        # Persist timer: armed only when nothing is in flight (no ACK will come) and we
        # still have something to send that the window does not allow.
        if nxt < end and self._snd_una >= self._snd_max:
            if self._persist_deadline is None:
                self._persist_deadline = now + min(
                    max(self._rto, self._rto_min) * (1 << self._persist_backoff), self._rto_max
                )
        else:
            self._persist_deadline = None
            self._persist_backoff = 0

    # ------------------------------------------------------------------ input

    def receive_segment(self, seg: TcpSegment, now: float) -> None:
        """Process one segment from the guest (checksum already verified by the caller,
        ports already matched by the demultiplexer)."""
        self.stats.segments_in += 1
        self._now = now
        st = self._state
        if st in _SYNCHRONIZED or st is TcpState.SYN_RECEIVED:
            self._rx_synchronized(seg, now)
        elif st is TcpState.SYN_SENT:
            self._rx_syn_sent(seg, now)
        elif st is TcpState.LISTEN:
            if seg.flags & RST and seg.seq == (self._irs + 1) & _MASK:
                self._events.append(ConnectionFailed("reset"))
                self._to_closed()
            # Anything else (e.g. a retransmitted SYN) waits for accept()/refuse().
        else:
            rst = build_reset_reply(self.local_ip, self.remote_ip, seg)
            if rst is not None:
                self.stats.segments_out += 1
                self._out.append(rst)

    def _rx_syn_sent(self, seg: TcpSegment, now: float) -> None:
        flags = seg.flags
        ack_ok = False
        if flags & ACK:
            d = seq_diff(seg.ack, self._iss)
            if d <= 0 or d > self._snd_max:
                if not flags & RST:
                    self.stats.segments_out += 1
                    self._out.append(
                        _build(
                            self._pseudo,
                            self.local_port,
                            self.remote_port,
                            seg.ack,
                            0,
                            RST,
                            0,
                            b"",
                            b"",
                        )
                    )
                return
            ack_ok = True
        if flags & RST:
            if ack_ok:
                self._events.append(ConnectionFailed("refused"))
                self._to_closed()
            return
        if not flags & SYN:
            return
        self._irs = seg.seq
        self._rcv_nxt = 1
        self._rcv_adv = 1
        self._syn_opts = seg.options
        self._set_peer_syn_options(seg.options)
        self._rcv_adv = 1 + min(self._recv_buffer, 0xFFFF)  # what our SYN advertised
        self._snd_wnd = seg.window
        self._max_snd_wnd = max(self._max_snd_wnd, seg.window)
        self._wl1 = 0
        if ack_ok:
            self._snd_una = 1
            self._wl2 = 1
            self._rtx_deadline = None
            self._retries = 0
            self._backoff = 0
            self._take_rtt_sample(1, now)
            self._establish()
            self._want_ack(now)
        else:
            # Simultaneous open: answer with SYN-ACK (same ISN).
            self._state = TcpState.SYN_RECEIVED
            self._syn_pending = True
            self._rtx_deadline = None
            self._wl2 = 0

    def _establish(self) -> None:
        self._state = TcpState.FIN_WAIT_1 if self._fin_off is not None else TcpState.ESTABLISHED
        self._events.append(Connected())

    def _rx_synchronized(self, seg: TcpSegment, now: float) -> None:
        flags = seg.flags
        payload = seg.payload
        plen = len(payload)
        rcv_nxt = self._rcv_nxt
        seq_off = rcv_nxt + seq_diff(seg.seq, (self._irs + rcv_nxt) & _MASK)
        seg_len = plen + (1 if flags & SYN else 0) + (flags & FIN)
        st = self.stats

        # 1. Sequence acceptability, Linux flavour: the segment must not end before
        # RCV.NXT nor start beyond the advertised right edge.
        if seq_off > max(self._rcv_adv, rcv_nxt) or seq_off + seg_len < rcv_nxt:
            if not flags & RST:
                if plen:
                    st.dup_segments += 1
                else:
                    st.dropped_segments += 1
                self._want_ack(now)
            return

        # 2. RST (RFC 5961 3.2): only exactly at RCV.NXT; in window -> challenge ACK.
        if flags & RST:
            if seq_off == rcv_nxt:
                if self._state is TcpState.TIME_WAIT:
                    self._to_closed()
                elif self._state is TcpState.SYN_RECEIVED:
                    self._events.append(ConnectionFailed("reset"))
                    self._to_closed()
                else:
                    self._events.append(ConnectionReset("reset"))
                    self._to_closed()
            else:
                st.challenge_acks += 1
                self._want_ack(now)
            return

        # 3. SYN in a synchronized state (RFC 5961 4.2): challenge ACK. A retransmitted
        # SYN during our SYN_RECEIVED means our SYN-ACK was lost: resend it now.
        if flags & SYN:
            if self._state is not TcpState.SYN_RECEIVED or seg.seq != self._irs:
                st.challenge_acks += 1
                self._want_ack(now)
                return
            if not (flags & ACK and seq_diff(seg.ack, self._iss) == 1):
                self._syn_pending = True
                return
            # Simultaneous open: the guest's SYN-ACK acknowledges ours; go on as its ACK.
            self._want_ack(now)
            seq_off = rcv_nxt
            payload = b""
            plen = 0
            flags &= ~(SYN | FIN)

        if not flags & ACK:
            st.dropped_segments += 1
            return

        # 4. ACK.
        if self._state is TcpState.SYN_RECEIVED:
            ack_off = seq_diff(seg.ack, self._iss)
            if ack_off <= 0 or ack_off > self._snd_max:
                st.dropped_segments += 1
                self._out.append(
                    _build(
                        self._pseudo,
                        self.local_port,
                        self.remote_port,
                        seg.ack,
                        0,
                        RST,
                        0,
                        b"",
                        b"",
                    )
                )
                st.segments_out += 1
                return
            self._snd_wnd = seg.window << self._snd_wscale
            self._max_snd_wnd = max(self._max_snd_wnd, self._snd_wnd)
            self._wl1 = seq_off
            self._wl2 = ack_off
            self._establish()
        if not self._process_ack(seg, seq_off, now):
            return
        if self._state is TcpState.CLOSED:
            return

        # 5. Data.
        whole = True  # False when the tail was cut at the window edge (drops any FIN)
        if plen:
            if self._state in _RECEIVES_DATA:
                whole = self._rx_data(seq_off, payload, now)
            else:
                st.dropped_segments += 1  # data after the guest's own FIN: ignore, re-ACK
                self._want_ack(now)

        # 6. FIN.
        if flags & FIN and whole:
            fin_at = seq_off + plen
            if self._state in _RECEIVES_DATA:
                if fin_at == self._rcv_nxt:
                    self._rx_fin(now)
                elif fin_at > self._rcv_nxt:
                    self._rfin_off = fin_at  # beyond a hole: taken when the hole fills
                    self._want_ack(now)
            else:
                # Retransmitted FIN (our ACK got lost): re-ACK; TIME_WAIT restarts (RFC 9293).
                self._want_ack(now)
                if self._state is TcpState.TIME_WAIT:
                    self._tw_deadline = now + self._time_wait

    def _rx_fin(self, now: float) -> None:
        self._rcv_nxt += 1
        self._rfin_off = None
        st = self._state
        if st is TcpState.ESTABLISHED:
            # The application usually answers a FIN with its own soon: one segment for both.
            self._want_delayed_ack(now, 0)
        else:
            self._want_ack(now)
        self._events.append(PeerClosed())
        if st is TcpState.ESTABLISHED:
            self._state = TcpState.CLOSE_WAIT
        elif st is TcpState.FIN_WAIT_1:
            self._state = TcpState.CLOSING
        elif st is TcpState.FIN_WAIT_2:
            self._enter_time_wait(now)

    def _take_rtt_sample(self, ack_off: int, now: float) -> None:
        if self._rtt_off is None or ack_off < self._rtt_off:
            return
        r = now - self._rtt_time
        self._rtt_off = None
        if r < 0:
            return
        if self._srtt is None:
            self._srtt = r
            self._rttvar = r / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - r)
            self._srtt = 0.875 * self._srtt + 0.125 * r
        self._rto = min(
            max(self._srtt + max(0.001, 4 * self._rttvar), self._rto_min), self._rto_max
        )

    def _process_ack(self, seg: TcpSegment, seq_off: int, now: float) -> bool:
        """RFC 9293 3.10.7.4 fifth check plus congestion control. False: drop the segment."""
        una = self._snd_una
        ack_off = una + seq_diff(seg.ack, (self._iss + una) & _MASK)
        st = self.stats
        if ack_off > self._snd_max:
            st.dropped_segments += 1
            self._want_ack(now)  # ACK of data we never sent
            return False
        if ack_off < una - max(self._max_snd_wnd, 1):
            st.dropped_segments += 1
            self._want_ack(now)  # RFC 5961 5.2: too old to be a real ACK
            return False
        self._probes = 0  # the guest is alive
        wnd = seg.window << self._snd_wscale
        smss = self._smss
        if self._sack_ok and seg.options.sack_blocks:
            self._update_sacked(seg.options.sack_blocks, max(ack_off, una))

        if ack_off > una:
            acked = ack_off - una
            # Release acknowledged bytes (the SYN at offset 0 and the FIN are not in buf).
            n = min(ack_off, self._buf_off + len(self._sndbuf)) - self._buf_off
            if n > 0:
                self._sndbuf.drop_front(n)
                self._buf_off += n
            self._snd_una = una = ack_off
            if self._snd_nxt < ack_off:
                self._snd_nxt = ack_off  # after go-back-N the guest may ack beyond snd_nxt
            if self._sacked:
                while self._sacked and self._sacked[0][1] <= ack_off:
                    self._sacked.pop(0)
                if self._sacked and self._sacked[0][0] < ack_off:
                    self._sacked[0][0] = ack_off
            self._take_rtt_sample(ack_off, now)
            self._retries = 0
            self._backoff = 0
            self._dupacks = 0
            # Congestion control.
            if self._in_recovery:
                if ack_off >= self._recover:
                    self._in_recovery = False
                    self._cwnd = max(min(self._ssthresh, self._snd_max - una + smss), smss)
                else:
                    # Partial ACK (RFC 6582): the next hole is lost too.
                    self._cwnd = max(self._cwnd - acked + smss, smss)
                    if self._rexmit_hi <= una:
                        self._queue_hole(una)
                    self._queue_next_sack_hole()
            elif self._cwnd < self._ssthresh:
                self._cwnd += acked  # slow start, full byte counting: the link is local
            else:
                self._cwnd += max(1, smss * acked // self._cwnd)
            if self._cwnd > 1 << 30:
                self._cwnd = 1 << 30
            self._rtx_deadline = None if una >= self._snd_max else now + self._cur_rto()
            if self._send_blocked:
                space = self._send_buffer - len(self._sndbuf)
                if space >= self._send_buffer >> 2 and self._fin_off is None:
                    self._send_blocked = False
                    self._events.append(SendSpaceAvailable(space))
            if self._fin_off is not None and ack_off > self._fin_off:
                self._our_fin_acked(now)
                if self._state is TcpState.CLOSED:
                    return True
        elif (
            ack_off == una
            and self._snd_max > una
            and not seg.payload
            and not seg.flags & (SYN | FIN)
            and wnd == self._snd_wnd
        ):
            # Duplicate ACK (RFC 5681 2).
            self._dupacks += 1
            if self._in_recovery:
                self._cwnd += smss
                self._queue_next_sack_hole()
            elif self._dupacks == 3 and una >= self._recover:
                self._enter_recovery()

        # Window update (RFC 9293: only from segments newer than the last one used).
        if self._wl1 < seq_off or (self._wl1 == seq_off and self._wl2 <= ack_off):
            self._snd_wnd = wnd
            self._wl1 = seq_off
            self._wl2 = ack_off
            if wnd > self._max_snd_wnd:
                self._max_snd_wnd = wnd
            elif wnd == 0 and ack_off == una:
                # A guest that answers our forced retransmission with a closed window is
                # alive: keep probing instead of counting towards giving up (as Linux).
                self._retries = 0
        return True

    def _our_fin_acked(self, now: float) -> None:
        st = self._state
        if st is TcpState.FIN_WAIT_1:
            self._state = TcpState.FIN_WAIT_2
        elif st is TcpState.CLOSING:
            self._enter_time_wait(now)
        elif st is TcpState.LAST_ACK:
            self._to_closed()

    def _enter_recovery(self) -> None:
        smss = self._smss
        una = self._snd_una
        self.stats.fast_retransmits += 1
        self._ssthresh = max((self._snd_max - una) // 2, 2 * smss)
        self._cwnd = self._ssthresh + 3 * smss
        self._recover = self._snd_max
        self._in_recovery = True
        self._rexmit_hi = una
        self._rtt_off = None  # Karn
        self._queue_hole(una)

    def _queue_hole(self, start: int) -> None:
        end = min(start + self._smss, self._snd_max)
        for s, e in self._sacked:
            if e <= start:
                continue
            if s <= start:
                return  # already SACKed
            end = min(end, s)
            break
        if start < end:
            self._rexmit.append((start, end))
            if end > self._rexmit_hi:
                self._rexmit_hi = end

    def _queue_next_sack_hole(self) -> None:
        # One more hole below the highest SACKed byte for each ACK that tells us a segment
        # left the network (a simplified RFC 6675 NextSeg()).
        if not self._sacked:
            return
        p = max(self._rexmit_hi, self._snd_una)
        for s, e in self._sacked:
            if p < s:
                self._queue_hole(p)
                return
            if p < e:
                p = e

    def _update_sacked(self, blocks: tuple[tuple[int, int], ...], una: int) -> None:
        ref = (self._iss + una) & _MASK
        sacked = self._sacked
        for left, right in blocks:
            s = una + seq_diff(left, ref)
            e = una + seq_diff(right, ref)
            if s < una:
                s = una  # D-SACK or stale: only the part above snd_una matters
            if e > self._snd_max:
                e = self._snd_max
            if s >= e:
                continue
            # Merge [s, e) into the sorted disjoint list (tiny: a handful of ranges).
            merged: list[list[int]] = []
            placed = False
            for r in sacked:
                if r[1] < s:
                    merged.append(r)
                elif e < r[0]:
                    if not placed:
                        merged.append([s, e])
                        placed = True
                    merged.append(r)
                else:
                    s = min(s, r[0])
                    e = max(e, r[1])
            if not placed:
                merged.append([s, e])
                merged.sort()
            sacked[:] = merged

    def _rx_data(self, seq_off: int, payload: bytes | memoryview, now: float) -> bool:
        """Take the payload at `seq_off`; False when its tail did not fit the window."""
        st = self.stats
        rcv_nxt = self._rcv_nxt
        plen = len(payload)
        end = seq_off + plen
        if end <= rcv_nxt:
            st.dup_segments += 1
            self._want_ack(now)
            return True
        limit = max(self._rcv_adv, rcv_nxt + self._recv_buffer - len(self._rcvbuf))
        if seq_off >= limit:
            st.dropped_segments += 1
            self._want_ack(now)
            return False
        whole = end <= limit
        if seq_off < rcv_nxt or not whole:
            mv = memoryview(payload)
            start = max(seq_off, rcv_nxt)
            payload = mv[start - seq_off : min(end, limit) - seq_off]
            seq_off = start
            end = min(end, limit)
        if seq_off == rcv_nxt:
            self._rcvbuf += payload
            rcv_nxt = end
            if self._ooo_starts:
                rcv_nxt = self._drain_ooo(rcv_nxt)
                self._want_ack(now)  # a hole filled: the guest waits for this ACK
            delivered = rcv_nxt - self._rcv_nxt
            self._rcv_nxt = rcv_nxt
            st.bytes_in += delivered
            ev = self._events[-1] if self._events else None
            if type(ev) is DataReceived:
                ev.length += delivered
            else:
                self._events.append(DataReceived(delivered))
            self._want_delayed_ack(now, plen)
            if self._rfin_off is not None and self._rfin_off == rcv_nxt:
                self._rx_fin(now)
        else:
            if self._ooo_insert(seq_off, payload):
                st.ooo_segments += 1
            else:
                st.dup_segments += 1
            # Immediate duplicate ACK (RFC 5681 4.2) with SACK blocks, one per segment so
            # a guest without SACK still counts three of them for fast retransmit.
            self._out.append(self._segment(self._snd_nxt, ACK, options=self._sack_option()))
        return whole

    def _drain_ooo(self, rcv_nxt: int) -> int:
        starts = self._ooo_starts
        datas = self._ooo_data
        while starts and starts[0] <= rcv_nxt:
            s = starts.pop(0)
            d = datas.pop(0)
            self._ooo_bytes -= len(d)
            e = s + len(d)
            if e > rcv_nxt:
                if s == rcv_nxt:
                    self._rcvbuf += d
                else:
                    with memoryview(d) as mv:
                        self._rcvbuf += mv[rcv_nxt - s :]
                rcv_nxt = e
        self._last_ooo = None
        return rcv_nxt

    def _ooo_insert(self, s: int, payload: bytes | memoryview) -> bool:
        """Store [s, s+len) beyond a hole; False when it added nothing new."""
        e = s + len(payload)
        starts = self._ooo_starts
        datas = self._ooo_data
        i = bisect_left(starts, s)
        # Fast path: extends the run just before it (the common in-order-after-hole case).
        if i > 0:
            ps = starts[i - 1]
            pd = datas[i - 1]
            pe = ps + len(pd)
            if pe >= e:
                return False  # entirely inside an existing run
            if pe >= s and (i == len(starts) or e < starts[i]):
                with memoryview(payload) as mv:
                    pd += mv[pe - s :]
                self._ooo_bytes += e - pe
                self._last_ooo = (s, e)
                return True
        if len(starts) >= _MAX_OOO_RUNS:
            return False
        # General case: merge with every run it overlaps or touches.
        lo = i - 1 if i > 0 and starts[i - 1] + len(datas[i - 1]) >= s else i
        hi = i
        while hi < len(starts) and starts[hi] <= e:
            hi += 1
        if lo == hi:
            starts.insert(i, s)
            datas.insert(i, bytearray(payload))
            self._ooo_bytes += e - s
            self._last_ooo = (s, e)
            return True
        ns = min(s, starts[lo])
        ne = max(e, starts[hi - 1] + len(datas[hi - 1]))
        merged = bytearray(ne - ns)
        merged[s - ns : e - ns] = payload
        old = 0
        for j in range(lo, hi):
            js = starts[j]
            merged[js - ns : js - ns + len(datas[j])] = datas[j]
            old += len(datas[j])
        if old == ne - ns:
            return False
        starts[lo:hi] = [ns]
        datas[lo:hi] = [merged]
        self._ooo_bytes += (ne - ns) - old
        self._last_ooo = (s, e)
        return True

    def __repr__(self) -> str:
        return (
            f"<TcpConnection {self.remote_port}->{self.local_port} {self._state.name} "
            f"una={self._snd_una} nxt={self._snd_nxt} max={self._snd_max} "
            f"wnd={self._snd_wnd} cwnd={self._cwnd} rcv_nxt={self._rcv_nxt} "
            f"sndbuf={len(self._sndbuf)} rcvbuf={len(self._rcvbuf)}>"
        )
