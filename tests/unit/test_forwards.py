"""hostd/forwards.py: the forward table, guest-address checks, source choice, UDP sessions
in the flow table, and forwarded clients against the descriptor budget.

Forwards listen on 127.0.0.1 (or a private unix path); the "guest" is the switch's port
that records frames, so nothing leaves loopback."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import structlog
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from netferry.address import HostPort
from netferry.hostd import forwards as forwards_mod
from netferry.hostd.config import NetworkConfig
from netferry.hostd.errors import ControlError
from netferry.hostd.forwards import canonical_local
from netferry.hostd.switch import HostSwitch
from tests.unit.helpers import GUEST_IP, guest_link

GUEST = GUEST_IP


def run(test: Callable[[HostSwitch], Awaitable[object]], **config: object) -> object:
    async def main() -> object:
        sw = HostSwitch(NetworkConfig(**config))  # type: ignore[arg-type]
        try:
            return await test(sw)
        finally:
            await sw.close()

    return asyncio.run(main())


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_canonical_local_spellings() -> None:
    assert canonical_local("tcp", " 127.0.0.1:80 ") == ("127.0.0.1:80", HostPort("127.0.0.1", 80))
    assert canonical_local("udp", ":53")[0] == ":53"
    assert canonical_local("tcp", "[::1]:8080")[0] == "[::1]:8080"
    assert canonical_local("unix", "/run/x.sock") == ("/run/x.sock", None)


@pytest.mark.parametrize(
    ("protocol", "local", "remote", "kind", "message"),
    [
        ("sctp", "127.0.0.1:1", f"{GUEST}:80", "invalid_argument", "not tcp, udp or unix"),
        ("tcp", "127.0.0.1", f"{GUEST}:80", "invalid_argument", "has no port"),
        ("tcp", "127.0.0.1:1", "10.0.0.2:80", "invalid_argument", "is not in 192.168.127.0/24"),
        ("tcp", "127.0.0.1:1", "192.168.127.1:80", "invalid_argument", "not a guest address"),
        ("tcp", "127.0.0.1:1", "192.168.127.255:80", "invalid_argument", "not a guest address"),
        ("unix", "relative.sock", f"{GUEST}:80", "invalid_argument", "not an absolute"),
    ],
)
def test_expose_refuses_bad_requests(protocol, local, remote, kind, message) -> None:
    async def test(sw: HostSwitch) -> None:
        with pytest.raises(ControlError, match=message) as e:
            await sw.forwards.expose(protocol, local, remote)
        assert e.value.kind == kind
        assert sw.forwards.list() == []

    run(test)


def test_a_held_address_is_refused_naming_its_holder() -> None:
    async def test(sw: HostSwitch) -> None:
        port = free_port()
        await sw.forwards.expose("tcp", f"127.0.0.1:{port}", f"{GUEST}:80")
        for local in (f"127.0.0.1:{port}", f":{port}"):  # the same, and a wildcard over it
            with pytest.raises(ControlError, match=f"held by the forward tcp 127.0.0.1:{port}"):
                await sw.forwards.expose("tcp", local, f"{GUEST}:81")
        assert len(sw.forwards.list()) == 1
        await sw.forwards.unexpose("tcp", f"127.0.0.1:{port}")
        with pytest.raises(ControlError) as e:
            await sw.forwards.unexpose("tcp", f"127.0.0.1:{port}")
        assert e.value.kind == "not_found"

    run(test)


def test_source_for_keeps_a_real_client_address_and_hides_loopback() -> None:
    async def test(sw: HostSwitch) -> None:
        remote = HostPort(GUEST, 80)
        ip, port = sw.forwards.source_for(("203.0.113.7", 5555), remote, "tcp")
        assert (ipaddress.IPv4Address(ip), port) == (ipaddress.IPv4Address("203.0.113.7"), 5555)
        ip, port = sw.forwards.source_for(("127.0.0.1", 5555), remote, "tcp")
        assert ipaddress.IPv4Address(ip) == ipaddress.IPv4Address("192.168.127.254")
        ip, _ = sw.forwards.source_for(("::ffff:203.0.113.7", 5555), remote, "udp")
        assert ipaddress.IPv4Address(ip) == ipaddress.IPv4Address("203.0.113.7")
        # a client inside the virtual subnet could be confused with a guest: hidden too
        ip, _ = sw.forwards.source_for(("192.168.127.3", 5555), remote, "tcp")
        assert ipaddress.IPv4Address(ip) == ipaddress.IPv4Address("192.168.127.254")

    run(test)


def test_udp_forward_sessions_live_in_a_bounded_flow_table() -> None:
    async def test(sw: HostSwitch) -> None:
        link = guest_link(sw)
        port = free_port(socket.SOCK_DGRAM)
        fwd = await sw.forwards.expose("udp", f"127.0.0.1:{port}", f"{GUEST}:5353")
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
        try:
            for i, c in enumerate(clients):
                c.sendto(b"client %d" % i, ("127.0.0.1", port))
                for _ in range(200):  # bounded wait for the datagram to be forwarded
                    await asyncio.sleep(0.01)
                    if fwd.counters["total"] == i + 1:
                        break
            runtime = fwd.runtime
            assert fwd.counters["total"] == 3 and fwd.counters["active"] == 2
            assert runtime.sessions.stats["evicted"] == 1  # type: ignore[attr-defined]
            assert len(sw.network.udp_sessions) == 2
            sent = [Ether(f) for f in link.sent]
            payloads = [bytes(f[UDP].payload) for f in sent if f.haslayer(UDP)]
            assert payloads == [b"client 0", b"client 1", b"client 2"]
            assert {f[IP].dst for f in sent if f.haslayer(UDP)} == {GUEST}
        finally:
            for c in clients:
                c.close()
        await sw.forwards.unexpose("udp", f"127.0.0.1:{port}")
        assert fwd.counters["active"] == 0 and not sw.network.udp_sessions

    run(test, udp_max_flows=2)


def test_a_forwarded_client_over_the_budget_is_reset_and_counted() -> None:
    async def test(sw: HostSwitch) -> None:
        link = guest_link(sw)
        port = free_port()
        fwd = await sw.forwards.expose("tcp", f"127.0.0.1:{port}", f"{GUEST}:80")
        loop = asyncio.get_running_loop()
        first = socket.create_connection(("127.0.0.1", port))
        second = socket.create_connection(("127.0.0.1", port))
        second.setblocking(False)
        try:
            for _ in range(200):  # bounded wait for both accepts
                await asyncio.sleep(0.01)
                if fwd.counters["total"] + fwd.counters["refused"] == 2:
                    break
            assert fwd.counters["total"] == 1 and fwd.counters["refused"] == 1
            assert sw.budget.in_use == 1 and sw.budget.stats["refused"] == 1
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(loop.sock_recv(second, 1), 10)
            syns = [Ether(f) for f in link.sent if Ether(f).haslayer(TCP)]
            assert len(syns) == 1 and syns[0][TCP].flags == "S"  # one active open only
        finally:
            first.close()
            second.close()

    run(test, max_connections=1)


def test_unix_forward_socket_is_private_and_removed_only_if_still_ours(tmp_path: Path) -> None:
    async def test(sw: HostSwitch) -> None:
        path = str(tmp_path / "fwd.sock")
        await sw.forwards.expose("unix", path, f"{GUEST}:22")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(ControlError, match="is held by the forward unix"):
            await sw.forwards.expose("unix", path, f"{GUEST}:23")
        await sw.forwards.unexpose("unix", path)
        assert not os.path.exists(path)
        # a file someone put there meanwhile is never removed
        other = str(tmp_path / "other.sock")
        await sw.forwards.expose("unix", other, f"{GUEST}:22")
        os.unlink(other)
        Path(other).write_text("not ours")
        await sw.forwards.unexpose("unix", other)
        assert Path(other).read_text() == "not ours"

    run(test)


def test_accept_without_descriptors_pauses_the_listener_then_resumes(monkeypatch):
    monkeypatch.setattr(forwards_mod, "ACCEPT_RETRY_DELAY", 0.05)

    async def main():
        sw = HostSwitch(NetworkConfig())
        with socket.socket() as probe:  # a free port
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        fwd = await sw.forwards.expose("tcp", f"127.0.0.1:{port}", "192.168.127.2:80")
        real_accept = socket.socket.accept
        calls = []

        def failing_accept(self):
            calls.append(1)
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(socket.socket, "accept", failing_accept)
        client = socket.create_connection(("127.0.0.1", port))
        with structlog.testing.capture_logs() as logs:
            await asyncio.sleep(0.02)
            paused_calls = len(calls)  # one try, then the reader is off: no spinning
            monkeypatch.setattr(socket.socket, "accept", real_accept)
            await asyncio.sleep(0.15)  # resumed: the waiting client is accepted now
        counters = dict(fwd.counters)
        client.close()
        await sw.close()
        return paused_calls, logs, counters

    paused_calls, logs, counters = asyncio.run(main())
    assert paused_calls == 1
    assert [e["event"] for e in logs] == ["forward.accept_paused"]
    assert counters["total"] == 1


# ---- IPv6 remotes ---------------------------------------------------------------------

GUEST6 = "fd00:192:168:127::2"


def v6_network(sw: HostSwitch) -> None:
    """The network's v6 addresses (the IPv6 layer sets them; set here where it has not)."""
    net, config = sw.network, sw.config
    for name, value in (
        ("ipv6_enabled", True),
        ("gateway_ip6", config.gateway6.packed),
        ("host_ip6", config.host6.packed),
        ("dns_ip6", config.dns6.packed),
    ):
        if getattr(net, name, None) is None:
            setattr(net, name, value)


def test_v6_remotes_are_checked_against_the_prefix() -> None:
    async def test(sw: HostSwitch) -> None:
        v6_network(sw)
        check = sw.forwards.check_guest_address
        check(HostPort(GUEST6, 80))
        check(HostPort("5a:94:ef:e4:0c:ee", 80))  # a guest by MAC
        for bad, why in (
            ("fd00:192:168:127::1", "not a guest address"),  # the gateway
            ("fd00:192:168:127::254", "not a guest address"),  # the host loopback
            ("fd00:192:168:127::", "not a guest address"),  # subnet-router anycast
            ("fd00:1::2", "is not in fd00:192:168:127::/64"),
            ("::1", "is not in"),
        ):
            with pytest.raises(ControlError, match=why):
                check(HostPort(bad, 80))
        sw.network.ipv6_enabled = False
        with pytest.raises(ControlError, match="IPv6 is off"):
            check(HostPort(GUEST6, 80))
        with pytest.raises(ControlError, match="needs IPv6"):
            check(HostPort("5a:94:ef:e4:0c:ee", 80))

    run(test)


def test_source_for_a_v6_guest_keeps_a_v6_client_and_hides_the_rest() -> None:
    async def test(sw: HostSwitch) -> None:
        v6_network(sw)
        remote = HostPort(GUEST6, 80)
        host6 = sw.config.host6.packed

        def source(peer: object, via: bytes | None = None) -> tuple[bytes, int]:
            return sw.forwards.source_for(peer, remote, "tcp", via=via)

        client = ipaddress.IPv6Address("fd15:6:6::2")
        assert source(("fd15:6:6::2", 5555, 0, 0)) == (client.packed, 5555)
        for hidden in ("::1", "fe80::1%eth0", "fd00:192:168:127::3", "203.0.113.7"):
            ip, _port = source((hidden, 5555, 0, 0) if ":" in hidden else (hidden, 5555))
            assert ip == host6, hidden
        ip, _ = source(None)
        assert ip == host6  # a unix client
        # A tunnel names the v4 gateway as its source: a v6 guest gets the v6 gateway.
        ip, _ = source(None, via=sw.network.gateway_ip)
        assert ip == sw.config.gateway6.packed
        # A v4 guest is unchanged by it all: a v6 client is hidden behind .254.
        ip, _ = sw.forwards.source_for(("fd15:6:6::2", 1), HostPort(GUEST, 80), "tcp")
        assert ip == sw.network.host_ip

    run(test)


def test_a_mac_remote_is_looked_up_per_client(monkeypatch) -> None:
    async def test(sw: HostSwitch) -> None:
        v6_network(sw)
        known: dict[bytes, bytes] = {}
        monkeypatch.setattr(sw.network, "guest_ip6_for_mac", known.get, raising=False)
        remote = HostPort("5a:94:ef:e4:0c:ee", 80)
        assert sw.forwards.guest_address(remote) is None
        assert sw.forwards.open_to_guest(remote) is None  # nobody has it: refused
        known[bytes.fromhex("5a94efe40cee")] = ipaddress.IPv6Address(GUEST6).packed
        assert sw.forwards.guest_address(remote) == ipaddress.IPv6Address(GUEST6).packed
        assert sw.forwards.guest_address(HostPort(GUEST, 80)) == ipaddress.IPv4Address(GUEST).packed

    run(test)
