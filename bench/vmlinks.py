"""Real VM links: User Mode Linux over bess and QEMU over `-netdev stream`, netferry against
slirp4netns (or, for QEMU, against QEMU's own `-netdev user`, which is libslirp in QEMU:
slirp4netns's engine on the QEMU side). Rows, in the `slirp4netns` column for the peer:

- UML (Debian's user-mode-linux, the guest tests/interop/test_uml.py boots): its bess NIC on
  `host-switch --listen unixpacket://S` or `slirp4netns --target-type=bess S`; the guest
  fetches N MiB from a host loopback HTTP server into /dev/null, uploads N MiB of zeros to a
  host loopback sink, and makes M connections one after another (each forks busybox nc, so
  the rate is the guest's as much as the link's; both contenders pay the same). Times are
  the guest's (its uptime, 10 ms steps); MB/s are 10^6 bytes per second.
- QEMU (TCG, the guest tests/interop/test_qemu.py builds; used only when its image is
  already cached, the benchmark never downloads): the guest fetches N MiB into its RAM and
  checks the sha256; the time runs from the server seeing the request to the guest's
  result line on the console, so it includes the guest hashing N MiB under TCG (the same
  work for both contenders, which pulls the ratio towards 1).

One guest boot per contender per round does all of a VM's rows; contenders alternate by
round. Network safety: the guest sends only to the host-loopback alias of its switch;
hostd's DNS upstream is a dead loopback port, slirp4netns runs with --disable-dns and the
QEMU guest never resolves a name.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from harness import REAPER, REPO, VENV_BIN, BenchError

sys.path.insert(0, str(REPO))

# key, label, unit, better, phase (0: the VM-link phase)
VM_ROWS: list[tuple[str, str, str, str, int]] = [
    ("uml_fetch", "UML over bess: fetch from host loopback", "MB/s", "higher", 0),
    ("uml_upload", "UML over bess: upload to host loopback", "MB/s", "higher", 0),
    ("uml_connrate", "UML over bess: connect+close, one at a time", "conn/s", "higher", 0),
    ("qemu_fetch", "QEMU stream (slirp column: -netdev user) fetch", "MB/s", "higher", 0),
]
VM_CONTENDERS = ("netferry", "slirp4netns")


class Servers:
    """HTTP GET /blob?mib=N (random bytes, timed per request) and a TCP sink that reads to
    EOF and answers "ok BYTES", both on 127.0.0.1."""

    def __init__(self, mib: int) -> None:
        self.blob = os.urandom(mib << 20)
        self.get_times: list[tuple[int, float, float]] = []  # (bytes, start, seconds)
        blob, times = self.blob, self.get_times

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                size = len(blob)
                if "?mib=" in self.path:
                    size = min(size, int(self.path.split("?mib=")[1]) << 20)
                t0 = time.monotonic()
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                view = memoryview(blob)[:size]
                for off in range(0, size, 1 << 20):
                    self.wfile.write(view[off : off + (1 << 20)])
                times.append((size, t0, time.monotonic() - t0))

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.sink = socket.create_server(("127.0.0.1", 0))
        self._threads = [
            threading.Thread(target=self.http.serve_forever, daemon=True),
            threading.Thread(target=self._sink_loop, daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def http_port(self) -> int:
        return self.http.server_address[1]

    @property
    def sink_port(self) -> int:
        return self.sink.getsockname()[1]

    def _sink_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sink.accept()
            except OSError:
                return
            threading.Thread(target=self._sink_one, args=(conn,), daemon=True).start()

    @staticmethod
    def _sink_one(conn: socket.socket) -> None:
        n = 0
        with conn:
            conn.settimeout(600)
            try:
                while data := conn.recv(1 << 18):
                    n += len(data)
                conn.sendall(f"ok {n}\n".encode())
            except OSError:
                pass

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.sink.close()


@contextmanager
def switch(kind: str, contender: str, workdir: Path) -> Iterator[tuple[Path, dict, str]]:
    """One contender's listener for a VM: (socket, static-address steps, host alias)."""
    sock = workdir / f"{kind}-{contender}.sock"
    log = open(workdir / f"{kind}-{contender}.log", "ab")
    if contender == "netferry":
        scheme = "unixpacket" if kind == "uml" else "unix"
        cmd = [str(VENV_BIN / "host-switch"), "--listen", f"{scheme}://{sock}", "--api", "none",
               "--dns-upstream", "127.0.0.1:9"]  # fmt: skip
        steps: dict[str, str] = {}
        alias = "192.168.127.254"
    else:
        cmd = ["slirp4netns", "--target-type=bess", "--disable-dns", str(sock)]
        steps = {"addr": "10.0.2.100/24", "gw": "10.0.2.2"}
        alias = "10.0.2.2"
    proc = REAPER.popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{contender} for {kind} did not listen on {sock}")
            time.sleep(0.05)
        yield sock, steps, alias
    finally:
        REAPER.stop(proc)
        log.close()
        sock.unlink(missing_ok=True)


def _cs(value: str) -> float:
    if not value.startswith("cs="):
        raise BenchError(f"no timing in {value!r}")
    return max(int(value.split()[0][3:]), 1) / 100


def measure_uml(contender: str, servers: Servers, mib: int, conns: int, workdir: Path) -> dict:
    from tests.interop.uml_guest import run_uml

    with switch("uml", contender, workdir) as (sock, steps, alias):
        steps = {
            **steps,
            "sink": f"http://{alias}:{servers.http_port}/blob?mib={mib}",
            "upload": f"{alias}:{servers.sink_port}:{mib}",
            "connrate": f"{alias}:{servers.sink_port}:{conns}",
        }
        result = run_uml(str(sock), steps, 900.0)
    r = result.results
    upload = r.get("upload", "")
    if not upload.endswith(f"ok {mib << 20}"):
        raise BenchError(f"UML {contender}: upload incomplete: {upload!r}\n{result.describe()}")
    conn = r.get("connrate", "")
    if "fails=0" not in conn:
        raise BenchError(f"UML {contender}: connections failed: {conn!r}")
    return {
        "uml_fetch": (mib << 20) / 1e6 / _cs(r.get("sink", "")),
        "uml_upload": (mib << 20) / 1e6 / _cs(upload),
        "uml_connrate": conns / _cs(conn),
    }


def qemu_image():
    """The cached QEMU guest image, or None (the benchmark never builds or downloads it)."""
    from tests.interop.qemu_guest import GuestImage, default_cache_dir

    for d in sorted(default_cache_dir().glob("*/"), key=lambda p: p.stat().st_mtime):
        if (d / "vmlinuz").is_file() and (d / "initrd.img").is_file():
            return GuestImage(kernel=d / "vmlinuz", initrd=d / "initrd.img")
    return None


def measure_qemu(contender: str, servers: Servers, mib: int, image, workdir: Path) -> dict:
    from tests.interop.qemu_guest import parse_console, qemu_command

    want = hashlib.sha256(servers.blob[: mib << 20]).hexdigest()
    before = len(servers.get_times)
    done_at: list[float] = []

    def boot(sock: str, alias: str) -> str:
        steps = {"fetch": f"http://{alias}:{servers.http_port}/blob?mib={mib}"}
        cmd = qemu_command(image, sock, steps)
        if contender != "netferry":
            i = cmd.index("-netdev")
            cmd[i + 1] = "user,id=n0"  # libslirp in QEMU; the guest's DHCP gets 10.0.2.15
        proc = REAPER.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines: list[str] = []
        timer = threading.Timer(600, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace").replace("\r", "")
                lines.append(line)
                if line.startswith("NETFERRY-FETCH"):
                    done_at.append(time.monotonic())
            proc.wait()
        finally:
            timer.cancel()
        return "".join(lines)

    if contender == "netferry":
        with switch("qemu", contender, workdir) as (sock, _steps, alias):
            console = boot(str(sock), alias)
    else:
        console = boot(str(workdir / "unused.sock"), "10.0.2.2")
    _lease, results = parse_console(console)
    if results.get("fetch") != f"sha256={want}":
        raise BenchError(f"QEMU {contender}: fetch failed: {results}\n{console[-1500:]}")
    gets = servers.get_times[before:]
    if not gets or not done_at:
        raise BenchError(f"QEMU {contender}: no request seen or no result line")
    size, started, _secs = gets[-1]
    return {"qemu_fetch": size / 1e6 / max(done_at[-1] - started, 1e-3)}
