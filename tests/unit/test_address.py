"""clients/python/netferry/address.py: the forward addresses users type, parsed once for
hostd's API, the SDK and the CLI; every error names its field."""

from __future__ import annotations

import re

import pytest

from netferry.address import (
    AddressError,
    HostPort,
    is_mac_host,
    parse_host_port,
    parse_remote,
    parse_unix_path,
)


@pytest.mark.parametrize(
    ("text", "want", "shown"),
    [
        ("127.0.0.1:8080", HostPort("127.0.0.1", 8080), "127.0.0.1:8080"),
        ("  127.0.0.1:8080 ", HostPort("127.0.0.1", 8080), "127.0.0.1:8080"),
        (":8080", HostPort("", 8080), ":8080"),
        ("[::1]:53", HostPort("::1", 53), "[::1]:53"),
        ("[0:0::1]:53", HostPort("::1", 53), "[::1]:53"),  # canonical spelling
        ("0.0.0.0:1", HostPort("0.0.0.0", 1), "0.0.0.0:1"),
        ("10.0.0.1:65535", HostPort("10.0.0.1", 65535), "10.0.0.1:65535"),
    ],
)
def test_parse_host_port(text: str, want: HostPort, shown: str) -> None:
    hp = parse_host_port(text, "local")
    assert hp == want and str(hp) == shown


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "local: is empty"),
        ("8080", "has no port"),
        ("::1:53", "write IPv6 addresses as [ADDR]:PORT"),
        ("[::1]53", "is not [IPV6]:PORT"),
        ("[::1", "is not [IPV6]:PORT"),
        ("localhost:80", "'localhost' is not an IP address"),
        ("127.0.0.1:http", "port 'http' is not a number"),
        ("127.0.0.1:0", "port 0 is out of range 1..65535"),
        ("127.0.0.1:65536", "port 65536 is out of range"),
    ],
)
def test_parse_host_port_errors_name_the_field(text: str, message: str) -> None:
    with pytest.raises(AddressError, match=re.escape(message)) as e:
        parse_host_port(text, "local")
    assert e.value.field == "local" and str(e.value).startswith("local: ")
    assert isinstance(e.value, ValueError)  # callers catching ValueError still cope


def test_a_host_may_be_required() -> None:
    with pytest.raises(AddressError, match="has no host address"):
        parse_host_port(":80", "remote", allow_any_host=False)


def test_parse_remote_takes_a_v4_or_v6_guest_or_a_mac() -> None:
    assert parse_remote("192.168.127.2:80") == HostPort("192.168.127.2", 80)
    assert parse_remote("[fd00:192:168:127:0::2]:80") == HostPort("fd00:192:168:127::2", 80)
    assert str(parse_remote("[fd00:192:168:127::2]:80")) == "[fd00:192:168:127::2]:80"
    mac = parse_remote("[5A-94-EF-E4-0C-EE]:8080")
    assert mac == HostPort("5a:94:ef:e4:0c:ee", 8080) and is_mac_host(mac.host)
    assert str(mac) == "[5a:94:ef:e4:0c:ee]:8080"
    assert not is_mac_host("fd00::2") and not is_mac_host("192.168.127.2")
    with pytest.raises(AddressError, match="out of range"):
        parse_remote("[5a:94:ef:e4:0c:ee]:0")
    with pytest.raises(AddressError, match="is not an IP address"):
        parse_remote("[5a:94:ef:e4:0c]:80")
    with pytest.raises(AddressError, match="has no host address"):
        parse_remote(":80")
    with pytest.raises(AddressError, match=r"^target: "):
        parse_remote("x:1", "target")


def test_parse_unix_path() -> None:
    assert parse_unix_path("/run/user/1000/x.sock") == "/run/user/1000/x.sock"
    with pytest.raises(AddressError, match="not an absolute socket path"):
        parse_unix_path("x.sock")
    with pytest.raises(AddressError, match="longer than 107 bytes"):
        parse_unix_path("/" + "a" * 107)
    assert parse_unix_path("/" + "a" * 106)  # 107 bytes fit sun_path with its NUL
    with pytest.raises(AddressError, match="NUL byte"):
        parse_unix_path("/tmp/a\0b")
