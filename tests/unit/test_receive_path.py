"""The one receive path frame by frame: every frame is validated once; segments of open TCP
connections go straight to them and datagrams of UDP flows the NAT opened to
`udp_flow_datagrams` (no event objects), whatever valid form they take (IP options,
fragments, broadcast MAC); everything else goes to the slower handlers, where it is
checked, counted and dropped or turned into an event."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.l2 import Ether

from netferry.hostd.config import NetworkConfig
from netferry.hostd.stack import tcp
from netferry.hostd.stack.network import (
    VNET_HDR,
    VNET_NONE,
    Network,
    TcpConnEvent,
    TcpDial,
    UdpOutbound,
    udp_flow_key,
)

GW_MAC = "5a:94:ef:e4:0c:dd"
GUEST_MAC = "5a:94:ef:e4:0c:ee"
GUEST_IP = "192.168.127.2"
HOST_IP = "192.168.127.254"
FLOW = object()  # what the NAT registers: opaque to the network


def b(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def datagram(payload: bytes = b"payload", sport: int = 40000, dport: int = 5001, **ip) -> bytes:
    ip.setdefault("src", GUEST_IP)
    ip.setdefault("dst", HOST_IP)
    return bytes(
        Ether(src=GUEST_MAC, dst=GW_MAC) / IP(**ip) / UDP(sport=sport, dport=dport) / payload
    )


def net_with_flow(vnet: bool) -> tuple[Network, int]:
    net = Network(NetworkConfig())
    port = net.add_port(vnet=vnet)
    net.udp_flows[udp_flow_key(b(GUEST_IP), 40000, b(HOST_IP), 5001)] = FLOW
    return net, port


def feed(net: Network, port: int, frames: list[bytes], vnet: bool) -> None:
    net.receive_frames(port, [(VNET_NONE + f) if vnet else f for f in frames], 0.0)


@pytest.mark.parametrize("vnet", [False, True])
def test_flow_datagrams_skip_events_and_count_like_the_full_path(vnet):
    net, port = net_with_flow(vnet)
    frames = [datagram(b"x" * n) for n in (0, 1, 1400)]
    feed(net, port, frames, vnet)
    assert not net.events
    assert net.take_udp_flow_datagrams() == [(FLOW, b""), (FLOW, b"x"), (FLOW, b"x" * 1400)]
    assert net.udp_flow_datagrams == []
    for key in ("frames_in", "ipv4_in", "udp_packets_in", "udp_in"):
        assert net.stats[key] == 3
    assert net.stats["udp_bytes_in"] == sum(len(f) - 14 for f in frames)


@pytest.mark.parametrize("vnet", [False, True])
def test_padded_frame_gives_the_datagram_without_padding(vnet):
    net, port = net_with_flow(vnet)
    feed(net, port, [datagram(b"p") + bytes(20)], vnet)
    assert net.take_udp_flow_datagrams() == [(FLOW, b"p")]


@pytest.mark.parametrize(
    "frame",
    [
        datagram(dport=5002),  # another flow: none open
        datagram(sport=40001),
        datagram(src="192.168.127.3"),
    ],
    ids=["other-port", "other-sport", "other-src"],
)
@pytest.mark.parametrize("vnet", [False, True])
def test_datagrams_of_no_open_flow_become_events(frame, vnet):
    net, port = net_with_flow(vnet)
    feed(net, port, [frame], vnet)
    assert net.udp_flow_datagrams == []
    assert [type(ev) for ev in net.events] == [UdpOutbound]
    assert net.stats["frames_in"] == 1  # counted once


@pytest.mark.parametrize(
    "frame",
    [
        datagram(ttl=1),  # to .254, the host's loopback: TTL is not checked (no hop)
        datagram(options=b"\x01\x01\x01\x01"),  # IP options: header longer than 20
        bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff", type=0x800))[:14] + datagram()[14:],
    ],
    ids=["ttl1", "options", "bcast"],
)
@pytest.mark.parametrize("vnet", [False, True])
def test_datagrams_of_an_open_flow_in_any_valid_form_reach_it(frame, vnet):
    net, port = net_with_flow(vnet)
    feed(net, port, [frame], vnet)
    assert net.take_udp_flow_datagrams() == [(FLOW, b"payload")]
    assert not net.events
    assert net.stats["frames_in"] == 1 and net.stats["udp_in"] == 1  # counted once


@pytest.mark.parametrize(
    "frame", [datagram(b"8 bytes!", flags="MF"), datagram(frag=100)], ids=["mf", "offset"]
)
@pytest.mark.parametrize("vnet", [False, True])
def test_a_lone_fragment_of_a_flow_waits_for_reassembly(frame, vnet):
    net, port = net_with_flow(vnet)
    feed(net, port, [frame], vnet)
    assert net.udp_flow_datagrams == [] and not net.events
    assert len(net.reassembler) == 1
    assert net.stats["frames_in"] == 1


def test_ttl_exceeded_for_a_flow_to_the_outside():
    net = Network(NetworkConfig())
    port = net.add_port()
    net.udp_flows[udp_flow_key(b(GUEST_IP), 40000, b("10.9.8.7"), 5001)] = FLOW
    feed(net, port, [datagram(dst="10.9.8.7", ttl=1)], False)
    assert net.udp_flow_datagrams == [] and not net.events
    assert net.stats["ttl_exceeded"] == 1


def test_plain_port_bad_udp_checksum_dropped():
    net, port = net_with_flow(False)
    raw = bytearray(datagram(b"data"))
    raw[-1] ^= 0xFF  # payload changed, checksum not
    feed(net, port, [bytes(raw)], False)
    assert net.udp_flow_datagrams == [] and not net.events
    assert net.stats["udp_bad_checksum"] == 1


def test_plain_port_bad_header_checksum_dropped():
    net, port = net_with_flow(False)
    raw = bytearray(datagram())
    raw[24] ^= 0x01  # header checksum byte
    feed(net, port, [bytes(raw)], False)
    assert net.udp_flow_datagrams == [] and not net.events
    assert net.stats["ipv4_bad_checksum"] == 1


def test_plain_port_zero_udp_checksum_accepted():
    net, port = net_with_flow(False)
    raw = bytearray(datagram(b"z"))
    raw[40:42] = b"\x00\x00"
    feed(net, port, [bytes(raw)], False)
    assert net.take_udp_flow_datagrams() == [(FLOW, b"z")]


@pytest.mark.parametrize("bad", ["udp_length", "ip_length", "truncated"])
def test_inconsistent_lengths_dropped(bad):
    net, port = net_with_flow(True)
    raw = bytearray(datagram(b"abcdef"))
    if bad == "udp_length":
        raw[38:40] = (100).to_bytes(2, "big")
    elif bad == "ip_length":
        raw[16:18] = (200).to_bytes(2, "big")
    else:
        raw = raw[:-3]
    feed(net, port, [bytes(raw)], True)
    assert net.udp_flow_datagrams == []
    assert not any(isinstance(ev, UdpOutbound) for ev in net.events)


def test_gso_frame_on_offload_port_reaches_its_flow_whole():
    net, port = net_with_flow(True)
    frame = VNET_HDR.pack(0, 5, 0, 1400, 0, 0) + datagram()  # gso_type UDP_L4
    net.receive_frames(port, [frame], 0.0)
    assert net.take_udp_flow_datagrams() == [(FLOW, b"payload")]
    assert not net.events


def test_without_flows_every_datagram_is_an_event_in_order():
    net = Network(NetworkConfig())
    port = net.add_port()
    feed(net, port, [datagram(bytes([i])) for i in range(5)], False)
    assert [ev.payload for ev in net.events] == [bytes([i]) for i in range(5)]


def test_mixed_batch_keeps_each_flows_order():
    """A batch is handled frame by frame in order: the open flow's datagrams stay in order
    around another flow's first datagram (an event)."""
    net, port = net_with_flow(True)
    feed(net, port, [datagram(b"1"), datagram(b"2", dport=53), datagram(b"3")], True)
    assert net.take_udp_flow_datagrams() == [(FLOW, b"1"), (FLOW, b"3")]
    assert [(ev.dst_port, ev.payload) for ev in net.events] == [(53, b"2")]


def test_fragmented_datagram_is_not_overtaken_by_a_later_small_one():
    net, port = net_with_flow(False)
    big = IP(src=GUEST_IP, dst=HOST_IP) / UDP(sport=40000, dport=5001) / (b"b" * 3000)
    frags = [bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / f) for f in fragment(big, 1480)]
    feed(net, port, [*frags, datagram(b"small")], False)
    assert not net.events
    assert net.take_udp_flow_datagrams() == [(FLOW, b"b" * 3000), (FLOW, b"small")]


# --------------------------------------------------------------------------- TCP


def segment(flags: str = "A", seq: int = 1001, ack: int = 0, payload: bytes = b"", **ip) -> bytes:
    ip.setdefault("src", GUEST_IP)
    ip.setdefault("dst", HOST_IP)
    return bytes(
        Ether(src=GUEST_MAC, dst=GW_MAC)
        / IP(**ip)
        / TCP(sport=40000, dport=80, flags=flags, seq=seq, ack=ack, window=65535)
        / payload
    )


def established(vnet: bool) -> tuple[Network, int, tcp.TcpConnection, int]:
    """A guest connection to .254:80 through the full path, accepted and acknowledged."""
    net = Network(NetworkConfig())
    port = net.add_port(vnet=vnet)
    feed(net, port, [segment("S", seq=1000)], vnet)
    dial = next(ev for ev in net.events if isinstance(ev, TcpDial))
    net.events.clear()
    net.tcp_accept(dial.conn, 0.0)
    (synack,) = net.frames_to_send(0.0)[port]
    our_seq = Ether(synack[10:] if vnet else synack)[TCP].seq + 1
    feed(net, port, [segment("A", ack=our_seq)], vnet)
    net.frames_to_send(0.0)
    net.events.clear()
    net.stats.clear()
    return net, port, dial.conn, our_seq


def no_slow_handler(net: Network) -> None:
    def fail(*_args):
        raise AssertionError("took a slower handler")

    net.transport.tcp_segment = fail  # type: ignore[method-assign]
    net._ipv4_unusual = fail  # type: ignore[method-assign]


@pytest.mark.parametrize("vnet", [False, True])
def test_established_segments_go_straight_to_their_connection(vnet):
    net, port, conn, ack = established(vnet)
    no_slow_handler(net)
    feed(
        net,
        port,
        [
            segment("PA", ack=ack, payload=b"hello"),
            segment("PA", seq=1006, ack=ack, payload=b" world"),
        ],
        vnet,
    )
    assert conn.read() == b"hello world"
    for key in ("frames_in", "ipv4_in", "tcp_packets_in", "tcp_segments_in"):
        assert net.stats[key] == 2
    net.pull_tcp_events()
    assert [type(ev.event) for ev in net.events] == [tcp.DataReceived]
    assert isinstance(net.events[0], TcpConnEvent)


@pytest.mark.parametrize("vnet", [False, True])
def test_fin_and_rst_go_straight_to_their_connection_too(vnet):
    net, port, conn, ack = established(vnet)
    no_slow_handler(net)
    feed(net, port, [segment("FA", ack=ack)], vnet)
    assert conn.state is tcp.TcpState.CLOSE_WAIT
    feed(net, port, [segment("R", seq=1002)], vnet)
    assert conn.state is tcp.TcpState.CLOSED


def test_plain_port_bad_tcp_checksum_dropped():
    net, port, conn, ack = established(False)
    raw = bytearray(segment("PA", ack=ack, payload=b"data"))
    raw[-1] ^= 0xFF
    feed(net, port, [bytes(raw)], False)
    assert conn.readable() == 0
    assert net.stats["tcp_bad_checksum"] == 1


def test_syn_on_an_open_connection_goes_to_the_transports_handler():
    net, port, conn, _ack = established(True)
    seen = []
    handler = net.transport.tcp_segment
    net.transport.tcp_segment = lambda *a: (seen.append(1), handler(*a))  # type: ignore[method-assign]
    feed(net, port, [segment("S", seq=5000)], True)
    assert seen == [1]
    assert conn.state is tcp.TcpState.ESTABLISHED  # answered with a challenge ACK


def test_segment_with_ip_options_reaches_its_connection():
    net, port, conn, ack = established(True)
    feed(net, port, [segment("PA", ack=ack, payload=b"x", options=b"\x01\x01\x01\x01")], True)
    assert conn.read() == b"x"
    assert net.stats["tcp_segments_in"] == 1


def test_fragmented_segment_reaches_its_connection_once_whole():
    net, port, conn, ack = established(False)
    whole = IP(src=GUEST_IP, dst=HOST_IP) / TCP(
        sport=40000, dport=80, flags="PA", seq=1001, ack=ack, window=65535
    )
    frags = [
        bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / f) for f in fragment(whole / (b"f" * 3000), 1480)
    ]
    feed(net, port, frags[:1], False)
    assert conn.readable() == 0 and len(net.reassembler) == 1
    feed(net, port, frags[1:], False)
    assert conn.read() == b"f" * 3000


def test_retransmitted_syn_for_a_pending_dial_is_ignored():
    net = Network(NetworkConfig())
    port = net.add_port(vnet=True)
    feed(net, port, [segment("S", seq=1000)], True)
    net.events.clear()
    feed(net, port, [segment("S", seq=1000)], True)  # retransmitted SYN while dialling
    assert not net.events and net.frames_to_send(0.0) == {}


@pytest.mark.parametrize("vnet", [False, True])
@pytest.mark.parametrize("cut", [28, 33, 39])
def test_truncated_segment_of_an_open_connection_is_counted_not_raised(vnet, cut):
    """A frame that ends inside the TCP header of an established connection's 4-tuple."""
    net, port, conn, ack = established(vnet)
    raw = bytearray(segment("PA", ack=ack, payload=b"data"))[: 14 + 20 + cut - 20]
    raw[16:18] = (len(raw) - 14).to_bytes(2, "big")  # IP total length says so too
    feed(net, port, [bytes(raw)], vnet)
    assert conn.readable() == 0 and conn.state is tcp.TcpState.ESTABLISHED
    assert (
        sum(v for k, v in net.stats.items() if "malformed" in k or "bad" in k or "truncated" in k)
        == 1
    )


@pytest.mark.parametrize("vnet", [False, True])
def test_mutated_frames_of_open_flows_never_raise(vnet):
    """Seeded mutations (bytes flipped, cut, extended) of segments and datagrams of an open
    connection and flow: each ends counted or delivered, none raises, the switch goes on."""
    import random

    rng = random.Random(7)
    net, port, _conn, ack = established(vnet)
    net.udp_flows[udp_flow_key(b(GUEST_IP), 40000, b(HOST_IP), 5001)] = FLOW
    seeds = [segment("PA", ack=ack, payload=b"abc"), datagram(b"xyz")]
    for i in range(3000):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.6:
                pos = rng.randrange(len(raw))
                raw[pos] = rng.randrange(256)
            elif op < 0.8 and len(raw) > 15:
                del raw[rng.randrange(14, len(raw)) :]
            else:
                raw += rng.randbytes(rng.randint(1, 40))
        feed(net, port, [bytes(raw)], vnet)
        net.take_udp_flow_datagrams()
        net.frames_to_send(float(i))
        net.events.clear()
    assert net.stats["frames_in"] == 3000


# --------------------------------------------------------------------------- neighbour rules


@pytest.mark.parametrize("vnet", [False, True])
def test_every_segment_of_an_open_connection_keeps_its_neighbour_entry_true(vnet):
    """An ARP claim from the same port (a bridge behind it) may move the entry, but the
    guest's next segment on its open connection, delivered straight to the connection,
    moves it back: the source rule applies to every frame."""
    from scapy.layers.l2 import ARP

    net, port, conn, ack = established(vnet)
    other = "5a:94:ef:e4:0c:99"
    claim = Ether(src=other, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=2, hwsrc=other, psrc=GUEST_IP, pdst=GUEST_IP
    )
    feed(net, port, [bytes(claim)], vnet)
    assert net.neighbours.lookup(b(GUEST_IP)) == bytes.fromhex(other.replace(":", ""))
    feed(net, port, [segment("PA", ack=ack, payload=b"hi")], vnet)
    assert conn.read() == b"hi"
    assert net.neighbours.lookup(b(GUEST_IP)) == bytes.fromhex(GUEST_MAC.replace(":", ""))


@pytest.mark.parametrize("vnet", [False, True])
def test_a_claim_from_another_port_never_steers_an_open_connection(vnet):
    from scapy.layers.l2 import ARP

    net, port, conn, _ack = established(vnet)
    attacker_port = net.add_port()
    thief = "5a:94:ef:e4:0c:66"
    claim = Ether(src=thief, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=2, hwsrc=thief, psrc=GUEST_IP, pdst=GUEST_IP
    )
    net.receive_frames(attacker_port, [bytes(claim)], 0.0)
    assert net.frames_to_send(0.0) == {}  # not flooded to the victim either
    assert net.stats["arp_address_theft_dropped"] == 1
    conn.send(b"for the guest only")
    net.tcp_touch(conn)
    out = net.frames_to_send(0.0)
    assert set(out) == {port}
