"""The HostSwitch API end to end: forwards into a real guest, capture, tunnel, streams, errors."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest

from netferry.client import NetferryError
from tests.conftest import free_tcp_port, wait_for

pytestmark = pytest.mark.e2e

GUEST_PEER_SERVER = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(16)
print("listening", flush=True)
while True:
    c, addr = srv.accept()
    c.sendall(f"{addr[0]}:{addr[1]}\n".encode())
    c.close()
"""

# argv PORT FILE: each client gets FILE, then the connection closes
GUEST_FILE_SERVER = r"""
import socket, sys
data = open(sys.argv[2], "rb").read()
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(16)
print("listening", flush=True)
while True:
    c, _ = srv.accept()
    c.sendall(data)
    c.close()
"""

GUEST_UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(data, addr)
"""


def start_in_guest(g, code: str, *args: str) -> subprocess.Popen:
    p = g.ns.popen(sys.executable, "-c", code, *args, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "listening"
    return p


def http_in_guest(g, directory: str, port: int = 80) -> subprocess.Popen:
    p = g.ns.popen(
        sys.executable, "-m", "http.server", str(port), "--bind", "0.0.0.0", "-d", directory,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for(lambda: _guest_listening(g, port), 10, "the guest's web server")
    return p


def _guest_listening(g, port: int) -> bool:
    out = g.ns.run("ss", "-Hltn", f"sport = :{port}", check=False).stdout
    return bool(out.strip())


def connect_refused(port: int) -> bool:
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
    except ConnectionRefusedError:
        return True
    finally:
        s.close()
    return False


def test_tcp_forward_100mib_byte_exact_then_unexpose(hostd, guest, http_server, short_tmp):
    h = hostd()
    g = guest(h)
    site = short_tmp / "site"
    site.mkdir()
    with open(http_server.blob.path, "rb") as f:
        data = f.read(100 << 20)
    (site / "blob").write_bytes(data)
    http_in_guest(g, str(site))
    port = free_tcp_port()
    api = h.client()
    fwd = api.expose("tcp", f"127.0.0.1:{port}", "192.168.127.2:80")
    assert (fwd.local, fwd.remote) == (f"127.0.0.1:{port}", "192.168.127.2:80")
    r = subprocess.run(
        ["sh", "-c", f"curl -sS --fail --max-time 120 http://127.0.0.1:{port}/blob | sha256sum"],
        capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest(), r.stderr
    listed = api.forwards()
    assert [(f.local, f.total) for f in listed] == [(f"127.0.0.1:{port}", 1)]
    assert listed[0].bytes_to_guest > 0 and listed[0].bytes_from_guest >= 100 << 20
    api.unexpose("tcp", f"127.0.0.1:{port}")
    assert connect_refused(port)
    assert api.forwards() == []


def test_udp_forward_10000_datagrams(hostd, guest):
    h = hostd()
    g = guest(h)
    start_in_guest(g, GUEST_UDP_ECHO, "5353")
    port = free_tcp_port()
    h.client().expose("udp", f"127.0.0.1:{port}", "192.168.127.2:5353")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.connect(("127.0.0.1", port))
    s.settimeout(5)
    rng = __import__("random").Random(99)
    ok = 0
    window: dict[int, bytes] = {}
    i = 0
    while i < 10000 or window:
        while i < 10000 and len(window) < 8:
            body = i.to_bytes(4, "big") + rng.randbytes(rng.randint(0, 1400))
            window[i] = body
            s.send(body)
            i += 1
        data = s.recv(65535)
        k = int.from_bytes(data[:4], "big")
        ok += window.pop(k, None) == data
    assert ok == 10000
    fwd = h.client().forwards()[0]
    assert fwd.total == 1 and fwd.active == 1  # one client, one session


def test_unix_forward_reaches_guest_tcp(hostd, guest, short_tmp):
    h = hostd()
    g = guest(h)
    start_in_guest(g, GUEST_PEER_SERVER, "7000")
    path = str(short_tmp / "fwd.sock")
    api = h.client()
    api.expose("unix", path, "192.168.127.2:7000")
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    line = s.makefile().readline().strip()
    s.close()
    assert line.startswith("192.168.127.254:")  # unix clients come from the host address
    api.unexpose("unix", path)
    assert not os.path.exists(path)


def test_unix_forward_never_replaces_a_file(hostd, short_tmp):
    h = hostd()
    victim = short_tmp / "important.txt"
    victim.write_text("keep me")
    with pytest.raises(NetferryError) as e:
        h.client().expose("unix", str(victim), "192.168.127.2:80")
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert "never replaced" in e.value.message
    assert victim.read_text() == "keep me"


def test_tunnel_and_capture_with_tshark(hostd, guest, short_tmp):
    h = hostd()
    g = guest(h)
    start_in_guest(g, GUEST_PEER_SERVER, "7001")
    pcap = short_tmp / "cap.pcap"
    netferry = [os.path.join(os.path.dirname(sys.executable), "netferry"), "--api", h.api]
    cap = subprocess.Popen(
        [
            *netferry,
            "capture",
            "--protocol",
            "tcp",
            "--port",
            "7001",
            "--duration",
            "20",
            "-w",
            str(pcap),
        ]
    )
    time.sleep(0.5)  # the capture is registered before the traffic starts
    r = subprocess.run(
        [*netferry, "tunnel", "192.168.127.2:7001"], input=b"", capture_output=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().startswith("192.168.127.1:")  # the tunnel is dialled from .1
    time.sleep(0.5)
    cap.terminate()
    cap.wait(10)
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-T", "fields", "-e", "ip.src", "-e", "tcp.srcport",
         "-e", "tcp.dstport", "-e", "tcp.flags.str"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lines = [line.split("\t") for line in out.splitlines()]
    assert any(x[0] == "192.168.127.1" and x[2] == "7001" and "S" in x[3] for x in lines), out
    assert any(x[0] == "192.168.127.2" and x[1] == "7001" for x in lines), out
    assert all("7001" in (x[1], x[2]) for x in lines)  # the filter kept only this port


def test_watch_stats_and_events_stream_while_traffic_flows(hostd, guest, tcp_echo_server):
    h = hostd()
    api = h.client()
    events: list = []
    stats: list = []

    def watch_events() -> None:
        for ev in api.events():
            events.append(ev)
            if len(events) >= 4:
                return

    def watch_stats() -> None:
        for s in api.watch_stats(0.2):
            stats.append(s)
            if len(stats) >= 15:
                return

    threads = [threading.Thread(target=watch_events), threading.Thread(target=watch_stats)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    g = guest(h)
    port = free_tcp_port()
    api.expose("tcp", f"127.0.0.1:{port}", "192.168.127.2:9")
    g.ns.python(
        "import socket,sys\ns=socket.create_connection(('192.168.127.254',int(sys.argv[1])))\n"
        "s.sendall(b'x'*1000000)\ns.shutdown(1)\nn=0\nwhile (c:=s.recv(65536)): n+=len(c)\nprint(n)",
        str(tcp_echo_server),
    )
    api.unexpose("tcp", f"127.0.0.1:{port}")
    for t in threads:
        t.join(20)
    kinds = [ev.WhichOneof("kind") for ev in events]
    assert kinds[:1] == ["link_up"] and "lease_granted" in kinds, kinds
    assert ("forward_added" in kinds and "forward_removed" in kinds) or len(kinds) == 4, kinds
    assert len(stats) >= 15
    first, last = stats[0], stats[-1]
    assert last.tcp.bytes_from_guests - first.tcp.bytes_from_guests > 1_000_000
    assert last.tcp.bytes_to_guests - first.tcp.bytes_to_guests > 1_000_000
    assert last.frames_in > first.frames_in


def test_bad_requests_get_precise_statuses(hostd):
    h = hostd()
    api = h.client()
    port = free_tcp_port()
    cases = [
        (lambda: api.expose("tcp", "nonsense", "192.168.127.2:80"), "INVALID_ARGUMENT", "local:"),
        (
            lambda: api.expose("tcp", f"127.0.0.1:{port}", "10.0.0.1:80"),
            "INVALID_ARGUMENT",
            "remote:",
        ),
        (
            lambda: api.expose("tcp", f"127.0.0.1:{port}", "192.168.127.2:0"),
            "INVALID_ARGUMENT",
            "remote:",
        ),
        (
            lambda: api.expose("tcp", f"127.0.0.1:{port}", "192.168.127.1:80"),
            "INVALID_ARGUMENT",
            "not a guest",
        ),
        (
            lambda: api.expose("unix", "relative.sock", "192.168.127.2:80"),
            "INVALID_ARGUMENT",
            "absolute",
        ),
        (lambda: api.unexpose("tcp", f"127.0.0.1:{port}"), "NOT_FOUND", f"127.0.0.1:{port}"),
        (
            lambda: api.dns_add("containers.internal", [("x", "A", "not-an-ip", 0)]),
            "INVALID_ARGUMENT",
            "records[0]",
        ),
        (lambda: api.dns_remove("nope.internal", ["x"]), "NOT_FOUND", "nope.internal"),
        (lambda: list(api.capture(host="not-an-ip")), "INVALID_ARGUMENT", "filter.host"),
        (lambda: list(api.tunnel("192.168.127.2", [])), "INVALID_ARGUMENT", "open.address"),
        (lambda: list(api.tunnel("10.1.1.1:22", [])), "INVALID_ARGUMENT", "is not in"),
        # the gateway's own ports, host loopback, network and broadcast are no guests
        (lambda: list(api.tunnel("192.168.127.1:53", [])), "INVALID_ARGUMENT", "not a guest"),
        (lambda: list(api.tunnel("192.168.127.254:22", [])), "INVALID_ARGUMENT", "not a guest"),
        (lambda: list(api.tunnel("192.168.127.0:22", [])), "INVALID_ARGUMENT", "not a guest"),
        (lambda: list(api.tunnel("192.168.127.255:22", [])), "INVALID_ARGUMENT", "not a guest"),
    ]
    for call, code, text in cases:
        with pytest.raises(NetferryError) as e:
            call()
        assert e.value.code.name == code, (code, e.value)
        assert text in e.value.message, (text, e.value)
    # A port held by another process.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    with pytest.raises(NetferryError) as e:
        api.expose("tcp", f"127.0.0.1:{holder.getsockname()[1]}", "192.168.127.2:80")
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and "another process" in e.value.message
    holder.close()
    # Ours: the message names the forward that holds it; a wildcard overlaps a specific host.
    api.expose("tcp", f":{port}", "192.168.127.2:80")
    with pytest.raises(NetferryError) as e:
        api.expose("tcp", f"127.0.0.1:{port}", "192.168.127.2:81")
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert f"tcp :{port} → 192.168.127.2:80" in e.value.message
    assert h.proc.poll() is None


def test_concurrent_expose_of_one_port_exactly_one_wins(hostd):
    h = hostd()
    port = free_tcp_port()
    clients = [h.client() for _ in range(8)]

    def attempt(i: int) -> str:
        try:
            clients[i].expose("tcp", f"127.0.0.1:{port}", f"192.168.127.2:{8000 + i}")
            return "ok"
        except NetferryError as e:
            return e.code.name

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(8)))
    assert results.count("ok") == 1, results
    assert results.count("ALREADY_EXISTS") == 7, results
    assert len(h.client().forwards()) == 1


def test_client_address_preserved_through_forward(hostd, guest, netns):
    """A client in its own namespace, joined to the host by a veth pair, reaches a forward on
    the host's veth address; the guest server sees the client's address, not the gateway's."""
    h = hostd()
    g = guest(h)
    start_in_guest(g, GUEST_PEER_SERVER, "7002")
    client = netns()
    host_if, peer_if = f"nfh{os.getpid() % 10000}", f"nfc{os.getpid() % 10000}"
    subprocess.run(
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if], check=True
    )
    try:
        subprocess.run(["ip", "link", "set", peer_if, "netns", client.name], check=True)
        subprocess.run(["ip", "addr", "add", "198.51.100.1/24", "dev", host_if], check=True)
        subprocess.run(["ip", "link", "set", host_if, "up"], check=True)
        client.run("ip", "addr", "add", "198.51.100.2/24", "dev", peer_if)
        client.run("ip", "link", "set", peer_if, "up")
        port = free_tcp_port()
        h.client().expose("tcp", f"198.51.100.1:{port}", "192.168.127.2:7002")
        out = client.python(
            "import socket,sys\ns=socket.create_connection(('198.51.100.1',int(sys.argv[1])),timeout=10)\n"
            "print(s.getsockname()[0], s.makefile().readline().strip())",
            str(port),
        ).stdout.split()
        client_ip, seen = out[0], out[1]
        assert client_ip == "198.51.100.2"
        assert seen.split(":")[0] == "198.51.100.2", seen
    finally:
        subprocess.run(["ip", "link", "del", host_if], check=False)


def test_static_port_forward_flag(hostd, guest):
    port = free_tcp_port()
    h = hostd("--port-forward", f"127.0.0.1:{port}=192.168.127.2:7003")
    g = guest(h)
    start_in_guest(g, GUEST_PEER_SERVER, "7003")
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert s.makefile().readline().startswith("192.168.127.254:")
    s.close()
    assert [f.local for f in h.client().forwards()] == [f"127.0.0.1:{port}"]
