"""Segment-by-segment tests of hostd.stack.tcp with a fake clock.

Two kinds of peers play the guest:

* `Guest`: a deliberately small TCP written here, independently of the module under test
  (go-back-N sender, in-order-only receiver), driven step by step so that each test can
  craft exactly the segments a Linux guest would send (via `build_segment` or scapy).
* `simulate()`: two `TcpConnection`s (the guest side opened with `connect()`, the host side
  with `from_syn` + `accept`) joined by `Net`, a seeded discrete-event network that can
  drop, duplicate and reorder segments, for multi-MiB transfers checked with sha256.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
import time
from dataclasses import dataclass, field

import pytest
from scapy.layers.inet import IP, TCP

from netferry.hostd.stack.checksum import verify_transport_v4
from netferry.hostd.stack.tcp import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    Closed,
    Connected,
    ConnectionFailed,
    ConnectionReset,
    DataReceived,
    PeerClosed,
    SendSpaceAvailable,
    TcpConnection,
    TcpEvent,
    TcpParseError,
    TcpSegment,
    TcpState,
    TcpStateError,
    build_options,
    build_reset_reply,
    build_segment,
    seq_diff,
)

G_IP = bytes([10, 0, 2, 15])  # the guest
H_IP = bytes([93, 184, 216, 34])  # the address the guest dialled (we impersonate it)
G_PORT = 40000
H_PORT = 443
M32 = 0xFFFFFFFF


def out_segments(conn: TcpConnection, now: float) -> list[TcpSegment]:
    """Drain `conn`, checking every checksum, and parse what it sent."""
    segs = []
    for raw in conn.segments_to_send(now):
        assert verify_transport_v4(conn.local_ip, conn.remote_ip, 6, raw)
        seg = TcpSegment.parse(raw)
        assert (seg.src_port, seg.dst_port) == (conn.local_port, conn.remote_port)
        segs.append(seg)
    return segs


def events(conn: TcpConnection) -> list[TcpEvent]:
    evs = []
    while (ev := conn.next_event()) is not None:
        evs.append(ev)
    return evs


def event_types(conn: TcpConnection) -> list[type]:
    return [type(e) for e in events(conn)]


def rand_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------- a small guest


@dataclass
class Guest:
    """Guest-side TCP state, kept independently of the module under test."""

    isn: int = 1_000_000
    window: int = 0xFFFF  # raw window field we (the guest) advertise
    wscale: int | None = 7  # our shift; None: do not offer window scaling
    mss: int = 1460
    sack: bool = True
    snd_nxt: int = 0
    snd_una: int = 0
    rcv_nxt: int = 0
    peer_wscale: int = 0
    peer_window: int = 0  # host's window, scaled, relative to snd_una
    peer_mss: int = 536
    received: bytearray = field(default_factory=bytearray)
    fin_received: bool = False
    max_seg_seen: int = 0

    def __post_init__(self) -> None:
        self.snd_nxt = self.isn
        self.snd_una = self.isn

    def seg(
        self,
        flags: int = ACK,
        payload: bytes = b"",
        *,
        seq: int | None = None,
        ack: int | None = None,
        window: int | None = None,
        options: bytes = b"",
    ) -> TcpSegment:
        raw = build_segment(
            G_IP,
            H_IP,
            G_PORT,
            H_PORT,
            self.snd_nxt if seq is None else seq,
            (self.rcv_nxt if ack is None else ack) if flags & ACK else 0,
            flags,
            self.window if window is None else window,
            options,
            payload,
        )
        assert verify_transport_v4(G_IP, H_IP, 6, raw)
        return TcpSegment.parse(raw)

    def syn(self) -> TcpSegment:
        opts = build_options(
            mss=self.mss, wscale=self.wscale, sack_permitted=self.sack, timestamps=(7, 0)
        )
        s = self.seg(SYN, options=opts, window=64240)
        self.snd_nxt = (self.isn + 1) & M32
        return s

    def data(self, payload: bytes, flags: int = ACK | PSH) -> TcpSegment:
        s = self.seg(flags, payload)
        self.snd_nxt = (self.snd_nxt + len(payload) + (1 if flags & FIN else 0)) & M32
        return s

    def fin(self) -> TcpSegment:
        return self.data(b"", ACK | FIN)

    def handle(self, seg: TcpSegment) -> None:
        """Take one segment from the host: ACK, window, in-order data and FIN."""
        if seg.flags & SYN:
            self.rcv_nxt = (seg.seq + 1) & M32
            self.peer_mss = seg.options.mss or 536
            if seg.options.wscale is not None and self.wscale is not None:
                self.peer_wscale = seg.options.wscale
            self.peer_window = seg.window
        if seg.flags & ACK:
            if seq_diff(seg.ack, self.snd_una) > 0:
                self.snd_una = seg.ack
            if not seg.flags & SYN:
                self.peer_window = seg.window << self.peer_wscale
        self.max_seg_seen = max(self.max_seg_seen, len(seg.payload))
        if seg.payload and seg.seq == self.rcv_nxt:
            self.received += seg.payload
            self.rcv_nxt = (self.rcv_nxt + len(seg.payload)) & M32
        if seg.flags & FIN and (seg.seq + len(seg.payload)) & M32 == self.rcv_nxt:
            self.rcv_nxt = (self.rcv_nxt + 1) & M32
            self.fin_received = True


def passive_open(
    guest: Guest | None = None, now: float = 0.0, **kw: object
) -> tuple[TcpConnection, Guest]:
    g = guest or Guest()
    conn = TcpConnection.from_syn(H_IP, H_PORT, G_IP, G_PORT, g.syn(), now=now, **kw)
    assert conn.segments_to_send(now) == []  # nothing before accept()
    conn.accept(now)
    (synack,) = out_segments(conn, now)
    assert synack.flags == SYN | ACK
    g.handle(synack)
    conn.receive_segment(g.seg(), now)
    assert conn.state is TcpState.ESTABLISHED
    assert event_types(conn) == [Connected]
    return conn, g


def pump_to_guest(conn: TcpConnection, g: Guest, now: float, *, ack: bool = True) -> int:
    """Deliver everything the host sends to the guest; the guest ACKs once. Returns bytes."""
    segs = out_segments(conn, now)
    n = 0
    for s in segs:
        if s.payload:
            # Never beyond the guest's advertised window.
            right = (g.rcv_nxt + (g.window << (7 if g.wscale is not None else 0))) & M32
            assert seq_diff((s.seq + len(s.payload)) & M32, right) <= 0
        g.handle(s)
        n += len(s.payload)
    if ack and segs:
        conn.receive_segment(g.seg(), now)
    return n


# --------------------------------------------------------------------------- parsing


def test_build_and_parse_roundtrip_matches_scapy() -> None:
    opts = build_options(mss=1460, wscale=7, sack_permitted=True, sack_blocks=[(5, 9)])
    raw = build_segment(G_IP, H_IP, 1234, 80, 0xFFFFFFF0, 77, ACK | PSH, 501, opts, b"hello")
    assert verify_transport_v4(G_IP, H_IP, 6, raw)
    seg = TcpSegment.parse(raw)
    assert (seg.src_port, seg.dst_port, seg.seq, seg.ack) == (1234, 80, 0xFFFFFFF0, 77)
    assert seg.flags == ACK | PSH and seg.window == 501 and bytes(seg.payload) == b"hello"
    assert seg.options.mss == 1460 and seg.options.wscale == 7
    assert seg.options.sack_permitted and seg.options.sack_blocks == ((5, 9),)
    # scapy agrees on the checksum and the options.
    pkt = IP(src="10.0.2.15", dst="93.184.216.34") / TCP(raw)
    ours = pkt[TCP].chksum
    del pkt[TCP].chksum  # let scapy compute it
    assert IP(bytes(pkt))[TCP].chksum == ours
    parsed = TCP(raw)
    assert ("MSS", 1460) in parsed.options and ("WScale", 7) in parsed.options
    assert ("SAck", (5, 9)) in parsed.options


def test_parse_scapy_syn_with_timestamps() -> None:
    pkt = IP(src="10.0.2.15", dst="93.184.216.34") / TCP(
        sport=G_PORT,
        dport=H_PORT,
        seq=0xFFFFFFFF,
        flags="S",
        window=64240,
        options=[
            ("MSS", 65495),
            ("SAckOK", b""),
            ("Timestamp", (11, 0)),
            ("NOP", None),
            ("WScale", 15),
        ],
    )
    raw = bytes(pkt)[20:]
    assert verify_transport_v4(G_IP, H_IP, 6, raw)
    seg = TcpSegment.parse(memoryview(raw))
    assert seg.flags == SYN and seg.seq == 0xFFFFFFFF and seg.seg_len == 1
    o = seg.options
    assert (o.mss, o.wscale, o.sack_permitted, o.timestamps) == (65495, 14, True, (11, 0))


def test_parse_errors() -> None:
    good = build_segment(G_IP, H_IP, 1, 2, 3, 4, ACK, 5, build_options(mss=100), b"x")
    with pytest.raises(TcpParseError):
        TcpSegment.parse(good[:19])
    with pytest.raises(ValueError):  # TcpParseError is a ValueError
        TcpSegment.parse(b"")
    bad_off = bytearray(good)
    bad_off[12] = 4 << 4  # data offset 16 bytes < 20
    with pytest.raises(TcpParseError):
        TcpSegment.parse(bytes(bad_off))
    bad_off[12] = 15 << 4  # 60 bytes > segment length
    with pytest.raises(TcpParseError):
        TcpSegment.parse(bytes(bad_off))
    # A malformed option ends option parsing (like Linux) but the segment is fine.
    weird = build_segment(G_IP, H_IP, 1, 2, 3, 4, ACK, 5, b"\x02\x04\x05\xb4\x03\x00\x00\x00")
    assert TcpSegment.parse(weird).options.mss == 1460
    truncated_opt = build_segment(G_IP, H_IP, 1, 2, 3, 4, ACK, 5, b"\x01\x01\x01\x02")
    assert TcpSegment.parse(truncated_opt).options.mss is None


def test_seq_diff_wraps() -> None:
    assert seq_diff(5, 0xFFFFFFFB) == 10
    assert seq_diff(0xFFFFFFFB, 5) == -10
    assert seq_diff(7, 7) == 0


# --------------------------------------------------------------------------- open / refuse


def test_passive_open_synack_options_and_window() -> None:
    g = Guest(isn=4242, mss=1400, wscale=9)
    conn = TcpConnection.from_syn(
        H_IP, H_PORT, G_IP, G_PORT, g.syn(), now=0.0, isn=777, recv_buffer=4 << 20
    )
    assert conn.state is TcpState.LISTEN
    assert conn.segments_to_send(0.0) == []
    conn.accept(0.0)
    assert conn.state is TcpState.SYN_RECEIVED
    raws = conn.segments_to_send(0.0)
    assert len(raws) == 1
    ref = TCP(raws[0])
    assert ref.flags == "SA" and ref.seq == 777 and ref.ack == 4243
    opts = dict(ref.options)
    assert opts["MSS"] == 1460 and opts["WScale"] == 7 and "SAckOK" in opts
    assert "Timestamp" not in opts  # not supported, never advertised
    assert ref.window == 0xFFFF
    assert conn.effective_mss == 1400
    g.handle(TcpSegment.parse(raws[0]))
    conn.receive_segment(g.seg(), 0.01)
    assert conn.state is TcpState.ESTABLISHED and event_types(conn) == [Connected]
    # After the handshake the window is scaled: 4 MiB >> 7.
    conn.receive_segment(g.data(b"abc"), 0.02)
    (ack,) = out_segments(conn, 0.02)
    assert ack.ack == (4243 + 3) and ack.window == ((4 << 20) - 3) >> 7


def test_passive_open_without_wscale_and_sack() -> None:
    g = Guest(wscale=None, sack=False, mss=1200)
    conn = TcpConnection.from_syn(H_IP, H_PORT, G_IP, G_PORT, g.syn(), now=0.0)
    conn.accept(0.0)
    (synack,) = out_segments(conn, 0.0)
    assert synack.options.wscale is None and not synack.options.sack_permitted
    assert synack.options.mss == 1460
    g.handle(synack)
    conn.receive_segment(g.seg(), 0.0)
    conn.receive_segment(g.data(b"x" * 100), 0.0)
    (ack,) = out_segments(conn, 0.0)
    assert ack.window == 0xFFFF  # unscaled, capped
    conn.send(b"y" * 5000)
    segs = out_segments(conn, 0.0)
    assert [len(s.payload) for s in segs] == [1200, 1200, 1200, 1200, 200]


def test_synack_retransmitted_on_timer_and_on_guest_syn_retransmit() -> None:
    g = Guest()
    syn = g.syn()
    conn = TcpConnection.from_syn(H_IP, H_PORT, G_IP, G_PORT, syn, now=0.0, syn_retries=2)
    conn.receive_segment(syn, 0.5)  # guest retransmits while the host dial is pending
    assert conn.segments_to_send(0.5) == []
    conn.accept(1.0)
    assert len(out_segments(conn, 1.0)) == 1
    assert conn.get_timer() == pytest.approx(2.0)
    conn.receive_segment(syn, 1.2)  # our SYN-ACK was lost: answer the retransmit at once
    (again,) = out_segments(conn, 1.2)
    assert again.flags == SYN | ACK
    conn.handle_timer(2.0)
    assert [s.flags for s in out_segments(conn, 2.0)] == [SYN | ACK]
    assert conn.get_timer() == pytest.approx(4.0)
    conn.handle_timer(4.0)
    assert len(out_segments(conn, 4.0)) == 1
    conn.handle_timer(8.0)
    assert conn.state is TcpState.CLOSED
    assert event_types(conn) == [ConnectionFailed, Closed]


def test_refuse_sends_rst_ack() -> None:
    g = Guest(isn=0xFFFFFFFF)
    conn = TcpConnection.from_syn(H_IP, H_PORT, G_IP, G_PORT, g.syn(), now=0.0)
    conn.refuse(0.0)
    (rst,) = out_segments(conn, 0.0)
    assert rst.flags == RST | ACK and rst.seq == 0 and rst.ack == 0  # ISN + 1 wraps to 0
    assert conn.state is TcpState.CLOSED and event_types(conn) == [Closed]
    # A retransmitted SYN reaching the dead connection is answered the same way.
    conn.receive_segment(g.seg(SYN, seq=0xFFFFFFFF), 0.1)
    (rst2,) = out_segments(conn, 0.1)
    assert rst2.flags == RST | ACK and rst2.ack == 0


def test_guest_rst_before_accept() -> None:
    g = Guest()
    conn = TcpConnection.from_syn(H_IP, H_PORT, G_IP, G_PORT, g.syn(), now=0.0)
    conn.receive_segment(g.seg(RST), 0.1)
    assert conn.state is TcpState.CLOSED
    assert event_types(conn) == [ConnectionFailed, Closed]


def test_active_open_syn_retransmit_and_failure() -> None:
    conn = TcpConnection(H_IP, H_PORT, G_IP, G_PORT, now=0.0, isn=5, syn_retries=3)
    conn.connect(0.0)
    assert conn.state is TcpState.SYN_SENT
    (syn,) = out_segments(conn, 0.0)
    assert syn.flags == SYN and syn.seq == 5
    assert syn.options.mss == 1460 and syn.options.wscale == 7 and syn.options.sack_permitted
    times = []
    now = 0.0
    while conn.state is TcpState.SYN_SENT:
        now = conn.get_timer()
        assert now is not None
        conn.handle_timer(now)
        for s in out_segments(conn, now):
            assert s.flags == SYN and s.seq == 5
            times.append(now)
    assert times == pytest.approx([1.0, 3.0, 7.0])
    assert now == pytest.approx(15.0)
    assert event_types(conn) == [ConnectionFailed, Closed]
    assert conn.get_timer() is None


def test_active_open_success_and_options() -> None:
    conn = TcpConnection(H_IP, H_PORT, G_IP, G_PORT, now=0.0, isn=0xFFFFFFFF, mss=9000)
    conn.connect(0.0)
    (syn,) = out_segments(conn, 0.0)
    g = Guest(isn=0xFFFFFFF0, wscale=3)
    g.handle(syn)
    assert g.rcv_nxt == 0
    opts = build_options(mss=1460, wscale=3, sack_permitted=True)
    synack = g.seg(SYN | ACK, options=opts, window=29200)
    g.snd_nxt = (g.isn + 1) & M32
    conn.receive_segment(synack, 0.05)
    assert conn.state is TcpState.ESTABLISHED and event_types(conn) == [Connected]
    (ack,) = out_segments(conn, 0.05)
    assert ack.flags == ACK and ack.seq == 0 and ack.ack == 0xFFFFFFF1
    assert conn.effective_mss == 1460
    assert conn.get_timer() is None
    # The guest's window 29200 (in the SYN, unscaled) bounds the first burst.
    conn.send(b"z" * 100_000)
    assert sum(len(s.payload) for s in out_segments(conn, 0.05)) <= 29200


def test_close_before_the_guest_answers_keeps_the_queued_bytes() -> None:
    """A forwarded client that sends and shuts down before the guest's SYN-ACK (found as a
    flaky forward test: RST after the SYN-ACK, nothing delivered): the bytes go out once
    the handshake completes, then the FIN."""
    conn = TcpConnection(H_IP, H_PORT, G_IP, G_PORT, now=0.0, isn=1000)
    conn.connect(0.0)
    (syn,) = out_segments(conn, 0.0)
    assert conn.send(b"early bytes") == 11
    conn.close()
    assert conn.state is TcpState.SYN_SENT  # not dropped
    g = Guest(isn=77)
    g.handle(syn)
    g.snd_nxt = (g.isn + 1) & M32
    conn.receive_segment(g.seg(SYN | ACK), 0.01)
    assert conn.state is TcpState.FIN_WAIT_1
    assert event_types(conn) == [Connected]
    segs = out_segments(conn, 0.01)
    assert b"".join(s.payload for s in segs) == b"early bytes"
    assert segs[-1].flags & FIN and not any(s.flags & RST for s in segs)


def test_active_open_refused() -> None:
    conn = TcpConnection(H_IP, H_PORT, G_IP, G_PORT, now=0.0, isn=100)
    conn.connect(0.0)
    out_segments(conn, 0.0)
    g = Guest()
    # An RST with an unacceptable ACK is ignored ...
    conn.receive_segment(g.seg(RST | ACK, seq=0, ack=555), 0.01)
    assert conn.state is TcpState.SYN_SENT
    # ... a SYN-ACK acking the wrong thing is answered with RST ...
    conn.receive_segment(g.seg(SYN | ACK, ack=555), 0.01)
    (rst,) = out_segments(conn, 0.01)
    assert rst.flags == RST and rst.seq == 555
    # ... and the kernel's "connection refused" answer fails the open.
    conn.receive_segment(g.seg(RST | ACK, seq=0, ack=101), 0.02)
    assert conn.state is TcpState.CLOSED
    evs = events(conn)
    assert evs == [ConnectionFailed("refused"), Closed()]


def test_simultaneous_open() -> None:
    conn = TcpConnection(H_IP, H_PORT, G_IP, G_PORT, now=0.0, isn=100)
    conn.connect(0.0)
    out_segments(conn, 0.0)
    g = Guest(isn=9000)
    conn.receive_segment(g.syn(), 0.01)  # a bare SYN crossing ours
    assert conn.state is TcpState.SYN_RECEIVED
    (synack,) = out_segments(conn, 0.01)
    assert synack.flags == SYN | ACK and synack.seq == 100 and synack.ack == 9001
    g.handle(synack)
    conn.receive_segment(g.seg(SYN | ACK, seq=9000, ack=101), 0.02)
    assert conn.state is TcpState.ESTABLISHED
    assert event_types(conn) == [Connected]


# --------------------------------------------------------------------------- data transfer


def test_bulk_host_to_guest_byte_exact_and_segmented() -> None:
    conn, g = passive_open(Guest(mss=1460, window=2048), send_buffer=1 << 20)
    data = rand_bytes(5 << 20, 1)
    off = 0
    now = 0.0
    while len(g.received) < len(data):
        now += 0.001
        off += conn.send(memoryview(data)[off : off + 300_000])
        pump_to_guest(conn, g, now)
    assert bytes(g.received) == data
    assert g.max_seg_seen == 1460
    assert conn.stats.retransmits == 0
    assert conn.stats.bytes_out == len(data)


def test_bulk_guest_to_host_byte_exact() -> None:
    conn, g = passive_open(recv_buffer=1 << 20)
    data = rand_bytes(6 << 20, 2)
    got = bytearray()
    off = 0
    now = 0.0
    while len(got) < len(data):
        now += 0.001
        # The guest sends 1448-byte segments up to the window we advertised.
        while off < len(data):
            room = seq_diff((g.snd_una + g.peer_window) & M32, g.snd_nxt)
            n = min(1448, room, len(data) - off)
            if n <= 0:
                break
            conn.receive_segment(g.data(data[off : off + n]), now)
            off += n
        acks = out_segments(conn, now)
        assert len(acks) <= 1  # one coalesced ACK per batch
        for a in acks:
            g.handle(a)
        got += conn.read()
        # Reading may open the window: a window update follows when the guest is stalled.
        for a in out_segments(conn, now):
            g.handle(a)
    assert bytes(got) == data
    assert conn.stats.bytes_in == len(data)


def test_large_mss_segments_up_to_64k() -> None:
    g = Guest(mss=65480, window=0xFFFF)
    conn, g = passive_open(g, mss=65480)
    data = rand_bytes(1 << 20, 3)
    conn.send(data)
    now = 0.0
    while len(g.received) < len(data):
        now += 0.001
        pump_to_guest(conn, g, now)
    assert bytes(g.received) == data and g.max_seg_seen == 65480


def test_send_backpressure_and_send_space_available() -> None:
    conn, g = passive_open(send_buffer=10_000)
    assert conn.send_space() == 10_000
    assert conn.send(b"a" * 25_000) == 10_000
    assert conn.send(b"b") == 0
    assert conn.send_space() == 0
    segs = out_segments(conn, 0.0)
    assert sum(len(s.payload) for s in segs) == 10_000
    for s in segs:
        g.handle(s)
    conn.receive_segment(g.seg(ack=(segs[1].seq) & M32), 0.01)  # partial ACK: 1460 bytes
    assert event_types(conn) == []  # < a quarter free
    conn.receive_segment(g.seg(), 0.02)
    (ev,) = events(conn)
    assert isinstance(ev, SendSpaceAvailable) and ev.space == 10_000


def test_guest_zero_window_probe_and_resume() -> None:
    conn, g = passive_open(Guest(window=20, wscale=7))  # 2560 bytes of window
    conn.send(b"q" * 5000)
    segs = out_segments(conn, 0.0)
    # One full segment; the 1100 bytes left in the window wait (sender SWS avoidance).
    assert [len(s.payload) for s in segs] == [1460]
    for s in segs:
        g.handle(s)
    g.window = 0
    conn.receive_segment(g.seg(), 0.01)  # ACK everything, window now closed
    assert out_segments(conn, 0.01) == []
    t1 = conn.get_timer()
    assert t1 is not None and t1 > 0.01
    # Probes back off exponentially and carry an old sequence number (snd_una - 1).
    probe_times = []
    now = 0.01
    for _ in range(4):
        now = conn.get_timer()
        conn.handle_timer(now)
        (probe,) = out_segments(conn, now)
        assert not probe.payload and probe.seq == (g.rcv_nxt - 1) & M32
        probe_times.append(now)
        conn.receive_segment(g.seg(), now)  # the guest answers: still zero
        assert out_segments(conn, now) == []
    gaps = [b - a for a, b in itertools.pairwise(probe_times)]
    assert gaps[1] == pytest.approx(2 * gaps[0]) and gaps[2] == pytest.approx(2 * gaps[1])
    assert conn.state is TcpState.ESTABLISHED and conn.stats.window_probes == 4
    # A tiny window (less than half the largest seen) is used only when the persist timer
    # forces it.
    g.window = 1  # 128 bytes
    conn.receive_segment(g.seg(), now + 0.01)
    assert out_segments(conn, now + 0.01) == []
    now = conn.get_timer()
    conn.handle_timer(now)
    (forced,) = out_segments(conn, now)
    assert len(forced.payload) == 128
    g.handle(forced)
    # The guest reads and opens its window: we resume.
    g.window = 100
    conn.receive_segment(g.seg(), now + 0.01)
    rest = out_segments(conn, now + 0.01)
    assert sum(len(s.payload) for s in rest) == 5000 - 1460 - 128
    for s in rest:
        g.handle(s)
    assert bytes(g.received) == b"q" * 5000
    assert conn.get_timer() is not None  # RTO for the data in flight
    conn.receive_segment(g.seg(), now + 0.02)
    assert conn.get_timer() is None


def test_our_receive_buffer_full_zero_window_then_update() -> None:
    conn, g = passive_open(recv_buffer=8192)
    data = rand_bytes(12_000, 4)
    conn.receive_segment(g.data(data[:4096]), 0.0)
    conn.receive_segment(g.data(data[4096:8192]), 0.0)
    (ack,) = out_segments(conn, 0.0)
    assert ack.window == 0 and ack.ack == (g.isn + 1 + 8192) & M32
    # Data beyond a zero window is dropped and answered with an ACK.
    conn.receive_segment(g.data(data[8192:9000]), 0.01)
    (dup,) = out_segments(conn, 0.01)
    assert dup.window == 0 and dup.ack == ack.ack
    g.snd_nxt = ack.ack  # the guest will resend
    # The guest's zero-window probe (seq = rcv_nxt - 1) gets an ACK.
    conn.receive_segment(g.seg(seq=(ack.ack - 1) & M32), 0.02)
    assert [s.window for s in out_segments(conn, 0.02)] == [0]
    # A small read does not reopen (SWS avoidance); a big one sends a window update.
    assert conn.read(100) == data[:100]
    assert out_segments(conn, 0.03) == []
    assert conn.read(5000) == data[100:5100]
    (upd,) = out_segments(conn, 0.04)
    assert upd.ack == ack.ack and upd.window == 5100 and not upd.payload
    conn.receive_segment(g.data(data[8192:12_000]), 0.05)
    assert conn.read() == data[5100:]


def test_rto_retransmit_backoff_and_rtt() -> None:
    conn, g = passive_open()
    conn.send(b"A" * 1000)
    (seg,) = out_segments(conn, 0.0)
    # The handshake measured an RTT of 0: RTO is the 200 ms floor.
    assert conn.get_timer() == pytest.approx(0.2)
    conn.handle_timer(0.2)
    (again,) = out_segments(conn, 0.2)
    assert again.seq == seg.seq and bytes(again.payload) == bytes(seg.payload)
    assert conn.get_timer() == pytest.approx(0.6)  # doubled
    conn.handle_timer(conn.get_timer())
    assert len(out_segments(conn, 0.6)) == 1
    assert conn.get_timer() == pytest.approx(1.4)
    g.handle(again)
    conn.receive_segment(g.seg(), 3.01)
    assert conn.get_timer() is None
    assert conn.stats.retransmits == 2 and conn.stats.timeouts == 2
    # Karn: no sample from the retransmitted segment; the next clean one gives ~rto_min.
    conn.send(b"B" * 10)
    for s in out_segments(conn, 4.0):
        g.handle(s)
    conn.receive_segment(g.seg(), 4.005)
    conn.send(b"C" * 10)
    out_segments(conn, 5.0)
    assert conn.get_timer() == pytest.approx(5.2)


def test_retries_exhausted_resets() -> None:
    conn, _ = passive_open(max_retries=3)
    conn.send(b"x" * 100)
    out_segments(conn, 0.0)
    for _ in range(3):
        conn.handle_timer(conn.get_timer())
        assert len(out_segments(conn, 0.0)) == 1
    conn.handle_timer(conn.get_timer())
    (rst,) = out_segments(conn, 0.0)
    assert rst.flags & RST
    assert events(conn) == [ConnectionReset("timeout"), Closed()]
    assert conn.state is TcpState.CLOSED


def test_fast_retransmit_on_three_dup_acks_with_sack() -> None:
    conn, g = passive_open()
    data = rand_bytes(1460 * 8, 5)
    conn.send(data)
    segs = out_segments(conn, 0.0)
    assert len(segs) == 8
    una = segs[0].seq
    # Segment 1 (the second) is lost; the guest SACKs the rest one by one.
    g.handle(segs[0])
    conn.receive_segment(g.seg(), 0.001)
    for k in range(2, 6):
        left = segs[2].seq
        right = (segs[k].seq + 1460) & M32
        conn.receive_segment(g.seg(options=build_options(sack_blocks=[(left, right)])), 0.002)
    out = out_segments(conn, 0.002)
    assert conn.stats.fast_retransmits == 1
    rexmit = [s for s in out if s.seq == segs[1].seq]
    assert len(rexmit) == 1 and bytes(rexmit[0].payload) == data[1460:2920]
    # SACKed data is not resent; only the hole.
    assert all(s.seq not in {segs[k].seq for k in range(2, 6)} for s in out)
    g.handle(rexmit[0])
    for k in range(2, 8):
        g.handle(segs[k])
    conn.receive_segment(g.seg(), 0.003)
    assert conn.get_timer() is None
    assert seq_diff(g.rcv_nxt, una) == len(data) and bytes(g.received) == data


def test_fast_retransmit_without_sack_newreno_partial_acks() -> None:
    conn, g = passive_open(Guest(sack=False))
    data = rand_bytes(1460 * 10, 6)
    conn.send(data)
    segs = out_segments(conn, 0.0)
    lost = {1, 4}
    for k, s in enumerate(segs):
        if k not in lost:
            before = g.rcv_nxt
            g.handle(s)
            if k > 1:
                assert g.rcv_nxt == before  # the simple guest drops out-of-order data
            conn.receive_segment(g.seg(), 0.001)
    resent = out_segments(conn, 0.001)
    assert [s.seq for s in resent if s.payload][:1] == [segs[1].seq]
    for s in resent:
        g.handle(s)
    # Partial ACK (up to the second hole) triggers the retransmission of that hole.
    g.received.clear()
    for s in segs[2:4]:
        g.handle(s)
    conn.receive_segment(g.seg(), 0.002)
    second = [s for s in out_segments(conn, 0.002) if s.payload]
    assert second and second[0].seq == segs[4].seq
    for s in [second[0], *segs[5:]]:
        g.handle(s)
    conn.receive_segment(g.seg(), 0.003)
    assert seq_diff(g.rcv_nxt, segs[0].seq) == len(data)
    assert conn.stats.fast_retransmits == 1 and conn.get_timer() is None


def test_out_of_order_duplicate_and_lost_guest_segments() -> None:
    conn, g = passive_open()
    data = rand_bytes(20 * 1000, 7)
    base = g.snd_nxt
    chunks = [(base + i, data[i : i + 1000]) for i in range(0, len(data), 1000)]  # 20 segments
    rng = random.Random(8)
    order = list(range(20))
    rng.shuffle(order)
    order += [3, 3, 7]  # duplicates
    got = bytearray()
    sack_seen = False
    for idx in order:
        if idx == 11 and order.count(11) == 1:
            order.append(11)  # "lost": delivered only at the very end
            continue
        seq, chunk = chunks[idx]
        conn.receive_segment(g.seg(ACK | PSH, chunk, seq=seq & M32), 0.0)
        for a in out_segments(conn, 0.0):
            sack_seen |= bool(a.options.sack_blocks)
        got += conn.read()
    got += conn.read()
    assert bytes(got) == data
    assert sack_seen and conn.stats.ooo_segments > 0 and conn.stats.dup_segments >= 3


def test_overlapping_out_of_order_segments_merge() -> None:
    conn, g = passive_open()
    data = rand_bytes(10_000, 9)
    b = g.snd_nxt
    pieces = [(5000, 7000), (6000, 9000), (2000, 3000), (2500, 5500), (9000, 10_000), (100, 2100)]
    for s, e in pieces:
        conn.receive_segment(g.seg(ACK, data[s:e], seq=(b + s) & M32), 0.0)
        acks = out_segments(conn, 0.0)
        assert acks and all(a.ack == (b & M32) for a in acks)
    blocks = acks[-1].options.sack_blocks
    assert blocks[0] == ((b + 100) & M32, (b + 10_000) & M32)
    assert conn.readable() == 0
    conn.receive_segment(g.seg(ACK, data[:150], seq=b), 0.0)
    assert conn.read() == data
    (ack,) = out_segments(conn, 0.0)
    assert ack.ack == (b + 10_000) & M32 and not ack.options.sack_blocks


# --------------------------------------------------------------------------- close / reset


def test_guest_fin_half_close_then_we_keep_sending() -> None:
    conn, g = passive_open()
    conn.receive_segment(g.data(b"request"), 0.0)
    conn.receive_segment(g.fin(), 0.0)
    assert conn.state is TcpState.CLOSE_WAIT
    assert event_types(conn) == [DataReceived, PeerClosed]
    assert conn.read() == b"request"
    (ack,) = out_segments(conn, 0.0)
    assert ack.ack == g.snd_nxt
    reply = rand_bytes(300_000, 10)
    conn.send(reply)
    now = 0.0
    while len(g.received) < len(reply):
        now += 0.001
        pump_to_guest(conn, g, now)
    conn.close()
    assert conn.state is TcpState.LAST_ACK
    (fin,) = out_segments(conn, now)
    assert fin.flags & FIN
    g.handle(fin)
    conn.receive_segment(g.seg(), now)
    assert conn.state is TcpState.CLOSED
    assert event_types(conn) == [Closed]
    assert bytes(g.received) == reply and g.fin_received


def test_we_close_guest_keeps_sending_then_time_wait() -> None:
    conn, g = passive_open(time_wait=2.0)
    conn.send(b"bye")
    conn.close()
    assert conn.state is TcpState.FIN_WAIT_1
    with pytest.raises(TcpStateError):
        conn.send(b"more")
    (seg,) = out_segments(conn, 0.0)
    assert seg.flags & FIN and bytes(seg.payload) == b"bye"  # FIN piggybacked
    g.handle(seg)
    conn.receive_segment(g.seg(), 0.01)
    assert conn.state is TcpState.FIN_WAIT_2
    conn.receive_segment(g.data(b"still talking"), 0.02)
    assert conn.read() == b"still talking"
    conn.receive_segment(g.fin(), 0.03)
    assert conn.state is TcpState.TIME_WAIT
    (ack,) = out_segments(conn, 0.03)
    assert ack.ack == g.snd_nxt
    assert event_types(conn) == [DataReceived, PeerClosed]
    # Retransmitted FIN in TIME_WAIT: re-ACK and restart the timer.
    conn.receive_segment(g.seg(ACK | FIN, seq=(g.snd_nxt - 1) & M32), 1.0)
    assert len(out_segments(conn, 1.0)) == 1
    assert conn.get_timer() == pytest.approx(3.0)
    old_syn = g.seg(SYN, seq=(g.snd_nxt - 100) & M32)
    new_syn = g.seg(SYN, seq=(g.snd_nxt + 100_000) & M32)
    assert not conn.accepts_new_syn(old_syn) and conn.accepts_new_syn(new_syn)
    conn.handle_timer(3.0)
    assert conn.state is TcpState.CLOSED and event_types(conn) == [Closed]
    assert conn.get_timer() is None and not conn.accepts_new_syn(new_syn)


def test_simultaneous_close() -> None:
    conn, g = passive_open(time_wait=1.0)
    conn.close()
    (fin,) = out_segments(conn, 0.0)
    conn.receive_segment(g.fin(), 0.01)  # crosses our FIN, does not ack it
    assert conn.state is TcpState.CLOSING
    g.handle(fin)
    conn.receive_segment(g.seg(), 0.02)
    assert conn.state is TcpState.TIME_WAIT
    (ack,) = out_segments(conn, 0.02)  # ACK of the guest's FIN
    assert ack.ack == g.snd_nxt
    assert conn.get_timer() == pytest.approx(1.02)
    conn.handle_timer(conn.get_timer())
    assert conn.state is TcpState.CLOSED
    assert event_types(conn) == [PeerClosed, Closed]


def test_fin_ack_and_fin_in_one_segment() -> None:
    conn, g = passive_open(time_wait=1.0)
    conn.close()
    (fin,) = out_segments(conn, 0.0)
    g.handle(fin)
    conn.receive_segment(g.fin(), 0.01)  # ACKs our FIN and carries the guest's
    assert conn.state is TcpState.TIME_WAIT


def test_fin_retransmitted_and_out_of_order_guest_fin() -> None:
    conn, g = passive_open()
    conn.close()
    (fin,) = out_segments(conn, 0.0)
    conn.handle_timer(conn.get_timer())
    (fin2,) = out_segments(conn, 1.0)
    assert fin2.flags & FIN and fin2.seq == fin.seq
    g.handle(fin2)
    conn.receive_segment(g.seg(), 1.1)
    assert conn.state is TcpState.FIN_WAIT_2
    # Guest data + FIN where the data segment arrives after the FIN.
    d = g.data(b"late")
    f = g.fin()
    conn.receive_segment(f, 1.2)
    assert conn.state is TcpState.FIN_WAIT_2
    conn.receive_segment(d, 1.3)
    assert conn.state is TcpState.TIME_WAIT
    assert conn.read() == b"late"


def test_rst_validation() -> None:
    conn, g = passive_open()
    conn.receive_segment(g.data(b"x" * 10), 0.0)
    out_segments(conn, 0.0)
    # Out of window: silently ignored.
    conn.receive_segment(g.seg(RST, seq=(g.snd_nxt + (1 << 30)) & M32), 0.01)
    conn.receive_segment(g.seg(RST, seq=(g.snd_nxt - 5000) & M32), 0.01)
    assert conn.state is TcpState.ESTABLISHED and out_segments(conn, 0.01) == []
    # In window but not exact: challenge ACK.
    conn.receive_segment(g.seg(RST, seq=(g.snd_nxt + 100) & M32), 0.02)
    assert conn.state is TcpState.ESTABLISHED
    (chal,) = out_segments(conn, 0.02)
    assert chal.flags == ACK and chal.ack == g.snd_nxt
    assert conn.stats.challenge_acks == 1
    # Exact: reset.
    conn.receive_segment(g.seg(RST), 0.03)
    assert conn.state is TcpState.CLOSED
    assert events(conn)[-2:] == [ConnectionReset("reset"), Closed()]
    assert conn.segments_to_send(0.03) == []  # never answer a RST


def test_syn_in_established_gets_challenge_ack() -> None:
    conn, g = passive_open()
    conn.receive_segment(g.seg(SYN, seq=(g.snd_nxt + 10) & M32), 0.0)
    (chal,) = out_segments(conn, 0.0)
    assert chal.flags == ACK and chal.ack == g.snd_nxt
    assert conn.state is TcpState.ESTABLISHED


def test_abort_sends_rst_and_dead_connection_answers_with_rst() -> None:
    conn, g = passive_open()
    conn.send(b"x" * 3000)
    segs = out_segments(conn, 0.0)
    conn.abort()
    (rst,) = out_segments(conn, 0.0)
    assert rst.flags & RST and rst.seq == (segs[-1].seq + len(segs[-1].payload)) & M32
    assert conn.state is TcpState.CLOSED and event_types(conn) == [Closed]
    assert conn.get_timer() is None
    # The guest missed some data and answers with a challenge ACK: RST at its ack.
    conn.receive_segment(g.seg(ack=segs[1].seq), 0.1)
    (rst2,) = out_segments(conn, 0.1)
    assert rst2.flags == RST and rst2.seq == segs[1].seq
    with pytest.raises(TcpStateError):
        conn.send(b"y")


def test_build_reset_reply() -> None:
    syn = TcpSegment.parse(build_segment(G_IP, H_IP, G_PORT, H_PORT, 100, 0, SYN, 1000))
    rst = TcpSegment.parse(build_reset_reply(H_IP, G_IP, syn))
    assert (rst.flags, rst.seq, rst.ack, rst.src_port, rst.dst_port) == (
        RST | ACK,
        0,
        101,
        H_PORT,
        G_PORT,
    )
    ack = TcpSegment.parse(build_segment(G_IP, H_IP, G_PORT, H_PORT, 100, 77, ACK, 1000))
    rst = TcpSegment.parse(build_reset_reply(H_IP, G_IP, ack))
    assert (rst.flags, rst.seq) == (RST, 77)
    r = TcpSegment.parse(build_segment(G_IP, H_IP, G_PORT, H_PORT, 100, 77, RST, 0))
    assert build_reset_reply(H_IP, G_IP, r) is None


def test_ack_of_unsent_data_is_dropped_with_ack() -> None:
    conn, g = passive_open()
    conn.receive_segment(g.data(b"zz", flags=ACK), 0.0)
    out_segments(conn, 0.0)
    bogus = g.seg(ACK | PSH, b"data", ack=(g.rcv_nxt + 5000) & M32)
    conn.receive_segment(bogus, 0.01)
    (ack,) = out_segments(conn, 0.01)
    assert conn.readable() == 2  # the bogus segment's data was not taken
    assert ack.ack == g.snd_nxt


# --------------------------------------------------------------------------- wraparound


def test_sequence_wraparound_both_directions() -> None:
    g = Guest(isn=0xFFFFFFFF - 3000, window=512)
    conn, g = passive_open(g, isn=0xFFFFFFFF - 5000, recv_buffer=1 << 16)
    up = rand_bytes(1 << 20, 11)
    down = rand_bytes(1 << 20, 12)
    got = bytearray()
    off_up = off_down = 0
    now = 0.0
    while len(got) < len(up) or len(g.received) < len(down):
        now += 0.001
        off_down += conn.send(memoryview(down)[off_down : off_down + 100_000])
        # The guest sends what our window allows, then everything goes both ways.
        for _ in range(20):
            if off_up >= len(up):
                break
            chunk = up[off_up : off_up + 1000]
            conn.receive_segment(g.data(chunk), now)
            off_up += len(chunk)
        for s in out_segments(conn, now):
            g.handle(s)
        conn.receive_segment(g.seg(), now)
        got += conn.read()
    assert bytes(got) == up and bytes(g.received) == down
    assert g.snd_nxt < 0x10000000 and g.rcv_nxt < 0x10000000  # both wrapped


# --------------------------------------------------------------------------- simulation


class Net:
    """Seeded discrete-event network between two endpoints: latency, loss, duplication,
    reordering (a random extra delay). Verifies checksums and parses every segment."""

    def __init__(
        self,
        seed: int,
        *,
        latency: float = 0.0005,
        drop: float = 0.0,
        dup: float = 0.0,
        reorder: float = 0.0,
    ) -> None:
        self.rng = random.Random(seed)
        self.latency = latency
        self.drop = drop
        self.dup = dup
        self.reorder = reorder
        self.queue: list[tuple[float, int, TcpConnection, TcpSegment]] = []
        self.n = 0
        self.dropped = 0

    def put(self, now: float, src: TcpConnection, dst: TcpConnection, raws: list[bytes]) -> None:
        for raw in raws:
            assert verify_transport_v4(src.local_ip, src.remote_ip, 6, raw)
            seg = TcpSegment.parse(raw)
            if self.rng.random() < self.drop:
                self.dropped += 1
                continue
            copies = 2 if self.rng.random() < self.dup else 1
            for _ in range(copies):
                t = now + self.latency
                if self.rng.random() < self.reorder:
                    t += self.rng.random() * 4 * self.latency
                self.n += 1
                heapq.heappush(self.queue, (t, self.n, dst, seg))

    def next_time(self) -> float | None:
        return self.queue[0][0] if self.queue else None

    def deliver_until(self, now: float) -> set[TcpConnection]:
        touched = set()
        while self.queue and self.queue[0][0] <= now:
            _, _, dst, seg = heapq.heappop(self.queue)
            dst.receive_segment(seg, now)
            touched.add(dst)
        return touched


@dataclass
class App:
    conn: TcpConnection
    outgoing: bytes
    sent: int = 0
    received: bytearray = field(default_factory=bytearray)
    closed_sent: bool = False
    peer_closed: bool = False
    done: bool = False
    events: list[TcpEvent] = field(default_factory=list)

    def step(self) -> None:
        for ev in events(self.conn):
            self.events.append(ev)
            if isinstance(ev, PeerClosed):
                self.peer_closed = True
            elif isinstance(ev, Closed):
                self.done = True
            elif isinstance(ev, ConnectionReset | ConnectionFailed):
                raise AssertionError(f"unexpected {ev}")
        self.received += self.conn.read()
        if self.sent < len(self.outgoing) and self.conn.send_space():
            self.sent += self.conn.send(memoryview(self.outgoing)[self.sent : self.sent + 262144])
        if self.sent == len(self.outgoing) and not self.closed_sent:
            self.conn.close()
            self.closed_sent = True


def simulate(
    net: Net,
    up: bytes,
    down: bytes,
    *,
    guest_kw: dict | None = None,
    host_kw: dict | None = None,
    max_steps: int = 2_000_000,
) -> tuple[App, App, float]:
    """Guest (connect()) sends `up`, host (from_syn + accept) sends `down`, both close."""
    now = 0.0
    gkw = {"time_wait": 0.5, **(guest_kw or {})}
    hkw = {"time_wait": 0.5, **(host_kw or {})}
    guest = TcpConnection(G_IP, G_PORT, H_IP, H_PORT, now=now, isn=0xFFFF0000, **gkw)
    guest.connect(now)
    syn = TcpSegment.parse(guest.segments_to_send(now)[0])
    host = TcpConnection.from_syn(H_IP, H_PORT, G_IP, G_PORT, syn, now=now, **hkw)
    host.accept(now)
    ga, ha = App(guest, up), App(host, down)
    for _ in range(max_steps):
        for app, other in ((ga, ha), (ha, ga)):
            app.step()
            net.put(now, app.conn, other.conn, app.conn.segments_to_send(now))
        if ga.done and ha.done:
            return ga, ha, now
        times = [t for t in (net.next_time(), guest.get_timer(), host.get_timer()) if t]
        assert times, "deadlock: nothing in flight and no timer"
        now = max(now, min(times))
        net.deliver_until(now)
        for c in (guest, host):
            t = c.get_timer()
            if t is not None and t <= now:
                c.handle_timer(now)
    raise AssertionError("simulation did not finish")


def check_transfer(ga: App, ha: App, up: bytes, down: bytes) -> None:
    assert hashlib.sha256(ha.received).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(ga.received).digest() == hashlib.sha256(down).digest()
    assert ga.peer_closed and ha.peer_closed
    assert ga.conn.state is TcpState.CLOSED and ha.conn.state is TcpState.CLOSED


def test_simulated_clean_8mib_both_ways() -> None:
    up, down = rand_bytes(8 << 20, 20), rand_bytes(8 << 20, 21)
    t0 = time.perf_counter()
    net = Net(1)
    ga, ha, now = simulate(net, up, down, guest_kw={"mss": 65480}, host_kw={"mss": 65480})
    check_transfer(ga, ha, up, down)
    assert ha.conn.stats.retransmits == 0 and ga.conn.stats.retransmits == 0
    # A local pipe: 16 MiB must move in well under a simulated second.
    assert now < 1.0, now
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize(
    ("seed", "drop", "dup", "reorder"),
    [(2, 0.01, 0.01, 0.05), (3, 0.05, 0.02, 0.2), (4, 0.0, 0.1, 0.5)],
)
def test_simulated_lossy_8mib_both_ways(seed: int, drop: float, dup: float, reorder: float) -> None:
    up, down = rand_bytes(8 << 20, seed * 10), rand_bytes(8 << 20, seed * 10 + 1)
    net = Net(seed, drop=drop, dup=dup, reorder=reorder)
    kw = {"mss": 8960, "recv_buffer": 1 << 20, "send_buffer": 1 << 20}
    ga, ha, _now = simulate(net, up, down, guest_kw=kw, host_kw=kw)
    check_transfer(ga, ha, up, down)
    if drop:
        assert ha.conn.stats.retransmits > 0 and ga.conn.stats.retransmits > 0
    if reorder:
        assert ha.conn.stats.ooo_segments > 0 and ga.conn.stats.ooo_segments > 0


def test_simulated_lossy_small_mss_no_sack_wraparound() -> None:
    up, down = rand_bytes(1 << 20, 30), rand_bytes(1 << 20, 31)
    net = Net(5, drop=0.02, reorder=0.1)
    kw = {"mss": 1460, "recv_buffer": 200_000, "send_buffer": 100_000}
    ga, ha, _now = simulate(net, up, down, guest_kw=kw, host_kw={**kw, "isn": 0xFFFFFF00})
    check_transfer(ga, ha, up, down)


def test_many_concurrent_connections_bounded() -> None:
    # Hundreds of idle established connections: the objects stay small and independent.
    conns = []
    for i in range(300):
        g = Guest(isn=i * 7919)
        syn = g.syn()
        c = TcpConnection.from_syn(H_IP, H_PORT, G_IP, 10000 + i, syn, now=0.0)
        c.accept(0.0)
        c.segments_to_send(0.0)
        conns.append(c)
    assert all(c.state is TcpState.SYN_RECEIVED for c in conns)
    assert all(c.get_timer() == pytest.approx(1.0) for c in conns)


def test_receive_data_event_coalescing() -> None:
    conn, g = passive_open()
    for _ in range(5):
        conn.receive_segment(g.data(b"12345"), 0.0)
    evs = events(conn)
    assert evs == [DataReceived(25)]
    assert conn.readable() == 25
    out = out_segments(conn, 0.0)
    assert len(out) == 1 and out[0].flags == ACK  # one ACK per batch


def test_send_before_accept_and_close_during_handshake() -> None:
    g = Guest()
    conn = TcpConnection.from_syn(H_IP, H_PORT, G_IP, G_PORT, g.syn(), now=0.0)
    assert conn.send(b"early bytes") == 11  # buffered until the handshake completes
    conn.accept(0.0)
    conn.close()
    (synack,) = out_segments(conn, 0.0)
    assert not synack.payload
    g.handle(synack)
    conn.receive_segment(g.seg(), 0.01)
    assert conn.state is TcpState.FIN_WAIT_1
    (seg,) = out_segments(conn, 0.01)
    assert bytes(seg.payload) == b"early bytes" and seg.flags & FIN
    assert event_types(conn) == [Connected]


def test_advertised_right_edge_never_moves_left() -> None:
    conn, g = passive_open(recv_buffer=1 << 20)  # window scale 5: 32-byte granularity
    rng = random.Random(13)
    edge = None
    now = 0.0
    for _ in range(3000):
        now += 0.001
        room = seq_diff((g.snd_una + g.peer_window) & M32, g.snd_nxt)
        n = min(rng.randrange(1, 3000), room)
        if n > 0:
            conn.receive_segment(g.data(rng.randbytes(n)), now)
        if rng.random() < 0.5:
            conn.read(rng.randrange(0, 5000))
        for a in out_segments(conn, now):
            g.handle(a)
            right = a.ack + (a.window << 5)
            assert edge is None or right >= edge
            edge = right
    assert edge is not None and conn.stats.bytes_in > 1_000_000


def test_receive_memory_is_bounded_by_the_window() -> None:
    conn, g = passive_open(recv_buffer=8192)
    base = g.snd_nxt
    data = rand_bytes(30_000, 14)
    # Out-of-order data far beyond the window is dropped (with an ACK) ...
    conn.receive_segment(g.seg(ACK, data[20_000:21_000], seq=(base + 20_000) & M32), 0.0)
    assert [a.ack for a in out_segments(conn, 0.0)] == [base]
    # ... and data straddling the right edge is cut at the edge.
    for off in range(1000, 30_000, 1000):
        conn.receive_segment(g.seg(ACK, data[off : off + 1000], seq=(base + off) & M32), 0.0)
    out_segments(conn, 0.0)
    conn.receive_segment(g.seg(ACK, data[:1000], seq=base), 0.0)
    (ack,) = out_segments(conn, 0.0)
    assert conn.readable() == 8192 and ack.window == 0
    assert conn.read() == data[:8192]


def test_rst_in_time_wait_and_closing_states() -> None:
    conn, g = passive_open(time_wait=5.0)
    conn.close()
    g.handle(out_segments(conn, 0.0)[0])
    conn.receive_segment(g.fin(), 0.01)
    assert conn.state is TcpState.TIME_WAIT
    events(conn)
    conn.receive_segment(g.seg(RST), 0.02)
    assert conn.state is TcpState.CLOSED and event_types(conn) == [Closed]


# --------------------------------------------------------------------------- delayed ACK


def test_delayed_ack_waits_then_goes_alone_at_the_deadline() -> None:
    conn, g = passive_open(ack_delay=0.0005)
    conn.receive_segment(g.data(b"q"), 1.0)
    assert out_segments(conn, 1.0) == []  # nothing yet: a reply may carry it
    assert conn.get_timer() == pytest.approx(1.0005)
    assert out_segments(conn, 1.0004) == []
    (ack,) = out_segments(conn, 1.0005)
    assert ack.flags == ACK and ack.ack == g.snd_nxt and not ack.payload


def test_delayed_ack_rides_on_the_reply() -> None:
    conn, g = passive_open(ack_delay=0.0005)
    conn.receive_segment(g.data(b"request"), 1.0)
    assert conn.read() == b"request"
    conn.send(b"response")
    (seg,) = out_segments(conn, 1.0001)
    assert seg.payload == b"response" and seg.flags & ACK and seg.ack == g.snd_nxt
    assert out_segments(conn, 1.01) == []  # and no ACK of its own later
    assert conn.get_timer() != pytest.approx(1.0005)


def test_second_small_segment_and_full_segment_are_acked_at_once() -> None:
    conn, g = passive_open(ack_delay=0.0005)
    conn.receive_segment(g.data(b"a"), 1.0)
    conn.receive_segment(g.data(b"b"), 1.0)
    (ack,) = out_segments(conn, 1.0)
    assert ack.ack == g.snd_nxt
    conn.receive_segment(g.data(b"x" * conn.effective_mss), 2.0)
    (ack,) = out_segments(conn, 2.0)
    assert ack.ack == g.snd_nxt


def test_out_of_order_segment_is_acked_at_once_even_with_delay() -> None:
    conn, g = passive_open(ack_delay=0.0005)
    first = g.data(b"1" * 100)
    second = g.data(b"2" * 100)
    conn.receive_segment(second, 1.0)
    (dup,) = out_segments(conn, 1.0)
    assert dup.ack == first.seq  # the duplicate ACK that drives fast retransmit
    conn.receive_segment(first, 1.0)
    (ack,) = out_segments(conn, 1.0)  # the hole filled: ACK now, not after the delay
    assert ack.ack == g.snd_nxt


def test_fin_ack_delayed_to_ride_on_our_fin() -> None:
    conn, g = passive_open(ack_delay=0.0005)
    conn.receive_segment(g.fin(), 1.0)
    assert conn.state is TcpState.CLOSE_WAIT
    assert out_segments(conn, 1.0) == []
    conn.close()
    (fin,) = out_segments(conn, 1.0002)
    assert fin.flags == FIN | ACK and fin.ack == g.snd_nxt
    g.handle(fin)
    conn.receive_segment(g.seg(), 1.0003)
    assert conn.state is TcpState.CLOSED


def test_fin_ack_sent_alone_when_the_application_keeps_it_open() -> None:
    conn, g = passive_open(ack_delay=0.0005)
    conn.receive_segment(g.fin(), 1.0)
    assert out_segments(conn, 1.0) == []
    (ack,) = out_segments(conn, 1.001)
    assert ack.flags == ACK and ack.ack == g.snd_nxt


def test_zero_ack_delay_acks_every_segment_at_once() -> None:
    conn, g = passive_open()
    conn.receive_segment(g.data(b"q"), 1.0)
    (ack,) = out_segments(conn, 1.0)
    assert ack.ack == g.snd_nxt
