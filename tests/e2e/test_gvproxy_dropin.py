"""netferry-gvproxy end to end: gvproxy's command line runs host-switch.

A guest (vm-switch with the kernel in a namespace, as the `guest` fixture makes it) dials
the `-listen-qemu` socket, gets its lease and fetches from the host's loopback through .254.
DNS goes to the test's own loopback resolver (`-dns-upstream`, netferry's addition).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    STARTED,
    DnsUpstream,
    HttpServer,
    _bin,
    free_tcp_port,
    stop_process,
    wait_for,
)

pytestmark = pytest.mark.e2e

ECHO_22 = r"""
import socket, threading
s = socket.create_server(("0.0.0.0", 22))
print("listening", flush=True)
def echo(c):
    with c:
        while d := c.recv(65536):
            c.sendall(d)
while True:
    c, _ = s.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"""


class Gvproxy:
    def __init__(self, proc: subprocess.Popen, d: Path) -> None:
        self.proc, self.dir = proc, d

    @property
    def log(self) -> str:
        p = self.dir / "gvproxy.log"
        return p.read_text() if p.exists() else ""


@pytest.fixture
def gvproxy(short_tmp: Path, dns_upstream: DnsUpstream) -> Iterator:
    started: list[subprocess.Popen] = []

    def start(*flags: str, **popen: object) -> Gvproxy:
        d = short_tmp / f"gv{len(started)}"
        d.mkdir()
        argv = [_bin("netferry-gvproxy"), *flags, "-log-file", str(d / "gvproxy.log"),
                "-dns-upstream", dns_upstream.spec]  # fmt: skip
        popen.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, **popen)  # type: ignore[call-overload]
        STARTED.append(proc)
        started.append(proc)
        g = Gvproxy(proc, d)

        def ready() -> bool:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"netferry-gvproxy exited {proc.returncode}: {err}\n{g.log}")
            return "hostd.ready" in g.log

        wait_for(ready, 15, "netferry-gvproxy to listen")
        return g

    try:
        yield start
    finally:
        for p in started:
            stop_process(p)


@pytest.mark.parametrize(
    "flag, scheme",
    [("-listen-qemu", "unix"), ("-listen-bess", "unixpacket"), ("-listen-vfkit", "unixgram")],
)
def test_link_listener_lease_fetch_and_pid_file(
    gvproxy, guest, short_tmp: Path, http_server: HttpServer, flag: str, scheme: str
) -> None:
    sock, pid_file = short_tmp / "link.sock", short_tmp / "gvproxy.pid"
    g = gvproxy(flag, f"{scheme}://{sock}", "-ssh-port", "-1", "-pid-file", str(pid_file),
                "-mtu", "0", "-debug")  # fmt: skip
    assert pid_file.read_text().strip() == str(g.proc.pid)
    vm = guest(None, connect=f"{scheme}://{sock}")
    assert vm.addr() == "192.168.127.2/24"
    r = vm.ns.run("curl", "-s", "-m", "20", f"http://192.168.127.254:{http_server.port}/blob?mib=8",
                  text=False)  # fmt: skip
    want = hashlib.sha256(http_server.blob.path.read_bytes()[: 8 << 20]).hexdigest()
    assert hashlib.sha256(r.stdout).hexdigest() == want
    assert "mtu=1500" in g.log  # -mtu 0 is gvproxy's 1500
    stop_process(g.proc)
    assert g.proc.returncode == 0
    assert not pid_file.exists() and not sock.exists()


# dup2 an fd to 3 and exec the rest (what Rancher Desktop's network-setup does for vm-switch)
MOVE_TO_FD3 = (
    "import os,sys; fd=int(sys.argv[1]); fd != 3 and (os.dup2(fd, 3), os.close(fd)); "
    "os.execvp(sys.argv[2], sys.argv[2:])"
)


def test_listen_stdio(gvproxy, netns, short_tmp: Path, http_server: HttpServer) -> None:
    """-listen-stdio: frames on netferry-gvproxy's stdin/stdout (2-byte LE), here one end of
    a socket pair whose other end is vm-switch's inherited fd 3 (`-vsock-fd 3`)."""
    ours, theirs = socket.socketpair()
    try:
        g = gvproxy("-listen-stdio", "yes", "-ssh-port", "-1", stdin=theirs, stdout=theirs)
    finally:
        theirs.close()
    ns = netns()
    log = short_tmp / "vm-switch.log"
    try:
        fd = ours.fileno()
        vm = subprocess.Popen(
            [sys.executable, "-c", MOVE_TO_FD3, str(fd), *ns.cmd(_bin("vm-switch"), "-vsock-fd",
             "3", "-logfile", str(log))], pass_fds=[fd], stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        ours.close()
    STARTED.append(vm)
    try:

        def leased() -> bool:
            assert vm.poll() is None, log.read_text() if log.exists() else "vm-switch exited"
            out = ns.run("ip", "-4", "-o", "addr", "show", "dev", "eth0", check=False).stdout
            return "192.168.127.2/24" in out

        wait_for(leased, 30, "a lease over stdio", step=0.2)
        r = ns.run("curl", "-s", "-m", "20",
                   f"http://192.168.127.254:{http_server.port}/blob?mib=4", text=False)  # fmt: skip
        want = hashlib.sha256(http_server.blob.path.read_bytes()[: 4 << 20]).hexdigest()
        assert hashlib.sha256(r.stdout).hexdigest() == want
    finally:
        stop_process(vm)
        stop_process(g.proc)


def test_ssh_port_forwards_to_the_guest_port_22(gvproxy, guest, short_tmp: Path) -> None:
    sock, port = short_tmp / "qemu.sock", free_tcp_port()
    gp = gvproxy("-listen-qemu", f"unix://{sock}", f"-ssh-port={port}")
    vm = guest(None, connect=f"unix://{sock}")
    server = vm.ns.popen(sys.executable, "-c", ECHO_22, stdout=subprocess.PIPE, text=True)
    STARTED.append(server)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        data = os.urandom(2 << 20)
        got = hashlib.sha256()
        with socket.create_connection(("127.0.0.1", port), timeout=20) as c:

            def send() -> None:
                c.sendall(data)
                c.shutdown(socket.SHUT_WR)

            t = threading.Thread(target=send)
            t.start()
            while chunk := c.recv(1 << 16):
                got.update(chunk)
            t.join()
        assert got.hexdigest() == hashlib.sha256(data).hexdigest(), gp.log + vm.log_text()
    finally:
        stop_process(server)


def test_unsupported_flag_exits_2_naming_it() -> None:
    r = subprocess.run([_bin("netferry-gvproxy"), "-listen-qemu", "unix:///nonexistent/q.sock",
                        "-forward-sock", "/tmp/x.sock"], capture_output=True, text=True,
                       timeout=30)  # fmt: skip
    assert r.returncode == 2 and "-forward-sock: not supported" in r.stderr


def curl_unix(sock: Path, path: str, data: str | None = None) -> tuple[int, str]:
    cmd = ["curl", "-s", "-m", "10", "-o", "-", "-w", "\n%{http_code}", "--unix-socket",
           str(sock), f"http://localhost{path}"]  # fmt: skip
    if data is not None:
        cmd += ["-X", "POST", "-d", data]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    body, _, code = r.stdout.rpartition("\n")
    return int(code), body


def test_listen_and_services_serve_the_http_api(gvproxy, guest, short_tmp: Path) -> None:
    """-listen and -services become host-switch's --http-api (the latter without /connect);
    a forward exposed through the API carries 4 MiB sha256-exact to a guest server."""
    qemu, api, services = short_tmp / "q.sock", short_tmp / "n.sock", short_tmp / "s.sock"
    ssh_port, port = free_tcp_port(), free_tcp_port()
    gvproxy("-listen", f"unix://{api}", "-listen-qemu", f"unix://{qemu}",
            "-services", f"unix://{services}", "-ssh-port", str(ssh_port))  # fmt: skip
    vm = guest(None, connect=f"unix://{qemu}")
    listed = f'[{{"local":"127.0.0.1:{ssh_port}","remote":"192.168.127.2:22","protocol":"tcp"}}]'
    assert curl_unix(api, "/services/forwarder/all") == (200, listed + "\n")  # JSON + newline
    code, _ = curl_unix(services, "/services/forwarder/expose",
                        f'{{"local":"127.0.0.1:{port}","remote":"192.168.127.2:22"}}')  # fmt: skip
    assert code == 200
    assert curl_unix(services, "/connect", "")[0] == 404  # -services: no /connect
    server = vm.ns.popen(sys.executable, "-c", ECHO_22, stdout=subprocess.PIPE, text=True)
    STARTED.append(server)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        data = os.urandom(4 << 20)
        got = hashlib.sha256()
        with socket.create_connection(("127.0.0.1", port), timeout=20) as c:
            t = threading.Thread(target=lambda: (c.sendall(data), c.shutdown(socket.SHUT_WR)))
            t.start()
            while chunk := c.recv(1 << 16):
                got.update(chunk)
            t.join()
        assert got.hexdigest() == hashlib.sha256(data).hexdigest()
    finally:
        stop_process(server)


def test_readme_commands_against_netferry_gvproxy(gvproxy, guest, short_tmp: Path) -> None:
    """Issue 11 acceptance 1: `netferry-gvproxy -debug -listen unix://.../network.sock
    -listen-qemu unix://.../qemu.sock`, then gvisor-tap-vsock's README curl lines (only the
    socket path and the port changed): gvproxy's statuses and bodies; the forward made that
    way carries 8 MiB sha256-exact to a guest server."""
    from tests.e2e.test_api import http_in_guest
    from tests.e2e.test_gvproxy_api import GVPROXY_STATS_KEYS, assert_error, curl

    net, qemu = str(short_tmp / "network.sock"), str(short_tmp / "qemu.sock")
    gvproxy("-debug", "-listen", f"unix://{net}", "-listen-qemu", f"unix://{qemu}")
    vm = guest(None, connect=f"unix://{qemu}")
    www = short_tmp / "www"
    www.mkdir()
    blob = os.urandom(8 << 20)
    (www / "blob").write_bytes(blob)
    port = free_tcp_port()
    server = http_in_guest(vm, str(www), port)
    try:
        status, _, body = curl("http:/unix/stats", sock=net)
        assert status == 200 and GVPROXY_STATS_KEYS <= set(json.loads(body))
        expose = f'{{"local":":{port}","remote":"192.168.127.2:{port}"}}'
        assert curl("http:/unix/services/forwarder/expose", "-X", "POST", "-d", expose,
                    sock=net)[::2] == (200, b"")  # fmt: skip
        status, _, body = curl("http:/unix/services/forwarder/all", sock=net)
        assert status == 200
        # sorted by local, as gvproxy sorts: "1" before ":"
        assert (
            body
            == (
                '[{"local":"127.0.0.1:2222","remote":"192.168.127.2:22","protocol":"tcp"},'
                f'{{"local":":{port}","remote":"192.168.127.2:{port}","protocol":"tcp"}}]\n'
            ).encode()
        )
        r = subprocess.run(["curl", "-sS", "--max-time", "60", f"http://127.0.0.1:{port}/blob"],
                           capture_output=True, timeout=90)  # fmt: skip
        assert hashlib.sha256(r.stdout).digest() == hashlib.sha256(blob).digest(), r.stderr
        unexpose = f'{{"local":":{port}"}}'
        assert curl("http:/unix/services/forwarder/unexpose", "-X", "POST", "-d", unexpose,
                    sock=net)[::2] == (200, b"")  # fmt: skip
        assert_error(curl("http:/unix/services/forwarder/unexpose", "-X", "POST", "-d", unexpose,
                          sock=net), 500, "proxy not found")  # fmt: skip
    finally:
        stop_process(server)


def test_gvforwarder_guest_through_listen_alone(gvproxy, netns, short_tmp, http_server) -> None:
    """Issue 11 acceptance 2 with gvproxy's own shape: only `-listen` (the guest's link is
    its `POST /connect`), a gvforwarder-wire guest with udhcpc gets .2 and fetches via .254."""
    net = str(short_tmp / "network.sock")
    g = gvproxy("-listen", f"unix://{net}", "-ssh-port", "-1")
    ns = netns()
    ns.run("ip", "tuntap", "add", "tap0", "mode", "tap")
    ns.run("ip", "link", "set", "tap0", "address", "5a:94:ef:e4:0c:ee", "up")
    here = Path(__file__).parent
    peer = ns.popen(sys.executable, str(here / "gvforwarder_peer.py"), net, "tap0",
                    stdout=subprocess.PIPE, text=True)  # fmt: skip
    STARTED.append(peer)
    try:
        assert peer.stdout is not None and peer.stdout.readline().strip() == "connected"
        script = here.parents[1] / "guestd" / "udhcpc.script"
        lease = ns.run("udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "2", "-i", "tap0", "-s",
                       str(script), timeout=60)  # fmt: skip
        assert "NETFERRY-LEASE ip=192.168.127.2 " in lease.stdout, lease.stdout + g.log
        r = ns.run("sh", "-c", f"curl -sS --max-time 60 http://192.168.127.254:{http_server.port}"
                   "/blob?mib=8 | sha256sum", timeout=90)  # fmt: skip
        want = hashlib.sha256(http_server.blob.path.read_bytes()[: 8 << 20]).hexdigest()
        assert r.stdout.split()[0] == want
    finally:
        stop_process(peer)


def test_listen_tcp_serves_without_a_token_and_warns(gvproxy) -> None:
    """gvproxy's `-listen tcp://` has no authentication and its clients send none: the
    drop-in answers them too (host-switch alone would refuse a TCP API without a token) and
    says so in its log."""
    port = free_tcp_port()
    g = gvproxy("-listen", f"tcp://127.0.0.1:{port}", "-ssh-port", "-1")
    r = subprocess.run(["curl", "-sS", "--max-time", "10",
                        f"http://127.0.0.1:{port}/services/forwarder/all"],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.stdout == "[]\n", r.stderr
    assert "api.tcp_without_token" in g.log
