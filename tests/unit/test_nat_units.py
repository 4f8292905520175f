"""The switch's socket side with failures injected: descriptors running out while dialling
or accepting must cost one connection, and a bug in the core one batch, never the switch
or a busy loop."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest
import structlog
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import ARP, Ether

from hostd import forwards as forwards_mod
from hostd.config import NetworkConfig
from hostd.nat import tcp as nat_tcp
from hostd.switch import HostSwitch

GW_MAC = "5a:94:ef:e4:0c:dd"
GUEST_MAC = "5a:94:ef:e4:0c:ee"
GUEST_IP = "192.168.127.2"


class CollectLink:
    """A switch port that keeps what the switch sends it."""

    vnet = False
    port = 0
    name = "collect"

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_frames(self, frames: list[bytes]) -> None:
        self.sent += frames

    def close(self, reason: str | None = None) -> None:
        pass


def emfile(*_args, **_kw):
    raise OSError(errno.EMFILE, "Too many open files")


def test_dial_without_descriptors_answers_unreachable_and_logs_once(monkeypatch):
    monkeypatch.setattr(nat_tcp, "host_socket", emfile)

    async def main():
        sw = HostSwitch(NetworkConfig())
        link = CollectLink()
        sw.link_opened(link)  # type: ignore[arg-type]
        arp = Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=GUEST_MAC, psrc=GUEST_IP, pdst="192.168.127.1"
        )
        sw.link_frames(link, [bytes(arp)])  # type: ignore[arg-type]
        link.sent.clear()
        with structlog.testing.capture_logs() as logs:
            for sport in (40000, 40001, 40002):
                syn = (
                    Ether(src=GUEST_MAC, dst=GW_MAC)
                    / IP(src=GUEST_IP, dst="192.168.127.254")
                    / TCP(sport=sport, dport=80, flags="S", seq=1)
                )
                sw.link_frames(link, [bytes(syn)])  # type: ignore[arg-type]
        stats = dict(sw.tcp_nat.stats)
        await sw.close()
        return link.sent, logs, stats

    sent, logs, stats = asyncio.run(main())
    replies = [Ether(f) for f in sent]
    assert len(replies) == 3
    for r in replies:
        assert r.haslayer(ICMP) and r[ICMP].type == 3 and r[ICMP].code == 1  # host unreachable
    assert stats["socket_errors"] == 3 and stats["unreachable"] == 3
    assert [e["event"] for e in logs].count("nat.tcp.socket_failed") == 1


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


@pytest.mark.parametrize("err", [errno.ECONNREFUSED, errno.ENETUNREACH])
def test_dial_failure_codes(monkeypatch, err):
    """connect() failing at once maps to RST (refused) or ICMP net unreachable."""

    class FailingSocket:
        def __init__(self, *_a):
            self.closed = False

        def connect_ex(self, _addr):
            return err

        def close(self):
            self.closed = True

    monkeypatch.setattr(nat_tcp, "host_socket", lambda budget, family, guest: FailingSocket())

    async def main():
        sw = HostSwitch(NetworkConfig())
        link = CollectLink()
        sw.link_opened(link)  # type: ignore[arg-type]
        syn = (
            Ether(src=GUEST_MAC, dst=GW_MAC)
            / IP(src=GUEST_IP, dst="192.168.127.254")
            / TCP(sport=40000, dport=80, flags="S", seq=1)
        )
        sw.link_frames(link, [bytes(syn)])  # type: ignore[arg-type]
        await sw.close()
        return [Ether(f) for f in link.sent]

    (reply,) = asyncio.run(main())
    if err == errno.ECONNREFUSED:
        assert reply[TCP].flags == "RA"
    else:
        assert reply[ICMP].type == 3 and reply[ICMP].code == 0  # net unreachable


def test_a_core_bug_costs_the_batch_not_the_switch(monkeypatch):
    async def main():
        sw = HostSwitch(NetworkConfig())
        link = CollectLink()
        sw.link_opened(link)  # type: ignore[arg-type]

        def broken(*_a):
            raise IndexError("a bug")

        real = sw.network.receive_frames
        monkeypatch.setattr(sw.network, "receive_frames", broken)
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):
                sw.link_frames(link, [b"\x00" * 60])  # type: ignore[arg-type]
        monkeypatch.setattr(sw.network, "receive_frames", real)
        arp = Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=GUEST_MAC, psrc=GUEST_IP, pdst="192.168.127.1"
        )
        sw.link_frames(link, [bytes(arp)])  # type: ignore[arg-type]
        errors = sw.network.stats["internal_errors"]
        await sw.close()
        return logs, errors, [Ether(f) for f in link.sent]

    logs, errors, sent = asyncio.run(main())
    assert errors == 3
    assert [e["event"] for e in logs] == ["switch.internal_error"]  # once, not per batch
    assert len(sent) == 1 and sent[0][ARP].op == 2  # and the next batch is served
