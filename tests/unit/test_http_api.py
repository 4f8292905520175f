"""gvproxy's HTTP API: the pieces that need no switch (URI, Go's address splitting, the
HTTP exchange); the endpoints themselves are tested end to end with curl and Go in
tests/e2e/test_gvproxy_api.py and tests/interop/test_clients.py."""

from __future__ import annotations

import asyncio

import pytest

from netferry.hostd.api.http import (
    BadRequest,
    GvproxyApi,
    Hijack,
    HttpExchange,
    Response,
    _split_host_port,
    parse_http_api_uri,
)


@pytest.mark.parametrize(
    ("uri", "want"),
    [
        ("unix:///run/x/network.sock", ("unix", "/run/x/network.sock", True)),
        ("unix:///tmp/s?connect=0", ("unix", "/tmp/s", False)),
        ("tcp://127.0.0.1:7777", ("tcp", "127.0.0.1:7777", True)),
        ("tcp://[::1]:7777?connect=1", ("tcp", "[::1]:7777", True)),
    ],
)
def test_http_api_uri(uri, want):
    assert parse_http_api_uri(uri) == want


@pytest.mark.parametrize(
    "uri", ["unix://", "tcp://127.0.0.1", "tcp://h:0", "vsock://2:1024", "unix:///s?x=1",
            "unix:///s?connect=yes"]
)  # fmt: skip
def test_http_api_uri_rejected(uri):
    with pytest.raises(ValueError, match="--http-api"):
        parse_http_api_uri(uri)


@pytest.mark.parametrize(
    ("text", "want"),
    [("192.168.127.2:80", ("192.168.127.2", "80")), (":8080", ("", "8080")),
     ("[::1]:22", ("::1", "22"))],
)  # fmt: skip
def test_split_host_port(text, want):
    assert _split_host_port(text) == want


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("192.168.127.2", "address 192.168.127.2: missing port in address"),
        ("::1:22", "address ::1:22: too many colons in address"),
        ("[::1]", "address [::1]: missing port in address"),
    ],
)
def test_split_host_port_errors_are_gos(text, message):
    with pytest.raises(BadRequest) as e:
        _split_host_port(text)
    assert str(e.value) == message


class NoControl:
    """Nothing below may reach the control core."""

    def __getattr__(self, name):
        raise AssertionError(f"control.{name} used")


def exchange(inside: bool = False) -> HttpExchange:
    return HttpExchange(GvproxyApi(NoControl(), inside=inside), None, connect=True)  # type: ignore[arg-type]


def test_keep_alive_requests_one_at_a_time_and_pipelined_bodies():
    ex = exchange()
    ex.feed(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\nPOST /connect HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 0\r\n\r\n\x10\x00frame")  # fmt: skip
    method, target, body = ex.next_request()
    assert (method, target, body) == ("GET", "/nope", b"")
    out = asyncio.run(ex.answer(method, target, body))
    assert out.startswith(b"HTTP/1.1 404 Not Found\r\n") and out.endswith(b"404 page not found\n")
    assert ex.next_cycle()
    assert ex.next_request() == ("POST", "/connect", b"")
    assert isinstance(asyncio.run(ex.answer("POST", "/connect", b"")), Hijack)
    assert ex.trailing == b"\x10\x00frame"  # the first frame, for the link


def test_inside_only_the_forwarder_answers_and_connect_is_404():
    ex = exchange(inside=True)
    for target in ("/connect", "/stats", "/tunnel?ip=192.168.127.2&port=22", "/cam"):
        got = asyncio.run(ex.api.handle("POST", target, b"", "192.168.127.2", connect=False))
        assert got == Response.fail(404, "404 page not found")


def test_garbage_and_oversized_requests_get_an_error_response():
    ex = exchange()
    ex.feed(b"\x00\x01 not http\r\n\r\n")
    got = ex.next_request()
    assert isinstance(got, Response) and got.status == 400
    ex = exchange()
    ex.feed(b"POST /services/dns/add HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n")
    ex.feed(b"{" * (1 << 20) + b"{")
    got = ex.next_request()
    assert isinstance(got, Response) and got.status == 413
