"""Offload links (virtio-net header), frame by frame: partial checksums and TSO/GSO segments
between our own vm-switch and hostd, and the TCP send buffer that feeds them."""

from __future__ import annotations

import os
import struct

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from netferry.hostd.config import NetworkConfig
from netferry.hostd.stack import tcp
from netferry.hostd.stack.checksum import checksum, pseudo_header_sum_v4
from netferry.hostd.stack.network import (
    VNET_F_NEEDS_CSUM,
    VNET_GSO_TCPV4,
    VNET_HDR,
    VNET_LEN,
    VNET_NONE,
    Network,
    TcpDial,
)

GW_MAC = "5a:94:ef:e4:0c:dd"
GUEST_MAC = "5a:94:ef:e4:0c:ee"


def vnet_frame(pkt, flags=0, gso_type=0, gso_size=0) -> bytes:
    return VNET_HDR.pack(flags, gso_type, 0, gso_size, 34, 16) + bytes(pkt)


def partial_tcp(pkt) -> bytes:
    """The guest kernel's CHECKSUM_PARTIAL form: the field holds the pseudo header sum."""
    raw = bytearray(bytes(pkt))
    ip = raw[14:34]
    seg_len = len(raw) - 34
    s = pseudo_header_sum_v4(bytes(ip[12:16]), bytes(ip[16:20]), 6, seg_len)
    raw[34 + 16 : 34 + 18] = s.to_bytes(2, "big")
    return bytes(raw)


def established(net: Network, port: int):
    """Open a guest connection to .254:80 through the offload port and complete it."""
    syn = (
        Ether(src=GUEST_MAC, dst=GW_MAC)
        / IP(src="192.168.127.2", dst="192.168.127.254")
        / TCP(sport=40000, dport=80, flags="S", seq=1000, options=[("MSS", 1460), ("WScale", 7)])
    )
    net.receive_frames(port, [vnet_frame(partial_tcp(syn), VNET_F_NEEDS_CSUM)], 0.0)
    dial = next(ev for ev in net.events if isinstance(ev, TcpDial))
    net.events.clear()
    net.tcp_accept(dial.conn, 0.0)
    out = net.frames_to_send(0.0)[port]
    synack = Ether(out[0][VNET_LEN:])
    ack = (
        Ether(src=GUEST_MAC, dst=GW_MAC)
        / IP(src="192.168.127.2", dst="192.168.127.254")
        / TCP(sport=40000, dport=80, flags="A", seq=1001, ack=synack[TCP].seq + 1, window=65535)
    )
    net.receive_frames(port, [vnet_frame(partial_tcp(ack), VNET_F_NEEDS_CSUM)], 0.0)
    net.frames_to_send(0.0)
    net.events.clear()
    return dial.conn, synack


def test_partial_checksum_from_guest_is_trusted_and_plain_port_is_not():
    net = Network(NetworkConfig())
    vport, plain = net.add_port(vnet=True), net.add_port()
    conn, synack = established(net, vport)
    assert conn.state is tcp.TcpState.ESTABLISHED
    assert synack[TCP].flags == "SA"
    # The same partial checksum on a plain port is a bad checksum.
    bad = (
        Ether(src="5a:94:ef:e4:0c:01", dst=GW_MAC)
        / IP(src="192.168.127.3", dst="192.168.127.254")
        / TCP(sport=40001, dport=80, flags="S", seq=5)
    )
    net.receive_frames(plain, [partial_tcp(bad)], 0.0)
    assert net.stats["tcp_bad_checksum"] == 1


def test_tso_segment_from_guest_is_received_whole():
    net = Network(NetworkConfig())
    port = net.add_port(vnet=True)
    conn, synack = established(net, port)
    data = os.urandom(60000)
    seg = (
        Ether(src=GUEST_MAC, dst=GW_MAC)
        / IP(src="192.168.127.2", dst="192.168.127.254")
        / TCP(sport=40000, dport=80, flags="PA", seq=1001, ack=synack[TCP].seq + 1, window=65535)
        / data
    )
    net.receive_frames(
        port, [vnet_frame(partial_tcp(seg), VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 1460)], 0.0
    )
    assert conn.read() == data


def test_gso_segments_to_guest_carry_headers_and_valid_partial_sums():
    net = Network(NetworkConfig())
    port = net.add_port(vnet=True)
    conn, _ = established(net, port)
    payload = os.urandom(300_000)
    assert conn.send(payload) == len(payload)
    net.tcp_touch(conn)
    frames = net.frames_to_send(0.0)[port]
    got = b""
    for frame in frames:
        flags, gso_type, hdr_len, gso_size, start, offset = VNET_HDR.unpack_from(frame)
        eth = frame[VNET_LEN:]
        seg_len = len(eth) - 34
        body = eth[34:]
        assert flags == VNET_F_NEEDS_CSUM and (start, offset) == (34, 16)
        data = Ether(eth)[TCP].payload.load if len(body) > 20 else b""
        if len(data) > 1460:
            assert (gso_type, gso_size, hdr_len) == (VNET_GSO_TCPV4, 1460, 54)
        # Completing the partial sum as the guest kernel would gives a valid checksum.
        field = int.from_bytes(body[16:18], "big")
        completed = checksum(body[:16] + b"\0\0" + body[18:], field)
        s = pseudo_header_sum_v4(eth[26:30], eth[30:34], 6, seg_len)
        assert field == s
        assert completed == int.from_bytes(
            struct.pack("!H", checksum(body[:16] + b"\0\0" + body[18:], s)), "big"
        )
        got += data
    # The initial congestion window (10 segments) goes as ONE GSO super-segment.
    assert got == payload[:14600]
    assert len([f for f in frames if len(f) > 1514]) == 1


def test_plain_port_gets_frames_without_header():
    net = Network(NetworkConfig())
    port = net.add_port()
    vport = net.add_port(vnet=True)
    # A broadcast from the gateway (ARP request) reaches both, each in its own format.
    net.send_ip(b"\xc0\xa8\x7f\x01", b"\xc0\xa8\x7f\x05", 17, b"\0" * 8)
    out = net.frames_to_send(0.0)
    assert out[port][0][:6] == b"\xff" * 6
    assert out[vport][0][:VNET_LEN] == VNET_NONE and out[vport][0][VNET_LEN:] == out[port][0]


def test_send_buffer_views_acks_and_joins():
    buf = tcp._SendBuffer()
    chunks = [os.urandom(n) for n in (10, 100, 1000, 5)]
    whole = b"".join(chunks)
    for c in chunks:
        buf.append(c)
    assert len(buf) == len(whole)
    for a, b in [(0, 10), (5, 8), (5, 115), (0, len(whole)), (109, 1111), (1110, 1115), (3, 3)]:
        assert bytes(buf[a:b]) == whole[a:b], (a, b)
    assert isinstance(buf[10:110], bytes) and buf[10:110] is chunks[1]  # whole chunk: no copy
    buf.drop_front(15)
    whole = whole[15:]
    assert len(buf) == len(whole)
    assert bytes(buf[0:200]) == whole[:200]
    buf.drop_front(len(whole) - 3)
    assert bytes(buf[0:3]) == whole[-3:]
    buf.append(bytearray(b"xyz"))  # a mutable input is copied
    assert bytes(buf[0:6]) == whole[-3:] + b"xyz"
    buf.clear()
    assert len(buf) == 0 and buf[0:0] == b""
