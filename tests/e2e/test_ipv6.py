"""IPv6 end to end: the Linux kernel in a namespace, through vm-switch's tap, to hostd.

The guest's kernel takes hostd's router advertisement (SLAAC address in the prefix, default
route via the gateway's link-local address, the MTU, RDNSS), dhclient -6 gets the static
DHCPv6 lease ::2, and the guest pings the gateway and the host-loopback address, connects
to a [::1] server on the host through the v6 host-loopback address, and survives
scapy-built malformed and spoofing frames (each counted by hostd)."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import subprocess
import threading
import time

import pytest

from tests.conftest import wait_for
from tests.e2e.test_dhcpv6_client import dhclient_log, run_dhclient

pytestmark = pytest.mark.e2e

PREFIX = "fd00:192:168:127::"
GATEWAY6 = f"{PREFIX}1"
HOST6 = f"{PREFIX}254"
GUEST_MAC = "5a:94:ef:e4:0c:ee"
GATEWAY_MAC = "5a:94:ef:e4:0c:dd"
GATEWAY_LL = "fe80::5894:efff:fee4:cdd"


def in_prefix(addr: str) -> bool:
    return ipaddress.IPv6Interface(addr).ip in ipaddress.IPv6Network(f"{PREFIX}/64")


def global_addrs(g) -> list[str]:
    out = g.ns.run("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global").stdout
    return [line.split()[3] for line in out.splitlines()]


def wait_slaac(g) -> str:
    """The guest's SLAAC address in the prefix (not ::2), once the kernel has it (DAD done)."""

    def slaac() -> str | None:
        out = g.ns.run("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global").stdout
        for line in out.splitlines():
            addr = line.split()[3]
            if in_prefix(addr) and addr != f"{PREFIX}2/64" and "tentative" not in line:
                return addr
        return None

    return wait_for(slaac, 30, "a SLAAC address from hostd's router advertisement", step=0.2)


def no_tentative(g) -> None:
    wait_for(
        lambda: "tentative" not in g.ns.run("ip", "-6", "addr", "show", "dev", "eth0").stdout,
        30,
        "DAD of the guest's addresses",
        step=0.2,
    )


@pytest.fixture
def guest6(hostd, guest, short_tmp):
    """hostd, a vm-switch guest with its IPv4 lease, its SLAAC address and the ::2 lease."""
    started = []

    def start(*args: str, offload: bool = False, dhcp6: bool = True, mtu: int | None = None):
        if mtu:
            args = (*args, "--mtu", str(mtu))
        h = hostd(*args, offload=offload)
        g = guest(h, mtu=mtu)
        # The kernel's link-local address needs DAD before it sends a router solicitation.
        wait_slaac(g)
        no_tentative(g)  # dhclient binds to the link-local address: DAD must be done
        if dhcp6:
            proc, _got, log = run_dhclient(g.ns, short_tmp)
            started.append((proc, log))
            deadline = time.monotonic() + 60
            while f"{PREFIX}2/64" not in global_addrs(g):
                if time.monotonic() > deadline:
                    log_text = dhclient_log(short_tmp)
                    pytest.fail(f"dhclient -6 did not configure {PREFIX}2:\n{log_text}")
                time.sleep(0.2)
            no_tentative(g)
        return h, g

    try:
        yield start
    finally:
        for proc, log in started:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            log.close()


# ---- acceptance 1: SLAAC, DHCPv6, default route, RDNSS ----------------------------------


def test_slaac_dhcpv6_default_route_and_rdnss(guest6, short_tmp):
    h, g = guest6()
    addrs = global_addrs(g)
    assert f"{PREFIX}2/64" in addrs
    assert any(in_prefix(a) and a != f"{PREFIX}2/64" for a in addrs), addrs
    route = g.ns.run("ip", "-6", "route", "show", "default").stdout
    assert f"default via {GATEWAY_LL} dev eth0" in route, route
    assert "mtu 1500" in route or "mtu" not in route  # the RA's MTU option: the link's
    # dhclient's script saw the DNS server of the reply; the kernel took the RA's RDNSS
    # (seen in the RA hostd sent: the pcap holds it) and its prefix.
    got = (short_tmp / "got").read_text()  # what run_dhclient's script recorded
    assert f"BOUND6 {PREFIX}2 {GATEWAY6}" in got, got
    from scapy.layers.inet6 import ICMPv6ND_RA, ICMPv6NDOptRDNSS
    from scapy.utils import rdpcap

    ras = [p for p in rdpcap(h.pcap_path) if ICMPv6ND_RA in p]
    assert ras, "hostd sent no router advertisement"
    assert ras[0][ICMPv6NDOptRDNSS].dns == [GATEWAY6]
    assert ras[0][ICMPv6ND_RA].M == 1 and ras[0][ICMPv6ND_RA].O == 1
    # The lease is visible to hostd as a lease event (logged like DHCPv4's).
    assert any(
        e.get("event") == "dhcp.lease" and e.get("ip") == f"{PREFIX}2" for e in h.log_events()
    ), h.log_text()[-2000:]
    stats = h.stats()
    assert stats["network"]["ndp_ra_out"] >= 1
    assert stats["dhcp6"]["replies"] + stats["dhcp6"]["rapid_commits"] >= 1


# ---- acceptance 2: ping -6 the gateway and the host-loopback address ---------------------


def test_ping6_gateway_and_host_loopback(guest6):
    _h, g = guest6(dhcp6=False)
    for target in (GATEWAY6, HOST6, f"{GATEWAY_LL}%eth0"):
        r = g.ns.run("ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", target, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "3 received" in r.stdout
    # A large echo: fragmented by both kernels' stacks and hostd's, reassembled on both sides.
    r = g.ns.run("ping", "-6", "-c", "2", "-s", "4000", "-W", "2", GATEWAY6, check=False)
    assert r.returncode == 0 and "2 received" in r.stdout, r.stdout + r.stderr


CONNECT = r"""
import errno, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.settimeout(20)
try:
    s.connect((sys.argv[1], 80))
    print("connected")
except TimeoutError:
    print("timeout")
except OSError as e:
    print(errno.errorcode[e.errno])
"""


def test_host_loopback6_refused(guest6):
    _h, g = guest6("--no-host-loopback", dhcp6=False)
    # A TCP connect fails with an error (ICMPv6 administratively prohibited), not a timeout.
    r = g.ns.python(CONNECT, HOST6)
    assert r.stdout.strip() in ("EACCES", "EPERM", "ECONNREFUSED", "EHOSTUNREACH"), r.stdout
    r = g.ns.run("ping", "-6", "-c", "2", "-i", "0.2", "-W", "1", HOST6, check=False)
    assert r.returncode != 0 and "0 received" in r.stdout
    # Refused explicitly (ICMPv6 administratively prohibited), not a silent timeout.
    assert "Administratively prohibited" in r.stdout or "prohibited" in r.stdout.lower(), r.stdout
    assert g.ns.run("ping", "-6", "-c", "1", "-W", "2", GATEWAY6, check=False).returncode == 0


# ---- TCP guest → [host6] → a [::1] server on the host ------------------------------------


class Sha256Server:
    """TCP on [::1]: sends `size` random bytes to each client, then reads what the client
    sends back until EOF and records its sha256."""

    def __init__(self, size: int) -> None:
        self.data = os.urandom(size)
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.received: list[str] = []
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.sock.bind(("::1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(60)
            conn.sendall(self.data)
            conn.shutdown(socket.SHUT_WR)
            h = hashlib.sha256()
            while chunk := conn.recv(1 << 16):
                h.update(chunk)
            self.received.append(h.hexdigest())

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


GUEST_CLIENT = r"""
import hashlib, socket, sys
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=60)
h, got = hashlib.sha256(), 0
chunks = []
while got < size:
    chunk = s.recv(1 << 16)
    if not chunk:
        break
    h.update(chunk)
    chunks.append(chunk)
    got += len(chunk)
s.sendall(b"".join(chunks))
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(got, h.hexdigest())
"""


@pytest.mark.parametrize("mtu", [1500, 65520])
@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
def test_tcp_to_host_loopback6_sha256_both_ways(guest6, offload, mtu):
    _h, g = guest6(offload=offload, dhcp6=False, mtu=mtu)
    server = Sha256Server(4 << 20)
    try:
        r = g.ns.python(GUEST_CLIENT, HOST6, str(server.port), str(len(server.data)))
        got, digest = r.stdout.split()
        assert int(got) == len(server.data) and digest == server.sha256
        wait_for(lambda: server.received, 30, "the server to read the upload")
        assert server.received == [server.sha256]
    finally:
        server.close()


# ---- DNS on the gateway's IPv6 address (UDP and TCP) ------------------------------------


def dig6(g, *args: str) -> str:
    r = g.ns.run("dig", "+time=6", "+tries=1", f"@{GATEWAY6}", *args, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def answer_lines(out: str) -> list[str]:
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


def test_dns_over_ipv6_local_and_forwarded(guest6, dns_upstream):
    _h, g = guest6(dhcp6=False)
    assert answer_lines(dig6(g, "host.containers.internal", "A")) == [
        "host.containers.internal. A 192.168.127.254"
    ]
    for tcp in ("+notcp", "+tcp"):
        out = dig6(g, tcp, "www.example.test", "AAAA")
        assert answer_lines(out) == ["www.example.test. AAAA 2001:db8::10"], out
        assert f"SERVER: {GATEWAY6}#53" in out
    assert answer_lines(dig6(g, "www.example.test", "A")) == ["www.example.test. A 192.0.2.10"]
    assert ("www.example.test.", "AAAA", "udp") in dns_upstream.queries


# ---- UDP through the NAT to a [::1] echo server ------------------------------------------

UDP_CLIENT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(5)
ok = 0
for size in (1, 1000, 1400, 3000, 8000):  # the last two are fragmented both ways
    data = bytes([size % 251]) * size
    for _ in range(3):  # UDP: a lost datagram is retried, a wrong one fails
        s.sendto(data, (host, port))
        try:
            got, _ = s.recvfrom(65535)
        except TimeoutError:
            continue
        assert got == data, (size, len(got))
        ok += 1
        break
print(ok)
"""


def test_udp_to_host_loopback6_echoed_fragmented_too(guest6):
    _h, g = guest6(dhcp6=False)
    srv = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    srv.bind(("::1", 0))
    port = srv.getsockname()[1]
    stop = threading.Event()

    def echo() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                data, addr = srv.recvfrom(65535)
            except TimeoutError:
                continue
            srv.sendto(data, addr)

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    try:
        r = g.ns.python(UDP_CLIENT, HOST6, str(port))
        assert r.stdout.split() == ["5"], r.stdout + r.stderr
    finally:
        stop.set()
        t.join(5)
        srv.close()


# ---- acceptance 8: malformed and spoofing frames from a guest -----------------------------

HOSTILE_FRAMES = r"""
import sys
from scapy.all import Ether, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, UDP, sendp
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6ND_NA, ICMPv6ND_RA, ICMPv6NDOptDstLLAddr
from scapy.layers.inet6 import ICMPv6NDOptPrefixInfo, ICMPv6NDOptSrcLLAddr
mac, src, gw_mac, gw6, host6 = sys.argv[1:6]
eth = Ether(src=mac, dst=gw_mac)
frames = []
# a destination-options header whose length runs past the packet
frames.append(eth / IPv6(src=src, dst=gw6, nh=60, plen=4) / b"\x3a\x05\0\0")
# more extension headers than anyone sends
chain = IPv6(src=src, dst=gw6)
for _ in range(10):
    chain = chain / IPv6ExtHdrDestOpt()
frames.append(eth / chain / ICMPv6EchoRequest())
# a payload length beyond the frame
frames.append(eth / IPv6(src=src, dst=gw6, plen=1400) / ICMPv6EchoRequest())
# a tiny first fragment: the UDP header is not in it (RFC 7112)
frames.append(eth / IPv6(src=src, dst=host6) / IPv6ExtHdrFragment(nh=6, m=1, id=78) / (b"\0" * 8))
# overlapping fragments
udp = bytes(UDP(sport=1234, dport=9) / (b"O" * 64))
frames.append(eth / IPv6(src=src, dst=host6) / IPv6ExtHdrFragment(nh=17, offset=0, m=1, id=79) / udp[:48])
frames.append(eth / IPv6(src=src, dst=host6) / IPv6ExtHdrFragment(nh=17, offset=4, m=0, id=79) / udp[32:])
# a router advertisement from the guest, and an advertisement claiming the gateway's address
mc = Ether(src=mac, dst="33:33:00:00:00:01")
ra = IPv6(src=sys.argv[6], dst="ff02::1", hlim=255) / ICMPv6ND_RA(routerlifetime=1800)
ra = ra / ICMPv6NDOptSrcLLAddr(lladdr=mac) / ICMPv6NDOptPrefixInfo(prefix="2001:db8:bad::", prefixlen=64)
frames.append(mc / ra)
na = IPv6(src=sys.argv[6], dst="ff02::1", hlim=255) / ICMPv6ND_NA(tgt=gw6, R=1, S=0, O=1)
frames.append(mc / na / ICMPv6NDOptDstLLAddr(lladdr=mac))
# the same two hidden behind a first fragment that stops after a destination options header
# (RFC 7112): the NDP message is all in the second fragment
rogue = ICMPv6NDOptPrefixInfo(prefix="2001:db8:bad:f::", prefixlen=64)
for ident, msg in ((80, ra.payload.copy() / rogue), (81, na.payload.copy())):
    whole = IPv6(src=sys.argv[6], dst="ff02::1", hlim=255) / IPv6ExtHdrDestOpt(nh=58) / msg
    icmp = bytes(IPv6(bytes(whole))[IPv6ExtHdrDestOpt].payload)  # checksummed in place
    head = IPv6(src=sys.argv[6], dst="ff02::1", hlim=255, nh=44)
    frames.append(mc / head / IPv6ExtHdrFragment(nh=60, m=1, id=ident) / IPv6ExtHdrDestOpt(nh=58))
    frames.append(mc / head / IPv6ExtHdrFragment(nh=60, offset=1, m=0, id=ident) / icmp)
sendp(frames, iface="eth0", verbose=False)
print(len(frames))
"""


def test_malformed_and_spoofing_frames_counted_and_dropped(hostd, guest, short_tmp):
    h = hostd()
    g1 = guest(h)
    g2 = guest(h, mac="5a:94:ef:e4:0c:ef")
    for g in (g1, g2):
        wait_slaac(g)
        no_tentative(g)
    ll1 = g1.ns.run("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link").stdout
    ll1 = ll1.split()[3].split("/")[0]
    before = h.stats()["network"]
    r = g1.ns.python(
        HOSTILE_FRAMES,
        GUEST_MAC,
        global_addrs(g1)[0].split("/")[0],
        GATEWAY_MAC,
        GATEWAY6,
        HOST6,
        ll1,
    )
    assert r.stdout.strip() == "12"

    def counted() -> dict | None:
        stats = h.stats()
        net = stats["network"]
        want = {
            "ipv6_truncated_extension": 1,
            "ipv6_too_many_extensions": 1,
            "ipv6_bad_payload_length": 1,
            "ipv6_incomplete_chain": 1,
            "ndp_ra_from_guest_dropped": 1,
            "ndp_spoof_dropped": 1,
            "ipv6_incomplete_chain_dropped": 2,  # the fragmented RA and NA, never switched
        }
        if all(net.get(k, 0) - before.get(k, 0) >= v for k, v in want.items()) and (
            stats["reassembly6"].get("overlap_dropped", 0) >= 1
        ):
            return stats
        return None

    deadline = time.monotonic() + 10
    while not counted():
        if time.monotonic() > deadline:
            stats = h.stats()
            diff = {
                k: v - before.get(k, 0) for k, v in stats["network"].items() if v != before.get(k)
            }
            pytest.fail(f"hostd did not count every hostile frame: {diff} {stats['reassembly6']}")
        time.sleep(0.2)
    # The other guest took neither the rogue prefix nor the claim to be the gateway.
    out = g2.ns.run("ip", "-6", "addr", "show", "dev", "eth0").stdout
    assert "2001:db8:bad" not in out, out
    route = g2.ns.run("ip", "-6", "route", "show", "default").stdout
    assert route.count("default") == 1 and GATEWAY_LL in route, route
    # And both guests keep working.
    for g in (g1, g2):
        r = g.ns.run("ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", GATEWAY6, check=False)
        assert r.returncode == 0 and "2 received" in r.stdout, r.stdout + r.stderr
    neigh = g2.ns.run("ip", "-6", "neigh", "show", GATEWAY6).stdout
    assert GUEST_MAC not in neigh, neigh
    assert h.proc.poll() is None


# ---- acceptance 7 (basic): two guests on one switch reach each other over IPv6 -------------


def test_two_guests_reach_each_other(hostd, guest):
    h = hostd()
    g1 = guest(h)
    g2 = guest(h, mac="5a:94:ef:e4:0c:ef")
    for g in (g1, g2):
        wait_slaac(g)
        no_tentative(g)
    a2 = global_addrs(g2)[0].split("/")[0]
    r = g1.ns.run("ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", a2, check=False)
    assert r.returncode == 0 and "3 received" in r.stdout, r.stdout + r.stderr
