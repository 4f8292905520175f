"""hostd/nat/{udp,icmp,tcp}.py and host_errors.py with IPv6 flows: 16-byte addresses in,
host sockets of the target's family out (real ones, to ::1), and what the host sockets hear
(replies, ICMPv6 errors from the error queue, routing failures) back to the guest.

The network layer here is a recorder with the methods the NAT calls (the IPv6 network layer
has its own tests); a failing route is injected where a real one would need an address off
this machine (the end-to-end tests make a host without routes in a namespace instead)."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable

import pytest

from netferry.hostd.nat import host_errors
from netferry.hostd.nat import icmp as nat_icmp
from netferry.hostd.nat.budget import DescriptorBudget
from netferry.hostd.nat.icmp import IcmpNat, echo_quote
from netferry.hostd.nat.tcp import endpoint_text
from netferry.hostd.nat.udp import UdpNat
from netferry.hostd.stack import icmp
from netferry.hostd.stack.network import IcmpEchoOutbound, UdpOutbound

GUEST6 = bytes.fromhex("fd000192016801270000000000000002")
HOST6 = bytes.fromhex("fd000192016801270000000000000254")  # the v6 host-loopback address
QUOTE6 = b"\x60" + bytes(39) + bytes(8)  # an IPv6 header + 8 bytes, as the layer gives it


class Recorder:
    """The `Network` methods the NAT calls, recorded."""

    def __init__(self) -> None:
        self.udp_flows: dict = {}
        self.calls: list[tuple] = []

    def send_udp(self, src: bytes, sport: int, dst: bytes, dport: int, payload: bytes) -> None:
        self.calls.append(("udp", src, sport, dst, dport, bytes(payload)))

    def send_icmp_echo_reply(self, src, dst, ident, seq, payload) -> None:
        self.calls.append(("echo_reply", src, dst, ident, seq, bytes(payload)))

    def send_icmp_error(self, src, dst, type_, code, quote, mtu=0) -> None:
        self.calls.append(("icmp_error", src, dst, type_, code, bytes(quote), mtu))

    def send_icmp6_error(self, src, dst, type_, code, quote, param=0) -> None:
        self.calls.append(("icmp6_error", src, dst, type_, code, bytes(quote), param))

    def of(self, kind: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == kind]


def run(test: Callable[[Recorder], Awaitable[object]]) -> object:
    async def main() -> object:
        return await test(Recorder())

    return asyncio.run(main())


async def until(predicate: Callable[[], object], what: str) -> None:
    for _ in range(200):  # bounded: 10 s at most
        if predicate():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def udp_nat(net: Recorder) -> UdpNat:
    return UdpNat(net, lambda: None, idle_timeout=30, max_flows=64)  # type: ignore[arg-type]


def closed_udp_port6() -> int:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_a_v6_flow_goes_out_on_a_v6_socket_and_replies_come_back_with_16_byte_addresses():
    async def test(net: Recorder) -> None:
        nat = udp_nat(net)
        echo = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        echo.bind(("::1", 0))
        echo.setblocking(False)
        port = echo.getsockname()[1]
        loop = asyncio.get_running_loop()
        try:
            for i in range(3):
                nat.send(UdpOutbound(GUEST6, 40000, HOST6, port, "::1", b"ping %d" % i, QUOTE6))
                data, addr = await asyncio.wait_for(loop.sock_recvfrom(echo, 100), 5)
                assert data == b"ping %d" % i
                await loop.sock_sendto(echo, b"pong %d" % i, addr)
            await until(lambda: len(net.of("udp")) == 3, "three replies")
            assert net.of("udp") == [
                ("udp", HOST6, port, GUEST6, 40000, b"pong %d" % i) for i in range(3)
            ]
            (flow,) = nat.flows.values()
            assert flow.sock.family == socket.AF_INET6
            assert nat.stats["flows_opened"] == 1
        finally:
            nat.close()
            echo.close()

    run(test)


def test_a_closed_v6_port_is_told_once_as_icmpv6_port_unreachable():
    async def test(net: Recorder) -> None:
        nat = udp_nat(net)
        port = closed_udp_port6()
        try:
            nat.send(UdpOutbound(GUEST6, 40001, HOST6, port, "::1", b"anyone?", QUOTE6))
            await until(lambda: net.of("icmp6_error"), "the port unreachable")
            await asyncio.sleep(0.2)  # a second copy (errno and error queue both) would be here
            assert net.of("icmp6_error") == [("icmp6_error", HOST6, GUEST6, 1, 4, QUOTE6, 0)]
            assert not net.of("icmp_error")
            assert nat.stats["refused"] == 1 and nat.stats["icmp_errors"] == 1
            # the guest sends again (its socket saw ECONNREFUSED, a new send is allowed)
            nat.send(UdpOutbound(GUEST6, 40001, HOST6, port, "::1", b"again", QUOTE6))
            await until(lambda: len(net.of("icmp6_error")) == 2, "the second port unreachable")
        finally:
            nat.close()

    run(test)


class NoRouteSocket:
    """A socket whose connect() fails as on a host without a route to the target."""

    family = socket.AF_INET6

    def __init__(self, err: int) -> None:
        self.err = err
        self.closed = False

    def setsockopt(self, *args: object) -> None:
        pass

    def connect(self, addr: object) -> None:
        raise OSError(self.err, "no route")

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (errno.ENETUNREACH, icmp.NET_UNREACHABLE),
        (errno.EHOSTUNREACH, icmp.HOST_UNREACHABLE),
        (errno.EADDRNOTAVAIL, icmp.HOST_UNREACHABLE),
    ],
)
def test_no_route_on_the_host_is_told_at_once(monkeypatch, err, code):
    target = bytes.fromhex("20010db8000000000000000000000001")
    echo = IcmpEchoOutbound(GUEST6, target, "2001:db8::1", 0x1234, 7, b"abcdefgh")

    async def test(net: Recorder) -> list[tuple]:
        budget = DescriptorBudget(100)
        monkeypatch.setattr(budget, "open", lambda *a, **k: NoRouteSocket(err))
        monkeypatch.setattr(nat_icmp, "ping_sockets_allowed", lambda: (True, "0 0"))
        nat = UdpNat(net, lambda: None, idle_timeout=30, max_flows=8, budget=budget)  # type: ignore[arg-type]
        inat = IcmpNat(net, lambda: None, idle_timeout=30, max_flows=8, budget=budget)  # type: ignore[arg-type]
        try:
            nat.send(UdpOutbound(GUEST6, 40002, target, 53, "2001:db8::1", b"q", QUOTE6))
            inat.send(echo)
        finally:
            nat.close()
            inat.close()
        return net.calls

    calls = run(test)
    # At once (inside send), ICMPv4 codes: the network layer maps them to ICMPv6 1/0, 1/3.
    assert [c[:5] for c in calls] == [
        ("icmp_error", target, GUEST6, icmp.DEST_UNREACHABLE, code),
        ("icmp_error", target, GUEST6, icmp.DEST_UNREACHABLE, code),
    ]
    assert calls[0][5] == QUOTE6
    assert calls[1][5] == echo_quote(echo)


def test_an_echo_quote_is_the_guests_icmpv6_echo_request():
    dst = bytes.fromhex("fd000192016801270000000000000254")
    quote = echo_quote(IcmpEchoOutbound(GUEST6, dst, "::1", 0x1234, 7, b"x" * 200))
    assert quote[0] >> 4 == 6 and quote[6] == 58  # IPv6, next header ICMPv6
    assert int.from_bytes(quote[4:6], "big") == 8 + 200  # the payload length it had
    assert quote[8:24] == GUEST6 and quote[24:40] == dst
    assert quote[40] == 128 and quote[44:48] == b"\x12\x34\x00\x07"  # echo request, id, seq
    assert len(quote) == 40 + 8 + nat_icmp.QUOTED_PAYLOAD
    v4 = echo_quote(
        IcmpEchoOutbound(b"\xc0\xa8\x7f\x02", b"\xc0\xa8\x7f\xfe", "127.0.0.1", 1, 2, b"")
    )
    assert v4[0] == 0x45 and v4[9] == 1 and v4[20] == icmp.ECHO_REQUEST


@pytest.mark.parametrize("raw", [False, True], ids=["ping-socket", "raw-socket"])
def test_icmpv6_echo_to_the_host_loopback(monkeypatch, raw):
    """Through an IPv6 ping socket, and through the raw ICMPv6 socket of a host whose
    ping_group_range leaves us out (this test runs as root: CAP_NET_RAW)."""
    monkeypatch.setattr(nat_icmp, "ping_sockets_allowed", lambda: (not raw, "1 0"))

    async def test(net: Recorder) -> dict:
        inat = IcmpNat(net, lambda: None, idle_timeout=30, max_flows=8)  # type: ignore[arg-type]
        try:
            if raw:
                assert inat.raw6 is not None, "no raw ICMPv6 socket (not root?)"
            for seq in range(3):
                inat.send(IcmpEchoOutbound(GUEST6, HOST6, "::1", 0x4242, seq, b"payload %d" % seq))
            await until(lambda: len(net.of("echo_reply")) == 3, "three echo replies")
            return dict(inat.stats)
        finally:
            inat.close()

    calls = []

    async def wrapped(net: Recorder) -> dict:
        stats = await test(net)
        calls.extend(net.calls)
        return stats

    stats = run(wrapped)
    assert sorted(c for c in calls if c[0] == "echo_reply") == [
        ("echo_reply", HOST6, GUEST6, 0x4242, seq, b"payload %d" % seq) for seq in range(3)
    ]
    assert stats["echo_out"] == 3 and stats["echo_in"] == 3


def test_error_queue_entries_are_relayed_as_what_they_are():
    net = Recorder()
    e6 = host_errors.HostError(errno.EMSGSIZE, host_errors.SO_EE_ORIGIN_ICMP6, 2, 0, 1280)
    assert host_errors.relay(net, HOST6, GUEST6, QUOTE6, e6)
    e6 = host_errors.HostError(errno.EHOSTUNREACH, host_errors.SO_EE_ORIGIN_ICMP6, 3, 0, 0)
    assert host_errors.relay(net, HOST6, GUEST6, QUOTE6, e6)
    local = host_errors.HostError(errno.EMSGSIZE, host_errors.SO_EE_ORIGIN_LOCAL, 0, 0, 1400)
    assert host_errors.relay(net, HOST6, GUEST6, QUOTE6, local)
    nothing = host_errors.HostError(errno.EINVAL, host_errors.SO_EE_ORIGIN_LOCAL, 0, 0, 0)
    assert not host_errors.relay(net, HOST6, GUEST6, QUOTE6, nothing)
    assert net.calls == [
        ("icmp6_error", HOST6, GUEST6, 2, 0, QUOTE6, 1280),  # packet too big, its MTU
        ("icmp6_error", HOST6, GUEST6, 3, 0, QUOTE6, 0),  # hop limit exceeded
        ("icmp_error", HOST6, GUEST6, icmp.DEST_UNREACHABLE, icmp.FRAG_NEEDED, QUOTE6, 1400),
    ]


def test_error_queue_of_a_real_v6_socket():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        host_errors.enable_recverr(s)
        s.connect(("::1", closed_udp_port6()))
        s.send(b"x")
        for _ in range(100):  # bounded
            got = host_errors.drain(s)
            if got:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert got == [
            host_errors.HostError(errno.ECONNREFUSED, host_errors.SO_EE_ORIGIN_ICMP6, 1, 4, 0)
        ]
        assert host_errors.drain(s) == []
    finally:
        s.close()


def test_log_text_of_v4_and_v6_endpoints():
    assert endpoint_text(b"\xc0\xa8\x7f\x02", 80) == "192.168.127.2:80"
    assert endpoint_text(GUEST6, 443) == "[fd00:192:168:127::2]:443"


def test_the_raw_icmpv6_socket_tells_the_guest_an_error_about_its_echo(monkeypatch):
    """An error the raw socket sees is matched by the echo it quotes (destination, host-side
    id) and told to the guest about the guest's own echo; others' errors are ignored."""
    monkeypatch.setattr(nat_icmp, "ping_sockets_allowed", lambda: (False, "1 0"))
    loopback = bytes(15) + b"\x01"
    echo = IcmpEchoOutbound(GUEST6, HOST6, "::1", 0x4242, 9, b"payload")

    async def test(net: Recorder) -> list[tuple]:
        inat = IcmpNat(net, lambda: None, idle_timeout=30, max_flows=8)  # type: ignore[arg-type]
        try:
            assert inat.raw6 is not None, "no raw ICMPv6 socket (not root?)"
            inat.send(echo)
            (flow,) = inat.flows.values()

            def error_about(ident: int) -> bytes:
                inner = IPV6 + icmp.HEADER.pack(128, 0, 0, ident, 9) + b"payload"
                return icmp.HEADER.pack(1, 3, 0, 0, 0) + inner  # address unreachable

            IPV6 = nat_icmp.IPV6_HEADER.pack(0x60000000, 15, 58, 64, loopback, loopback)
            assert not inat._raw_error(error_about(flow.host_ident ^ 1), 0, True, 1, 3)
            assert inat._raw_error(error_about(flow.host_ident), 0, True, 1, 3)
            return [c for c in net.calls if c[0] == "icmp6_error"]
        finally:
            inat.close()

    calls = run(test)
    assert calls == [("icmp6_error", HOST6, GUEST6, 1, 3, echo_quote(echo), 0)]
