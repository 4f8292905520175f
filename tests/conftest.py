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
    procs = subprocess.run(
        ["pgrep", "-f", f"{BIN}/(host-switch|vm-switch)"], capture_output=True, text=True
    ).stdout.split()
    procs = [p for p in procs if int(p) != os.getpid()]
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
    queries: list[tuple[str, str]] = field(default_factory=list)

    @property
    def spec(self) -> str:
        return f"127.0.0.1:{self.port}"


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

    class Resolver(BaseResolver):
        def resolve(self, request, handler):
            reply = request.reply()
            q = request.q
            state.queries.append((str(q.qname), QTYPE[q.qtype]))
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

    server = DNSServer(Resolver(), port=0, address="127.0.0.1", logger=Quiet())
    state.port = server.server.server_address[1]
    server.start_thread()
    try:
        yield state
    finally:
        server.stop()
        server.server.server_close()


@pytest.fixture
def silent_udp_port() -> Iterator[int]:
    """A bound UDP port on loopback that never answers (a dead DNS upstream)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.fixture
def udp_echo_server() -> Iterator[int]:
    """UDP echo on 127.0.0.1; returns the port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
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


# ---- hostd ------------------------------------------------------------------------------


@dataclass
class Hostd:
    proc: subprocess.Popen
    dir: Path
    link_path: str
    pcap_path: str
    log_path: str
    args: list[str]

    @property
    def link_uri(self) -> str:
        return f"unix://{self.link_path}"

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


@pytest.fixture
def hostd(short_tmp: Path, dns_upstream: DnsUpstream) -> Iterator[Callable[..., Hostd]]:
    """hostd(*extra_args) starts host-switch on a unix socket in a private directory.

    DNS goes to the test's own loopback resolver unless the test passes --dns-upstream."""
    started: list[Hostd] = []

    def start(*extra: str, name: str = "hostd") -> Hostd:
        d = short_tmp / name
        d.mkdir()
        link = str(d / "link.sock")
        pcap = str(d / "switch.pcap")
        logf = str(d / "hostd.log")
        args = [_bin("host-switch"), "--listen", f"unix://{link}", "--pcap", pcap]
        args += ["--log-format", "json", "--log-file", logf]
        if "--dns-upstream" not in extra:
            args += ["--dns-upstream", dns_upstream.spec]
        args += list(extra)
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        h = Hostd(proc, d, link, pcap, logf, args)
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
    ) -> Guest:
        ns = netns()
        n = len(guests)
        log_path = short_tmp / f"vm-switch-{n}.log"
        resolv = short_tmp / f"resolv-{n}.conf"
        args = [_bin("vm-switch"), "--connect", h.link_uri, "--tap-mac-address", mac]
        args += ["--dhcp-client", dhcp_client, "--resolv-conf", str(resolv)]
        args += ["--log-format", "json", "--log-file", str(log_path)]
        if mtu:
            args += ["--mtu", str(mtu)]
        proc = ns.popen(*args, stdin=subprocess.DEVNULL)
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
