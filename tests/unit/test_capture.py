"""hostd/capture.py: live-capture buffering (pcap records are tested with tshark in e2e)."""

from __future__ import annotations

import io
import struct

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.utils import rdpcap

from netferry.hostd.capture import PcapWriter, pcap_header, pcap_record


def test_capture_buffer_bounds_bytes_and_messages():
    from netferry.hostd.capture import CaptureBuffer

    buf = CaptureBuffer(max_bytes=10_000, max_message=4_000)
    for _ in range(12):
        buf.put(b"x" * 1_000)
    assert buf.dropped == 2 and buf.bytes == 10_000  # what does not fit is counted, not kept
    data, n = buf.take()
    assert (len(data), n) == (4_000, 4)  # messages stay under max_message
    data, n = buf.take(max_records=3)
    assert (len(data), n) == (3_000, 3)
    buf.put(b"y" * 9_000)  # too big for what is left (3,000 held + 9,000 > 10,000)
    assert buf.dropped == 3
    big = CaptureBuffer(max_bytes=100_000, max_message=4_000)
    big.put(b"z" * 50_000)  # one record larger than a message still goes out alone
    assert big.take() == (b"z" * 50_000, 1) and big.bytes == 0


# ---- moved from test_network.py ------------------------------------------------------


GW_MAC = "5a:94:ef:e4:0c:dd"
MAC1 = "5a:94:ef:e4:0c:ee"
BCAST = "ff:ff:ff:ff:ff:ff"
GW_IP = "192.168.127.1"
GUEST_IP = "192.168.127.2"


GOOD_PING = IP(src=GUEST_IP, dst=GW_IP) / ICMP(id=1, seq=1) / b"payload!"


def test_pcap_writer_read_back_with_scapy(tmp_path):
    path = tmp_path / "cap.pcap"
    frames = [
        bytes(Ether(src=MAC1, dst=GW_MAC) / GOOD_PING),
        bytes(Ether(src=MAC1, dst=BCAST) / ARP(hwsrc=MAC1, psrc=GUEST_IP, pdst=GW_IP)),
        bytes(Ether(src=GW_MAC, dst=MAC1) / IP(src=GW_IP, dst=GUEST_IP) / UDP() / (b"u" * 2000)),
    ]
    w = PcapWriter.open(str(path))
    w.write(frames[:2], ts=1700000000.25)
    w.write(frames[2:], ts=1700000001.5)
    w.flush()
    w.close()
    assert w.frames == 3
    pkts = rdpcap(str(path))
    assert [bytes(p) for p in pkts] == frames
    assert [float(p.time) for p in pkts] == pytest.approx(
        [1700000000.25, 1700000000.25, 1700000001.5], abs=1e-6
    )
    assert pkts[0][ICMP].id == 1
    assert path.read_bytes()[20:24] == (1).to_bytes(4, "little")  # LINKTYPE_ETHERNET


def test_pcap_snaplen_truncates_but_keeps_original_length(tmp_path):
    buf = io.BytesIO()
    w = PcapWriter(buf, snaplen=64)
    frame = bytes(Ether(src=MAC1, dst=GW_MAC) / IP() / (b"x" * 200))
    w.write([frame], ts=5.000001)
    path = tmp_path / "snap.pcap"
    path.write_bytes(buf.getvalue())
    (p,) = rdpcap(str(path))
    assert bytes(p) == frame[:64]
    assert p.wirelen == len(frame)
    assert float(p.time) == pytest.approx(5.000001, abs=1e-6)


def test_pcap_header_and_record_layout():
    hdr = pcap_header()
    assert len(hdr) == 24 and hdr[:4] == bytes.fromhex("d4c3b2a1")  # little-endian magic
    rec = pcap_record(b"abc", 1.5)
    assert struct.unpack("<IIII", rec[:16]) == (1, 500000, 3, 3) and rec[16:] == b"abc"


# ---- the live-capture filter, both families ------------------------------------------

GW6 = "fd00:192:168:127::1"
GUEST6 = "fd00:192:168:127::2"


def _frames() -> dict[str, bytes]:
    from scapy.layers.inet import TCP
    from scapy.layers.inet6 import (
        ICMPv6EchoRequest,
        ICMPv6ND_NS,
        IPv6,
        IPv6ExtHdrDestOpt,
        IPv6ExtHdrFragment,
    )

    eth = Ether(src=MAC1, dst=GW_MAC)
    return {
        "tcp4": bytes(eth / IP(src=GUEST_IP, dst=GW_IP) / TCP(sport=40000, dport=80)),
        "udp4": bytes(eth / IP(src=GUEST_IP, dst=GW_IP) / UDP(sport=5353, dport=53)),
        "arp": bytes(eth / ARP(psrc=GUEST_IP, pdst=GW_IP)),
        "tcp6": bytes(eth / IPv6(src=GUEST6, dst=GW6) / TCP(sport=40000, dport=80)),
        "udp6_ext": bytes(
            eth / IPv6(src=GUEST6, dst=GW6) / IPv6ExtHdrDestOpt() / UDP(sport=5353, dport=53)
        ),
        "udp6_frag0": bytes(
            eth
            / IPv6(src=GUEST6, dst="::1")
            / IPv6ExtHdrFragment(offset=0, m=1, nh=17)
            / UDP(sport=5353, dport=53)
        ),
        "udp6_frag1": bytes(
            eth / IPv6(src=GUEST6, dst="::1") / IPv6ExtHdrFragment(offset=100, nh=17) / (b"x" * 16)
        ),
        "echo6": bytes(eth / IPv6(src=GUEST6, dst=GW6) / ICMPv6EchoRequest()),
        "ns6": bytes(eth / IPv6(src="fe80::1", dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt=GW6)),
        "short6": bytes(eth)[:12] + b"\x86\xdd" + bytes(10),
    }


@pytest.mark.parametrize(
    ("proto", "host", "port", "want"),
    [
        (
            None,
            "",
            0,
            {
                "tcp4",
                "udp4",
                "arp",
                "tcp6",
                "udp6_ext",
                "udp6_frag0",
                "udp6_frag1",
                "echo6",
                "ns6",
                "short6",
            },
        ),
        ("tcp", "", 0, {"tcp4", "tcp6"}),
        ("udp", "", 0, {"udp4", "udp6_ext", "udp6_frag0", "udp6_frag1"}),
        ("icmp", "", 0, {"echo6", "ns6"}),
        ("arp", "", 0, {"arp"}),
        (None, GW6, 0, {"tcp6", "udp6_ext", "echo6"}),
        (None, "::1", 0, {"udp6_frag0", "udp6_frag1"}),
        (None, GUEST_IP, 0, {"tcp4", "udp4", "arp"}),
        (None, "", 53, {"udp4", "udp6_ext", "udp6_frag0"}),  # a later fragment has no ports
        ("tcp", GW6, 80, {"tcp6"}),
        ("udp", GUEST_IP, 80, set()),
    ],
)
def test_capture_filter_both_families(proto, host, port, want):
    from netferry.hostd.capture import CaptureFilter

    flt = CaptureFilter(proto, host, port)
    assert {name for name, f in _frames().items() if flt.match(f)} == want


def test_capture_filter_bounds_a_looping_extension_chain():
    from netferry.hostd.capture import CaptureFilter

    # destination options pointing at destination options, forever (nothing but zeros after)
    frame = bytes(14) + bytes([0x60]) + bytes(5) + bytes([60, 64]) + bytes(32) + bytes([60, 0]) * 40
    frame = frame[:12] + b"\x86\xdd" + frame[14:]
    assert not CaptureFilter("udp", "", 0).match(frame)
    assert CaptureFilter(None, "", 0).match(frame)
    with pytest.raises(ValueError):
        CaptureFilter(None, "fd00::zz", 0)


def test_pcap_carries_ipv6_read_back_with_scapy(tmp_path):
    from scapy.layers.inet6 import IPv6

    frames = [f for name, f in _frames().items() if name.endswith("6") or "6_" in name]
    path = tmp_path / "v6.pcap"
    w = PcapWriter.open(str(path))
    w.write(frames, ts=1700000000.0)
    w.close()
    pkts = rdpcap(str(path))
    assert [bytes(p) for p in pkts] == frames
    assert pkts[0][IPv6].src == GUEST6 and pkts[0][IPv6].dst == GW6
