"""hostd/capture.py: live-capture buffering (pcap records are tested with tshark in e2e)."""

from __future__ import annotations


def test_capture_buffer_bounds_bytes_and_messages():
    from hostd.capture import CaptureBuffer

    buf = CaptureBuffer(max_bytes=10_000, max_message=4_000)
    for _ in range(12):
        buf.put(b"x" * 1_000)
    assert buf.dropped == 2 and buf.bytes == 10_000  # what does not fit is counted, not kept
    data, n = buf.take()
    assert (len(data), n) == (4_000, 4)  # messages stay under max_message
    data, n = buf.take(max_records=3)
    assert (len(data), n) == (3_000, 3)
    buf.put(b"y" * 9_000)  # too big for what is left (3,000 held + 9,000 > 10,000)
    assert buf.dropped == 3
    big = CaptureBuffer(max_bytes=100_000, max_message=4_000)
    big.put(b"z" * 50_000)  # one record larger than a message still goes out alone
    assert big.take() == (b"z" * 50_000, 1) and big.bytes == 0
