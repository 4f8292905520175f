#!/usr/bin/env python3
"""netferry vs slirp4netns vs pasta, side by side, on the same machine in the same run.

    .venv/bin/python bench/run.py              # 9 rounds: bench/results/<ts>.{md,json,png}
    .venv/bin/python bench/run.py --rounds 3
    .venv/bin/python bench/run.py --quick      # 1 round, short durations, writes nothing
    .venv/bin/python bench/run.py --profile    # netferry only, py-spy on hostd + vm-switch

Needs root (network namespaces, taps). See bench/README.md for what each row measures and
how each contender is set up.

Network safety: every byte the benchmark moves goes to host loopback (127.0.0.1) or into a
namespace made here. Through slirp4netns the guest talks only to 10.0.2.2 (slirp's alias
for host loopback), through pasta only to its gateway address (which this build maps to
host loopback; verified with strace), through netferry only to 192.168.127.254. DNS is off
or pointed at a dead loopback port for all three, pasta runs with --no-icmp, nothing pings.

Layout of a run: the contenders are brought up together, one namespace each, at one MTU
(first 1500, then 65520); each row is then measured on every contender in turn, the order
rotating by round, before the next row; then the contenders are torn down. Every process,
namespace and temp dir made here is removed on exit, on Ctrl-C and on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV_BIN = REPO / ".venv" / "bin"
PY = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
PEERS = str(BENCH / "peers.py")
RESULTS = BENCH / "results"
NS_PREFIX = f"nfb{os.getpid()}-"
CLK_TCK = os.sysconf("SC_CLK_TCK")
DASH, TIMES = "\u2013", "\u00d7"  # en dash, multiplication sign
GUEST_IPERF_PORT = 5201

CONTENDERS = ("netferry", "slirp4netns", "pasta", "netferry-slirp4netns")
# Pairs compared head to head besides netferry ÷ each: the drop-in against the program it
# replaces, both driven the same way (slirp4netns's command line and API).
PAIRS = (("netferry-slirp4netns", "slirp4netns"),)

# key, label, unit, better ("higher" | "lower"), MTU phase
ROWS: list[tuple[str, str, str, str, int]] = [
    ("tcp_g2h_1500", "TCP guest→host, MTU 1500", "Gbit/s", "higher", 1500),
    ("tcp_h2g_1500", "TCP host→guest, MTU 1500", "Gbit/s", "higher", 1500),
    ("tcp_g2h_65520", "TCP guest→host, MTU 65520", "Gbit/s", "higher", 65520),
    ("tcp_h2g_65520", "TCP host→guest, MTU 65520", "Gbit/s", "higher", 65520),
    ("tcp_connrate", "TCP connect+close guest→host", "conn/s", "higher", 1500),
    ("tcp_rr", "TCP 1-byte request-response (median)", "µs", "lower", 1500),
    ("udp_g2h", "UDP guest→host 1400 B, received", "Gbit/s", "higher", 1500),
    ("udp_g2h_loss", "UDP guest→host 1400 B, loss", "%", "lower", 1500),
    ("fwd_h2g", "TCP port forward host→guest, MTU 1500", "Gbit/s", "higher", 1500),
    ("rss_1000", "host-side RSS, 1000 idle TCP conns", "MiB", "lower", 1500),
    ("cpu_g2h_1500", "CPU per GiB, TCP guest→host MTU 1500", "s/GiB", "lower", 1500),
    ("cpu_h2g_1500", "CPU per GiB, TCP host→guest MTU 1500", "s/GiB", "lower", 1500),
    ("cpu_g2h_65520", "CPU per GiB, TCP guest→host MTU 65520", "s/GiB", "lower", 65520),
    ("cpu_h2g_65520", "CPU per GiB, TCP host→guest MTU 65520", "s/GiB", "lower", 65520),
]
ROW_INFO = {r[0]: r for r in ROWS}


class BenchError(Exception):
    pass


# ---- cleanup: everything we start is registered here and removed in finally ------------


class Reaper:
    """Processes, namespaces and directories to remove; `cleanup()` is idempotent."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.netns: list[str] = []
        self.dirs: list[Path] = []

    def popen(self, args: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)  # Ctrl-C reaches us only; we tear down
        p = subprocess.Popen(args, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 3.0) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait()
        for f in (p.stdin, p.stdout, p.stderr):
            if f:
                with contextlib.suppress(OSError):
                    f.close()
        if p in self.procs:
            self.procs.remove(p)

    def add_netns(self, name: str) -> None:
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.netns.append(name)

    def del_netns(self, name: str) -> None:
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in out.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        if name in self.netns:
            self.netns.remove(name)

    def mkdtemp(self) -> Path:
        d = Path(tempfile.mkdtemp(prefix="nfb-"))
        self.dirs.append(d)
        return d

    def cleanup(self) -> None:
        for p in reversed(list(self.procs)):
            self.stop(p)
        for n in list(self.netns):
            self.del_netns(n)
        for d in list(self.dirs):
            shutil.rmtree(d, ignore_errors=True)
            self.dirs.remove(d)


REAPER = Reaper()


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def remove_stale_namespaces() -> None:
    """Namespaces named by an earlier run of ours whose process is gone."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith("nfb") or "-" not in name:
            continue
        pid = name[3:].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            print(f"removing stale namespace {name}", file=sys.stderr)
            REAPER.del_netns(name)


# ---- small helpers ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


def listening(pid: int, port: int) -> bool:
    """Whether the network namespace of `pid` has a TCP socket listening on `port`."""
    for f in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{f}").read_text().splitlines()[1:]
        except OSError:
            return False
        for line in lines:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc, children before grandchildren)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(0), [])
        out += kids
        todo += kids
    return out


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for {pid}")


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def ns_cmd(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


def run_json(args: list[str], timeout: float) -> dict:
    r = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        try:
            data = json.loads(r.stdout)  # iperf3 -J: one JSON document
        except ValueError:
            data = json.loads(r.stdout.strip().splitlines()[-1])  # peers.py: last line
    except (ValueError, IndexError):
        raise BenchError(
            f"{' '.join(args[:6])}... exited {r.returncode}: {(r.stderr or r.stdout)[-400:]}"
        ) from None
    if isinstance(data, dict) and data.get("error"):
        raise BenchError(f"iperf3: {data['error']}")
    return data


def make_netns(name: str) -> None:
    REAPER.add_netns(name)
    for cmd in (
        ["ip", "link", "set", "lo", "up"],
        # IPv4 only (no router solicitations etc. towards the contender), and let the
        # connection-rate client reuse ports in TIME_WAIT (its peer is not loopback).
        [
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
            "net.ipv4.tcp_tw_reuse=1",
        ],
    ):
        subprocess.run(ns_cmd(name, *cmd), check=True)


# ---- contenders ------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    mtu: int = 1500
    ns: str = ""
    target: str = ""  # the host-loopback address as the guest sees it
    fwd_port: int = 0  # host 127.0.0.1 port forwarded to the guest's GUEST_IPERF_PORT
    dir: Path | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)

    def cpu_pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def rss_pids(self) -> dict[str, int]:
        return {k: p.pid for k, p in self.procs.items()}

    def check_alive(self) -> None:
        for k, p in self.procs.items():
            if p.poll() is not None:
                raise BenchError(
                    f"{self.name}: {k} exited with {p.returncode}\n"
                    f"{tail(self.logs.get(k, Path('/nonexistent')))}"
                )

    def _spawn(self, key: str, args: list[str], **kw) -> subprocess.Popen:
        assert self.dir
        log = self.dir / f"{key}.out"
        self.logs.setdefault(key, log)
        self.commands.append(" ".join(args))
        with open(log, "ab") as out:
            p = REAPER.popen(args, stdout=out, stderr=subprocess.STDOUT, **kw)
        self.procs[key] = p
        return p

    def setup(self, mtu: int, index: int) -> None:
        self.mtu = mtu
        self.dir = REAPER.mkdtemp()
        self.ns = f"{NS_PREFIX}{self.name[:5]}-{index}"
        make_netns(self.ns)
        self.fwd_port = free_port()
        self._start()

    def _start(self) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        for p in reversed(list(self.procs.values())):
            REAPER.stop(p)
        self.procs.clear()
        if self.ns:
            REAPER.del_netns(self.ns)
            self.ns = ""
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self.dir in REAPER.dirs:
                REAPER.dirs.remove(self.dir)
        self.logs.clear()


class Netferry(Contender):
    GUEST_IP = "192.168.127.2"

    def __init__(self) -> None:
        super().__init__("netferry")
        self.warnings: dict[str, int] = {}

    def _start(self) -> None:
        # The topology `netferry run` uses: hostd owns the namespace's tap (handed over by
        # vm-switch --give-tap), with TSO/checksum offload. `--enter` networks the bench's
        # own namespace (a holder process keeps it), so every contender runs in `ip netns`.
        assert self.dir
        api = self.dir / "api.sock"
        self.api = f"unix://{api}"
        holder = self._spawn("holder", ns_cmd(self.ns, "sleep", "1000000"))
        self._spawn(
            "run",
            [
                str(VENV_BIN / "netferry"),
                "run",
                "--enter",
                str(holder.pid),
                "--mtu",
                str(self.mtu),
                "--api",
                str(api),
                "--dns-upstream",
                "127.0.0.1:9",
                "--dhcp-client",
                "udhcpc",
            ],
        )

        def leased() -> bool:
            self.check_alive()
            out = subprocess.run(
                ns_cmd(self.ns, "ip", "-4", "-o", "addr", "show", "dev", "eth0"),
                capture_output=True,
                text=True,
            ).stdout
            return f"inet {self.GUEST_IP}/" in out

        wait_for(leased, 30, "the netferry guest's DHCP lease", step=0.1)
        self.target = "192.168.127.254"
        cmd = [
            str(VENV_BIN / "netferry"),
            "--api",
            self.api,
            "expose",
            f"127.0.0.1:{self.fwd_port}",
            f"{self.GUEST_IP}:{GUEST_IPERF_PORT}",
        ]
        self.commands.append(" ".join(cmd))
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise BenchError(f"netferry expose failed: {r.stdout}{r.stderr}")

    def teardown(self) -> None:
        # collect warnings/errors hostd and vm-switch logged, to report oddities
        run_dirs = sorted(Path("/tmp").glob("netferry-run-*"), key=lambda p: p.stat().st_mtime)
        for key, name in (("hostd", "hostd.log"), ("vm-switch", "vm-switch.log")):
            path = run_dirs[-1] / name if run_dirs else None
            if not path or not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if (
                    ev.get("level") in ("warning", "error", "critical")
                    and ev.get("event") != "icmp.ping_sockets_not_permitted"
                ):
                    k = f"{key}: {ev.get('level')} {ev.get('event')}"
                    self.warnings[k] = self.warnings.get(k, 0) + 1
        super().teardown()

    def _daemons(self) -> dict[str, int]:
        """host-switch and vm-switch under `netferry run` (found by their command lines)."""
        found: dict[str, int] = {}
        for pid in descendants(self.procs["run"].pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            for name in ("host-switch", "vm-switch"):
                if any(part.endswith(name.encode()) for part in cmd[:2]):
                    found[name] = pid
        return found

    def cpu_pids(self) -> list[int]:
        return [self.procs["run"].pid, *descendants(self.procs["run"].pid)]

    def rss_pids(self) -> dict[str, int]:
        return self._daemons()


class Slirp(Contender):
    def __init__(self) -> None:
        super().__init__("slirp4netns")

    def _start(self) -> None:
        self._start_slirp("slirp4netns", configure=True)

    def _start_slirp(self, binary: str, configure: bool) -> None:
        assert self.dir
        api = self.dir / "slirp.sock"
        rfd, wfd = os.pipe()
        try:
            # no --disable-host-loopback: 10.0.2.2 must reach 127.0.0.1;
            # --disable-dns: the guest never resolves through the host
            self._spawn(
                self.name,
                [
                    binary,
                    *(["--configure"] if configure else []),
                    f"--mtu={self.mtu}",
                    "--disable-dns",
                    f"--api-socket={api}",
                    f"--ready-fd={wfd}",
                    "--netns-type=path",
                    f"/var/run/netns/{self.ns}",
                    "tap0",
                ],
                pass_fds=(wfd,),
            )
        finally:
            os.close(wfd)
        try:
            import select

            r, _, _ = select.select([rfd], [], [], 20)
            if not r or os.read(rfd, 1) != b"1":
                self.check_alive()
                raise BenchError(f"{self.name} did not report ready")
        finally:
            os.close(rfd)
        if not configure:
            # rootlesskit's part, after `1` on the ready fd: address, route (tap0 is its own).
            for cmd in (
                ["ip", "addr", "add", "10.0.2.100/24", "dev", "tap0"],
                ["ip", "route", "add", "default", "via", "10.0.2.2"],
            ):
                self.commands.append(" ".join(cmd))
                subprocess.run(ns_cmd(self.ns, *cmd), check=True)
        self.target = "10.0.2.2"
        req = {
            "execute": "add_hostfwd",
            "arguments": {
                "proto": "tcp",
                "host_addr": "127.0.0.1",
                "host_port": self.fwd_port,
                "guest_port": GUEST_IPERF_PORT,
            },
        }
        self.commands.append(f"echo '{json.dumps(req)}' | socat - UNIX:{api}")
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(api))
            s.sendall(json.dumps(req).encode())
            s.shutdown(socket.SHUT_WR)
            reply = s.recv(4096)
        if b'"return"' not in reply or b"error" in reply:
            raise BenchError(f"{self.name} add_hostfwd: {reply!r}")


class NetferrySlirp(Slirp):
    """netferry started the way rootlesskit starts slirp4netns: rootlesskit makes tap0 (up,
    MTU set) first, runs the program without --configure, waits for `1` on the ready fd,
    then addresses the tap itself; forwards go through the same JSON API."""

    def __init__(self) -> None:
        Contender.__init__(self, "netferry-slirp4netns")

    def _start(self) -> None:
        for cmd in (
            ["ip", "tuntap", "add", "name", "tap0", "mode", "tap"],
            ["ip", "link", "set", "tap0", "mtu", str(self.mtu), "up"],
        ):
            self.commands.append(" ".join(cmd))
            subprocess.run(ns_cmd(self.ns, *cmd), check=True)
        self._start_slirp(str(VENV_BIN / "netferry-slirp4netns"), configure=False)


class Pasta(Contender):
    def __init__(self) -> None:
        super().__init__("pasta")

    def _start(self) -> None:
        # -f: stay in the foreground (our child, so /proc/PID/stat is pasta itself);
        # --runas 0: as root this build drops to nobody and then cannot join the netns;
        # --no-icmp: this build would send guest pings to the real gateway;
        # -4, no DNS options: no DNS is offered or forwarded;
        # -t: one forward bound on 127.0.0.1; no automatic port scanning in any direction.
        self._spawn(
            "pasta",
            [
                "pasta",
                "-f",
                "-q",
                "--runas",
                "0",
                "--config-net",
                "--no-icmp",
                "-4",
                "-m",
                str(self.mtu),
                "-t",
                f"127.0.0.1/{self.fwd_port}:{GUEST_IPERF_PORT}",
                "-u",
                "none",
                "-T",
                "none",
                "-U",
                "none",
                "--netns",
                f"/var/run/netns/{self.ns}",
            ],
        )

        def gateway() -> str | None:
            self.check_alive()
            out = subprocess.run(
                ns_cmd(self.ns, "ip", "-4", "route", "show", "default"),
                capture_output=True,
                text=True,
            ).stdout.split()
            return out[out.index("via") + 1] if "via" in out else None

        gw = wait_for(gateway, 20, "pasta to configure the namespace", step=0.1)
        # pasta maps its gateway address to the host's loopback (this build has --no-map-gw,
        # so mapping is the default); the guest sends to nothing else.
        self.target = gw
        self.commands.append(f"(guest → host loopback via the gateway {gw})")


def make_contender(name: str) -> Contender:
    return {
        "netferry": Netferry,
        "slirp4netns": Slirp,
        "pasta": Pasta,
        "netferry-slirp4netns": NetferrySlirp,
    }[name]()


# ---- measurements -------------------------------------------------------------------------


@dataclass
class Opts:
    tput_secs: int
    connrate_secs: float
    rr_secs: float
    hold_n: int


def tcp_detail(data: dict) -> dict:
    """Retransmits and stalls (1-s intervals under 5% of the run's mean rate) of an iperf3
    TCP run, to tell a steady rate from bursts and stalls."""
    rates = [i["sum"]["bits_per_second"] for i in data.get("intervals", [])]
    mean = statistics.mean(rates) if rates else 0.0
    return {
        "retransmits": data["end"].get("sum_sent", {}).get("retransmits", 0),
        "intervals": len(rates),
        "stalled_intervals": sum(1 for r in rates if mean and r < 0.05 * mean),
    }


class Bench:
    def __init__(self, opts: Opts, peer_port: int) -> None:
        self.opts = opts
        self.peer_port = peer_port
        self.last_tcp: dict = {}

    # iperf3 server on the host (127.0.0.1), client in the guest namespace
    def _host_iperf_server(self, c: Contender) -> tuple[subprocess.Popen, int]:
        port = free_port()
        assert c.dir
        srv = REAPER.popen(
            ["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
            stdout=open(c.dir / "iperf3-server.out", "ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: listening(srv.pid, port) or srv.poll() is not None, 10, "iperf3 server")
        if srv.poll() is not None:
            raise BenchError(f"iperf3 server exited: {tail(c.dir / 'iperf3-server.out', 3)}")
        return srv, port

    def _finish_server(self, srv: subprocess.Popen) -> None:
        try:
            srv.wait(5)
        except subprocess.TimeoutExpired:
            pass
        REAPER.stop(srv)

    def tcp_throughput(self, c: Contender, reverse: bool) -> tuple[float, float]:
        """Gbit/s received, CPU seconds per GiB of the contender's processes."""
        srv, port = self._host_iperf_server(c)
        try:
            args = ns_cmd(
                c.ns,
                "iperf3",
                "-c",
                c.target,
                "-p",
                str(port),
                "-t",
                str(self.opts.tput_secs),
                "-J",
                "--connect-timeout",
                "5000",
            )
            if reverse:
                args.append("-R")
            per0 = {k: cpu_seconds([pid]) for k, pid in c.rss_pids().items()}
            cpu0 = cpu_seconds(c.cpu_pids())
            data = run_json(args, timeout=self.opts.tput_secs + 30)
            cpu1 = cpu_seconds(c.cpu_pids())
            per1 = {k: cpu_seconds([pid]) for k, pid in c.rss_pids().items()}
        finally:
            self._finish_server(srv)
        rcv = data["end"]["sum_received"]
        gib = rcv["bytes"] / 2**30
        self.last_tcp = tcp_detail(data)
        # per-process CPU seconds per GiB (host-switch vs vm-switch for netferry)
        self.last_tcp["cpu_split"] = {
            k: (per1[k] - per0[k]) / gib if gib else float("nan") for k in per0
        }
        return rcv["bits_per_second"] / 1e9, (cpu1 - cpu0) / gib if gib else float("nan")

    def udp_throughput(self, c: Contender) -> tuple[float, float]:
        """Received Gbit/s and loss % for 1400-byte datagrams sent as fast as possible."""
        srv, port = self._host_iperf_server(c)
        try:
            args = ns_cmd(
                c.ns,
                "iperf3",
                "-c",
                c.target,
                "-p",
                str(port),
                "-u",
                "-b",
                "0",
                "-l",
                "1400",
                "-t",
                str(self.opts.tput_secs),
                "-J",
                "--connect-timeout",
                "5000",
            )
            data = run_json(args, timeout=self.opts.tput_secs + 30)
        finally:
            self._finish_server(srv)
        s = data["end"]["sum"]
        packets, lost = s["packets"], s["lost_packets"]
        received_bits = (packets - lost) * 1400 * 8
        return received_bits / s["seconds"] / 1e9, (100.0 * lost / packets if packets else 100.0)

    def forward_throughput(self, c: Contender) -> float:
        """iperf3 server in the guest, client on the host through the contender's forward."""
        assert c.dir
        out = open(c.dir / "iperf3-guest.out", "ab")
        srv = REAPER.popen(
            ns_cmd(c.ns, "iperf3", "-s", "-1", "-B", "0.0.0.0", "-p", str(GUEST_IPERF_PORT)),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()
        try:
            wait_for(
                lambda: listening(srv.pid, GUEST_IPERF_PORT) or srv.poll() is not None,
                10,
                "iperf3 server in the guest",
            )
            args = [
                "iperf3",
                "-c",
                "127.0.0.1",
                "-p",
                str(c.fwd_port),
                "-t",
                str(self.opts.tput_secs),
                "-J",
                "--connect-timeout",
                "5000",
            ]
            data = run_json(args, timeout=self.opts.tput_secs + 30)
        finally:
            self._finish_server(srv)
        return data["end"]["sum_received"]["bits_per_second"] / 1e9

    def connrate(self, c: Contender) -> float:
        data = run_json(
            ns_cmd(
                c.ns,
                PY,
                PEERS,
                "connrate",
                c.target,
                str(self.peer_port),
                str(self.opts.connrate_secs),
            ),
            timeout=self.opts.connrate_secs + 60,
        )
        if data["errors"]:
            c_err = f"{c.name} connrate: {data['errors']} errors, first {data['first_error']}"
            NOTES.append(c_err)
        return data["per_second"]

    def rr_latency(self, c: Contender) -> float:
        data = run_json(
            ns_cmd(
                c.ns,
                PY,
                PEERS,
                "pingpong",
                c.target,
                str(self.peer_port),
                str(self.opts.rr_secs),
                "200000",
            ),
            timeout=self.opts.rr_secs + 60,
        )
        return data["median_us"]

    def rss_with_idle_conns(self, c: Contender) -> dict[str, float]:
        client = REAPER.popen(
            ns_cmd(c.ns, PY, PEERS, "hold", c.target, str(self.peer_port), str(self.opts.hold_n)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            import select

            r, _, _ = select.select([client.stdout], [], [], 90)
            if not r:
                raise BenchError("hold client: no report in 90 s")
            line = client.stdout.readline()
            report = json.loads(line) if line.strip() else {}
            if report.get("alive") != self.opts.hold_n:
                NOTES.append(f"{c.name} hold: {report or 'client died'}")
                if not report.get("alive"):
                    raise BenchError(f"hold client: {report}")
            time.sleep(1.0)  # let the contender settle (timers, buffers) before sampling
            return {k: rss_mib(pid) for k, pid in c.rss_pids().items()}
        finally:
            if client.stdin:
                with contextlib.suppress(OSError):
                    client.stdin.close()
            try:
                client.wait(15)
            except subprocess.TimeoutExpired:
                pass
            REAPER.stop(client)


NOTES: list[str] = []


# ---- the run --------------------------------------------------------------------------------


class Results:
    def __init__(self, contenders: list[str]) -> None:
        self.contenders = contenders
        self.values: dict[str, dict[str, list[float]]] = {
            k: {c: [] for c in contenders} for k, *_ in ROWS
        }
        self.extra: dict[str, dict[str, list[float]]] = {}
        self.errors: list[str] = []

    def add(self, row: str, contender: str, value: float) -> None:
        self.values[row][contender].append(value)

    def add_extra(self, key: str, contender: str, value: float) -> None:
        self.extra.setdefault(key, {}).setdefault(contender, []).append(value)

    def summary(self) -> dict:
        out = {}
        for key, label, unit, better, _mtu in ROWS:
            row = {"label": label, "unit": unit, "better": better, "contenders": {}}
            for c, vals in self.values[key].items():
                row["contenders"][c] = {
                    "values": vals,
                    "median": statistics.median(vals) if vals else None,
                    "min": min(vals) if vals else None,
                    "max": max(vals) if vals else None,
                }
            nf = row["contenders"].get("netferry", {}).get("median")
            row["netferry_ratio"] = {
                c: (nf / v["median"] if nf is not None and v["median"] else None)
                for c, v in row["contenders"].items()
                if c != "netferry"
            }
            row["pair_ratio"] = {}
            for a, b in PAIRS:
                ma = row["contenders"].get(a, {}).get("median")
                mb = row["contenders"].get(b, {}).get("median")
                row["pair_ratio"][f"{a} ÷ {b}"] = ma / mb if ma is not None and mb else None
            out[key] = row
        return out


def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def markdown_table(summary: dict, contenders: list[str], keys: set[str] | None = None) -> str:
    others = [c for c in contenders if c != "netferry"]
    head = ["row", "unit"] + [f"{c} median (min{DASH}max)" for c in contenders]
    if "netferry" in contenders:
        head += [f"netferry ÷ {c}" for c in others]
    pairs = [f"{a} ÷ {b}" for a, b in PAIRS if a in contenders and b in contenders]
    head += pairs
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, *_ in ROWS:
        if keys is not None and key not in keys:
            continue
        row = summary[key]
        cells = [row["label"], row["unit"] + (" ↑" if row["better"] == "higher" else " ↓")]
        for c in contenders:
            s = row["contenders"][c]
            if s["median"] is None:
                cells.append("—")
            elif len(s["values"]) == 1:
                cells.append(fmt(s["median"]))
            else:
                cells.append(f"{fmt(s['median'])} ({fmt(s['min'])}{DASH}{fmt(s['max'])})")
        if "netferry" in contenders:
            for c in others:
                r = row["netferry_ratio"].get(c)
                cells.append("—" if r is None else f"{r:.2f}{TIMES}")
        for pair in pairs:
            r = row["pair_ratio"].get(pair)
            cells.append("—" if r is None else f"{r:.2f}{TIMES}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, contenders: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, *_ in ROWS]
    ncols = 4
    nrows = (len(keys) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.6 * nrows))
    colors = {
        "netferry": "#d95f02",
        "slirp4netns": "#7570b3",
        "pasta": "#1b9e77",
        "netferry-slirp4netns": "#e7298a",
    }
    for ax, key in zip(axes.flat, keys, strict=False):
        row = summary[key]
        meds, los, his, names = [], [], [], []
        for c in contenders:
            s = row["contenders"][c]
            m = s["median"] if s["median"] is not None else 0.0
            meds.append(m)
            los.append(m - (s["min"] if s["min"] is not None else m))
            his.append((s["max"] if s["max"] is not None else m) - m)
            names.append(c)
        ys = range(len(names))
        ax.barh(ys, meds, xerr=[los, his], color=[colors.get(n, "grey") for n in names], capsize=3)
        ax.set_yticks(list(ys), names, fontsize=8)
        ax.invert_yaxis()
        arrow = "higher is better" if row["better"] == "higher" else "lower is better"
        ax.set_title(f"{row['label']}\n{row['unit']}, {arrow}", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        right = max((m + h for m, h in zip(meds, his, strict=False)), default=0.0) or 1.0
        ax.set_xlim(0, right * 1.3)
        for y, m, h in zip(ys, meds, his, strict=False):
            ax.text(m + h + right * 0.02, y, fmt(m), va="center", fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def start_peer_server(reaper_dir: Path) -> tuple[subprocess.Popen, int]:
    p = REAPER.popen(
        [PY, PEERS, "server", "127.0.0.1", "0"],
        stdout=subprocess.PIPE,
        stderr=open(reaper_dir / "peer-server.err", "ab"),
        text=True,
    )
    import select

    r, _, _ = select.select([p.stdout], [], [], 10)
    line = p.stdout.readline() if r else ""
    if not line.startswith("ready "):
        raise BenchError(f"peer server did not start: {line!r}")
    return p, int(line.split()[1])


def measure_phase(
    bench: Bench,
    results: Results,
    contenders: list[Contender],
    mtu: int,
    round_no: int,
    rows_filter: set[str] | None,
) -> None:
    """Measure every row of this MTU phase on every contender that came up, in the
    (already rotated) order of `contenders`."""
    order = contenders

    def each(row_keys: list[str], fn) -> None:
        if rows_filter is not None and not (set(row_keys) & rows_filter):
            return
        for c in order:
            if not c.ns:
                continue
            t0 = time.monotonic()
            try:
                c.check_alive()
                fn(c)
            except BenchError as e:
                msg = f"round {round_no + 1}, MTU {mtu}, {c.name}, {'/'.join(row_keys)}: {e}"
                results.errors.append(msg)
                print(f"  ! {msg}", file=sys.stderr)
            except subprocess.TimeoutExpired as e:
                msg = (
                    f"round {round_no + 1}, MTU {mtu}, {c.name}, {'/'.join(row_keys)}: "
                    f"timed out ({e.timeout:.0f}s): {' '.join(map(str, e.cmd))[:160]}"
                )
                results.errors.append(msg)
                print(f"  ! {msg}", file=sys.stderr)
            print(
                f"  {'/'.join(row_keys):<28} {c.name:<12} {time.monotonic() - t0:5.1f}s",
                file=sys.stderr,
            )

    def tput(reverse: bool):
        d = "h2g" if reverse else "g2h"

        def fn(c: Contender) -> None:
            gbps, cpu = bench.tcp_throughput(c, reverse)
            results.add(f"tcp_{d}_{mtu}", c.name, gbps)
            results.add(f"cpu_{d}_{mtu}", c.name, cpu)
            detail = bench.last_tcp
            if len(detail["cpu_split"]) > 1:
                for proc, v in detail["cpu_split"].items():
                    results.add_extra(f"cpu_{d}_{mtu}:{proc}", c.name, v)
            results.add_extra(f"retransmits:tcp_{d}_{mtu}", c.name, detail["retransmits"])
            if detail["stalled_intervals"]:
                NOTES.append(
                    f"round {round_no + 1}: {c.name} tcp_{d}_{mtu}: "
                    f"{detail['stalled_intervals']} of {detail['intervals']} 1-s intervals "
                    f"stalled (<5% of mean), {detail['retransmits']} retransmits"
                )

        return fn

    each([f"tcp_g2h_{mtu}", f"cpu_g2h_{mtu}"], tput(False))
    each([f"tcp_h2g_{mtu}", f"cpu_h2g_{mtu}"], tput(True))
    if mtu != 1500:
        return
    each(["tcp_connrate"], lambda c: results.add("tcp_connrate", c.name, bench.connrate(c)))
    each(["tcp_rr"], lambda c: results.add("tcp_rr", c.name, bench.rr_latency(c)))

    def udp(c: Contender) -> None:
        gbps, loss = bench.udp_throughput(c)
        results.add("udp_g2h", c.name, gbps)
        results.add("udp_g2h_loss", c.name, loss)

    each(["udp_g2h", "udp_g2h_loss"], udp)
    each(["fwd_h2g"], lambda c: results.add("fwd_h2g", c.name, bench.forward_throughput(c)))

    def rss(c: Contender) -> None:
        r = bench.rss_with_idle_conns(c)
        main = r.get("host-switch", next(iter(r.values())))
        results.add("rss_1000", c.name, main)
        for k, v in r.items():
            results.add_extra(f"rss_1000:{k}", c.name, v)

    each(["rss_1000"], rss)


def bring_up(
    names: list[str], mtu: int, results: Results, round_no: int, commands: dict[str, list[str]]
) -> list[Contender]:
    up = []
    for i, name in enumerate(names):
        c = make_contender(name)
        try:
            c.setup(mtu, round_no * 10 + i)
            up.append(c)
            commands.setdefault(f"{name} (MTU {mtu})", c.commands)
        except (BenchError, subprocess.SubprocessError, OSError) as e:
            msg = f"round {round_no + 1}: {name} at MTU {mtu} did not come up: {e}"
            results.errors.append(msg)
            print(f"  ! {msg}", file=sys.stderr)
            c.teardown()
            c.ns = ""
            up.append(c)  # keeps its place in the rotation; rows skip it
    return up


def tear_down(contenders: list[Contender], warnings: dict[str, int]) -> None:
    for c in contenders:
        c.teardown()
        if isinstance(c, Netferry):
            for k, v in c.warnings.items():
                warnings[k] = warnings.get(k, 0) + v


def versions() -> dict[str, str]:
    def first_line(args: list[str]) -> str:
        try:
            r = subprocess.run(args, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    pasta = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "passt"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "slirp4netns": first_line(["slirp4netns", "--version"]),
        "pasta": f"passt {pasta}" if pasta else "?",
        "iperf3": first_line(["iperf3", "--version"]),
        "netferry_git": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
    }


def run_bench(args: argparse.Namespace) -> int:
    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for n in names:
        if n not in CONTENDERS:
            raise SystemExit(f"unknown contender {n!r} (have {', '.join(CONTENDERS)})")
    rows_filter = set(args.rows.split(",")) if args.rows else None
    if rows_filter and rows_filter - set(ROW_INFO):
        raise SystemExit(f"unknown rows {sorted(rows_filter - set(ROW_INFO))}")
    opts = Opts(
        tput_secs=2 if args.quick else 5,
        connrate_secs=1.0 if args.quick else 3.0,
        rr_secs=1.0 if args.quick else 2.0,
        hold_n=1000,
    )
    rounds = 1 if args.quick else args.rounds
    results = Results(names)
    warnings: dict[str, int] = {}
    commands: dict[str, list[str]] = {}
    work = REAPER.mkdtemp()
    peer, peer_port = start_peer_server(work)
    bench = Bench(opts, peer_port)
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    started = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for r in range(rounds):
        for mtu in (1500, 65520):
            if rows_filter is not None and not any(
                ROW_INFO[k][4] == mtu for k in rows_filter if k in ROW_INFO
            ):
                continue
            order = names[r % len(names) :] + names[: r % len(names)]
            print(f"round {r + 1}/{rounds}, MTU {mtu}: {', '.join(order)}", file=sys.stderr)
            if peer.poll() is not None:
                peer, peer_port = start_peer_server(work)
                bench.peer_port = peer_port
            cs = bring_up(order, mtu, results, r, commands)
            try:
                measure_phase(bench, results, cs, mtu, r, rows_filter)
            finally:
                tear_down(cs, warnings)
    elapsed = time.monotonic() - started
    summary = results.summary()
    table = markdown_table(summary, names, rows_filter)
    meta = {
        "timestamp": stamp,
        "rounds": rounds,
        "quick": args.quick,
        "durations": opts.__dict__,
        "elapsed_s": round(elapsed, 1),
        "versions": versions(),
        "loadavg_start": load_start,
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
    }
    print()
    print(
        f"netferry benchmark, {rounds} round(s), {elapsed:.0f} s, "
        f"{meta['versions']['cpus']} CPUs, kernel {meta['versions']['kernel']}, "
        f"load average {' '.join(load_start)} at start, {' '.join(meta['loadavg_end'])} at end"
    )
    print(table)
    extra_lines = []
    for key, per in sorted(results.extra.items()):
        if key.startswith("cpu_") and key.endswith(":host-switch"):
            row = key.split(":")[0]
            for c, vals in per.items():
                vm = results.extra.get(f"{row}:vm-switch", {}).get(c, [])
                if vals and vm:
                    extra_lines.append(
                        f"- {c} {row}: host-switch {fmt(statistics.median(vals))} + "
                        f"vm-switch {fmt(statistics.median(vm))} s/GiB (medians)"
                    )
        if key.startswith("rss_") and key.endswith(":vm-switch"):
            for c, vals in per.items():
                extra_lines.append(
                    f"- {c} vm-switch RSS with {opts.hold_n} idle conns: "
                    f"{fmt(statistics.median(vals))} MiB (median); the row above "
                    f"is host-switch alone"
                )
    notes = extra_lines + [f"- {n}" for n in NOTES]
    notes += [f"- error: {e}" for e in results.errors]
    notes += [f"- netferry logged {k} {TIMES}{v}" for k, v in sorted(warnings.items())]
    if notes:
        print("\n" + "\n".join(notes))
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        base = RESULTS / stamp
        md = [
            f"# netferry benchmark {stamp}",
            "",
            f"{rounds} rounds, interleaved; median (min{DASH}max) per contender; "
            f"ratio = netferry median ÷ contender median (↑ higher is better, "
            f"↓ lower is better).",
            "",
            "Machine: "
            + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
            + f"; load average {' '.join(load_start)} at start, "
            + f"{' '.join(meta['loadavg_end'])} at end",
            "",
            table,
            "",
        ]
        if notes:
            md += ["## Notes", "", *notes, ""]
        md += ["## Commands", ""]
        for k, cmds in commands.items():
            md += [f"{k}:", "", "```", *cmds, "```", ""]
        (base.with_suffix(".md")).write_text("\n".join(md))
        (base.with_suffix(".json")).write_text(
            json.dumps(
                {
                    "meta": meta,
                    "rows": summary,
                    "extra": results.extra,
                    "notes": NOTES,
                    "errors": results.errors,
                    "netferry_warnings": warnings,
                    "commands": commands,
                },
                indent=2,
                ensure_ascii=False,
            )
        )
        try:
            title = f"netferry vs slirp4netns vs pasta, {stamp}, {rounds} rounds"
            plot(summary, names, base.with_suffix(".png"), f"{title} (median, min{DASH}max)")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        print(f"\nwrote {base}.md, .json, .png")
    return 0


# ---- profiling ------------------------------------------------------------------------------


def run_profile(args: argparse.Namespace) -> int:
    """One workload through netferry with py-spy on host-switch (and vm-switch, when it is
    in the data path): a file per process and, for the `raw` format, the hottest functions
    by own time and by total time printed here."""
    pyspy = shutil.which("py-spy", path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    if not pyspy:
        raise SystemExit("py-spy is not installed (.venv/bin/pip install py-spy)")
    secs = args.profile_seconds
    work = args.profile_work
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    tmp = REAPER.mkdtemp()
    peer, peer_port = start_peer_server(tmp) if work in ("connrate", "rr") else (None, 0)
    c = Netferry()
    c.setup(args.profile_mtu, 0)
    bench = Bench(Opts(tput_secs=secs, connrate_secs=secs, rr_secs=secs, hold_n=0), peer_port)
    ext = {"raw": "txt", "speedscope": "speedscope.json", "flamegraph": "svg"}[args.profile_format]
    written = []
    try:
        spies = []
        for key, pid in c._daemons().items():
            tag = f"{work}-{args.profile_direction}" if work == "tcp" else work
            out = RESULTS / f"profile-{stamp}-{key}-{tag}-mtu{args.profile_mtu}.{ext}"
            err = open(c.dir / f"py-spy-{key}.err", "ab")
            spies.append(
                (
                    out,
                    REAPER.popen(
                        [pyspy, "record", "--pid", str(pid), "--rate", "250"]
                        + ["--duration", str(secs + 1), "--format", args.profile_format]
                        + ["--output", str(out)]
                        # native unwinding has to stop the process to read its stack
                        + ([] if args.profile_native else ["--nonblocking"])
                        + (["--idle"] if args.profile_idle else [])
                        + (["--native"] if args.profile_native else []),
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                    ),
                )
            )
            err.close()
        time.sleep(1.0)
        if work == "tcp":
            gbps, cpu = bench.tcp_throughput(c, args.profile_direction == "h2g")
            result = f"{gbps:.3f} Gbit/s, {cpu:.1f} CPU s/GiB"
        elif work == "udp":
            gbps, loss = bench.udp_throughput(c)
            result = f"{gbps:.3f} Gbit/s received, {loss:.1f} % lost"
        elif work == "connrate":
            result = f"{bench.connrate(c):,.0f} connections/s"
        else:
            result = f"{bench.rr_latency(c):.0f} µs median round trip"
        print(f"{work} MTU {args.profile_mtu} under py-spy (slower than unprofiled): {result}")
        for out, sp in spies:
            try:
                sp.wait(secs + 30)
            except subprocess.TimeoutExpired:
                pass
            REAPER.stop(sp)
            if out.exists():
                written.append(out)
            else:
                print(f"py-spy wrote nothing to {out}", file=sys.stderr)
    finally:
        c.teardown()
        if peer is not None:
            REAPER.stop(peer)
    for w in written:
        print(f"wrote {w}")
        if args.profile_format == "raw":
            print(summarize_collapsed(w.read_text(), top=args.profile_top))
    return 0


def summarize_collapsed(text: str, top: int = 25) -> str:
    """py-spy's collapsed stacks ("a;b;c COUNT" per line) → own and total time per function."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        # "func (path/file.py:LINE)" → "func file.py": lines of one function add up
        frames = [
            f.split(" (")[0] + " " + f.split("/")[-1].rstrip(")").split(":")[0]
            for f in stack.split(";")
        ]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            total[f] = total.get(f, 0) + n
    if not samples:
        return "  (no samples)"
    lines = [f"  {samples} samples; own time:"]
    for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * n / samples:5.1f} %  {f}")
    lines.append("  total time (function and what it calls):")
    for f, n in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * n / samples:5.1f} %  {f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="1 round, short durations, write nothing (CI smoke)"
    )
    ap.add_argument("--rounds", type=int, default=9, help="rounds (default 9)")
    ap.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help="comma-separated subset of: " + ", ".join(CONTENDERS),
    )
    ap.add_argument(
        "--rows",
        default="",
        help="comma-separated subset of rows: " + ", ".join(k for k, *_ in ROWS),
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="netferry only: one workload (--profile-work) under py-spy on host-switch "
        "and vm-switch; files go to bench/results/, the raw format is summarized here",
    )
    ap.add_argument("--profile-work", choices=("tcp", "connrate", "rr", "udp"), default="tcp")
    ap.add_argument("--profile-format", choices=("raw", "speedscope", "flamegraph"), default="raw")
    ap.add_argument("--profile-top", type=int, default=25, help="functions listed per table")
    ap.add_argument("--profile-idle", action="store_true", help="sample idle (waiting) stacks too")
    ap.add_argument("--profile-native", action="store_true", help="C frames too (py-spy --native)")
    ap.add_argument("--profile-direction", choices=("g2h", "h2g"), default="g2h")
    ap.add_argument("--profile-mtu", type=int, default=1500)
    ap.add_argument("--profile-seconds", type=int, default=10)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/run.py needs root (network namespaces and taps)")
    for tool in ("iperf3", "ip") + (() if args.profile else ("slirp4netns", "pasta")):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed")
    with contextlib.suppress(ValueError, OSError):
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        remove_stale_namespaces()
        return run_profile(args) if args.profile else run_bench(args)
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e or 'SIGINT'}): cleaning up", file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        # no second Ctrl-C may interrupt the teardown
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        REAPER.cleanup()
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
