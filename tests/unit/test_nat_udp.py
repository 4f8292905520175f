"""hostd/nat/udp.py: guest UDP flows to host loopback through a real switch and sockets.

The guest is a port that records what the switch sends it; its datagrams go to .254 (host
loopback) where a UDP echo socket of this test answers.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether

from netferry.hostd.config import NetworkConfig
from netferry.hostd.switch import HostSwitch
from tests.unit.helpers import GUEST_IP, GUEST_MAC, GW_MAC, guest_link

HOST_IP = "192.168.127.254"


class Guest:
    def __init__(self, sw: HostSwitch) -> None:
        self.sw = sw
        self.link = guest_link(sw)

    def send(self, sport: int, dport: int, payload: bytes) -> None:
        frame = (
            Ether(src=GUEST_MAC, dst=GW_MAC)
            / IP(src=GUEST_IP, dst=HOST_IP)
            / UDP(sport=sport, dport=dport)
            / payload
        )
        self.sw.link_frames(self.link, [bytes(frame)])  # type: ignore[arg-type]

    def received(self) -> list[Ether]:
        # (IPv6 frames, such as the gateway's router advertisements, are not these tests')
        frames = [Ether(f) for f in self.link.sent if f[12:14] != b"\x86\xdd"]
        self.link.sent.clear()
        return frames

    async def wait(self, count: int = 1) -> list[Ether]:
        got: list[Ether] = []
        for _ in range(200):  # bounded: 10 s at most
            got += self.received()
            if len(got) >= count:
                break
            await asyncio.sleep(0.05)
        return got


def echo_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


def run(test: Callable[[HostSwitch, Guest], Awaitable[object]], **config: object) -> object:
    async def main() -> object:
        sw = HostSwitch(NetworkConfig(**config))  # type: ignore[arg-type]
        try:
            return await test(sw, Guest(sw))
        finally:
            await sw.close()

    return asyncio.run(main())


async def echo_once(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    data, addr = await loop.sock_recvfrom(sock, 2048)
    await loop.sock_sendto(sock, data, addr)


def test_a_flow_carries_datagrams_both_ways_on_one_socket() -> None:
    async def test(sw: HostSwitch, g: Guest) -> None:
        with echo_socket() as echo:
            port = echo.getsockname()[1]
            for i in range(3):
                server = asyncio.ensure_future(echo_once(echo))
                g.send(40000, port, b"hello %d" % i)
                await server
                (reply,) = await g.wait()
                assert reply[UDP].sport == port and reply[UDP].dport == 40000
                assert bytes(reply[UDP].payload) == b"hello %d" % i
                assert reply[IP].src == HOST_IP and reply[IP].dst == GUEST_IP
        stats = sw.udp_nat.stats
        assert stats["flows_opened"] == 1 and stats["datagrams_out"] == 3
        assert stats["datagrams_in"] == 3

    run(test)


def test_at_max_flows_the_least_recently_used_flow_is_evicted() -> None:
    async def test(sw: HostSwitch, g: Guest) -> None:
        with echo_socket() as echo:
            port = echo.getsockname()[1]
            for sport in (40000, 40001, 40002):
                g.send(sport, port, b"x")
            assert sw.udp_nat.active == 2
            assert sw.udp_nat.stats["flows_evicted"] == 1
            assert [k[1] for k in sw.udp_nat.flows] == [40001, 40002]
            assert sw.budget.in_use == 2  # the evicted flow's socket is closed

    run(test, udp_max_flows=2)


def test_over_the_descriptor_budget_a_new_flow_gets_admin_prohibited() -> None:
    async def test(sw: HostSwitch, g: Guest) -> None:
        with echo_socket() as echo:
            port = echo.getsockname()[1]
            g.send(40000, port, b"first")
            g.send(40001, port, b"second")  # no descriptor left for guests
            (err,) = await g.wait()
            assert err[ICMP].type == 3 and err[ICMP].code == 13
            assert sw.udp_nat.stats["budget_refused"] == 1
            assert sw.budget.stats["refused"] == 1
            g.send(40000, port, b"again")  # the open flow still works
            assert sw.udp_nat.stats["datagrams_out"] == 2

    run(test, max_connections=1)


def test_socket_failure_answers_host_unreachable_and_raises_nothing(monkeypatch) -> None:
    async def test(sw: HostSwitch, g: Guest) -> None:
        def emfile(*_a: object, **_kw: object) -> socket.socket:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(sw.budget, "open", emfile)
        g.send(40000, 9, b"x")
        (err,) = await g.wait()
        assert err[ICMP].type == 3 and err[ICMP].code == 1
        assert sw.udp_nat.stats["socket_errors"] == 1
        assert sw.network.stats["internal_errors"] == 0
        assert sw.budget.stats["socket_errors"] == 1

    run(test)


def test_a_closed_port_answers_port_unreachable() -> None:
    async def test(sw: HostSwitch, g: Guest) -> None:
        with echo_socket() as probe:
            port = probe.getsockname()[1]
        g.send(40000, port, b"anyone?")  # nobody listens now: the socket gets ECONNREFUSED
        (err,) = await g.wait()
        assert err[ICMP].type == 3 and err[ICMP].code == 3
        assert sw.udp_nat.stats["refused"] == 1

    run(test)


def test_idle_flows_are_reaped_and_their_sockets_returned() -> None:
    async def test(sw: HostSwitch, g: Guest) -> None:
        with echo_socket() as echo:
            g.send(40000, echo.getsockname()[1], b"x")
            assert sw.udp_nat.active == 1 and sw.budget.in_use == 1
            assert sw.udp_nat.reap(sw.loop.time() + 1000) == 1
            assert sw.udp_nat.active == 0 and sw.budget.in_use == 0
            assert not sw.network.udp_flows  # the flow path forgets it too

    run(test)


@pytest.mark.parametrize("bad", [0, -1])
def test_max_connections_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match="max-connections"):
        NetworkConfig(max_connections=bad)
