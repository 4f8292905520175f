"""TCP end to end: the guest kernel's TCP against hostd's stack and real host sockets."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from tests.conftest import BIG_TXT_STRINGS, fd_count, free_tcp_port, wait_for

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("mtu", "offload"), [(1500, "none"), (65520, "none"), (1500, "auto"), (1500, "vnet")]
)
def test_curl_256mib_download_and_upload_byte_exact(hostd, guest, http_server, mtu, offload):
    """MTU 1500 and 65520 with plain frames (`?offload=none`), and MTU 1500 with the virtio-net
    offload link (TSO super-segments and partial checksums both ways), once negotiated by
    the capability exchange (no query parameter on either end) and once forced on both."""
    h = hostd("--mtu", str(mtu), offload=offload == "vnet")
    g = guest(h, connect=h.link_uri + ("?offload=none" if offload == "none" else ""))
    assert f"mtu {mtu}" in g.ns.run("ip", "link", "show", "eth0").stdout
    if offload == "auto":
        # Both ends log what they agreed, and hostd's stats say the link carries vnet frames.
        wait_for(lambda: '"link.offload"' in g.log_text(), 10, "vm-switch's offload result")
        agreed = [e for e in map(json.loads, g.log_text().splitlines())
                  if e.get("event") == "link.offload"]  # fmt: skip
        assert "vnet=True" in agreed[-1]["agreed"], agreed
        assert any(e.get("event") == "link.offload" and "vnet=True" in e["agreed"]
                   for e in h.log_events()), h.log_text()[-2000:]  # fmt: skip
        assert [v["offload"] for v in h.stats()["links"].values()] == ["vnet"]
    elif offload == "none":
        assert [v["offload"] for v in h.stats()["links"].values()] == ["none"]
    url = f"http://192.168.127.254:{http_server.port}"
    t0 = time.monotonic()
    down = g.ns.run(
        "sh", "-c", f"curl -sS --fail --max-time 240 {url}/blob | sha256sum", timeout=260
    )
    t1 = time.monotonic()
    assert down.stdout.split()[0] == http_server.blob.sha256
    up = g.ns.run(
        "curl",
        "-sS",
        "--fail",
        "--max-time",
        "240",
        "-T",
        str(http_server.blob.path),
        f"{url}/upload",
        timeout=260,
    )
    t2 = time.monotonic()
    assert up.stdout.strip() == http_server.blob.sha256
    assert http_server.uploads[-1] == (http_server.blob.size, http_server.blob.sha256)
    print(
        f"MTU {mtu} offload={offload}: download {256 / (t1 - t0):.0f} MiB/s, "
        f"upload {256 / (t2 - t1):.0f} MiB/s"
    )
    if offload != "none":
        assert h.stats()["network"].get("tcp_bad_checksum", 0) == 0


CONCURRENT_ECHO = r"""
import asyncio, hashlib, os, sys
port, n, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
async def one(i):
    r, w = await asyncio.open_connection("192.168.127.254", port)
    data = os.urandom(size)
    async def send():
        w.write(data)
        await w.drain()
        w.write_eof()
    sender = asyncio.create_task(send())
    got = await r.readexactly(size)
    await sender
    rest = await r.read()
    w.close()
    return got == data and rest == b""
async def main():
    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    ok = sum(1 for x in results if x is True)
    errors = [repr(x) for x in results if x is not True][:5]
    print(ok, errors)
asyncio.run(main())
"""


def test_500_concurrent_connections_byte_exact_and_no_leaks(hostd, guest, tcp_echo_server):
    h = hostd("--tcp-time-wait", "1")
    g = guest(h)
    fds_before = fd_count(h.proc.pid)
    r = g.ns.python(CONCURRENT_ECHO, str(tcp_echo_server), "500", "65536", timeout=240)
    ok, errors = r.stdout.split(" ", 1)
    assert int(ok) == 500, errors

    def drained() -> bool:
        s = h.stats()["tcp_nat"]
        return s["active"] == 0 and s["connections"] == 0 and s["pending"] == 0

    wait_for(drained, 30, "hostd to release every connection", step=0.5)
    wait_for(lambda: fd_count(h.proc.pid) <= fds_before, 10, "hostd's fd count to return")
    stats = h.stats()["tcp_nat"]
    assert stats["opened"] >= 500 and stats["closed"] >= 500


CONNECT = r"""
import socket, sys, time, errno
s = socket.socket()
s.settimeout(float(sys.argv[3]))
t = time.monotonic()
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected", time.monotonic() - t)
except OSError as e:
    print(errno.errorcode.get(e.errno, type(e).__name__), time.monotonic() - t)
"""


def test_closed_host_port_is_refused_at_once(hostd, guest):
    g = guest(hostd())
    out = g.ns.python(CONNECT, "192.168.127.254", str(free_tcp_port()), "10").stdout.split()
    assert out[0] == "ECONNREFUSED", out


def test_gateway_ports_other_than_dns_and_http_refused(hostd, guest):
    g = guest(hostd())
    for port in ("22", "81", "8080"):
        out = g.ns.python(CONNECT, "192.168.127.1", port, "10").stdout.split()
        assert out[0] == "ECONNREFUSED", (port, out)
    # 80 is the forwarder API (tests/e2e/test_gvproxy_api.py), unless --guest-expose off
    out = g.ns.python(CONNECT, "192.168.127.1", "80", "10").stdout.split()
    assert out[0] == "connected", out


def test_dial_timeout_is_host_unreachable(hostd, guest):
    port = free_tcp_port()
    rule = ["INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port), "--syn", "-j", "DROP"]
    subprocess.run(["iptables", "-I", *rule], check=True)
    try:
        g = guest(hostd("--tcp-connect-timeout", "1"))
        out = g.ns.python(CONNECT, "192.168.127.254", str(port), "20").stdout.split()
        assert out[0] == "EHOSTUNREACH", out
    finally:
        subprocess.run(["iptables", "-D", *rule], check=True)


HANGING_DIALS = r"""
import socket, sys, time
black, live, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
hanging = []
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(("192.168.127.254", black))
    except BlockingIOError:
        pass
    hanging.append(s)
time.sleep(1.0)  # let every SYN reach hostd and its dial start
s = socket.socket()
s.settimeout(10)
t = time.monotonic()
s.connect(("192.168.127.254", live))
s.sendall(b"ping")
reply = s.recv(4)
print(reply.decode(), round(time.monotonic() - t, 3))
"""


def test_hanging_dials_never_block_live_connections(hostd, guest, tcp_echo_server):
    black = free_tcp_port()
    rule = ["INPUT", "-i", "lo", "-p", "tcp", "--dport", str(black), "--syn", "-j", "DROP"]
    subprocess.run(["iptables", "-I", *rule], check=True)
    try:
        h = hostd()
        g = guest(h)
        out = g.ns.python(HANGING_DIALS, str(black), str(tcp_echo_server), "200").stdout.split()
        assert out[0] == "ping", out
        assert h.stats()["tcp_nat"]["pending"] >= 200  # they were really all hanging
        print("live connection while 200 dials hang:", out[1], "s")
    finally:
        subprocess.run(["iptables", "-D", *rule], check=True)


HALF_CLOSE_SERVER = r"""
import socket, sys, threading
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(4)
print(srv.getsockname()[1], flush=True)
# 1: read until the guest's EOF, then reply and close.
c, _ = srv.accept()
data = b""
while chunk := c.recv(65536):
    data += chunk
c.sendall(b"reply to " + str(len(data)).encode())
c.close()
# 2: send a greeting, shut our write side, then read what the guest sends after it.
c, _ = srv.accept()
c.sendall(b"greeting")
c.shutdown(socket.SHUT_WR)
data = b""
while chunk := c.recv(65536):
    data += chunk
print(len(data), flush=True)
c.close()
"""

HALF_CLOSE_CLIENT = r"""
import socket, sys
port = int(sys.argv[1])
s = socket.create_connection(("192.168.127.254", port), timeout=10)
s.sendall(b"x" * 100000)
s.shutdown(socket.SHUT_WR)
reply = b""
while chunk := s.recv(65536):
    reply += chunk
print(reply.decode())
s.close()
s = socket.create_connection(("192.168.127.254", port), timeout=10)
greeting = s.recv(100)
assert s.recv(100) == b""  # the server's FIN arrived...
s.sendall(b"y" * 200000)   # ...and we can still send
s.close()
print(greeting.decode())
"""


def test_half_close_both_directions(hostd, guest):
    g = guest(hostd())
    server = subprocess.Popen(
        ["python3", "-c", HALF_CLOSE_SERVER], stdout=subprocess.PIPE, text=True
    )
    try:
        port = server.stdout.readline().strip()
        out = g.ns.python(HALF_CLOSE_CLIENT, port).stdout.splitlines()
        assert out == ["reply to 100000", "greeting"]
        assert server.stdout.readline().strip() == "200000"
    finally:
        server.kill()
        server.wait()


RESET_SERVER = r"""
import socket, struct, sys
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(4)
print(srv.getsockname()[1], flush=True)
# 1: reset the guest (SO_LINGER 0 + close).
c, _ = srv.accept()
c.recv(10)
c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
c.close()
# 2: the guest resets us.
c, _ = srv.accept()
c.settimeout(10)
try:
    while c.recv(100):
        pass
    print("eof", flush=True)
except ConnectionResetError:
    print("reset", flush=True)
"""

RESET_CLIENT = r"""
import socket, struct, sys, time
port = int(sys.argv[1])
s = socket.create_connection(("192.168.127.254", port), timeout=10)
s.sendall(b"hello")
try:
    s.recv(100)
    print("no reset")
except ConnectionResetError:
    print("reset")
s = socket.create_connection(("192.168.127.254", port), timeout=10)
s.sendall(b"hi")
time.sleep(0.3)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
"""


def test_reset_both_directions(hostd, guest):
    g = guest(hostd())
    server = subprocess.Popen(["python3", "-c", RESET_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        assert g.ns.python(RESET_CLIENT, port).stdout.strip() == "reset"
        assert server.stdout.readline().strip() == "reset"
    finally:
        server.kill()
        server.wait()


def test_iperf3_both_directions(hostd, guest):
    iperf = shutil.which("iperf3")
    assert iperf, "iperf3 is not installed (scripts/bootstrap installs it)"
    port = free_tcp_port()
    server = subprocess.Popen(
        [iperf, "-s", "-B", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        g = guest(hostd("--mtu", "65520"))
        time.sleep(0.3)
        for reverse in (False, True):
            args = [iperf, "-c", "192.168.127.254", "-p", str(port), "-t", "5", "-J"]
            r = g.ns.run(*(args + (["-R"] if reverse else [])), timeout=60)
            result = json.loads(r.stdout)
            end = result["end"]
            gbps = end["sum_received"]["bits_per_second"] / 1e9
            assert end["sum_received"]["bytes"] > 0
            print(f"iperf3 {'host→guest' if reverse else 'guest→host'}: {gbps:.2f} Gbit/s")
    finally:
        server.terminate()
        server.wait()


def test_dns_over_tcp_and_truncation_retry(hostd, guest, dns_upstream):
    g = guest(hostd())
    out = g.ns.run(
        "dig", "+tcp", "+time=6", "+tries=1", "@192.168.127.1", "host.containers.internal"
    )
    assert "192.168.127.254" in out.stdout
    out = g.ns.run("dig", "+tcp", "+time=6", "@192.168.127.1", "www.example.test").stdout
    assert "192.0.2.10" in out
    # Over UDP the upstream truncates; hostd retries over TCP and the guest gets all of it.
    out = g.ns.run(
        "dig", "+time=6", "+tries=1", "+ignore", "@192.168.127.1", "big.example.test", "TXT"
    ).stdout
    out_tcp = g.ns.run("dig", "+tcp", "+time=6", "@192.168.127.1", "big.example.test", "TXT").stdout
    for text in BIG_TXT_STRINGS:
        assert text in out_tcp
    assert ("big.example.test.", "TXT", "tcp") in dns_upstream.queries
    assert ("big.example.test.", "TXT", "udp") in dns_upstream.queries
    assert "status: NOERROR" in out


SEQUENTIAL = r"""
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
ok = 0
for i in range(n):
    s = socket.create_connection(("192.168.127.254", port), timeout=5)
    s.sendall(b"GET %d\n" % i)
    data = b""
    while chunk := s.recv(100):
        data += chunk
    s.close()
    ok += data == b"OK %d\n" % i
print(ok)
"""

CLOSE_FIRST_SERVER = r"""
import socket
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(64)
print(srv.getsockname()[1], flush=True)
while True:
    c, _ = srv.accept()
    line = c.recv(100)
    c.sendall(b"OK " + line.split()[1] + b"\n")
    c.close()  # the server closes first
"""


def test_2000_sequential_connections_server_closes_first(hostd, guest):
    h = hostd()
    g = guest(h)
    # 50 ephemeral ports for 2,000 connections: every port is reused while hostd still
    # holds the previous connection on it in TIME_WAIT.
    g.ns.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40049")
    server = subprocess.Popen(
        ["python3", "-c", CLOSE_FIRST_SERVER], stdout=subprocess.PIPE, text=True
    )
    try:
        port = server.stdout.readline().strip()
        out = g.ns.python(SEQUENTIAL, port, "2000", timeout=300).stdout.strip()
        assert out == "2000"
        assert h.stats()["network"]["tcp_time_wait_reused"] > 1000
    finally:
        server.kill()
        server.wait()


def test_lossy_reordering_link_still_byte_exact(hostd, guest, http_server, short_tmp):
    """Drops, duplicates and swaps between guest and switch, both ways, seeded."""
    import hashlib
    import sys
    from pathlib import Path

    h = hostd()
    relay_path = str(short_tmp / "lossy.sock")
    relay = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("lossy_link.py")), relay_path,
         h.link_path, "7"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert relay.stdout.readline().strip() == "ready"
        g = guest(h, connect=f"unix://{relay_path}?offload=none")  # the relay parses plain frames
        url = f"http://192.168.127.254:{http_server.port}"
        down = g.ns.run(
            "sh",
            "-c",
            f"curl -sS --fail --max-time 200 '{url}/blob?mib=32' | sha256sum",
            timeout=220,
        )
        with open(http_server.blob.path, "rb") as f:
            want = hashlib.sha256(f.read(32 << 20)).hexdigest()
        assert down.stdout.split()[0] == want
        blob32 = short_tmp / "blob32"
        with open(http_server.blob.path, "rb") as f:
            blob32.write_bytes(f.read(32 << 20))
        up = g.ns.run(
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "200",
            "-T",
            str(blob32),
            f"{url}/upload",
            timeout=220,
        )
        assert up.stdout.strip() == want
        # vm-switch going away ends the relay, which then prints what it did.
        g.proc.terminate()
        g.proc.wait(5)
        counts = dict(kv.split("=") for kv in relay.stdout.read().split())
        relay.wait(5)
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
    print("lossy link:", counts)
    assert int(counts["dropped"]) > 100 and int(counts["duplicated"]) > 100
    assert int(counts["reordered"]) > 100
    assert h.stats()["tcp_nat"]["opened"] == 2
