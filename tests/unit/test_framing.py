import pytest

from netferry.framing import FramingError, StreamDeframer, get_framing


@pytest.mark.parametrize("name", ["len32be", "len16le"])
def test_roundtrip_in_arbitrary_chunks(name):
    framing = get_framing(name)
    frames = [bytes([i % 251]) * (60 + i * 37) for i in range(50)]
    stream = b"".join(framing.encode(f) for f in frames)
    for chunk in (1, 3, 64, 1000, len(stream)):
        d = StreamDeframer(framing)
        got = []
        for i in range(0, len(stream), chunk):
            got += d.feed(stream[i : i + chunk])
        assert got == frames
        assert d.pending == 0


def test_headers_are_the_documented_byte_orders():
    assert get_framing("len32be").encode(b"ab") == b"\x00\x00\x00\x02ab"
    assert get_framing("len16le").encode(b"ab") == b"\x02\x00ab"


def test_zero_length_frame_is_a_protocol_error():
    d = StreamDeframer(get_framing("len32be"))
    with pytest.raises(FramingError, match="zero-length"):
        d.feed(b"\x00\x00\x00\x00")


def test_oversized_frame_is_a_protocol_error():
    d = StreamDeframer(get_framing("len32be"), max_frame=2000)
    with pytest.raises(FramingError, match="exceeds the maximum of 2000"):
        d.feed((2001).to_bytes(4, "big"))


def test_unknown_framing_named():
    with pytest.raises(ValueError, match="unknown framing 'len8'"):
        get_framing("len8")
