"""Outbound policy against the guest's real kernel: refused connects fail at once with the
right errno, allowed ones work, the connections view and WatchEvents show both, rules
changed through the API apply to new flows, DNS upstreams follow the policy too, and IPv6
flows (to the v6 host-loopback address) follow IPv6 rules and the v4 catch-all."""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import subprocess
import threading

import pytest

from netferry.client import NetferryError
from tests.conftest import _bin
from tests.e2e.test_ipv6 import HOST6, no_tentative, wait_slaac

pytestmark = pytest.mark.e2e

HOST = "192.168.127.254"

GUEST_PROBE = r"""
import errno, json, socket, sys
host, kind, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    if kind == "tcp":
        s = socket.create_connection((host, port), timeout=20)
        s.sendall(b"hello")
        result = s.recv(5).decode()
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(20)
        s.connect((host, port))
        s.send(b"hello")
        result = s.recv(5).decode()
except OSError as e:
    result = errno.errorcode.get(e.errno, str(e))
print(json.dumps(result))
"""


def probe(g, kind: str, port: int, host: str = HOST) -> str:
    return json.loads(g.ns.python(GUEST_PROBE, host, kind, str(port)).stdout)


def test_deny_refuses_at_once_allow_works(hostd, guest, tcp_echo_server, udp_echo_server):
    denied_udp = udp_echo_server  # a live UDP echo, denied by its port
    h = hostd(
        "--allow", f"127.0.0.1:{tcp_echo_server}/tcp",
        "--deny", f"127.0.0.1:{denied_udp}/udp",
        "--deny", "127.0.0.0/8",
    )  # fmt: skip
    g = guest(h)
    events: queue.Queue = queue.Queue()
    client = h.client()
    stream = client.events()

    def watch() -> None:
        with contextlib.suppress(NetferryError):  # hostd stops at the end of the test
            for ev in stream:
                events.put(ev)

    threading.Thread(target=watch, daemon=True).start()

    assert probe(g, "tcp", tcp_echo_server) == "hello"  # allowed by the first rule
    # A live TCP listener behind a deny: RST, ECONNREFUSED (a timeout would say ETIMEDOUT).
    with tcp_listener() as live_port:
        assert probe(g, "tcp", live_port) == "ECONNREFUSED"
    assert probe(g, "udp", denied_udp) == "EHOSTUNREACH"
    r = g.ns.run("ping", "-c", "1", "-W", "5", HOST, check=False)
    assert r.returncode != 0 and "Packet filtered" in r.stdout, r.stdout

    view = client.connections()
    verdicts = {(f.protocol, f.destination, f.allowed) for f in view.flows}
    assert ("tcp", f"127.0.0.1:{tcp_echo_server}", True) in verdicts
    assert ("udp", f"127.0.0.1:{denied_udp}", False) in verdicts
    assert ("icmp", "127.0.0.1", False) in verdicts
    assert view.denied >= 3 and view.allowed >= 1
    denied = []
    while len(denied) < 3:
        ev = events.get(timeout=10)
        if ev.WhichOneof("kind") == "flow_denied":
            denied.append(ev.flow_denied.flow)
    assert {f.protocol for f in denied} == {"tcp", "udp", "icmp"}
    assert all(f.rule.startswith("deny ") for f in denied)

    # A rule added through the API applies to the next flow; removing it opens it again.
    index = client.policy_add("deny", f"127.0.0.1:{tcp_echo_server}/tcp", 0)
    assert index == 0
    assert [(r.rule, r.static) for r in client.policy_rules()][:2] == [
        (f"127.0.0.1:{tcp_echo_server}/tcp", False),
        (f"127.0.0.1:{tcp_echo_server}/tcp", True),
    ]
    assert probe(g, "tcp", tcp_echo_server) == "ECONNREFUSED"
    client.policy_remove(0)
    assert probe(g, "tcp", tcp_echo_server) == "hello"
    client.close()


def test_dns_upstream_follows_policy(hostd, guest, dns_upstream):
    h = hostd()
    g = guest(h)

    def dig() -> str:
        r = g.ns.run("dig", "+tries=1", "+time=5", "@192.168.127.1", "www.example.test", "A")
        return r.stdout

    assert "192.0.2.10" in dig()
    client = h.client()
    client.policy_add("deny", f"127.0.0.1:{dns_upstream.port}/udp")
    out = dig()
    assert "status: SERVFAIL" in out and "192.0.2.10" not in out
    queries_before = len(dns_upstream.queries)
    dig()
    assert len(dns_upstream.queries) == queries_before  # nothing went upstream
    client.policy_remove(0)
    assert "192.0.2.10" in dig()
    client.close()


def test_bad_rules_are_clear_errors(hostd, short_tmp):
    h = hostd()
    client = h.client()

    for rule, words in (
        ("10.0.0.0/33", "not an IPv4/IPv6 CIDR"),
        ("[::1]:0/tcp", "ports must be 1..65535"),
        ("2001:db8::1:80-90", "[IPv6 CIDR]:PORT"),
        ("10.0.0.0/8:0", "ports must be 1..65535"),
        ("10.0.0.0/8:90-80/tcp", "ports must be 1..65535"),
        ("host:22/icmp", "icmp has no ports"),
        ("x" * 1_000_000, "not an IPv4/IPv6 CIDR"),
    ):
        with pytest.raises(NetferryError) as e:
            client.policy_add("deny", rule)
        assert e.value.code.name == "INVALID_ARGUMENT" and words in e.value.message
        assert len(e.value.message) < 300
    with pytest.raises(NetferryError) as e:
        client.policy_remove(0)
    assert e.value.code.name == "NOT_FOUND"
    client.close()
    r = subprocess.run(
        [_bin("host-switch"), "--listen", f"unix://{short_tmp}/x.sock", "--deny", "bogus"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 2 and "'bogus' is not an IPv4/IPv6 CIDR or 'host'" in r.stderr


def test_ipv6_rules_and_a_v4_catch_all_apply_to_ipv6_flows(hostd, guest):
    """A v6 flow to the v6 host-loopback address (→ [::1] on the host): a bracketed v6 rule
    allows one port, and the policy's IPv4-written `--deny 0.0.0.0/0` denies the rest of
    IPv6 too (a v4-only policy must not leave IPv6 open)."""
    with tcp_listener("::1", echo=True) as allowed, tcp_listener("::1") as live:
        h = hostd("--allow", f"[::1]:{allowed}/tcp", "--deny", "0.0.0.0/0")
        g = guest(h)
        wait_slaac(g)
        no_tentative(g)
        assert probe(g, "tcp", allowed, HOST6) == "hello"
        # a live [::1] listener behind the catch-all: RST, not a timeout
        assert probe(g, "tcp", live, HOST6) == "ECONNREFUSED"
        client = h.client()
        verdicts = {
            (f.protocol, f.destination, f.allowed, f.rule) for f in client.connections().flows
        }
        assert ("tcp", f"[::1]:{allowed}", True, f"allow [::1]:{allowed}/tcp") in verdicts
        assert ("tcp", f"[::1]:{live}", False, "deny 0.0.0.0/0") in verdicts
        # `host` covers the IPv6 loopback: a run-time deny before the allow closes it
        client.policy_add("deny", "host/tcp", 0)
        assert probe(g, "tcp", allowed, HOST6) == "ECONNREFUSED"
        client.close()


class tcp_listener:
    """A live TCP listener on 127.0.0.1 or ::1 (accepts and echoes nothing, unless `echo`:
    then it echoes each connection's first bytes back)."""

    def __init__(self, addr: str = "127.0.0.1", echo: bool = False) -> None:
        self.addr, self.echo = addr, echo

    def __enter__(self) -> int:
        family = socket.AF_INET6 if ":" in self.addr else socket.AF_INET
        self.sock = socket.socket(family)
        self.sock.bind((self.addr, 0))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True) if self.echo else None
        if self.thread:
            self.thread.start()
        return self.sock.getsockname()[1]

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed at the end of the test
            with conn:
                conn.settimeout(20)
                with contextlib.suppress(OSError):
                    got = b""
                    while len(got) < 5 and (chunk := conn.recv(5 - len(got))):
                        got += chunk
                    conn.sendall(got)

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the echo thread
        self.sock.close()
        if self.thread:
            self.thread.join(5)
