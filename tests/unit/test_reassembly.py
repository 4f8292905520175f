"""The IPv4 reassembler's budget: what it holds is what it counts (issue 16.2)."""

from __future__ import annotations

import random

from netferry.hostd.stack import ipv4
from netferry.hostd.stack.ipv4 import (
    FLAG_MF,
    FRAGMENT_OVERHEAD,
    PARTIAL_OVERHEAD,
    Ipv4Packet,
    Reassembler,
)

SRC = b"\xc0\xa8\x7f\x02"
DST = b"\xc0\xa8\x7f\xfe"
HEADER = ipv4.build_header(SRC, DST, 17, 0)


def frag(ident: int, offset: int, data, more: bool, src: bytes = SRC) -> Ipv4Packet:
    flags = (FLAG_MF if more else 0) | (offset // 8)
    return Ipv4Packet(src, DST, 17, 64, ident, flags, 0, HEADER, data)


def test_fragment_is_copied_out_of_its_frame():
    frame = bytearray(65536)
    view = memoryview(frame)[100:108]
    r = Reassembler()
    assert r.add(frag(1, 0, view, True), 0.0) is None
    frame[100:108] = b"XXXXXXXX"  # the frame is reused: the held piece must not change
    whole = r.add(frag(1, 8, b"tail", False), 0.0)
    assert whole is not None and bytes(whole.payload) == bytes(8) + b"tail"
    view.release()  # no export of the frame's buffer is held any more


def test_every_fragment_and_partial_is_charged():
    r = Reassembler()
    r.add(frag(1, 0, bytes(8), True), 0.0)
    assert r.held_bytes == PARTIAL_OVERHEAD + 8 + FRAGMENT_OVERHEAD
    r.add(frag(1, 16, bytes(8), True), 0.0)
    assert r.held_bytes == PARTIAL_OVERHEAD + 2 * (8 + FRAGMENT_OVERHEAD)
    r.add(frag(1, 8, bytes(8), True), 0.0)
    r.add(frag(1, 24, b"end", False), 0.0)
    assert r.held_bytes == 0 and len(r) == 0 and r.stats["reassembled"] == 1


def test_zero_length_fragments_hold_nothing():
    r = Reassembler()
    for ident in range(10_000):
        assert r.add(frag(ident, 8 * (ident % 100), b"", True), 0.0) is None
    assert len(r) == 0 and r.held_bytes == 0
    assert r.stats["empty_dropped"] == 10_000


def test_tiny_fragments_bounded_by_budget_and_count():
    budget = 64 << 10
    r = Reassembler(max_bytes=budget, max_partials=50)
    for ident in range(20_000):
        r.add(frag(ident, 0, bytes(8), True), float(ident))
        assert r.held_bytes <= budget and len(r) <= 50
    assert r.stats["partials_dropped"] > 0
    # Many tiny pieces of one datagram are bounded by the budget too.
    r = Reassembler(max_bytes=budget)
    for i in range(8000):
        r.add(frag(7, 16 * i, bytes(8), True), 0.0)
        assert r.held_bytes <= budget
    assert r.stats["memory_dropped"] > 0
    # ... and a real datagram still goes through afterwards, evicting the junk.
    data = random.Random(1).randbytes(3000)
    whole = None
    for off in range(0, 3000, 1480):
        whole = r.add(frag(9, off, data[off : off + 1480], off + 1480 < 3000), 1.0)
    assert whole is not None and whole.payload == data


def test_deadline_heap_expires_oldest_only_and_stays_bounded():
    r = Reassembler(timeout=10.0)
    for ident in range(100):
        r.add(frag(ident, 0, bytes(8), True), float(ident))
    assert r.next_deadline() == 10.0
    assert r.expire(19.5) == 10  # deadlines 10..19
    assert len(r) == 90 and r.next_deadline() == 20.0
    # Datagrams that complete leave stale heap entries; they do not pile up.
    for ident in range(1000, 6000):
        r.add(frag(ident, 0, bytes(8), True), 50.0)
        r.add(frag(ident, 8, b"x", False), 50.0)
    assert len(r._deadlines) <= 2 * len(r) + 64
    assert r.expire(1000.0) == 90 and len(r) == 0 and r.held_bytes == 0
    assert r.next_deadline() is None and r.stats["timeout_dropped"] == 100
