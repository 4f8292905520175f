"""Parsing the addresses users give forwards: shared by hostd's API, the SDK and the CLI.

    local (TCP/UDP): "127.0.0.1:8080", ":8080" (every host address), "[::1]:8080"
    local (UNIX):    an absolute socket path
    remote:          "192.168.127.2:80", "[fd00:192:168:127::2]:80" (a guest address and a
                     port), "[5a:94:ef:e4:0c:ee]:80" (the IPv6 address of the guest with this
                     MAC, looked up when a client connects)

Errors are `AddressError`s that name the field, so the API can answer INVALID_ARGUMENT with
a message a user can act on.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


class AddressError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class HostPort:
    host: str  # "" = every address
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_host_port(text: str, field: str, *, allow_any_host: bool = True) -> HostPort:
    text = text.strip()
    if not text:
        raise AddressError(field, "is empty; expected HOST:PORT such as 127.0.0.1:8080")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise AddressError(field, f"{text!r} is not [IPV6]:PORT")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise AddressError(field, f"{text!r} has no port; expected HOST:PORT")
        if ":" in host:
            raise AddressError(field, f"{text!r}: write IPv6 addresses as [ADDR]:PORT")
    if host:
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise AddressError(field, f"{host!r} is not an IP address") from None
    elif not allow_any_host:
        raise AddressError(field, f"{text!r} has no host address")
    try:
        port = int(port_text)
    except ValueError:
        raise AddressError(field, f"port {port_text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise AddressError(field, f"port {port} is out of range 1..65535")
    return HostPort(host, port)


def parse_remote(text: str, field: str = "remote") -> HostPort:
    stripped = text.strip()
    if stripped.startswith("["):
        end = stripped.find("]")
        mac = parse_mac(stripped[1:end]) if end > 0 else None
        if mac is not None:
            hp = parse_host_port(f"[::]{stripped[end + 1 :]}", field)  # the port's checks
            return HostPort(mac, hp.port)
    return parse_host_port(text, field, allow_any_host=False)


def parse_mac(text: str) -> str | None:
    """`text` as a canonical MAC ("5a:94:ef:e4:0c:ee"), or None when it is not one."""
    parts = text.strip().replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        return None
    try:
        return ":".join(f"{int(p, 16):02x}" for p in parts)
    except ValueError:
        return None


def is_mac_host(host: str) -> bool:
    """Whether a remote's host names a guest by its MAC (see `parse_remote`)."""
    return host.count(":") == 5 and parse_mac(host) == host


def parse_unix_path(text: str, field: str = "local") -> str:
    if not text.startswith("/"):
        raise AddressError(field, f"{text!r} is not an absolute socket path")
    if len(text.encode()) >= 108:
        raise AddressError(field, "socket path is longer than 107 bytes (the sun_path limit)")
    if "\0" in text:
        raise AddressError(field, "socket path contains a NUL byte")
    return text
