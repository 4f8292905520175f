"""hostd/stack/transport.py through `Network`: connection tables, caps per port, refusals as
results, and offload options that follow the port a segment leaves by."""

from __future__ import annotations

import ipaddress

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from netferry.hostd.config import NetworkConfig
from netferry.hostd.stack import tcp
from netferry.hostd.stack.checksum import verify_transport_v4
from netferry.hostd.stack.network import VNET_HDR, VNET_LEN, VNET_NONE, Network, TcpDial
from netferry.hostd.stack.transport import TcpRoute

GW_MAC = "5a:94:ef:e4:0c:dd"
MAC1 = "5a:94:ef:e4:0c:ee"
MAC2 = "5a:94:ef:e4:0c:ef"
GUEST1 = "192.168.127.2"
GUEST2 = "192.168.127.3"
GW_IP = "192.168.127.1"
HOST_IP = "192.168.127.254"


def b(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def syn(src: str, mac: str, sport: int, dst: str = HOST_IP, dport: int = 80, **ip) -> bytes:
    return bytes(
        Ether(src=mac, dst=GW_MAC)
        / IP(src=src, dst=dst, **ip)
        / TCP(sport=sport, dport=dport, flags="S", seq=1000, options=[("MSS", 1460)])
    )


def rsts(out: dict[int, list[bytes]], port: int, vnet: bool = False) -> int:
    frames = [Ether(f[VNET_LEN:] if vnet else f) for f in out.get(port, [])]
    return sum(1 for f in frames if TCP in f and f[TCP].flags.R)


def dials(net: Network) -> list[TcpDial]:
    return [ev for ev in net.events if isinstance(ev, TcpDial)]


# ---- caps ---------------------------------------------------------------------------------


def test_half_open_cap_per_port_refuses_with_rst_and_spares_the_other_port():
    net = Network(NetworkConfig(tcp_max_half_open=10, tcp_port_share=0.5))
    p1, p2 = net.add_port(), net.add_port()
    net.receive_frames(p1, [syn(GUEST1, MAC1, 40000 + i) for i in range(8)], 0.0)
    out = net.frames_to_send(0.0)
    assert len(dials(net)) == 5  # the port's share of 10
    assert net.stats["tcp_half_open_port_refused"] == 3
    assert rsts(out, p1) == 3
    net.events.clear()
    net.receive_frames(p2, [syn(GUEST2, MAC2, 41000 + i) for i in range(5)], 0.0)
    assert len(dials(net)) == 5  # the other guest still gets its share
    net.events.clear()
    net.receive_frames(p2, [syn(GUEST2, MAC2, 42000)], 0.0)
    assert net.stats["tcp_half_open_refused"] == 1  # and now the global cap holds


def test_syns_to_the_gateways_dns_over_tcp_are_capped_too():
    net = Network(NetworkConfig(tcp_max_half_open=4, tcp_port_share=1.0))
    port = net.add_port()
    net.receive_frames(port, [syn(GUEST1, MAC1, 40000 + i, GW_IP, 53) for i in range(10)], 0.0)
    assert [d.service for d in dials(net)] == ["dns"] * 4
    assert net.stats["tcp_half_open_refused"] == 6
    assert len(net.tcp_conns) == 4


def test_established_cap_counts_accepted_connections_and_frees_on_close():
    net = Network(NetworkConfig(tcp_max_connections=2, tcp_port_share=1.0))
    port = net.add_port()
    conns = []
    for i in range(2):
        net.receive_frames(port, [syn(GUEST1, MAC1, 40000 + i)], 0.0)
        conn = dials(net)[-1].conn
        net.tcp_accept(conn, 0.0)
        synack = Ether(net.frames_to_send(0.0)[port][0])
        ack = (
            Ether(src=MAC1, dst=GW_MAC)
            / IP(src=GUEST1, dst=HOST_IP)
            / TCP(sport=40000 + i, dport=80, flags="A", seq=1001, ack=synack[TCP].seq + 1)
        )
        net.receive_frames(port, [bytes(ack)], 0.0)
        net.frames_to_send(0.0)
        assert conn.state is tcp.TcpState.ESTABLISHED
        conns.append(conn)
    net.receive_frames(port, [syn(GUEST1, MAC1, 40009)], 0.0)
    assert rsts(net.frames_to_send(0.0), port) == 1
    assert net.stats["tcp_connections_refused"] == 1
    conns[0].abort()
    net.tcp_touch(conns[0])
    net.frames_to_send(0.0)  # the abort's Closed frees its place
    net.events.clear()
    net.receive_frames(port, [syn(GUEST1, MAC1, 40010)], 0.0)
    assert len(dials(net)) == 1


def test_refused_dial_leaves_the_half_open_count():
    net = Network(NetworkConfig(tcp_max_half_open=1, tcp_port_share=1.0))
    port = net.add_port()
    net.receive_frames(port, [syn(GUEST1, MAC1, 40000)], 0.0)
    net.tcp_refuse(dials(net)[0].conn, 0.0)
    net.frames_to_send(0.0)
    net.events.clear()
    net.receive_frames(port, [syn(GUEST1, MAC1, 40001)], 0.0)
    assert len(dials(net)) == 1 and net.stats["tcp_half_open_refused"] == 0


# ---- refusals are results -----------------------------------------------------------------


def test_route_tcp_syn_says_whether_the_guest_was_answered():
    net = Network(NetworkConfig(host_loopback=False))
    net.add_port()

    class Pkt:
        src = b(GUEST1)
        ttl = 64
        quote = b""
        raw = b"\x45" + bytes(27)

        def __init__(self, dst: str, ttl: int = 64) -> None:
            self.dst = b(dst)
            self.ttl = ttl
            self.header = self.raw[:20]

    assert net.route_tcp_syn(Pkt(GW_IP), 1, 53) == TcpRoute(service="dns")
    assert net.route_tcp_syn(Pkt(GW_IP), 1, 22) == TcpRoute(refused=True)  # RST follows
    assert net.route_tcp_syn(Pkt(HOST_IP), 1, 80) == TcpRoute(refused=True, answered=True)
    assert net.route_tcp_syn(Pkt("192.0.2.7", ttl=1), 1, 80) == TcpRoute(
        refused=True, answered=True
    )
    assert net.route_tcp_syn(Pkt("192.0.2.7"), 1, 80) == TcpRoute(target="192.0.2.7")


# ---- typed connection fields --------------------------------------------------------------


def test_connections_carry_key_app_and_syn_quote():
    net = Network(NetworkConfig())
    port = net.add_port()
    frame = syn(GUEST1, MAC1, 40000)
    net.receive_frames(port, [frame], 0.0)
    conn = dials(net)[0].conn
    assert conn.key == (b(GUEST1), 40000, b(HOST_IP), 80)
    assert conn.app is None
    assert conn.syn_quote == frame[14 : 14 + 28]


# ---- offload follows the port -------------------------------------------------------------


def test_offload_follows_the_port_the_guest_moved_to():
    """A connection opened on an offload port sends GSO/partial-checksum segments there;
    once the guest's MAC shows up on a plain port, its segments there are plain MSS-sized
    frames with full checksums (and back again). Port security keeps a MAC on its port
    while that port lives, so the move is one a bridging setup makes (port security off)."""
    net = Network(NetworkConfig(port_security=False))
    vport, plain = net.add_port(vnet=True), net.add_port()
    net.receive_frames(vport, [VNET_NONE + syn(GUEST1, MAC1, 40000)], 0.0)
    conn = dials(net)[0].conn
    net.events.clear()
    net.tcp_accept(conn, 0.0)
    synack = Ether(net.frames_to_send(0.0)[vport][0][VNET_LEN:])
    ack = bytes(
        Ether(src=MAC1, dst=GW_MAC)
        / IP(src=GUEST1, dst=HOST_IP)
        / TCP(sport=40000, dport=80, flags="A", seq=1001, ack=synack[TCP].seq + 1, window=65535)
    )
    net.receive_frames(vport, [VNET_NONE + ack], 0.0)
    net.frames_to_send(0.0)
    assert conn.offload
    conn.send(b"a" * 2000)
    net.tcp_touch(conn)
    out = net.frames_to_send(0.0)[vport]
    assert VNET_HDR.unpack_from(out[0])[1] == 1  # GSO TCPv4
    # The guest's MAC moves to the plain port (its next frame arrives there).
    net.receive_frames(plain, [ack], 0.1)
    conn.send(b"b" * 2000)
    net.tcp_touch(conn)
    out = net.frames_to_send(0.1)
    assert vport not in out
    frames = [Ether(f) for f in out[plain]]
    assert len(frames) == 2 and all(len(f) <= 1514 for f in frames)
    for f in frames:
        raw = bytes(f[IP])
        assert verify_transport_v4(raw[12:16], raw[16:20], 6, raw[20:])
    assert not conn.offload


def test_prebuilt_partial_segments_completed_when_the_port_turns_plain():
    guest_syn = tcp.TcpSegment.parse(syn(GUEST1, MAC1, 40000)[34:])
    conn = tcp.TcpConnection.from_syn(
        b(HOST_IP), 80, b(GUEST1), 40000, guest_syn, now=0.0, partial_checksum=True, gso_max=60000
    )
    conn.refuse(0.0)  # queues a RST built with a partial checksum
    conn.set_offload(False, 0)
    (rst,) = conn.segments_to_send(0.0)
    assert verify_transport_v4(b(HOST_IP), b(GUEST1), 6, rst)


def test_pending_dials_evicted_from_the_port_that_holds_the_most():
    net = Network(NetworkConfig(tcp_max_pending=10, tcp_port_share=1.0))
    p1, p2 = net.add_port(), net.add_port()
    net.receive_frames(p2, [syn(GUEST2, MAC2, 41000 + i) for i in range(3)], 0.0)
    victims = [d.conn for d in dials(net)]
    net.events.clear()
    net.receive_frames(p1, [syn(GUEST1, MAC1, 40000 + i) for i in range(30)], 0.0)
    assert net.stats["tcp_pending_evicted"] == 23
    # The flooding port evicted its own dials; the other guest's are all still dialling.
    assert all(net.tcp_pending.get(c.key) is c for c in victims)
    assert len(net.tcp_pending) == 10
