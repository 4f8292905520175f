"""Forwards into the guest over IPv6 (issue 15, acceptance 6): `[::1]:PORT → [guest]:80`
carries 16 MiB sha256-exact, a guest named by its MAC (`[MAC]:80`) is found by its v6
address, and a v6 client in its own namespace is seen by the guest with its own address.

hostd runs in a namespace of its own here: the client namespace reaches it over a veth
pair with addresses of a private prefix, and nothing is added to the machine's namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_tcp_port
from tests.e2e.test_ipv6_nat import GW6, HOST6, wait_v6

pytestmark = pytest.mark.e2e

CLIENT_NET = "fd15:6:6::"  # the veth between hostd's namespace (::1) and the client's (::2)
GUEST_MAC = "5a:94:ef:e4:0c:ee"

GUEST_HTTP = r"""
import socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
blob = open(sys.argv[1], "rb").read()
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        body = blob if self.path == "/blob" else self.client_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
server = Server(("::", 80), Handler)
print("listening", flush=True)
server.serve_forever()
"""


GUEST_UDP = r"""
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", 5353))
print("listening", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(peer[0].encode() + b" " + data, peer)
"""

UDP_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(2)
for _ in range(10):  # UDP: a lost datagram is sent again (bounded)
    s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recv(65535).decode())
        break
    except TimeoutError:
        continue
"""


def veth_between(a, b, tag: str) -> None:
    """A veth pair from namespace `a` (CLIENT_NET::1) to `b` (CLIENT_NET::2)."""
    one, two = f"nf{tag}a", f"nf{tag}b"
    subprocess.run(["ip", "link", "add", one, "type", "veth", "peer", "name", two], check=True)
    try:
        subprocess.run(["ip", "link", "set", one, "netns", a.name], check=True)
        subprocess.run(["ip", "link", "set", two, "netns", b.name], check=True)
    except subprocess.CalledProcessError:
        subprocess.run(["ip", "link", "del", one], check=False)  # still ours, in our namespace
        raise
    for ns, dev, host in ((a, one, 1), (b, two, 2)):
        ns.run("ip", "addr", "add", f"{CLIENT_NET}{host}/64", "dev", dev, "nodad")
        ns.run("ip", "link", "set", dev, "up")


def curl(ns, url: str) -> subprocess.CompletedProcess:
    return ns.run("curl", "-g", "-sS", "--fail", "--max-time", "120", url, timeout=150)


def test_v6_forward_16mib_exact_by_address_and_by_mac_and_the_client_address_is_kept(
    hostd, guest, netns, short_tmp: Path
):
    host_ns, client_ns = netns(), netns()
    veth_between(host_ns, client_ns, f"{os.getpid() % 100000}")
    http_api = short_tmp / "http.sock"
    h = hostd(
        "--http-api", f"unix://{http_api}", name="hostd-ns",
        wrapper=("ip", "netns", "exec", host_ns.name),
    )  # fmt: skip
    g = guest(h, mac=GUEST_MAC)
    guest6 = wait_v6(g)

    blob = short_tmp / "blob16"
    data = os.urandom(16 << 20)
    blob.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    server = g.ns.popen(sys.executable, "-c", GUEST_HTTP, str(blob), stdout=subprocess.PIPE,
                        text=True)  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        by_address, by_mac = free_tcp_port(), free_tcp_port()
        with h.client() as api:
            fwd = api.expose("tcp", f"[::1]:{by_address}", f"[{guest6}]:80")
            assert fwd.remote == f"[{guest6}]:80"
            fwd = api.expose("tcp", f":{by_mac}", f"[{GUEST_MAC}]:80")
            assert fwd.remote == f"[{GUEST_MAC}]:80"
            listed = {f.local: f.remote for f in api.forwards()}
            assert listed[f"[::1]:{by_address}"] == f"[{guest6}]:80"

        down = host_ns.run(
            "sh", "-c", f"curl -g -sS --fail --max-time 120 http://[::1]:{by_address}/blob | sha256sum",
            timeout=150,
        )  # fmt: skip
        assert down.stdout.split()[0] == digest
        # A loopback client is hidden behind the host's v6 address, as .254 is for v4.
        assert curl(host_ns, f"http://[::1]:{by_address}/peer").stdout == HOST6
        # From its own namespace, through the MAC forward: the guest sees the client itself.
        peer = curl(client_ns, f"http://[{CLIENT_NET}1]:{by_mac}/peer").stdout
        assert peer == f"{CLIENT_NET}2", peer
        big = client_ns.run(
            "sh", "-c", f"curl -g -sS --fail --max-time 120 http://[{CLIENT_NET}1]:{by_mac}/blob | sha256sum",
            timeout=150,
        )  # fmt: skip
        assert big.stdout.split()[0] == digest
        # The gvproxy-compatible HTTP API takes a v6 remote too (one control core).
        by_http = free_tcp_port()
        body = json.dumps({"local": f"[::1]:{by_http}", "remote": f"[{guest6}]:80"})
        posted = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket",
             str(http_api), "-X", "POST", "-d", body, "http:/unix/services/forwarder/expose"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert posted.stdout == "200", posted
        assert curl(host_ns, f"http://[::1]:{by_http}/peer").stdout == HOST6
        with h.client() as api:
            counters = {f.local: f for f in api.forwards()}
        assert counters[f"[::1]:{by_http}"].remote == f"[{guest6}]:80"
        with h.client() as api:
            # A gRPC tunnel into the v6 guest comes from the gateway's v6 address.
            reply = b"".join(api.tunnel(f"[{guest6}]:80", [b"GET /peer HTTP/1.0\r\n\r\n"]))
        assert reply.startswith(b"HTTP/1.") and reply.endswith(GW6.encode()), reply
        assert counters[f"[::1]:{by_address}"].total == 2  # /blob and /peer
        assert counters[f":{by_mac}"].total == 2
        # UDP the same way: by address from loopback, by MAC from the client namespace.
        udp_server = g.ns.popen(sys.executable, "-c", GUEST_UDP, stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
        try:
            assert udp_server.stdout is not None
            assert udp_server.stdout.readline().strip() == "listening"
            with h.client() as api:
                api.expose("udp", f"[::1]:{by_address}", f"[{guest6}]:5353")
                api.expose("udp", f":{by_mac}", f"[{GUEST_MAC}]:5353")
            out = host_ns.python(UDP_CLIENT, "::1", str(by_address), "hello").stdout.strip()
            assert out == f"{HOST6} hello", out
            out = client_ns.python(UDP_CLIENT, f"{CLIENT_NET}1", str(by_mac), "hi").stdout.strip()
            assert out == f"{CLIENT_NET}2 hi", out
        finally:
            udp_server.kill()
            udp_server.wait()
    finally:
        server.kill()
        server.wait()
