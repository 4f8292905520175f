"""`netferry demo`: bring up hostd and a namespace guest and show the network working.

Everything it talks to is local: a web server and a DNS resolver it starts on 127.0.0.1,
hostd on a private unix socket, and a guest namespace it creates. It removes all of it on
exit, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BIN = Path(sys.executable).parent
PAGE = b"<h1>Hello from the host's loopback, through netferry</h1>\n"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


@contextlib.contextmanager
def web_server() -> Iterator[int]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAGE)))
            self.end_headers()
            self.wfile.write(PAGE)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


@contextlib.contextmanager
def dns_resolver() -> Iterator[int]:
    """A resolver on loopback for names outside netferry's zones: the demo never asks the
    machine's real resolver."""
    from dnslib import RR
    from dnslib.server import BaseResolver, DNSServer

    class Resolver(BaseResolver):
        def resolve(self, request, handler):  # type: ignore[no-untyped-def]
            reply = request.reply()
            if str(request.q.qname).lower() == "www.example.test.":
                reply.add_answer(*RR.fromZone("www.example.test. 60 IN A 192.0.2.80"))
            else:
                reply.header.rcode = 3
            return reply

    class Quiet:
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return lambda *a, **k: None

    srv = DNSServer(Resolver(), port=0, address="127.0.0.1", logger=Quiet())
    srv.start_thread()
    try:
        yield srv.server.server_address[1]
    finally:
        srv.stop()
        srv.server.server_close()


def run(cmd: list[str], ns: str | None = None) -> str:
    full = (["ip", "netns", "exec", ns] if ns else []) + cmd
    print("$ " + " ".join(cmd), flush=True)
    r = subprocess.run(full, capture_output=True, text=True, timeout=60)
    out = (r.stdout + r.stderr).rstrip()
    if out:
        print(out, flush=True)
    return out


def wait_until(pred, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def main(argv: list[str] | None = None) -> int:
    if os.geteuid() != 0:
        print("netferry demo: run as root (it creates a network namespace)", file=sys.stderr)
        return 1
    for tool in ("ip", "ping", "dig", "curl"):
        if shutil.which(tool) is None:
            print(f"netferry demo: {tool} is missing (scripts/bootstrap installs it)")
            return 1
    ping_range = Path("/proc/sys/net/ipv4/ping_group_range")
    old_range = " ".join(ping_range.read_text().split())
    lo, hi = (int(x) for x in old_range.split())
    if not lo <= 0 <= hi:
        print(
            f"net.ipv4.ping_group_range is '{old_range}': hostd relays guest pings through "
            "unprivileged ping sockets, so the demo allows them until it ends."
        )
        ping_range.write_text("0 2147483647")
    tmp = Path(tempfile.mkdtemp(prefix="netferry-demo-"))
    ns = f"netferry-demo-{os.getpid()}"
    procs: list[subprocess.Popen[bytes]] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with web_server() as http_port, dns_resolver() as dns_port:
            say("Starting hostd (host-switch) on a private unix socket")
            sock = tmp / "link.sock"
            hostd_log = tmp / "hostd.log"
            hostd = subprocess.Popen(
                [
                    str(BIN / "host-switch"),
                    "--listen",
                    f"unix://{sock}",
                    "--dns-upstream",
                    f"127.0.0.1:{dns_port}",
                    "--log-file",
                    str(hostd_log),
                ]
            )
            procs.append(hostd)
            if not wait_until(sock.exists, 10):
                print(hostd_log.read_text() if hostd_log.exists() else "hostd did not start")
                return 1
            print(f"hostd listening on unix://{sock}")
            say(f"Creating guest namespace {ns} with vm-switch on tap eth0")
            subprocess.run(["ip", "netns", "add", ns], check=True)
            guest_log = tmp / "vm-switch.log"
            vm = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    str(BIN / "vm-switch"),
                    "--connect",
                    f"unix://{sock}",
                    "--resolv-conf",
                    str(tmp / "resolv.conf"),
                    "--log-file",
                    str(guest_log),
                ]
            )
            procs.append(vm)
            leased = wait_until(
                lambda: guest_log.exists() and "dhcp.bound" in guest_log.read_text(), 30
            )
            if not leased:
                print("no DHCP lease within 30 s:\n" + guest_log.read_text())
                return 1
            say("The guest's lease (DHCP from hostd)")
            run(["ip", "-4", "addr", "show", "dev", "eth0"], ns)
            run(["ip", "route"], ns)
            print("resolv.conf written by vm-switch:\n" + (tmp / "resolv.conf").read_text())
            say("ICMP: the gateway (answered by hostd) and .254 (the host's 127.0.0.1)")
            run(["ping", "-c", "2", "-i", "0.3", "192.168.127.1"], ns)
            run(["ping", "-c", "2", "-i", "0.3", "192.168.127.254"], ns)
            say("DNS on the gateway: local zone, then a name forwarded to the loopback resolver")
            run(["dig", "+short", "@192.168.127.1", "host.containers.internal"], ns)
            run(["dig", "+short", "@192.168.127.1", "www.example.test"], ns)
            say("TCP: fetch a page from the host's loopback web server through .254")
            page = run(["curl", "-s", f"http://192.168.127.254:{http_port}/"], ns)
            ok = page.strip().encode() == PAGE.strip()
            print(
                f"sha256 {hashlib.sha256(page.encode()).hexdigest()[:16]}… "
                f"{'matches' if ok else 'DOES NOT match'} the served page"
            )
            say("hostd's counters")
            hostd.send_signal(signal.SIGUSR1)
            time.sleep(0.3)
            for line in hostd_log.read_text().splitlines():
                if "hostd.stats" in line:
                    print(line[line.index("stats=") :][:600] + " …")
            return 0 if ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up")
        return 130
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
        ping_range.write_text(old_range)
        say("Cleaned up: namespace, processes and sockets removed")


if __name__ == "__main__":
    sys.exit(main())
