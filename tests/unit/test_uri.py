import pytest

from netferry.uri import parse_link_uri


def test_forms():
    u = parse_link_uri("unix:///run/x.sock")
    assert (u.scheme, u.path, u.framing) == ("unix", "/run/x.sock", "len32be")
    u = parse_link_uri("unix:///run/x.sock?framing=len16le")
    assert u.framing == "len16le"
    u = parse_link_uri("tcp://127.0.0.1:4444")
    assert (u.host, u.port) == ("127.0.0.1", 4444)
    u = parse_link_uri("tcp://[::1]:4444")
    assert (u.host, u.port) == ("::1", 4444)
    assert parse_link_uri("vsock://:1024").cid is None
    u = parse_link_uri("vsock://2:1024")
    assert (u.cid, u.port) == (2, 1024)
    assert parse_link_uri("fd://3").fd == 3
    assert parse_link_uri("stdio://").framing == "len16le"
    assert parse_link_uri("unixgram:///tmp/v.sock").scheme == "unixgram"
    assert parse_link_uri("unixpacket:///tmp/b.sock").path == "/tmp/b.sock"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("/tmp/x", "no scheme"),
        ("http://x", "unknown scheme 'http'"),
        ("unix://", "missing socket path"),
        ("tcp://127.0.0.1", "expected tcp://HOST:PORT"),
        ("tcp://127.0.0.1:99999", "bad port"),
        ("vsock://x:1", "expected vsock"),
        ("fd://abc", "expected fd://N"),
        ("unix:///x?framing=len8", "framing 'len8'"),
        ("unixgram:///x?framing=len16le", "bare frames"),
        ("unix:///x?speed=1", "unknown parameter"),
        ("unix:///x?max-frame=10", "max-frame must be in"),
    ],
)
def test_errors_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        parse_link_uri(text)


def test_tapfd_uri():
    u = parse_link_uri("tapfd://7?offload=vnet")
    assert (u.scheme, u.fd, u.vnet) == ("tapfd", 7, True)
    with pytest.raises(ValueError, match="expected tapfd://N"):
        parse_link_uri("tapfd://x")
