"""The harness: paths, the reaper that removes everything a run made, process and
namespace helpers shared by contenders and measurements."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


class BenchError(Exception):
    pass


# ---- cleanup: everything we start is registered here and removed in finally ------------


def _die_with_us() -> None:
    """In the child before exec: SIGKILL when the benchmark dies, even by SIGKILL, so no
    contender outlives a killed run (its namespaces go at the next run's start)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Reaper:
    """Processes, namespaces and directories to remove; `cleanup()` is idempotent."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.netns: list[str] = []
        self.dirs: list[Path] = []

    def popen(self, args: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)  # Ctrl-C reaches us only; we tear down
        kw.setdefault("preexec_fn", _die_with_us)
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
        # IPv6 on (the IPv6 rows; a contender run with -4 ignores it), and let the
        # connection-rate client reuse ports in TIME_WAIT (its peer is not loopback).
        [
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=0",
            "net.ipv6.conf.default.disable_ipv6=0",
            "net.ipv4.tcp_tw_reuse=1",
        ],
    ):
        subprocess.run(ns_cmd(name, *cmd), check=True)


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
