"""The guest side end to end: network-setup, vm-switch, wsl-proxy and the agent, with hostd.

Stand-ins: the "WSL default namespace" is netns A (from the `netns` fixture); the "host" is
the root namespace, where hostd runs; the guest's isolated namespace B is made by
network-setup. Handshake and data go over unix sockets instead of vsock (nothing here dials
AF_VSOCK). Every namespace, veth, nft table, process and socket file is removed afterwards,
also on failure (the finalizer falls back to deleting B and killing what is in it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from netferry.v1 import guest_pb2 as gpb
from netferry.v1 import guest_pb2_grpc as gpb_grpc
from netferry.v1 import proxy_pb2 as ppb
from netferry.v1 import proxy_pb2_grpc as ppb_grpc
from tests.conftest import (
    NS_PREFIX,
    STARTED,
    Hostd,
    HttpServer,
    Netns,
    _bin,
    kill_netns_processes,
    list_netns,
    stop_process,
    wait_for,
)

pytestmark = pytest.mark.e2e

# A UDP echo and a tiny HTTP server, run inside B bound to 127.0.0.1 only.
SERVERS = r"""
import socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
tcp_port, udp_port = int(sys.argv[1]), int(sys.argv[2])
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        body = b"hello from B"
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", udp_port))
def echo():
    while True:
        d, a = u.recvfrom(65535); u.sendto(b"echo:" + d, a)
threading.Thread(target=echo, daemon=True).start()
s = ThreadingHTTPServer(("127.0.0.1", tcp_port), H)
print("serving", flush=True)
s.serve_forever()
"""


def free_port_pair() -> int:
    """A port free for TCP and UDP on the host's loopback."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        try:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                s = socket.socket(socket.AF_INET, kind)
                try:
                    s.bind(("127.0.0.1", port))
                finally:
                    s.close()
        except OSError:
            continue
        return port
    pytest.fail("no free port")


def udp_roundtrip(port: int, payload: bytes, timeout: float = 2.0) -> bytes | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(payload, ("127.0.0.1", port))
        return s.recvfrom(65535)[0]
    except OSError:
        return None
    finally:
        s.close()


UDP_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
s.sendto(sys.argv[2].encode(), ("127.0.0.1", int(sys.argv[1])))
try:
    print(s.recvfrom(65535)[0].decode())
except OSError as e:
    print("ERR", e); sys.exit(1)
"""


@dataclass
class Agent:
    proc: subprocess.Popen
    records: list[dict] = field(default_factory=list)

    def start_reader(self) -> None:
        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                with contextlib.suppress(ValueError):
                    self.records.append(json.loads(line))

        threading.Thread(target=read, daemon=True).start()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def answer(self, sink: str, op: str, mapping: str, since: int = 0, timeout: float = 15):
        def found():
            for r in self.records[since:]:
                if (r.get("sink"), r.get("op"), r.get("mapping")) == (sink, op, mapping):
                    return r
            return None

        return wait_for(found, timeout, f"{sink} answer to {op} {mapping}: {self.records}")


@dataclass
class Stack:
    a: Netns
    b: str
    dir: Path
    hostd: Hostd
    setup: subprocess.Popen
    proxy: subprocess.Popen
    guest_sock: Path
    proxy_sock: Path
    pid_file: Path
    setup_log: Path
    agents: list[Agent] = field(default_factory=list)

    def init_pid(self) -> int:
        return int(self.pid_file.read_text())

    def in_b(self, *cmd: str) -> list[str]:
        return ["nsenter", "-t", str(self.init_pid()), "-n", "-p", "-m", *cmd]

    def status(self) -> gpb.StatusResponse:
        with grpc.insecure_channel(f"unix:{self.guest_sock}") as ch:
            return gpb_grpc.GuestStub(ch).Status(gpb.StatusRequest(), timeout=5)

    def child_pid(self, name: str) -> int:
        return next(c.pid for c in self.status().children if c.name == name)

    def eth0_addr(self) -> str | None:
        out = subprocess.run(["ip", "-n", self.b, "-4", "-o", "addr", "show", "dev", "eth0"],
                             capture_output=True, text=True).stdout  # fmt: skip
        return out.split("inet ")[1].split("/")[0] if "inet " in out else None

    def wait_leased(self, timeout: float = 30) -> None:
        def ok() -> bool:
            if self.setup.poll() is not None:
                pytest.fail(f"network-setup exited {self.setup.returncode}:\n{self.log()}")
            return self.status().data_link_up and self.eth0_addr() == "192.168.127.2"

        wait_for(ok, timeout, f"B ({self.b}) to get its lease", step=0.2)

    def log(self) -> str:
        return self.setup_log.read_text() if self.setup_log.exists() else ""

    def agent(self) -> Agent:
        args = [_bin("netferry"), "agent", "--api", self.hostd.api,
                "--wsl-proxy", f"unix://{self.proxy_sock}", "--agent-name", "test"]  # fmt: skip
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        STARTED.append(proc)
        ag = Agent(proc)
        ag.start_reader()
        self.agents.append(ag)
        return ag

    def curl(self, where: list[str], port: int) -> subprocess.CompletedProcess:
        return subprocess.run([*where, "curl", "-s", "-m", "5", f"http://127.0.0.1:{port}/"],
                              capture_output=True, text=True, timeout=20)  # fmt: skip


@pytest.fixture
def stack(netns, hostd, short_tmp: Path) -> Iterator[Callable[..., Stack]]:
    made: list[Stack] = []

    def start(
        init: str = "exec sleep infinity",
        start_hostd: bool = True,
        rd_argv: bool = False,
        setup_extra: tuple[str, ...] = (),
    ) -> Stack:
        a = netns()
        b = f"{NS_PREFIX}b-{os.urandom(2).hex()}"
        d = short_tmp
        guest_sock, proxy_sock = d / "guest.sock", d / "wslp.sock"
        pid_file, setup_log = d / "init.pid", d / "network-setup.log"
        script = f"echo $$ > {d}/init-saw-pid; {init}"
        # Where the test runs things: its own socket, namespace and pid file (Rancher
        # Desktop's defaults, /run/... and "netferry", are the machine's).
        isolation = ["--listen", f"unix://{guest_sock}", "--namespace", b,
                     "--pid-file", str(pid_file), "--stop-timeout", "2"]  # fmt: skip
        if rd_argv:
            # Rancher Desktop's wsl-init, verbatim in form: `network-setup --logfile F
            # --vm-switch-path P --vm-switch-logfile F2 -debug --unshare-arg "${0}"`, where
            # the unshare argument is the init script itself.
            init_script = d / "wsl-init"
            init_script.write_text(f"#!/bin/sh\n{script}\n")
            init_script.chmod(0o755)
            setup_argv = [_bin("network-setup"), "--logfile", str(setup_log),
                          "--vm-switch-path", _bin("vm-switch"),
                          "--vm-switch-logfile", str(d / "vm-switch.log"), "-debug",
                          "--unshare-arg", str(init_script), *setup_extra, *isolation]  # fmt: skip
            # `wsl-proxy -debug=false -logfile=F` (+ -socketFile, as Rancher Desktop's
            # in-tree flag names it)
            proxy_argv = [_bin("wsl-proxy"), "-debug=false", f"-logfile={d / 'wsl-proxy.log'}",
                          f"-socketFile={proxy_sock}"]  # fmt: skip
        else:
            setup_argv = [_bin("network-setup"), *isolation, "--vm-switch-log-file",
                          str(d / "vm-switch.log"), "--log-format", "json", "--log-file",
                          str(setup_log), *setup_extra, "--", "sh", "-c", script]  # fmt: skip
            proxy_argv = [_bin("wsl-proxy"), "--socket", str(proxy_sock), "--log-format", "json",
                          "--log-file", str(d / "wsl-proxy.log")]  # fmt: skip
        # nsenter --net (not `ip netns exec`) keeps the root mount namespace, so B's
        # /run/netns entry is visible to the test (and `ip netns list`).
        setup = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{a.name}", *setup_argv], stdin=subprocess.DEVNULL
        )
        STARTED.append(setup)
        proxy = subprocess.Popen(a.cmd(*proxy_argv), stdin=subprocess.DEVNULL)
        STARTED.append(proxy)
        wait_for(lambda: guest_sock.exists() and proxy_sock.exists(), 15, "guest and proxy sockets")
        h = hostd("--guest", f"unix://{guest_sock}") if start_hostd else None
        st = Stack(a, b, d, h, setup, proxy, guest_sock, proxy_sock, pid_file, setup_log)  # type: ignore[arg-type]
        made.append(st)
        return st

    try:
        yield start
    finally:
        for st in made:
            for ag in st.agents:
                if ag.proc.stdin:
                    with contextlib.suppress(OSError):
                        ag.proc.stdin.close()
                stop_process(ag.proc)
            stop_process(st.proxy)
            stop_process(st.setup, timeout=20)
            if st.b in list_netns():  # network-setup failed to clean up: do it, then fail
                kill_netns_processes(st.b)
                subprocess.run(["ip", "netns", "del", st.b], check=False)


def test_handshake_makes_namespace_with_lease_and_init(stack, http_server: HttpServer) -> None:
    """Acceptance 1: the handshake builds B with vm-switch and a lease; init is pid 1 and
    reaches the host's loopback through .254."""
    st = stack()
    st.wait_leased()
    s = st.status()
    assert s.handshakes == 1 and s.namespace == st.b and s.data_address == st.hostd.link_uri
    assert (st.dir / "init-saw-pid").read_text().strip() == "1"
    assert st.init_pid() == s.init_pid
    # the veth pair, both ends
    inside = subprocess.run(["ip", "-n", st.b, "-4", "-o", "addr", "show", "veth-rd-ns"],
                            capture_output=True, text=True).stdout  # fmt: skip
    outside = st.a.run("ip", "-4", "-o", "addr", "show", "veth-rd-wsl").stdout
    assert "192.168.143.1/24" in inside and "192.168.143.2/24" in outside
    tables = subprocess.run(["ip", "netns", "exec", st.b, "nft", "list", "tables"],
                            capture_output=True, text=True).stdout  # fmt: skip
    assert "table ip netferry" in tables
    r = subprocess.run(
        st.in_b("sh", "-c", f"echo $$; curl -s -m 10 http://192.168.127.254:{http_server.port}"
                "/blob?mib=1 | wc -c"),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    pid, size = r.stdout.split()
    assert int(size) == 1 << 20, r.stderr
    assert int(pid) > 1  # a process of B's own pid namespace
    # ping from A over the veth reaches B
    st.a.run("ping", "-c", "1", "-W", "2", "192.168.143.1")


def start_servers(st: Stack, tcp_port: int, udp_port: int) -> subprocess.Popen:
    p = subprocess.Popen(st.in_b("python3", "-c", SERVERS, str(tcp_port), str(udp_port)),
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    STARTED.append(p)
    assert p.stdout is not None and p.stdout.readline().strip() == "serving"
    return p


def test_mappings_reach_b_from_a_and_host(stack) -> None:
    """Acceptance 2 and 3: TCP and UDP mappings work from A (wsl-proxy) and from the host
    (Expose); removal closes both; a port in use in A is refused and the stream goes on."""
    st = stack()
    st.wait_leased()
    port = free_port_pair()
    servers = start_servers(st, port, port)
    try:
        ag = st.agent()
        ag.send(f"add tcp 127.0.0.1 {port}")
        ag.send(json.dumps({"action": "add", "protocol": "udp", "host_ip": "127.0.0.1",
                            "port": port}))  # fmt: skip
        for sink in ("wsl-proxy", "hostd"):
            for proto in ("tcp", "udp"):
                assert ag.answer(sink, "add", f"{proto} 127.0.0.1:{port}")["ok"]
        # TCP: from A through wsl-proxy and the veth; from the host through hostd
        r = st.curl(st.a.cmd(), port)
        assert r.stdout == "hello from B", r
        r = st.curl([], port)
        assert r.stdout == "hello from B", r
        # UDP both ways: the request reaches B and the echo comes back, from A and the host
        out = st.a.python(UDP_CLIENT, str(port), "from-A").stdout.strip()
        assert out == "echo:from-A"
        assert udp_roundtrip(port, b"from-host") == b"echo:from-host"
        # wsl-proxy's own view
        with grpc.insecure_channel(f"unix:{st.proxy_sock}") as ch:
            listed = ppb_grpc.PortProxyStub(ch).ListMappings(ppb.ListMappingsRequest(), timeout=5)
        assert {(m.mapping.protocol, m.mapping.port, m.agent) for m in listed.mappings} == {
            (ppb.MAPPING_PROTOCOL_TCP, port, "test"),
            (ppb.MAPPING_PROTOCOL_UDP, port, "test"),
        }
        # Acceptance 3: a port in use in A → the error, and the stream still works
        busy = free_port_pair()
        holder = st.a.popen("python3", "-c",
                            "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',"
                            f"{busy})); s.listen(); print('held',flush=True); time.sleep(600)",
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
        STARTED.append(holder)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            n = len(ag.records)
            ag.send(f"add tcp 127.0.0.1 {busy}")
            refused = ag.answer("wsl-proxy", "add", f"tcp 127.0.0.1:{busy}", since=n)
            assert not refused["ok"] and refused["error"] == "ADDRESS_IN_USE", refused
            assert "port in use" in refused["message"]
            # removal closes both sides
            n = len(ag.records)
            ag.send(f"remove tcp 127.0.0.1 {port}")
            assert ag.answer("wsl-proxy", "remove", f"tcp 127.0.0.1:{port}", since=n)["ok"]
            assert ag.answer("hostd", "remove", f"tcp 127.0.0.1:{port}", since=n)["ok"]
            assert st.curl(st.a.cmd(), port).returncode != 0
            assert st.curl([], port).returncode != 0
            # the same stream is still usable
            n = len(ag.records)
            ag.send(f"add tcp 127.0.0.1 {port}")
            assert ag.answer("wsl-proxy", "add", f"tcp 127.0.0.1:{port}", since=n)["ok"]
            assert st.curl(st.a.cmd(), port).stdout == "hello from B"
        finally:
            stop_process(holder)
    finally:
        stop_process(servers)


def test_bad_address_and_direct_stream(stack) -> None:
    """wsl-proxy's stream, driven directly: precise errors, and the stream survives them."""
    st = stack(start_hostd=False)
    reqs = [
        ppb.StreamMappingsRequest(id=1, hello=ppb.Hello(agent="direct")),
        ppb.StreamMappingsRequest(id=2, add=ppb.Mapping(protocol=ppb.MAPPING_PROTOCOL_TCP,
                                                        host_ip="10.9.9.9", port=4000)),
        ppb.StreamMappingsRequest(id=3, add=ppb.Mapping(protocol=ppb.MAPPING_PROTOCOL_TCP,
                                                        host_ip="nonsense", port=4000)),
        ppb.StreamMappingsRequest(id=4, remove=ppb.Mapping(protocol=ppb.MAPPING_PROTOCOL_UDP,
                                                           port=4000)),
        ppb.StreamMappingsRequest(id=5, add=ppb.Mapping(protocol=ppb.MAPPING_PROTOCOL_UDP,
                                                        port=0)),
        ppb.StreamMappingsRequest(id=6, add=ppb.Mapping(protocol=ppb.MAPPING_PROTOCOL_UDP,
                                                        port=4000)),
    ]  # fmt: skip
    with grpc.insecure_channel(f"unix:{st.proxy_sock}") as ch:
        answers = list(ppb_grpc.PortProxyStub(ch).StreamMappings(iter(reqs), timeout=10))
    got = {a.id: (a.status, a.error) for a in answers}
    assert got == {
        1: (ppb.MAPPING_STATUS_OK, ppb.MAPPING_ERROR_UNSPECIFIED),
        2: (ppb.MAPPING_STATUS_ERROR, ppb.MAPPING_ERROR_BAD_ADDRESS),
        3: (ppb.MAPPING_STATUS_ERROR, ppb.MAPPING_ERROR_BAD_ADDRESS),
        4: (ppb.MAPPING_STATUS_ERROR, ppb.MAPPING_ERROR_NOT_FOUND),
        5: (ppb.MAPPING_STATUS_ERROR, ppb.MAPPING_ERROR_INVALID_ARGUMENT),
        6: (ppb.MAPPING_STATUS_APPLIED, ppb.MAPPING_ERROR_UNSPECIFIED),
    }
    # the stream ended; the mapping stays (the disconnected-agent rule) until a resync
    resync = [
        ppb.StreamMappingsRequest(id=1, hello=ppb.Hello(agent="direct", resync=True)),
        ppb.StreamMappingsRequest(id=2, sync_done=ppb.SyncDone()),
    ]
    with grpc.insecure_channel(f"unix:{st.proxy_sock}") as ch:
        stub = ppb_grpc.PortProxyStub(ch)
        assert [m.mapping.port for m in stub.ListMappings(ppb.ListMappingsRequest()).mappings] == [
            4000
        ]
        done = list(stub.StreamMappings(iter(resync), timeout=10))[-1]
        assert [m.port for m in done.swept] == [4000]
        assert not stub.ListMappings(ppb.ListMappingsRequest()).mappings


def test_hostd_restart_and_vm_switch_kill(stack, hostd, http_server: HttpServer) -> None:
    """Acceptance 4: a new hostd re-handshakes, traffic resumes, init is the same process;
    a killed vm-switch is replaced with a fresh data connection."""
    st = stack()
    st.wait_leased()
    init_pid = st.init_pid()
    port = free_port_pair()
    servers = start_servers(st, port, port)
    try:
        ag = st.agent()
        ag.send(f"add tcp 127.0.0.1 {port}")
        assert ag.answer("hostd", "add", f"tcp 127.0.0.1:{port}")["ok"]
        assert st.curl([], port).stdout == "hello from B"
        # kill hostd outright and start another (a new data socket path)
        st.hostd.proc.kill()
        st.hostd.proc.wait()
        t0 = time.monotonic()
        # the same API socket (the agent's target), a new data socket (so the guest must
        # be told: the re-handshake carries it)
        h2 = hostd("--guest", f"unix://{st.guest_sock}", "--api", st.hostd.api, name="hostd2")
        wait_for(lambda: st.status().data_address == h2.link_uri, 20, "the re-handshake")
        st.wait_leased()
        took = time.monotonic() - t0
        assert st.init_pid() == init_pid and os.path.exists(f"/proc/{init_pid}")
        assert st.status().handshakes == 2
        r = subprocess.run(st.in_b("curl", "-s", "-m", "10",
                                   f"http://192.168.127.254:{http_server.port}/blob?mib=1"),
                           capture_output=True, timeout=30)  # fmt: skip
        assert len(r.stdout) == 1 << 20
        # the agent saw hostd go and exposed its mapping on the new one
        wait_for(lambda: st.curl([], port).stdout == "hello from B", 20, "the forward again")
        print(f"re-handshake to lease: {took:.1f}s")
        # kill vm-switch: network-setup redials the data address and starts another
        old = st.child_pid("vm-switch")
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: st.child_pid("vm-switch") not in (0, old), 20, "a new vm-switch")
        st.wait_leased()
        assert st.init_pid() == init_pid
        wait_for(lambda: st.curl([], port).stdout == "hello from B", 20, "traffic after redial")
        assert st.curl(st.a.cmd(), port).stdout == "hello from B"
    finally:
        stop_process(servers)


def test_sigterm_leaves_nothing(stack) -> None:
    """Acceptance 5: SIGTERM removes the namespace, the veth, the nft table (with B), the
    children, the pid file and the socket."""
    st = stack(init="trap 'exit 0' TERM; while :; do sleep 0.2; done")
    st.wait_leased()
    s = st.status()
    pids = [c.pid for c in s.children] + [s.init_pid]
    assert all(pids)
    st.setup.send_signal(signal.SIGTERM)
    assert st.setup.wait(20) == 0
    assert st.b not in list_netns()
    assert "veth-rd-wsl" not in st.a.run("ip", "link").stdout
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} survived"
    assert not st.pid_file.exists() and not st.guest_sock.exists()
    # nothing of B is left anywhere: no process has B's network namespace any more
    assert "veth-rd-ns" not in subprocess.run(["ip", "-o", "link"], capture_output=True,
                                              text=True).stdout  # fmt: skip


def test_version_mismatch_is_refused(stack) -> None:
    """Acceptance 6: FAILED_PRECONDITION naming both versions; nothing is set up."""
    st = stack(start_hostd=False)
    req = gpb.HandshakeRequest(host_id="test/1", host_version="9.9.9", protocol_version=99,
                               data_address="unix:///nonexistent.sock", session="s")  # fmt: skip
    with grpc.insecure_channel(f"unix:{st.guest_sock}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            gpb_grpc.GuestStub(ch).Handshake(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    msg = e.value.details()
    assert "protocol 99" in msg and "9.9.9" in msg and "protocol 1" in msg and "0.1.0" in msg
    assert st.b not in list_netns()
    assert st.status().handshakes == 0
    # and a data address that cannot be dialled is UNAVAILABLE naming it
    req.protocol_version = 1
    with grpc.insecure_channel(f"unix:{st.guest_sock}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            gpb_grpc.GuestStub(ch).Handshake(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "/nonexistent.sock" in e.value.details()


def test_rancher_desktop_argv(stack, http_server: HttpServer) -> None:
    """Acceptance 5 (issue 11): network-setup and wsl-proxy started with Rancher Desktop's
    argument forms; the handshake, lease, init and the mappings work as with ours, and
    wsl-proxy serves a mapping sent as Rancher Desktop's JSON PortMapping."""
    st = stack(rd_argv=True, setup_extra=("-subnet", "192.168.127.0/24"))
    st.wait_leased()
    assert (st.dir / "init-saw-pid").read_text().strip() == "1"
    assert st.init_pid() == st.status().init_pid
    # the logs went to the -logfile/--vm-switch-logfile paths, at debug level
    assert "handshake.done" in st.log()
    assert (st.dir / "vm-switch.log").read_text().count("dhcp.bound") >= 1
    r = subprocess.run(st.in_b("curl", "-s", "-m", "10",
                               f"http://192.168.127.254:{http_server.port}/blob?mib=1"),
                       capture_output=True, timeout=30)  # fmt: skip
    assert (
        hashlib.sha256(r.stdout).hexdigest()
        == hashlib.sha256(http_server.blob.path.read_bytes()[: 1 << 20]).hexdigest()
    )
    port = free_port_pair()
    servers = start_servers(st, port, port)
    try:
        # the guest agent's JSON, sent from A as Rancher Desktop's agent sends it
        pm = {"remove": False, "ports": {f"{port}/tcp": [{"HostIp": "127.0.0.1",
                                                         "HostPort": str(port)}],
                                         f"{port}/udp": [{"HostIp": "127.0.0.1",
                                                         "HostPort": str(port)}]}}  # fmt: skip
        ack = st.a.python(JSON_CLIENT, str(st.proxy_sock), json.dumps(pm)).stdout
        assert json.loads(ack)["ok"], ack
        assert st.curl(st.a.cmd(), port).stdout == "hello from B"
        assert st.a.python(UDP_CLIENT, str(port), "json").stdout.strip() == "echo:json"
        pm["remove"] = True
        assert json.loads(st.a.python(JSON_CLIENT, str(st.proxy_sock), json.dumps(pm)).stdout)["ok"]
        assert st.curl(st.a.cmd(), port).returncode != 0
        # and the agent's gRPC stream on the same socket path
        ag = st.agent()
        ag.send(f"add tcp 127.0.0.1 {port}")
        assert ag.answer("wsl-proxy", "add", f"tcp 127.0.0.1:{port}")["ok"]
        assert st.curl(st.a.cmd(), port).stdout == "hello from B"
    finally:
        stop_process(servers)


JSON_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
print(s.makefile().readline())
"""


def test_subnet_mismatch_is_refused(stack) -> None:
    """-subnet that is not hostd's: the handshake is refused naming both, nothing is made."""
    st = stack(rd_argv=True, setup_extra=("-subnet", "10.99.0.0/24"))
    wait_for(lambda: "handshake.subnet_mismatch" in st.log(), 20, "the refusal")
    assert "192.168.127.0/24" in st.log() and "10.99.0.0/24" in st.log()
    assert st.status().handshakes == 0 and st.b not in list_netns()
    assert st.setup.poll() is None


# dup2 the connection to fd 3 and exec the rest (dash cannot redirect fds above 9)
MOVE_TO_FD3 = (
    "import os,sys; fd=int(sys.argv[1]); fd != 3 and (os.dup2(fd, 3), os.close(fd)); "
    "os.execvp(sys.argv[2], sys.argv[2:])"
)


def start_rd_vm_switch(
    ns: Netns, link: Path, log: Path, subnet: str, dhcp_script: str = ""
) -> subprocess.Popen:
    """vm-switch exactly as Rancher Desktop's network-setup starts it: the connection as fd 3
    (2-byte little-endian frames), `-tap-interface eth0 -subnet S -tap-mac-address M
    -dhcp-script '' -logfile F -debug`."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(link))
        argv = [_bin("vm-switch"), "-tap-interface", "eth0", "-subnet", subnet,
                "-tap-mac-address", "5a:94:ef:e4:0c:ee", "-dhcp-script", dhcp_script, "-logfile",
                str(log), "-debug"]  # fmt: skip
        fd = conn.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-c", MOVE_TO_FD3, str(fd), *ns.cmd(*argv)],
            pass_fds=[fd], stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        conn.close()
    STARTED.append(proc)
    return proc


# A udhcpc script of the user's own (as -dhcp-script names one): it prints no lease line.
OWN_DHCP_SCRIPT = """#!/bin/sh
case "$1" in
  deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew) ip -4 addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface"
               ip route replace default via "$router" dev "$interface" ;;
esac
"""


@pytest.mark.parametrize("own_script", [False, True], ids=["default-dhcp", "own-dhcp-script"])
def test_vm_switch_rancher_desktop_argv(
    hostd, netns, short_tmp: Path, http_server, own_script: bool
) -> None:
    link = short_tmp / "rd-link.sock"
    port = free_port_pair()
    # host-switch with Rancher Desktop's flags as well (its -port-forward form)
    hostd("--listen", f"unix://{link}?framing=len16le", "-debug", "-subnet", "192.168.127.0/24",
          "-port-forward", f"127.0.0.1:{port}=192.168.127.2:{port}")  # fmt: skip
    ns = netns()
    log = short_tmp / "rd-vm-switch.log"
    script = ""
    if own_script:
        path = short_tmp / "dhcp.script"
        path.write_text(OWN_DHCP_SCRIPT)
        path.chmod(0o755)
        script = str(path)
    proc = start_rd_vm_switch(ns, link, log, "192.168.127.0/24", script)
    try:

        def leased() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"vm-switch exited {proc.returncode}: {log.read_text()}")
            out = ns.run("ip", "-4", "-o", "addr", "show", "dev", "eth0", check=False).stdout
            return "192.168.127.2/24" in out

        wait_for(leased, 30, "the lease", step=0.2)
        want = hashlib.sha256(http_server.blob.path.read_bytes()[: 4 << 20]).hexdigest()
        r = ns.run("curl", "-s", "-m", "20", f"http://192.168.127.254:{http_server.port}/blob?mib=4",
                   text=False)  # fmt: skip
        assert hashlib.sha256(r.stdout).hexdigest() == want
        # -logfile took effect, and the inherited fd 3 was the link, with Rancher Desktop's framing
        text = log.read_text()
        assert "uri='fd://3?framing=len16le'" in text
        assert ("client=udhcpc" in text) == own_script and "dhcp.bound" in text
        # host-switch's -port-forward reaches the guest
        on_all = SERVERS.replace('("127.0.0.1", tcp_port)', '("0.0.0.0", tcp_port)')
        server = ns.popen("python3", "-c", on_all, str(port), str(port), stdout=subprocess.PIPE,
                          text=True)  # fmt: skip
        STARTED.append(server)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "serving"
            wait_for(lambda: subprocess.run(["curl", "-s", "-m", "5", f"http://127.0.0.1:{port}/"],
                                            capture_output=True, text=True).stdout
                     == "hello from B", 20, "the -port-forward")  # fmt: skip
        finally:
            stop_process(server)
    finally:
        stop_process(proc)
    assert proc.returncode == 0


def test_vm_switch_subnet_mismatch_and_missing_fd(hostd, netns, short_tmp: Path) -> None:
    link = short_tmp / "rd-link.sock"
    hostd("--listen", f"unix://{link}?framing=len16le")
    ns = netns()
    log = short_tmp / "rd-vm-switch.log"
    proc = start_rd_vm_switch(ns, link, log, "10.99.0.0/24")
    try:
        assert proc.wait(30) == 1
    finally:
        stop_process(proc)
    text = log.read_text()
    assert "dhcp.subnet_mismatch" in text and "-subnet 10.99.0.0/24 does not match" in text
    assert "eth0" not in ns.run("ip", "link").stdout  # the tap went with vm-switch
    # no --connect, no -vsock-fd and nothing on fd 3: a usage error that says what to give
    r = subprocess.run([_bin("vm-switch"), "-tap-interface", "eth0"], capture_output=True,
                       text=True, timeout=30)  # fmt: skip
    assert r.returncode == 2 and "pass the connection as fd 3" in r.stderr


def test_network_setup_brings_ipv6_up_in_b(stack) -> None:
    """Issue 15: vm-switch under network-setup brings IPv6 up on B's tap: SLAAC (EUI-64 of
    the tap's MAC) and ::2 by DHCPv6 (--dhcpv6), the default route from the RA, the v6 DNS
    server in the resolv.conf beside the v4 one, and B pings the gateway over IPv6."""
    resolv = Path(f"/tmp/nf-v6-resolv-{os.getpid()}.conf")
    try:
        st = stack(setup_extra=("--dhcpv6", "--resolv-conf", str(resolv)))
        st.wait_leased()

        def v6_up() -> bool:
            out = subprocess.run(
                ["ip", "-n", st.b, "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"],
                capture_output=True, text=True,
            ).stdout  # fmt: skip
            return (
                "fd00:192:168:127:5894:efff:fee4:cee/64" in out
                and "fd00:192:168:127::2/128" in out
                and "tentative" not in out
            )

        wait_for(v6_up, 60, "SLAAC and DHCPv6 addresses in B", step=0.2)
        route = subprocess.run(["ip", "-n", st.b, "-6", "route", "show", "default"],
                               capture_output=True, text=True).stdout  # fmt: skip
        assert "default via fe80::" in route and "dev eth0" in route, route
        wait_for(lambda: "fd00:192:168:127::1" in resolv.read_text(), 30, "the v6 DNS server")
        assert "nameserver 192.168.127.1" in resolv.read_text()
        r = subprocess.run(st.in_b("ping", "-6", "-c", "2", "-W", "5", "fd00:192:168:127::1"),
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        resolv.unlink(missing_ok=True)
