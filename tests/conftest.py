"""The test harness: network namespaces, hostd, vm-switch guests and loopback peers.

Everything a fixture creates is removed in its finalizer, which runs whether the test
passed or failed; a session-wide check at the end fails the run if any namespace, tap,
process or socket file of ours is left behind. Every address a test sends to is on
loopback or inside a namespace made here; DNS upstreams are resolvers started here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NS_PREFIX = f"nft{os.getpid() % 100000}-"
PING_RANGE = "/proc/sys/net/ipv4/ping_group_range"
# Every daemon a fixture starts; the session check fails if any is still alive at the end.
STARTED: list[subprocess.Popen] = []


def _bin(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: install the project (pip install -e .) first")
    return str(path)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, step: float = 0.05):
    """Poll until `predicate()` is truthy; fail the test naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- session: privileges, sysctl, leftovers ------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def session_environment() -> Iterator[None]:
    """Ping sockets for hostd's ICMP relay (restored after) and a leftover check at the end."""
    old_range = Path(PING_RANGE).read_text().strip() if os.path.exists(PING_RANGE) else None
    if old_range is not None and os.geteuid() == 0:
        Path(PING_RANGE).write_text("0 2147483647")
    try:
        yield
    finally:
        if old_range is not None and os.geteuid() == 0:
            Path(PING_RANGE).write_text(old_range)
    leftovers = [n for n in list_netns() if n.startswith(NS_PREFIX)]
    procs = [" ".join(map(str, p.args)) for p in STARTED if p.poll() is None]
    if leftovers or procs:
        for n in leftovers:
            subprocess.run(["ip", "netns", "del", n], check=False)
        pytest.fail(f"left behind: namespaces {leftovers}, processes {procs}")


def list_netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path is 108 bytes); removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="nf-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root (network namespaces, tap devices)")


# ---- loopback peers -------------------------------------------------------------------


@dataclass
class DnsUpstream:
    port: int
    records: dict[tuple[str, str], list[str]]
    queries: list[tuple[str, str, str]] = field(default_factory=list)  # name, type, udp|tcp

    @property
    def spec(self) -> str:
        return f"127.0.0.1:{self.port}"


# A TXT answer too big for 512-byte UDP: the upstream sets TC over UDP, answers over TCP.
BIG_TXT_NAME = "big.example.test."
BIG_TXT_STRINGS = [f"chunk-{i:02d}-" + "x" * 200 for i in range(6)]


UPSTREAM_ZONE = [
    ("www.example.test.", "A", "192.0.2.10"),
    ("www.example.test.", "AAAA", "2001:db8::10"),
    ("example.test.", "MX", "10 mail.example.test."),
    ("example.test.", "TXT", '"netferry test record"'),
    ("_http._tcp.example.test.", "SRV", "0 5 8080 www.example.test."),
]


@pytest.fixture
def dns_upstream() -> Iterator[DnsUpstream]:
    """A dnslib resolver on 127.0.0.1 serving a small test zone; NXDOMAIN for the rest."""
    from dnslib import QTYPE, RCODE, RR
    from dnslib.server import BaseResolver, DNSServer

    state = DnsUpstream(0, {})
    rrs = []
    for name, rtype, value in UPSTREAM_ZONE:
        rrs += RR.fromZone(f"{name} 60 IN {rtype} {value}")

    from dnslib import TXT

    big = RR(BIG_TXT_NAME, QTYPE.TXT, rdata=TXT([t.encode() for t in BIG_TXT_STRINGS]), ttl=60)

    class Resolver(BaseResolver):
        def resolve(self, request, handler):
            reply = request.reply()
            q = request.q
            state.queries.append((str(q.qname), QTYPE[q.qtype], handler.protocol))
            if q.qname == BIG_TXT_NAME:
                if handler.protocol == "udp":
                    reply.header.tc = 1
                else:
                    reply.add_answer(big)
                return reply
            matches = [rr for rr in rrs if rr.rname == q.qname]
            if not matches:
                reply.header.rcode = RCODE.NXDOMAIN
            for rr in matches:
                if rr.rtype == q.qtype:
                    reply.add_answer(rr)
            return reply

    class Quiet:
        def __getattr__(self, name):
            return lambda *a, **k: None

    for _ in range(20):  # UDP and TCP on one port number: retry if TCP's is taken
        server = DNSServer(Resolver(), port=0, address="127.0.0.1", logger=Quiet())
        state.port = server.server.server_address[1]
        try:
            tcp_server = DNSServer(
                Resolver(), port=state.port, address="127.0.0.1", tcp=True, logger=Quiet()
            )
            break
        except OSError:
            server.server.server_close()
    else:
        pytest.fail("no port free for both UDP and TCP on 127.0.0.1")
    server.start_thread()
    tcp_server.start_thread()
    try:
        yield state
    finally:
        for srv in (server, tcp_server):
            srv.stop()
            srv.server.server_close()


@pytest.fixture
def silent_udp_port() -> Iterator[int]:
    """A bound UDP port on loopback that never answers (a dead DNS upstream)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@contextlib.contextmanager
def serve_udp_echo(host: str = "127.0.0.1", buffers: int = 4 << 20) -> Iterator[int]:
    """A UDP echo server on `host` (IPv4 or IPv6 loopback) in a thread; yields its port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
    s.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                data, addr = s.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            s.sendto(data, addr)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield s.getsockname()[1]
    finally:
        stop.set()
        t.join(2)
        s.close()


@pytest.fixture
def udp_echo_server() -> Iterator[int]:
    """UDP echo on 127.0.0.1; returns the port."""
    with serve_udp_echo() as port:
        yield port


# ---- hostd ------------------------------------------------------------------------------


@dataclass
class Hostd:
    proc: subprocess.Popen
    dir: Path
    link_path: str
    pcap_path: str
    log_path: str
    args: list[str]
    api_path: str = ""
    link_query: str = ""  # "?offload=vnet" when hostd was started with offload

    @property
    def link_uri(self) -> str:
        return f"unix://{self.link_path}{self.link_query}"

    @property
    def api(self) -> str:
        return f"unix://{self.api_path}"

    def client(self):  # type: ignore[no-untyped-def]
        from netferry.client import HostSwitchClient

        return HostSwitchClient(self.api)

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text()
        except FileNotFoundError:
            return ""

    def log_events(self) -> list[dict]:
        events = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def stats(self) -> dict:
        """Ask hostd for its counters (SIGUSR1 logs them) and return the newest dump."""
        before = sum(1 for e in self.log_events() if e.get("event") == "hostd.stats")
        self.proc.send_signal(signal.SIGUSR1)
        wait_for(
            lambda: sum(1 for e in self.log_events() if e.get("event") == "hostd.stats") > before,
            10,
            "hostd to log its stats",
        )
        return [e for e in self.log_events() if e.get("event") == "hostd.stats"][-1]["stats"]

    def stop(self) -> None:
        stop_process(self.proc)

    def restart(self) -> None:
        """Stop hostd and start it again with the same arguments (same socket paths)."""
        self.stop()
        ready_before = self.log_text().count('"hostd.ready"')
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        STARTED.append(self.proc)
        wait_for(
            lambda: self.log_text().count('"hostd.ready"') > ready_before,
            15,
            "host-switch to listen again",
        )


@pytest.fixture
def hostd(short_tmp: Path, dns_upstream: DnsUpstream) -> Iterator[Callable[..., Hostd]]:
    """hostd(*extra_args) starts host-switch on a unix socket in a private directory.

    DNS goes to the test's own loopback resolver unless the test passes --dns-upstream."""
    started: list[Hostd] = []

    def start(
        *extra: str, name: str = "hostd", offload: bool = False, wrapper: tuple[str, ...] = ()
    ) -> Hostd:
        d = short_tmp / name
        d.mkdir()
        link = str(d / "link.sock")
        pcap = str(d / "switch.pcap")
        logf = str(d / "hostd.log")
        query = "?offload=vnet" if offload else ""
        # `wrapper`: a command that execs hostd (e.g. prlimit), so the pid stays hostd's.
        args = [*wrapper, _bin("host-switch"), "--listen", f"unix://{link}{query}"]
        args += ["--pcap", pcap]
        args += ["--log-format", "json", "--log-file", logf]
        api_path = str(d / "api.sock")
        if "--api" not in extra:
            args += ["--api", f"unix://{api_path}"]
        if "--dns-upstream" not in extra:
            args += ["--dns-upstream", dns_upstream.spec]
        if os.environ.get("NETFERRY_TEST_SANDBOX", "1") != "0":
            args += ["--sandbox"]  # every e2e test runs hostd under its seccomp filter
        args += list(extra)
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        STARTED.append(proc)
        h = Hostd(proc, d, link, pcap, logf, args, api_path, query)
        started.append(h)

        def ready() -> bool:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"host-switch exited {proc.returncode}: {err}\n{h.log_text()}")
            return '"hostd.ready"' in h.log_text()

        wait_for(ready, 15, "host-switch to listen")
        return h

    try:
        yield start
    finally:
        for h in started:
            h.stop()


# ---- namespaces and guests -------------------------------------------------------------


@dataclass
class Netns:
    name: str

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str, check: bool = True, timeout: float = 60, **kw):
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        r = subprocess.run(self.cmd(*args), timeout=timeout, check=False, **kw)
        if check and r.returncode != 0:
            pytest.fail(
                f"in {self.name}: {' '.join(args)} exited {r.returncode}\n"
                f"stdout: {r.stdout}\nstderr: {r.stderr}"
            )
        return r

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(*args), **kw)

    def python(self, code: str, *args: str, timeout: float = 120, check: bool = True):
        return self.run(sys.executable, "-c", code, *args, timeout=timeout, check=check)


def kill_netns_processes(name: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@pytest.fixture
def netns() -> Iterator[Callable[[], Netns]]:
    """netns() creates a fresh network namespace; all are deleted (processes killed) after."""
    require_root()
    made: list[str] = []

    def create() -> Netns:
        name = f"{NS_PREFIX}{len(made)}-{os.urandom(2).hex()}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(name)
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        return Netns(name)

    try:
        yield create
    finally:
        for name in made:
            kill_netns_processes(name)
            subprocess.run(["ip", "netns", "del", name], check=False)


@dataclass
class Guest:
    ns: Netns
    proc: subprocess.Popen
    log_path: Path
    resolv_conf: Path
    mac: str

    def addr(self) -> str | None:
        out = self.ns.run("ip", "-4", "-o", "addr", "show", "dev", "eth0", check=False).stdout
        for word_list in (line.split() for line in out.splitlines()):
            if "inet" in word_list:
                return word_list[word_list.index("inet") + 1]
        return None

    @property
    def ip(self) -> str:
        a = self.addr()
        assert a, "guest has no address"
        return a.split("/")[0]

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


@pytest.fixture
def guest(netns, short_tmp: Path) -> Iterator[Callable[..., Guest]]:
    """guest(hostd, mac=..., dhcp_client=..., mtu=...) puts vm-switch in a new namespace and
    waits for its DHCP lease."""
    guests: list[Guest] = []

    def start(
        h: Hostd,
        mac: str = "5a:94:ef:e4:0c:ee",
        dhcp_client: str = "udhcpc",
        mtu: int | None = None,
        wait_lease: bool = True,
        connect: str | None = None,
    ) -> Guest:
        ns = netns()
        n = len(guests)
        log_path = short_tmp / f"vm-switch-{n}.log"
        resolv = short_tmp / f"resolv-{n}.conf"
        args = [_bin("vm-switch"), "--connect", connect or h.link_uri, "--tap-mac-address", mac]
        args += ["--dhcp-client", dhcp_client, "--resolv-conf", str(resolv)]
        args += ["--log-format", "json", "--log-file", str(log_path)]
        if mtu:
            args += ["--mtu", str(mtu)]
        proc = ns.popen(*args, stdin=subprocess.DEVNULL)
        STARTED.append(proc)
        g = Guest(ns, proc, log_path, resolv, mac)
        guests.append(g)
        if wait_lease:

            def leased() -> bool:
                if proc.poll() is not None:
                    pytest.fail(f"vm-switch exited {proc.returncode}:\n{g.log_text()}")
                return g.addr() is not None and "dhcp.bound" in g.log_text()

            wait_for(leased, 30, f"a DHCP lease in {ns.name}", step=0.2)
        return g

    try:
        yield start
    finally:
        for g in guests:
            stop_process(g.proc)


# ---- TCP peers on host loopback -------------------------------------------------------


@dataclass
class Blob:
    path: Path
    size: int
    sha256: str


@pytest.fixture(scope="session")
def big_blob() -> Iterator[Blob]:
    """256 MiB of random bytes in a file (made once per session, removed after)."""
    import hashlib

    d = Path(tempfile.mkdtemp(prefix="nf-blob-"))
    path = d / "blob"
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(256):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
    try:
        yield Blob(path, 256 << 20, h.hexdigest())
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class HttpServer:
    port: int
    blob: Blob
    uploads: list[tuple[int, str]]  # (size, sha256) of every upload received


@contextlib.contextmanager
def serve_blob(big_blob: Blob, host: str = "127.0.0.1") -> Iterator[HttpServer]:
    """HTTP on `host` (IPv4 or IPv6 loopback): GET /blob sends the 256 MiB blob (or
    /blob?mib=N its first N MiB); PUT /upload answers with the sha256 of the body it got."""
    import hashlib
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlsplit

    uploads: list[tuple[int, str]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            url = urlsplit(self.path)
            if url.path != "/blob":
                self.send_error(404)
                return
            mib = int(parse_qs(url.query).get("mib", ["256"])[0])
            size = min(mib << 20, big_blob.size)
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            with open(big_blob.path, "rb") as f:
                left = size
                while left:
                    chunk = f.read(min(1 << 20, left))
                    self.wfile.write(chunk)
                    left -= len(chunk)

        def do_PUT(self):
            n = int(self.headers["Content-Length"])
            h = hashlib.sha256()
            left = n
            while left:
                chunk = self.rfile.read(min(1 << 20, left))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
            digest = h.hexdigest()
            uploads.append((n - left, digest))
            body = digest.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

    server = Server((host, 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield HttpServer(server.server_address[1], big_blob, uploads)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_server(big_blob: Blob) -> Iterator[HttpServer]:
    """`serve_blob` on 127.0.0.1."""
    with serve_blob(big_blob) as server:
        yield server


@contextlib.contextmanager
def serve_bytes(body: bytes) -> Iterator[int]:
    """HTTP on 127.0.0.1 answering every GET with `body`; yields the port."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def tcp_echo_server() -> Iterator[int]:
    """TCP echo on 127.0.0.1 (a thread per connection; echoes until EOF, then closes)."""
    import socketserver

    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            while data := self.request.recv(65536):
                self.request.sendall(data)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 1024

    server = Server(("127.0.0.1", 0), Echo)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def free_tcp_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
