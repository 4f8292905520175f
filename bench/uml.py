#!/usr/bin/env python3
"""User Mode Linux over bess: a large HTTP fetch through netferry vs through slirp4netns.

    sudo .venv/bin/python bench/uml.py                 # 256 MiB, 3 rounds, both contenders
    sudo .venv/bin/python bench/uml.py --mib 64 --rounds 1

One UML guest per measurement (the one tests/interop/test_uml.py boots, same command line),
its bess NIC connected to either
- netferry: ``host-switch --listen unixpacket://SOCK``; the guest takes its DHCP lease
  (192.168.127.2) and fetches from 192.168.127.254, hostd's alias for host loopback; or
- slirp4netns: ``slirp4netns --target-type=bess SOCK``; the guest sets 10.0.2.100/24 via
  10.0.2.2 (its man page's plan) and fetches from 10.0.2.2, slirp's alias for host loopback.

The guest fetches the blob twice: into ``sha256sum`` (checked against the blob: a wrong byte
fails the run) and into /dev/null (the network alone: UML has one CPU, which the hashing
shares). Times are the guest's (its uptime, 10 ms steps) around each ``wget``; MB/s are
10^6 bytes per second. Contenders alternate within each round; medians over rounds.
Nothing is asserted.

Network safety: the only server is an HTTP server on 127.0.0.1 started here; the guest
sends only to the host-loopback alias of the switch it is attached to and never resolves a
name; hostd's DNS upstream is a dead loopback port and slirp4netns runs with --disable-dns.
Every process, socket and temp dir made here is removed on exit and on failure.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.interop.uml_guest import find_uml, run_uml  # noqa: E402

CONTENDERS = ("netferry", "slirp4netns")
GUEST_TIMEOUT = 900.0


class BenchError(RuntimeError):
    pass


@contextmanager
def blob_server(data: bytes) -> Iterator[int]:
    """HTTP on 127.0.0.1: GET /blob answers ``data``. Yields the port."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path != "/blob":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            view = memoryview(data)
            for offset in range(0, len(data), 1 << 20):
                self.wfile.write(view[offset : offset + (1 << 20)])

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="blob-server", daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        if proc.poll() is not None:
            raise BenchError(f"{what} exited {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not create {path}")
        time.sleep(0.05)


@contextmanager
def switch(contender: str, workdir: Path) -> Iterator[tuple[Path, dict[str, str], str]]:
    """Start one contender's bess listener; yields (socket, static-address steps, host alias)."""
    sock = workdir / f"{contender}.sock"
    log = open(workdir / f"{contender}.log", "wb")
    if contender == "netferry":
        host_switch = Path(sys.executable).parent / "host-switch"
        cmd = [str(host_switch), "--listen", f"unixpacket://{sock}"]
        cmd += ["--dns-upstream", "127.0.0.1:9", "--log-file", str(workdir / "hostd.log")]
        steps: dict[str, str] = {}
        host_alias = "192.168.127.254"
    else:
        cmd = ["slirp4netns", "--target-type=bess", "--disable-dns", str(sock)]
        steps = {"addr": "10.0.2.100/24", "gw": "10.0.2.2"}
        host_alias = "10.0.2.2"
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_socket(sock, proc, contender)
        yield sock, steps, host_alias
    finally:
        _stop(proc)
        log.close()
        sock.unlink(missing_ok=True)


def measure(contender: str, port: int, digest: str, workdir: Path) -> tuple[float, float]:
    """One guest run: (seconds of the hashed fetch, seconds of the /dev/null fetch)."""
    with switch(contender, workdir) as (sock, steps, host_alias):
        url = f"http://{host_alias}:{port}/blob"
        result = run_uml(str(sock), {**steps, "fetch": url, "sink": url}, GUEST_TIMEOUT)
    if result.results.get("fetch") != f"sha256={digest}":
        raise BenchError(f"{contender}: fetch failed or corrupted\n{result.describe()}")
    hashed = result.results.get("fetchtime", "")
    sink = result.results.get("sink", "")
    if not hashed.startswith("cs=") or not sink.startswith("cs="):
        raise BenchError(f"{contender}: no timings\n{result.describe()}")
    return int(hashed[3:]) / 100, int(sink[3:]) / 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="blob size (default 256 MiB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    args = parser.parse_args()
    contenders = args.contenders.split(",")
    for c in contenders:
        if c not in CONTENDERS:
            parser.error(f"unknown contender {c!r}")
    find_uml()
    if "slirp4netns" in contenders and shutil.which("slirp4netns") is None:
        raise BenchError("slirp4netns not found: run scripts/bootstrap")

    data = os.urandom(args.mib << 20)
    digest = hashlib.sha256(data).hexdigest()
    size_mb = len(data) / 1e6
    times: dict[str, dict[str, list[float]]] = {c: {"hashed": [], "sink": []} for c in contenders}
    workdir = Path(tempfile.mkdtemp(prefix="nf-bench-uml-"))
    try:
        with blob_server(data) as port:
            for r in range(args.rounds):
                order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
                for c in order:
                    hashed, sink = measure(c, port, digest, workdir)
                    times[c]["hashed"].append(hashed)
                    times[c]["sink"].append(sink)
                    print(
                        f"round {r + 1} {c}: sha256 fetch {size_mb / hashed:.1f} MB/s, "
                        f"/dev/null fetch {size_mb / sink:.1f} MB/s",
                        flush=True,
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nUML over bess, {args.mib} MiB via host loopback, median of {args.rounds} rounds:")
    print("| contender | into sha256sum MB/s | into /dev/null MB/s |")
    print("|---|---|---|")
    for c in contenders:
        hashed = size_mb / statistics.median(times[c]["hashed"])
        sink = size_mb / statistics.median(times[c]["sink"])
        print(f"| {c} | {hashed:.1f} | {sink:.1f} |")


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        sys.exit(f"bench/uml.py: {e}")
