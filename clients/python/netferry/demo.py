"""`netferry demo`: `netferry run` a guest and show its network working.

Everything it talks to is local: a web server and a DNS resolver it starts on 127.0.0.1, and
the guest that `netferry run` puts in namespaces of its own. The guest shows its lease and
its IPv6 address (pinging the IPv6 gateway), resolves names, pings and fetches through .254
(the host's loopback) and serves a page that the host fetches through a published port;
hostd's counters come from the gRPC API. All of it is removed on exit, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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


GUEST_SCRIPT = r"""
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say "Inside: the lease vm-switch got from hostd's DHCP"
ip -4 addr show dev eth0; ip route
echo "resolv.conf (this mount namespace only):"; cat /etc/resolv.conf
say "IPv6 beside it: SLAAC from hostd's router advertisement, the gateway over ICMPv6"
ip -6 addr show dev eth0 scope global; ip -6 route show default
ping -6 -c 2 -i 0.3 fd00:192:168:127::1
say "DNS: a local zone name, then a name forwarded to the demo's loopback resolver"
getent hosts host.containers.internal; getent hosts www.example.test
say "ICMP and TCP to the host's loopback through .254"
ping -c 2 -i 0.3 192.168.127.254
curl -s "http://192.168.127.254:$WEB_PORT/"
say "A web server inside on port 8080, published on the host"
python3 -m http.server 8080 --bind 0.0.0.0 -d /etc >/dev/null 2>&1 &
server=$!
while [ ! -e "$STATE/fetched" ]; do sleep 0.1; done
kill "$server"
"""


def main(argv: list[str] | None = None) -> int:
    for tool in ("unshare", "ping", "curl", "getent"):
        if shutil.which(tool) is None:
            print(f"netferry demo: {tool} is missing (scripts/bootstrap installs it)")
            return 1
    ping_range = Path("/proc/sys/net/ipv4/ping_group_range")
    old_range = " ".join(ping_range.read_text().split())
    lo, hi = (int(x) for x in old_range.split())
    changed = False
    if not lo <= os.getegid() <= hi and os.geteuid() == 0:
        print(
            f"net.ipv4.ping_group_range is '{old_range}': hostd relays guest pings through "
            "unprivileged ping sockets, so the demo allows them until it ends."
        )
        ping_range.write_text("0 2147483647")
        changed = True
    tmp = Path(tempfile.mkdtemp(prefix="netferry-demo-"))
    published = _free_port()
    api = tmp / "api.sock"
    try:
        with web_server() as web_port, dns_resolver() as dns_port:
            say(
                "netferry run: a guest in new user, net, mount and pid namespaces, networked "
                "by hostd from outside"
            )
            cmd = [
                str(BIN / "netferry"), "run", "--publish", f"127.0.0.1:{published}:8080",
                "--api", str(api), "--dns-upstream", f"127.0.0.1:{dns_port}",
                "--", "sh", "-c", GUEST_SCRIPT,
            ]  # fmt: skip
            print(f"$ netferry run --publish 127.0.0.1:{published}:8080 --api {api} -- sh -c ...")
            env = dict(os.environ, WEB_PORT=str(web_port), STATE=str(tmp))
            guest = subprocess.Popen(cmd, env=env)
            ok = False
            try:
                page = _wait_for_page(published, guest)
                say(f"From the host: http://127.0.0.1:{published}/hostname (the guest's /etc)")
                print(page.strip() if page else "(no answer)")
                ok = page is not None
                say("hostd's counters, through the HostSwitch API")
                subprocess.run([str(BIN / "netferry"), "--api", str(api), "stats"])
                subprocess.run([str(BIN / "netferry"), "--api", str(api), "forwards"])
            finally:
                (tmp / "fetched").touch()
                rc = guest.wait(30)
            return 0 if ok and rc == 0 else 1
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up")
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if changed:
            ping_range.write_text(old_range)
        say("Done: netferry removed its namespaces, processes and sockets")


def _free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _wait_for_page(port: int, guest: subprocess.Popen[bytes]) -> str | None:
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and guest.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/hostname", timeout=2) as r:
                return r.read().decode()
        except OSError:
            time.sleep(0.3)
    return None


if __name__ == "__main__":
    sys.exit(main())
