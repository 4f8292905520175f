"""Descriptor exhaustion costs guests their new connections, never a link, the API or DNS.

hostd runs under a lowered descriptor limit (`prlimit --nofile=512:512`). Its budget for guest sockets is derived from the limit
(512 less a reserve of 256 = 256, half of it per guest). Guest A opens UDP flows, then TCP
connections to the host until one is refused: refused at once with RST (ConnectionRefused,
not a timeout), then a new UDP flow gets ICMP administratively prohibited (a hard error
for the guest's socket: EHOSTUNREACH, where host unreachable would only time out). Afterwards A's link still
carries pings, the gRPC API answers, DNS answers (a local name and one forwarded to the
test's loopback resolver), and a second guest gets a lease and a working TCP connection.
The refusals are counted. (It was: 5,000 UDP flows at a 1,024 limit dropped links with
EMFILE in `data_received` and the API and DNS failed for ~90 s.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from netferry.hostd.nat.budget import default_max_connections
from tests.conftest import STARTED

pytestmark = pytest.mark.e2e

LIMIT = 512
UDP_FLOWS = 40

# Runs in guest A: UDP flows (each answered by the echo server), then TCP connections held
# open until one is refused, then one more UDP flow. Prints what happened as JSON.
GUEST_A = r"""
import errno, json, socket, sys
host, tcp_port, udp_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
udp = []
for i in range({udp_flows}):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.connect((host, udp_port))
    s.send(b"flow %d" % i)
    assert s.recv(100) == b"flow %d" % i
    udp.append(s)
tcp, refusal = [], None
for _ in range(1000):
    s = socket.socket()
    s.settimeout(10)
    try:
        s.connect((host, tcp_port))
    except OSError as e:
        refusal = type(e).__name__
        break
    tcp.append(s)
late = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
late.settimeout(5)
late.connect((host, udp_port))
late.send(b"late")
try:
    late_result = late.recv(100).decode()
except OSError as e:
    late_result = errno.errorcode.get(e.errno, type(e).__name__)
for s in tcp[:3]:  # the connections that were accepted still carry data
    s.sendall(b"ping")
    assert s.recv(4) == b"ping"
print(json.dumps({{"tcp": len(tcp), "refusal": refusal, "late_udp": late_result}}))
sys.stdout.flush()
sys.stdin.read()  # hold every socket until the test is done
"""


def test_guest_exhausting_its_descriptor_budget_loses_nothing_else(
    hostd, guest, tcp_echo_server, udp_echo_server
) -> None:
    h = hostd(wrapper=("prlimit", f"--nofile={LIMIT}:{LIMIT}"))
    budget = default_max_connections(LIMIT)
    share = budget // 2
    assert budget == 256 and UDP_FLOWS < share
    a = guest(h)
    proc = a.ns.popen(
        sys.executable, "-c", GUEST_A.format(udp_flows=UDP_FLOWS), "192.168.127.254",
        str(tcp_echo_server), str(udp_echo_server),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    STARTED.append(proc)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, f"guest A's script failed (exit {proc.poll()})"
        result = json.loads(line)
        # Refused at once with RST when the guest's share was spent, UDP flows included.
        assert result["refusal"] == "ConnectionRefusedError", result
        assert result["tcp"] == share - UDP_FLOWS, result
        assert result["late_udp"] == "EHOSTUNREACH", result  # ICMP admin. prohibited: hard

        # Nothing else was lost: A's link, the API, DNS, and a second guest.
        a.ns.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "192.168.127.1")
        api = h.client()
        assert api.leases()
        counters = api.stats().counters  # the refusals, through the gRPC API
        assert counters["descriptors.refused_guest_share"] >= 2
        assert counters["tcp_nat.budget_refused"] >= 1
        dig = a.ns.run("dig", "+short", "+time=2", "+tries=2", "@192.168.127.1",
                       "gateway.containers.internal")  # fmt: skip
        assert dig.stdout.split() == ["192.168.127.1"]
        dig = a.ns.run("dig", "+short", "+time=2", "+tries=2", "@192.168.127.1",
                       "www.example.test")  # fmt: skip
        assert dig.stdout.split() == ["192.0.2.10"]
        b = guest(h, mac="5a:94:ef:e4:0c:ef")
        echo = b.ns.python(
            "import socket, sys\n"
            "s = socket.create_connection(('192.168.127.254', int(sys.argv[1])), timeout=10)\n"
            "s.sendall(b'second guest'); print(s.recv(100).decode())",
            str(tcp_echo_server),
        )
        assert echo.stdout.strip() == "second guest"

        stats = h.stats()
        d = stats["descriptors"]
        assert d["nofile_limit"] == LIMIT and d["limit"] == budget and d["per_guest"] == share
        assert d["refused_guest_share"] >= 2  # the TCP dial and the late UDP flow
        assert stats["tcp_nat"]["budget_refused"] >= 1
        assert stats["udp_nat"]["budget_refused"] >= 1
        events = h.log_events()
        assert not [e for e in events if e.get("event") == "link.down"]
        assert not [e for e in events if e.get("level") == "error"]
        assert any(e.get("event") == "budget.refused" for e in events)
    finally:
        proc.kill()
        proc.wait()
