"""IPv4 end to end: the Linux kernel in a namespace, through vm-switch's tap, to hostd."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def test_lease_route_dns_and_mtu(hostd, guest):
    h = hostd("--mtu", "4000")
    g = guest(h)
    assert g.addr() == "192.168.127.2/24"
    route = g.ns.run("ip", "-4", "route", "show", "default").stdout
    assert "default via 192.168.127.1 dev eth0" in route
    link = g.ns.run("ip", "link", "show", "eth0").stdout
    assert "mtu 4000" in link
    assert "nameserver 192.168.127.1" in g.resolv_conf.read_text()


def test_pyroute2_dhcp_client_gets_the_same_lease(hostd, guest):
    h = hostd()
    g = guest(h, dhcp_client="pyroute2")
    assert g.addr() == "192.168.127.2/24"
    assert "default via 192.168.127.1" in g.ns.run("ip", "route").stdout
    assert "nameserver 192.168.127.1" in g.resolv_conf.read_text()


def test_ping_gateway_and_host_loopback(hostd, guest):
    g = guest(hostd())
    for target in ("192.168.127.1", "192.168.127.254"):
        r = g.ns.run("ping", "-c", "3", "-i", "0.2", "-W", "2", target, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "3 received" in r.stdout


def test_host_loopback_refused(hostd, guest):
    g = guest(hostd("--no-host-loopback"))
    r = g.ns.run("ping", "-c", "2", "-i", "0.2", "-W", "1", "192.168.127.254", check=False)
    assert r.returncode != 0
    assert "0 received" in r.stdout
    # The refusal is explicit (ICMP administratively prohibited), not a silent timeout.
    assert "Packet filtered" in r.stdout or "Communication prohibited" in r.stdout, r.stdout
    assert g.ns.run("ping", "-c", "1", "-W", "2", "192.168.127.1", check=False).returncode == 0


def dig(g, *args: str) -> str:
    r = g.ns.run("dig", "+time=6", "+tries=1", "@192.168.127.1", *args, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def answers(out: str) -> list[str]:
    """The ANSWER section of dig output as 'name type value' lines."""
    lines, on = [], False
    for line in out.splitlines():
        if line.startswith(";; ANSWER SECTION"):
            on = True
            continue
        if on:
            if not line.strip():
                break
            parts = line.split()
            lines.append(" ".join([parts[0], parts[3], *parts[4:]]))
    return lines


def test_dns_local_zones(hostd, guest):
    g = guest(hostd())
    assert answers(dig(g, "host.containers.internal")) == [
        "host.containers.internal. A 192.168.127.254"
    ]
    assert answers(dig(g, "gateway.docker.internal")) == [
        "gateway.docker.internal. A 192.168.127.1"
    ]
    assert answers(dig(g, "HOST.Docker.Internal")) == ["HOST.Docker.Internal. A 192.168.127.254"]
    out = dig(g, "nothing.containers.internal")
    assert "status: NXDOMAIN" in out


def test_dns_forwarded_unchanged(hostd, guest, dns_upstream):
    g = guest(hostd())
    assert answers(dig(g, "www.example.test", "A")) == ["www.example.test. A 192.0.2.10"]
    assert answers(dig(g, "www.example.test", "AAAA")) == ["www.example.test. AAAA 2001:db8::10"]
    assert answers(dig(g, "example.test", "MX")) == ["example.test. MX 10 mail.example.test."]
    assert answers(dig(g, "example.test", "TXT")) == ['example.test. TXT "netferry test record"']
    assert answers(dig(g, "_http._tcp.example.test", "SRV")) == [
        "_http._tcp.example.test. SRV 0 5 8080 www.example.test."
    ]
    assert "status: NXDOMAIN" in dig(g, "missing.example.test")
    # The upstream really saw them: hostd forwarded, it did not invent answers.
    assert ("www.example.test.", "AAAA", "udp") in dns_upstream.queries
    assert ("missing.example.test.", "A", "udp") in dns_upstream.queries


def test_dns_silent_upstream_servfail_within_5s(hostd, guest, silent_udp_port):
    import time

    g = guest(hostd("--dns-upstream", f"127.0.0.1:{silent_udp_port}"))
    t0 = time.monotonic()
    out = dig(g, "www.example.test")
    elapsed = time.monotonic() - t0
    assert "status: SERVFAIL" in out
    assert elapsed < 5.5, elapsed  # dig's own start-up is included; the bound is hostd's 4 s


def test_static_dns_record_flag(hostd, guest):
    g = guest(hostd("--dns-record", "db.containers.internal=A:192.168.127.2"))
    assert answers(dig(g, "db.containers.internal")) == ["db.containers.internal. A 192.168.127.2"]


UDP_ECHO_CLIENT = r"""
import hashlib, random, socket, sys, time
port, count, window = int(sys.argv[1]), int(sys.argv[2]), 8
rng = random.Random(1234)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.connect(("192.168.127.254", port))
s.settimeout(5)
sent = {}
ok = bad = 0
deadline = time.monotonic() + 90
def payload(i):
    n = rng.randint(1, 8000)
    body = i.to_bytes(4, "big") + rng.randbytes(max(0, n - 4))
    return body[:n] if n >= 4 else i.to_bytes(4, "big")[:n]
i = 0
sizes = []
while (i < count or sent) and time.monotonic() < deadline:
    while i < count and len(sent) < window:
        p = payload(i)
        if len(p) < 4:  # too short to carry the index: send the index alone
            p = i.to_bytes(4, "big")
        sent[i] = hashlib.sha256(p).digest()
        sizes.append(len(p))
        s.send(p)
        i += 1
    data = s.recv(65535)
    k = int.from_bytes(data[:4], "big")
    if sent.pop(k, None) == hashlib.sha256(data).digest():
        ok += 1
    else:
        bad += 1
print(ok, bad, len(sent), max(sizes), sum(1 for n in sizes if n > 1472))
"""


def test_udp_echo_through_host_loopback_10000_datagrams(hostd, guest, udp_echo_server):
    h = hostd("--udp-idle-timeout", "1")
    g = guest(h)
    r = g.ns.python(UDP_ECHO_CLIENT, str(udp_echo_server), "10000", timeout=150)
    ok, bad, missing, biggest, fragmented = map(int, r.stdout.split())
    assert (ok, bad, missing) == (10000, 0, 0)
    assert biggest > 7900 and fragmented > 5000  # the sizes really did need fragmentation
    stats = h.stats()
    assert stats["reassembly"]["reassembled"] > 5000
    # The flow goes idle; the sweeper reaps it and says so.
    from tests.conftest import wait_for

    wait_for(
        lambda: any(e.get("event") == "nat.udp.flows_reaped" for e in h.log_events()),
        10,
        "the idle UDP flow to be reaped",
    )
    assert h.stats()["udp_nat"]["active"] == 0


def free_udp_port() -> int:
    """A loopback UDP port that nothing listens on (bound once, then released)."""
    import socket

    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def test_udp_to_closed_port_is_connection_refused(hostd, guest):
    g = guest(hostd())
    code = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("192.168.127.254", int(sys.argv[1])))
s.settimeout(5)
s.send(b"hello")
try:
    s.recv(100)
    print("answered")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
"""
    assert g.ns.python(code, str(free_udp_port())).stdout.strip() == "refused"


def test_two_guests_distinct_leases_ping_each_other(hostd, guest):
    h = hostd()
    a = guest(h)
    b = guest(h, mac="5a:94:ef:e4:0c:01")
    assert a.ip == "192.168.127.2"
    assert b.ip not in ("192.168.127.2", "192.168.127.1", "192.168.127.254")
    assert a.ns.run("ping", "-c", "2", "-i", "0.2", "-W", "2", b.ip, check=False).returncode == 0
    assert b.ns.run("ping", "-c", "2", "-i", "0.2", "-W", "2", a.ip, check=False).returncode == 0
    # Guest-to-guest frames are switched, not routed through the gateway.
    assert h.stats()["network"]["switched"] >= 4


MALFORMED_SENDER = r"""
from scapy.all import ARP, DNS, Ether, ICMP, IP, IPv6, Raw, UDP, sendp, conf
conf.verb = 0
gw = "5a:94:ef:e4:0c:dd"
me = "5a:94:ef:e4:0c:ee"
def eth(t=0x0800):
    return Ether(dst=gw, src=me, type=t)
ip = IP(src="192.168.127.2", dst="192.168.127.254")
frames = {
    "ipv4_truncated": bytes(eth()) + bytes(ip)[:12],
    "ipv4_bad_checksum": bytes(eth() / IP(src="192.168.127.2", dst="192.168.127.254", chksum=0x1234) / UDP(dport=9) / b"x"),
    "ipv4_bad_total_length": bytes(eth() / IP(src="192.168.127.2", dst="192.168.127.254", len=400) / UDP(dport=9) / b"x"),
    "ipv4_bad_header_length": bytes(eth() / IP(src="192.168.127.2", dst="192.168.127.254", ihl=15) / (b"x" * 4)),
    "ipv4_bad_version": bytes(eth()) + b"\x65" + bytes(ip)[1:],
    "udp_bad_checksum": bytes(eth() / ip / UDP(sport=1000, dport=9, chksum=0x4321) / b"hello"),
    "udp_bad_length": bytes(eth() / ip / UDP(sport=1000, dport=9, len=300) / b"hello"),
    "udp_truncated": bytes(eth() / IP(src="192.168.127.2", dst="192.168.127.254", proto=17) / b"abc"),
    "icmp_bad_checksum": bytes(eth() / ip / ICMP(chksum=0x1111) / b"ping"),
    "unknown_ethertype_dropped": bytes(eth(0x1234) / (b"garbage" * 10)),
    "malformed_arp": bytes(eth(0x0806) / b"\x00\x01\x08\x00\x06"),
    # (IPv6 is served now: a payload length past the frame's end is its malformed case)
    "ipv6_bad_payload_length": bytes(
        Ether(dst=gw, src=me) / IPv6(dst="fe80::1", plen=900) / UDP(dport=9)
    ),
}
# Overlapping fragments: the second overlaps the first; the datagram must be dropped whole.
f1 = IP(src="192.168.127.2", dst="192.168.127.254", id=777, flags="MF", frag=0, proto=17) / (b"A" * 64)
f2 = IP(src="192.168.127.2", dst="192.168.127.254", id=777, frag=4, proto=17) / (b"B" * 64)
frames["overlap_dropped"] = [bytes(eth() / f1), bytes(eth() / f2)]
# Garbage to the gateway's DHCP and DNS ports.
frames["dhcp_malformed"] = bytes(eth() / IP(src="192.168.127.2", dst="192.168.127.1") / UDP(sport=68, dport=67) / b"\x01garbage")
frames["dns_formerr"] = bytes(eth() / IP(src="192.168.127.2", dst="192.168.127.1") / UDP(sport=5353, dport=53) / (b"\x12\x34" + b"\xff" * 20))
for name, fr in frames.items():
    for f in (fr if isinstance(fr, list) else [fr]):
        for _ in range(3):
            sendp(f, iface="eth0")
print("sent", len(frames))
"""


def test_malformed_frames_counted_and_dropped(hostd, guest):
    # Plain frames: on a virtio-net link hostd trusts the guest kernel's checksums.
    h = hostd()
    g = guest(h, connect=h.link_uri + "?offload=none")
    r = g.ns.python(MALFORMED_SENDER)
    assert r.stdout.startswith("sent"), r.stderr
    # hostd is alive and the guest still works.
    assert g.ns.run("ping", "-c", "1", "-W", "2", "192.168.127.1", check=False).returncode == 0
    assert "192.168.127.254" in dig(g, "host.containers.internal")
    stats = h.stats()
    net = stats["network"]
    for counter in (
        "ipv4_truncated",
        "ipv4_bad_checksum",
        "ipv4_bad_total_length",
        "ipv4_bad_header_length",
        "ipv4_bad_version",
        "udp_bad_checksum",
        "udp_bad_length",
        "udp_truncated",
        "icmp_bad_checksum",
        "unknown_ethertype_dropped",
        "malformed_arp",
        "ipv6_bad_payload_length",
    ):
        assert net.get(counter, 0) >= 3, (counter, net)
    assert stats["reassembly"]["overlap_dropped"] >= 1
    assert stats["dhcp"]["malformed"] >= 3
    assert stats["dns"]["formerr"] + stats["dns"]["dropped"] >= 3
    assert h.proc.poll() is None


def test_pcap_reads_back_in_tshark(hostd, guest):
    import shutil
    import subprocess

    h = hostd()
    g = guest(h)
    g.ns.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "192.168.127.1")
    h.stats()  # flushes the pcap
    tshark = shutil.which("tshark")
    assert tshark, "tshark is not installed (scripts/bootstrap installs it)"
    out = subprocess.run(
        [
            tshark,
            "-r",
            h.pcap_path,
            "-Y",
            "icmp",
            "-T",
            "fields",
            "-e",
            "icmp.type",
            "-e",
            "ip.src",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    requests = [line for line in out if line.startswith("8\t192.168.127.2")]
    replies = [line for line in out if line.startswith("0\t192.168.127.1")]
    assert len(requests) == 3 and len(replies) == 3, out
    dhcp = subprocess.run(
        [tshark, "-r", h.pcap_path, "-Y", "dhcp"], capture_output=True, text=True, check=True
    ).stdout
    assert "DHCP Discover" in dhcp and "DHCP ACK" in dhcp


def test_vm_switch_redials_and_keeps_the_tap(hostd, guest):
    from tests.conftest import wait_for

    h = hostd()
    g = guest(h, dhcp_client="pyroute2")
    pid = g.proc.pid
    ifindex = g.ns.run("cat", "/sys/class/net/eth0/ifindex").stdout
    h.restart()  # the stream drops; a new hostd listens on the same path

    def pings() -> bool:
        r = g.ns.run("ping", "-c", "1", "-W", "1", "192.168.127.1", check=False)
        return r.returncode == 0

    wait_for(pings, 30, "the guest to reach the restarted hostd", step=0.5)
    assert g.proc.poll() is None and g.proc.pid == pid  # the same vm-switch...
    assert g.ns.run("cat", "/sys/class/net/eth0/ifindex").stdout == ifindex  # ...and tap
    assert g.addr() == "192.168.127.2/24"
    assert "link.down" in g.log_text() and g.log_text().count('"link.up"') >= 2
