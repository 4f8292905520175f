"""IPv6 end to end through the NAT (issue 15, acceptance 2-5 and 7): the Linux kernel in a
namespace, through vm-switch's tap, to hostd, and from there to host sockets on ::1.

The guest takes its global address by SLAAC from hostd's router advertisement (the kernel
does it on its own; DHCPv6 is tested in test_dhcpv6_client.py). Traffic goes only to ::1,
127.0.0.1 and addresses inside namespaces made here. "A host without a route" is made safe:
hostd runs in a namespace of its own that has no IPv6 route but ::1 (checked), so the
documentation address the guest pings is never sent anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path

import pytest

from tests.conftest import Blob, HttpServer, serve_blob, serve_udp_echo, wait_for
from tests.e2e.test_ipv4 import answers

pytestmark = pytest.mark.e2e

PREFIX = IPv6Network("fd00:192:168:127::/64")
GW6 = "fd00:192:168:127::1"
HOST6 = "fd00:192:168:127::254"  # the v6 host-loopback address → the host's ::1
DNS6 = GW6
UNREACHABLE6 = "2001:db8::15"  # documentation prefix; only ever "sent" from a route-less host
MIB64 = 64 << 20


def v6_addresses(g) -> list[str]:
    """The guest's usable global addresses in the prefix (DAD done)."""
    out = g.ns.run("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global").stdout
    found = []
    for line in out.splitlines():
        words = line.split()
        if "inet6" not in words or "tentative" in words or "dadfailed" in words:
            continue
        addr = IPv6Address(words[words.index("inet6") + 1].split("/")[0])
        if addr in PREFIX:
            found.append(str(addr))
    return found


def wait_v6(g) -> str:
    """Wait for the guest's global address and v6 default route; the address (::2 when
    DHCPv6 gave it, else the SLAAC one)."""

    def ready() -> list[str] | None:
        route = g.ns.run("ip", "-6", "route", "show", "default", check=False).stdout
        addrs = v6_addresses(g)
        return addrs if addrs and "default via fe80:" in route else None

    addrs = wait_for(ready, 30, f"a global IPv6 address and default route in {g.ns.name}", 0.2)
    return str(PREFIX[2]) if str(PREFIX[2]) in addrs else addrs[0]


# ---- loopback peers on ::1 ------------------------------------------------------------


@pytest.fixture
def http6_server(big_blob: Blob) -> Iterator[HttpServer]:
    """`serve_blob` on [::1]."""
    with serve_blob(big_blob, "::1") as server:
        yield server


@pytest.fixture
def blob64(big_blob: Blob, short_tmp: Path) -> tuple[Path, str]:
    """The blob's first 64 MiB as a file of its own (for curl -T) and its sha256."""
    path = short_tmp / "blob64"
    h = hashlib.sha256()
    with open(big_blob.path, "rb") as src, open(path, "wb") as dst:
        for _ in range(64):
            chunk = src.read(1 << 20)
            h.update(chunk)
            dst.write(chunk)
    return path, h.hexdigest()


@pytest.fixture
def udp6_echo_server() -> Iterator[int]:
    """UDP echo on [::1]; returns the port."""
    with serve_udp_echo("::1", 8 << 20) as port:
        yield port


def closed_udp6_port() -> int:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def closed_tcp6_port() -> int:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.bind(("::1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---- a host without IPv6 routes ----------------------------------------------------------


@pytest.fixture
def routeless_hostd(hostd, netns):
    """hostd in a namespace whose only IPv6 route is ::1 (asserted), so a guest's flow to
    any other v6 address meets "no route" on the host at once; `ping_sockets` chooses
    between ping sockets (ping_group_range opened there) and the raw-socket fallback."""

    def start(*extra: str, ping_sockets: bool = True):
        ns = netns()
        routes = ns.run("ip", "-6", "route", "show", "table", "all").stdout
        assert not [
            r for r in routes.splitlines() if not r.startswith(("local ::1", "::1", "multicast"))
        ], routes
        assert ns.run("ip", "-6", "route", "show", "default").stdout.strip() == ""
        got = ns.run("ip", "-6", "route", "get", UNREACHABLE6, check=False)
        assert got.returncode != 0 and "unreachable" in got.stderr.lower(), got
        if ping_sockets:
            ns.run("sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647")
        else:
            ns.run("sysctl", "-q", "-w", "net.ipv4.ping_group_range=1 0")
        h = hostd(*extra, name=f"hostd-{ns.name}", wrapper=("ip", "netns", "exec", ns.name))
        return h, ns

    return start


# ---- acceptance 2: ping -------------------------------------------------------------------


def test_ping6_gateway_and_host_loopback(hostd, guest):
    g = guest(hostd())
    wait_v6(g)
    for target in (GW6, HOST6):
        r = g.ns.run("ping", "-6", "-c", "3", "-i", "0.2", "-W", "5", target, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "3 received" in r.stdout, r.stdout


CONNECT6 = r"""
import errno, socket, sys
s = socket.socket(socket.AF_INET6)
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected")
except OSError as e:
    print(errno.errorcode.get(e.errno, type(e).__name__))
"""

UDP_ERROR6 = r"""
import errno, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
# "No route" is a soft error (RFC 1122): a UDP socket hears it only with IPV6_RECVERR.
s.setsockopt(socket.IPPROTO_IPV6, 25, 1)
s.settimeout(float(sys.argv[3]))
s.connect((sys.argv[1], int(sys.argv[2])))
try:
    s.send(b"anyone?")
    s.recv(100)
    print("answered")
except OSError as e:
    print(errno.errorcode.get(e.errno, type(e).__name__))
"""


@pytest.mark.parametrize("ping_sockets", [True, False], ids=["ping-socket", "raw-socket"])
def test_ping6_to_an_address_the_host_cannot_reach_fails_at_once(
    routeless_hostd, guest, ping_sockets
):
    """The guest's ping, TCP connect and UDP exchange to an address the host has no route
    to end with an error (ICMPv6 destination unreachable), not a timeout: -W/--timeout are
    far longer than the run, and what ends them is the error, which the output names."""
    h, _ns = routeless_hostd(ping_sockets=ping_sockets)
    g = guest(h)
    wait_v6(g)
    # The host's own loopback still answers: the refusal is about the route, not IPv6.
    ok = g.ns.run("ping", "-6", "-c", "1", "-W", "5", HOST6, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    r = g.ns.run("ping", "-6", "-c", "1", "-W", "30", UNREACHABLE6, check=False, timeout=60)
    assert r.returncode != 0
    assert "Destination unreachable" in r.stdout, r.stdout + r.stderr
    assert "0 received" in r.stdout and "+1 errors" in r.stdout, r.stdout
    tcp = g.ns.python(CONNECT6, UNREACHABLE6, "443", "30").stdout.split()
    assert tcp[0] in ("ENETUNREACH", "EHOSTUNREACH"), tcp
    udp = g.ns.python(UDP_ERROR6, UNREACHABLE6, "53", "30").stdout.split()
    assert udp[0] in ("ENETUNREACH", "EHOSTUNREACH"), udp
    stats = h.stats()
    assert stats["icmp_nat"]["icmp_errors"] >= 1, stats["icmp_nat"]
    assert stats["tcp_nat"]["unreachable"] >= 1, stats["tcp_nat"]


# ---- acceptance 3: curl -6 --------------------------------------------------------------


@pytest.mark.parametrize(
    ("mtu", "offload"), [(1500, "none"), (65520, "none"), (1500, "vnet"), (65520, "vnet")]
)
def test_curl6_64mib_download_and_upload_byte_exact(
    hostd, guest, http6_server, blob64, mtu, offload
):
    """64 MiB each way between the guest and a [::1] server through the v6 host-loopback
    address, with plain frames (`?offload=none`) and with the virtio-net offload link (TSO
    super-segments and partial checksums both ways)."""
    path, digest = blob64
    h = hostd("--mtu", str(mtu), offload=offload == "vnet")
    g = guest(h, connect=h.link_uri + ("?offload=none" if offload == "none" else ""))
    assert f"mtu {mtu}" in g.ns.run("ip", "link", "show", "eth0").stdout
    wait_v6(g)
    assert [v["offload"] for v in h.stats()["links"].values()] == [offload]
    url = f"http://[{HOST6}]:{http6_server.port}"
    t0 = time.monotonic()
    down = g.ns.run(
        "sh", "-c", f"curl -6 -g -sS --fail --max-time 240 '{url}/blob?mib=64' | sha256sum",
        timeout=260,
    )  # fmt: skip
    assert down.stdout.split()[0] == digest
    t1 = time.monotonic()
    up = g.ns.run(
        "curl", "-6", "-g", "-sS", "--fail", "--max-time", "240", "-T", str(path),
        f"{url}/upload", timeout=260,
    )  # fmt: skip
    assert up.stdout.strip() == digest
    t2 = time.monotonic()
    assert http6_server.uploads[-1] == (MIB64, digest)
    print(f"v6 MTU {mtu} offload={offload}: down {64 / (t1 - t0):.0f} MiB/s, "
          f"up {64 / (t2 - t1):.0f} MiB/s")  # fmt: skip
    network = h.stats()["network"]
    assert network.get("tcp_bad_checksum", 0) == 0


# ---- acceptance 4: UDP --------------------------------------------------------------------

UDP_ECHO_CLIENT = r"""
import json, random, socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(15)
sizes = [1, 8000] + [rng.randint(1, 8000) for _ in range(count - 2)]
payloads = [rng.randbytes(n) for n in sizes]
sent_any = set(payloads)
waiting = {}  # payload -> indices still waiting for it (identical tiny payloads share one)
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.connect((host, port))
s.settimeout(0.5)
WINDOW, MAX_RESENDS, DEADLINE = 64, 3000, time.monotonic() + 240
nxt = done = corrupted = duplicates = resends = 0
outstanding = {}  # index -> payload
while done < count and time.monotonic() < DEADLINE:
    while nxt < count and len(outstanding) < WINDOW:
        outstanding[nxt] = payloads[nxt]
        waiting.setdefault(payloads[nxt], []).append(nxt)
        s.send(payloads[nxt])
        nxt += 1
    try:
        data = s.recv(65535)
    except TimeoutError:
        if resends >= MAX_RESENDS:
            break
        for i, p in outstanding.items():  # lost on the way (UDP): send again
            s.send(p)
            resends += 1
        continue
    got = waiting.get(data)
    if got:
        outstanding.pop(got.pop(0))
        if not got:
            del waiting[data]
        done += 1
    elif data in sent_any:
        duplicates += 1  # the echo of a datagram sent again
    else:
        corrupted += 1
refused = "no error"
c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
c.settimeout(10)
c.connect((host, int(sys.argv[4])))
try:
    c.send(b"anyone?")
    c.recv(100)
except ConnectionRefusedError:
    refused = "ECONNREFUSED"
except OSError as e:
    refused = repr(e)
print(json.dumps(dict(done=done, corrupted=corrupted, duplicates=duplicates,
                      resends=resends, big=sum(1 for n in sizes if n > 1452),
                      refused=refused)))
"""


def test_udp6_10000_datagrams_echoed_intact_and_a_closed_port_refused(
    hostd, guest, udp6_echo_server
):
    """1-8,000 bytes each (datagrams above the MTU leave the guest in fragments and come
    back in fragments); lost ones are sent again (UDP may lose), bounded in count and time;
    every one must come back byte for byte, and nothing else may."""
    h = hostd()
    g = guest(h)
    wait_v6(g)
    r = g.ns.python(
        UDP_ECHO_CLIENT, HOST6, str(udp6_echo_server), "10000", str(closed_udp6_port()),
        timeout=300,
    )  # fmt: skip
    result = json.loads(r.stdout)
    print("udp6:", result)
    assert result["done"] == 10000, result
    assert result["corrupted"] == 0, result
    assert result["big"] > 5000, result  # most were fragmented
    assert result["refused"] == "ECONNREFUSED", result
    assert h.stats()["udp_nat"]["refused"] >= 1


# ---- acceptance 5: DNS over v6 ---------------------------------------------------------


def dig6(g, *args: str) -> str:
    r = g.ns.run("dig", "-6", "+time=6", "+tries=1", f"@{DNS6}", *args, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_dns_over_v6_forwards_a_and_aaaa_unchanged_udp_and_tcp(hostd, guest, dns_upstream):
    g = guest(hostd())
    wait_v6(g)
    for transport in ("+notcp", "+tcp"):
        assert answers(dig6(g, transport, "AAAA", "www.example.test")) == [
            "www.example.test. AAAA 2001:db8::10"
        ]
        assert answers(dig6(g, transport, "A", "www.example.test")) == [
            "www.example.test. A 192.0.2.10"
        ]
        assert answers(dig6(g, transport, "MX", "example.test")) == [
            "example.test. MX 10 mail.example.test."
        ]
    asked = [(name, kind) for name, kind, _ in dns_upstream.queries]
    assert asked.count(("www.example.test.", "AAAA")) == 2, dns_upstream.queries
    assert asked.count(("www.example.test.", "A")) == 2, dns_upstream.queries
    # The upstream's TTL and flags arrive unchanged (byte-identical relay).
    out = dig6(g, "AAAA", "www.example.test")
    assert "www.example.test.\t60\tIN\tAAAA\t2001:db8::10" in out.replace(" ", "\t"), out
    assert "NXDOMAIN" in dig6(g, "nothing.example.test")
    # The local zone (not forwarded) has both families for the host.
    for transport in ("+notcp", "+tcp"):
        assert answers(dig6(g, transport, "AAAA", "host.containers.internal")) == [
            f"host.containers.internal. AAAA {HOST6}"
        ]
        assert answers(dig6(g, transport, "A", "host.containers.internal")) == [
            "host.containers.internal. A 192.168.127.254"
        ]


# ---- acceptance 7: two guests ----------------------------------------------------------

TCP6_SINK = r"""
import hashlib, socket
srv = socket.socket(socket.AF_INET6)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::", 7000))
srv.listen(1)
print("listening", flush=True)
conn, peer = srv.accept()
h = hashlib.sha256()
n = 0
while data := conn.recv(1 << 16):
    h.update(data)
    n += len(data)
conn.sendall(f"{peer[0]} {n} {h.hexdigest()}".encode())
conn.close()
"""

TCP6_SOURCE = r"""
import hashlib, random, socket, sys
data = random.Random(7).randbytes(8 << 20)
s = socket.create_connection((sys.argv[1], 7000), timeout=60)
s.sendall(data)
s.shutdown(socket.SHUT_WR)
reply = b""
while chunk := s.recv(4096):
    reply += chunk
print(reply.decode(), hashlib.sha256(data).hexdigest())
"""


def test_two_guests_reach_each_other_over_v6(hostd, guest):
    h = hostd()
    a = guest(h, mac="5a:94:ef:e4:0c:ee")
    b = guest(h, mac="5a:94:ef:e4:0c:ef")
    a6, b6 = wait_v6(a), wait_v6(b)
    assert a6 != b6
    r = a.ns.run("ping", "-6", "-c", "3", "-i", "0.2", "-W", "5", b6, check=False)
    assert "3 received" in r.stdout, r.stdout + r.stderr
    sink = b.ns.popen(sys_python(), "-c", TCP6_SINK, stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        assert sink.stdout.readline().strip() == "listening"
        out = a.ns.python(TCP6_SOURCE, b6).stdout.split()
        peer, size, got, sent = out
        assert (peer, int(size), got) == (a6, 8 << 20, sent), out
    finally:
        with contextlib.suppress(ProcessLookupError):
            sink.kill()
        sink.wait()


def sys_python() -> str:
    import sys

    return sys.executable


# ---- errors of the path: packet too big, hop limit exceeded ---------------------------

PATH_ERRORS = r"""
import json, socket, struct, sys, time
IPV6_RECVERR = 25
EE = struct.Struct("=IBBBBII")
out = {}
for name, host, size in (("too_big", sys.argv[1], 1400), ("hop_limit", sys.argv[2], 100)):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    s.connect((host, 9))
    got = []
    deadline = time.monotonic() + 20
    while not got and time.monotonic() < deadline:
        try:
            s.send(b"x" * size)
        except OSError:
            pass  # the error of an earlier send; its details are queued
        time.sleep(0.5)
        while True:
            try:
                _, anc, _, _ = s.recvmsg(0, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            except OSError:
                break
            for level, kind, data in anc:
                if level == socket.IPPROTO_IPV6 and kind == IPV6_RECVERR:
                    err, origin, type_, code, _, info, _ = EE.unpack_from(data)
                    got.append([origin, type_, code, info])
    out[name] = got
print(json.dumps(out))
"""


def test_packet_too_big_and_hop_limit_exceeded_reach_the_guest(hostd, guest, netns):
    """Beyond hostd's namespace a router namespace forwards to a far one over a link of MTU
    1280 (so a 1400-byte datagram meets "packet too big") and routes a second prefix back
    and forth (so a datagram there loops until its hop limit runs out). hostd's host
    socket hears both as ICMPv6 errors; the guest must hear them too, with the MTU."""
    host_ns, router, far = netns(), netns(), netns()
    tag = f"{os.getpid() % 100000}"
    for a, b, one, two in ((host_ns, router, f"nf{tag}h", f"nf{tag}r"),
                           (router, far, f"nf{tag}s", f"nf{tag}f")):  # fmt: skip
        subprocess.run(["ip", "link", "add", one, "type", "veth", "peer", "name", two], check=True)
        try:
            subprocess.run(["ip", "link", "set", one, "netns", a.name], check=True)
            subprocess.run(["ip", "link", "set", two, "netns", b.name], check=True)
        except subprocess.CalledProcessError:
            subprocess.run(["ip", "link", "del", one], check=False)
            raise
    host_ns.run("ip", "addr", "add", "fd16:1::1/64", "dev", f"nf{tag}h", "nodad")
    router.run("ip", "addr", "add", "fd16:1::2/64", "dev", f"nf{tag}r", "nodad")
    router.run("ip", "addr", "add", "fd16:2::1/64", "dev", f"nf{tag}s", "nodad")
    far.run("ip", "addr", "add", "fd16:2::2/64", "dev", f"nf{tag}f", "nodad")
    for ns, dev in ((host_ns, "h"), (router, "r"), (router, "s"), (far, "f")):
        ns.run("ip", "link", "set", f"nf{tag}{dev}", "up")
    router.run("ip", "link", "set", f"nf{tag}s", "mtu", "1280")
    far.run("ip", "link", "set", f"nf{tag}f", "mtu", "1280")
    for ns in (host_ns, router):
        ns.run("sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
    host_ns.run("ip", "-6", "route", "add", "fd16:2::/64", "via", "fd16:1::2")
    host_ns.run("ip", "-6", "route", "add", "fd16:3::/64", "via", "fd16:1::2")
    router.run("ip", "-6", "route", "add", "fd16:3::/64", "via", "fd16:1::1")  # a loop
    host_ns.run("sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647")

    h = hostd(name="hostd-path", wrapper=("ip", "netns", "exec", host_ns.name))
    g = guest(h)
    wait_v6(g)
    r = g.ns.python(PATH_ERRORS, "fd16:2::2", "fd16:3::1", timeout=90)
    got = json.loads(r.stdout)
    ORIGIN_ICMP6 = 3
    assert [ORIGIN_ICMP6, 2, 0, 1280] in got["too_big"], got  # packet too big, MTU 1280
    assert [ORIGIN_ICMP6, 3, 0, 0] in got["hop_limit"], got  # hop limit exceeded in transit
    # The guest's kernel took the path MTU.
    route = g.ns.run("ip", "-6", "route", "get", "fd16:2::2").stdout
    assert "mtu 1280" in route, route
    assert h.stats()["udp_nat"]["icmp_errors"] >= 2


def test_ipv4_to_an_address_the_host_cannot_reach_fails_at_once_too(routeless_hostd, guest):
    """The same for IPv4 (the NAT code is one for both): ping and connect() end with
    "network unreachable" at once."""
    h, ns = routeless_hostd()
    assert ns.run("ip", "-4", "route", "show").stdout.strip() == ""
    g = guest(h)
    r = g.ns.run("ping", "-c", "1", "-W", "30", "192.0.2.15", check=False, timeout=60)
    assert r.returncode != 0
    assert "Destination Net Unreachable" in r.stdout, r.stdout + r.stderr
    tcp = g.ns.python(CONNECT6.replace("AF_INET6", "AF_INET"), "192.0.2.15", "443", "30")
    assert tcp.stdout.split()[0] == "ENETUNREACH", tcp.stdout


HELLO_SERVER = r"""
from http.server import BaseHTTPRequestHandler, HTTPServer
class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_GET(self):
        body = b"reached over IPv4"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
server = HTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def test_happy_eyeballs_falls_back_to_ipv4_on_the_error_not_a_timer(routeless_hostd, guest):
    """A dual-stack name whose AAAA the host cannot reach: curl tries IPv6 first and, told
    "network unreachable" at once, goes on to IPv4. Its happy-eyeballs timer is set far
    beyond --max-time, so only that error (not the timer) can start the IPv4 attempt."""
    h, ns = routeless_hostd()
    server = ns.popen(sys_python(), "-c", HELLO_SERVER, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        g = guest(h)
        wait_v6(g)
        r = g.ns.run(
            "curl", "-v", "-sS", "--max-time", "30", "--happy-eyeballs-timeout-ms", "600000",
            "--resolve", f"dual.test:{port}:[{UNREACHABLE6}],192.168.127.254",
            "-w", "\n%{remote_ip}", f"http://dual.test:{port}/", check=False, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.splitlines() == ["reached over IPv4", "192.168.127.254"], r.stdout
        assert f"Trying [{UNREACHABLE6}]:{port}" in r.stderr, r.stderr
        assert "Network is unreachable" in r.stderr, r.stderr
    finally:
        server.kill()
        server.wait()
