"""Small load peers for bench/run.py, run as separate processes (so their CPU is not the
benchmark's, and a guest-side one can run inside a namespace with `ip netns exec`).

    peers.py server HOST PORT            echo server: every connection echoes what it reads
                                         and is closed on EOF; prints "ready PORT" once
                                         listening (PORT 0: any free port)
    peers.py connrate HOST PORT SECS     sequential connect()/close() for SECS seconds
    peers.py pingpong HOST PORT SECS N   1-byte request/response, at most N round trips
    peers.py hold HOST PORT N            open N connections, one round trip on each, print
                                         the JSON report, hold them until stdin closes (or
                                         120 s), then close them

Clients print one JSON line with their result. Every loop is bounded in time and count.
Only the standard library is used.
"""

from __future__ import annotations

import json
import resource
import selectors
import socket
import statistics
import sys
import time


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def server(host: str, port: int) -> None:
    _raise_nofile()
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
    ls.listen(4096)
    ls.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ, None)
    print(f"ready {ls.getsockname()[1]}", flush=True)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                for _ in range(64):
                    try:
                        c, _addr = ls.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # EMFILE etc.: try again on the next event
                        break
                    c.setblocking(False)
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sel.register(c, selectors.EVENT_READ, True)
                continue
            c = key.fileobj
            try:
                data = c.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                try:
                    c.sendall(data)
                    continue
                except OSError:
                    pass
            sel.unregister(c)
            c.close()


def connrate(host: str, port: int, secs: float) -> None:
    ok = errors = 0
    first_error = None
    start = time.monotonic()
    deadline = start + secs
    while time.monotonic() < deadline and ok + errors < 1_000_000:
        try:
            s = socket.create_connection((host, port), timeout=5)
            s.close()
            ok += 1
        except OSError as e:
            errors += 1
            first_error = first_error or repr(e)
            if errors > 100:
                break
    elapsed = time.monotonic() - start
    print(
        json.dumps(
            {
                "connections": ok,
                "errors": errors,
                "seconds": elapsed,
                "per_second": ok / elapsed,
                "first_error": first_error,
            }
        )
    )


def pingpong(host: str, port: int, secs: float, n: int) -> None:
    s = socket.create_connection((host, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples: list[float] = []
    # a few warm-up round trips, not counted
    for _ in range(20):
        s.sendall(b"x")
        s.recv(1)
    deadline = time.monotonic() + secs
    clock = time.perf_counter
    while len(samples) < n and time.monotonic() < deadline:
        t0 = clock()
        s.sendall(b"x")
        if not s.recv(1):
            raise SystemExit("server closed the connection")
        samples.append(clock() - t0)
    s.close()
    samples.sort()
    print(
        json.dumps(
            {
                "count": len(samples),
                "median_us": statistics.median(samples) * 1e6,
                "p99_us": samples[int(len(samples) * 0.99) - 1] * 1e6,
                "min_us": samples[0] * 1e6,
            }
        )
    )


def hold(host: str, port: int, n: int) -> None:
    _raise_nofile()
    socks = []
    errors = 0
    first_error = None
    deadline = time.monotonic() + 60
    while len(socks) < n and time.monotonic() < deadline and errors < 50:
        try:
            socks.append(socket.create_connection((host, port), timeout=5))
        except OSError as e:
            errors += 1
            first_error = first_error or repr(e)
    # every connection must be established end to end: one round trip on each
    alive = 0
    for s in socks:
        try:
            s.sendall(b"x")
            if s.recv(1) == b"x":
                alive += 1
        except OSError as e:
            first_error = first_error or repr(e)
    print(
        json.dumps(
            {"opened": len(socks), "alive": alive, "errors": errors, "first_error": first_error}
        ),
        flush=True,
    )
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin, selectors.EVENT_READ)
    sel.select(timeout=120)
    for s in socks:
        s.close()


def main(argv: list[str]) -> None:
    mode, host, port = argv[0], argv[1], int(argv[2])
    if mode == "server":
        server(host, port)
    elif mode == "connrate":
        connrate(host, port, float(argv[3]))
    elif mode == "pingpong":
        pingpong(host, port, float(argv[3]), int(argv[4]))
    elif mode == "hold":
        hold(host, port, int(argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])
