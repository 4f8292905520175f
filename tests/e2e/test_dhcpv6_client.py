"""The sans-IO DHCPv6 server against a real client: ISC dhclient -6 in one namespace, the
server in another, a veth pair between them. A small UDP adapter in this test feeds the
server (no hostd: the stack's wiring comes with IPv6 integration); the client's script
configures what it was given, and `ip -6 addr` must show it."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from netferry.hostd.services.dhcpv6 import ALL_DHCP_SERVERS, Dhcpv6Config, Dhcpv6Server
from tests.conftest import Netns, wait_for
from tests.e2e.netns_socket import socket_in_netns

pytestmark = pytest.mark.e2e

GUEST_MAC = "5a:94:ef:e4:0c:ee"
PREFIX = "fd00:192:168:127::"


def _dhclient() -> str:
    path = shutil.which("dhclient") or "/sbin/dhclient"
    if not os.path.exists(path):
        pytest.fail("dhclient is missing: ./scripts/bootstrap installs isc-dhcp-client")
    return path


class UdpAdapter:
    """Port 547 in the server namespace → Dhcpv6Server.handle → the reply to the client.

    It binds to :: (with ff02::1:2 joined on the link) rather than to the link-local address:
    a socket bound to a unicast address does not receive the multicast clients send to."""

    def __init__(self, ns: Netns, ifname: str, server: Dhcpv6Server) -> None:
        self.server = server
        self.sock = socket_in_netns(ns)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("::", 547))
        ifindex = int(ns.run("cat", f"/sys/class/net/{ifname}/ifindex").stdout)
        mreq = ALL_DHCP_SERVERS.packed + struct.pack("@I", ifindex)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        self._stop = threading.Event()
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([self.sock], [], [], 0.1)
                if not ready:
                    continue
                data, addr = self.sock.recvfrom(65535)
                src = IPv6Address(addr[0].split("%")[0])
                reply = self.server.handle(data, src, None, time.monotonic())
                if reply is not None:
                    self.sock.sendto(reply.payload, (addr[0], reply.dst_port, 0, addr[3]))
        except BaseException as e:  # surfaced by the test, never swallowed
            self.errors.append(e)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@contextlib.contextmanager
def link(netns, client_mac: str) -> Iterator[tuple[Netns, Netns]]:
    srv, cli = netns(), netns()
    for ns in (srv, cli):
        # no DAD: link-local addresses usable at once (the test is about DHCPv6, not DAD)
        for conf in ("all", "default"):
            ns.run("sysctl", "-q", "-w", f"net.ipv6.conf.{conf}.accept_dad=0")
    srv.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", cli.name)
    cli.run("ip", "link", "set", "eth0", "address", client_mac)
    srv.run("ip", "link", "set", "eth0", "address", "5a:94:ef:e4:0c:dd")
    for ns in (srv, cli):
        ns.run("ip", "link", "set", "eth0", "up")
    for ns in (srv, cli):  # dhclient refuses to start before the link-local address exists
        wait_for(
            lambda ns=ns: (
                "inet6 fe80:" in ns.run("ip", "-6", "-o", "addr", "show", "dev", "eth0").stdout
            ),
            30,
            f"a link-local address in {ns.name}",
        )
    yield srv, cli


def wait_for_or_none(predicate, timeout: float):
    """Poll `predicate` until truthy (its value) or `timeout` seconds passed (None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    return None


def dhclient_log(tmp: Path) -> str:
    path = tmp / "dhclient.log"
    return path.read_text()[-3000:] if path.exists() else "(no log)"


def run_dhclient(cli: Netns, tmp: Path, *mode: str):
    """dhclient -6 in the foreground; its script records what it got and sets the address."""
    got = tmp / "got"
    script = tmp / "script.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$reason $new_ip6_address $new_dhcp6_name_servers $new_dhcp6_domain_search"'
        f" >> {got}\n"
        'case "$reason" in BOUND6|RENEW6|REBIND6|REBOOT6)\n'
        '  [ -z "$new_ip6_address" ] || ip -6 addr replace "$new_ip6_address/64" dev "$interface"'
        " ;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    conf = tmp / "dhclient6.conf"
    conf.write_text("request dhcp6.name-servers, dhcp6.domain-search;\n")
    args = [_dhclient(), "-6", "-d", "-v", "-D", "LL", *mode, "-cf", str(conf)]
    args += ["-lf", str(tmp / "leases"), "-pf", str(tmp / "pid"), "-sf", str(script), "eth0"]
    log = open(tmp / "dhclient.log", "w")
    return cli.popen(*args, stdout=log, stderr=log), got, log


@pytest.mark.parametrize(
    ("mac", "want"), [(GUEST_MAC, f"{PREFIX}2"), ("02:00:00:00:00:42", f"{PREFIX}1000")]
)
def test_dhclient_gets_its_address_and_dns(netns, short_tmp, mac, want):
    server = Dhcpv6Server(
        Dhcpv6Config(dns_servers=[IPv6Address(f"{PREFIX}1")], domain_search=["netferry.internal"])
    )
    with link(netns, mac) as (srv, cli):
        adapter = UdpAdapter(srv, "eth0", server)
        proc, got, log = run_dhclient(cli, short_tmp)
        try:

            def configured() -> bool:
                out = cli.run("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global")
                return f"inet6 {want}/64" in out.stdout

            if not wait_for_or_none(configured, 60):
                pytest.fail(f"dhclient did not configure {want}:\n{dhclient_log(short_tmp)}")
        finally:
            proc.terminate()
            proc.wait(10)
            log.close()
            adapter.close()
        assert not adapter.errors
        lines = got.read_text().split("\n")
        bound = [line.split() for line in lines if line.startswith("BOUND6")]
        assert bound and bound[0][1:] == [want, f"{PREFIX}1", "netferry.internal."]
        (lease,) = server.leases(time.monotonic())
        assert str(lease.ip) == want and lease.mac == mac and lease.static == (mac == GUEST_MAC)
        assert server.stats.malformed == 0 and server.stats.requests + server.stats.rapid_commits


def test_dhclient_stateless_information_request(netns, short_tmp):
    server = Dhcpv6Server(Dhcpv6Config(domain_search=["a.example", "b.example"]))
    with link(netns, GUEST_MAC) as (srv, cli):
        adapter = UdpAdapter(srv, "eth0", server)
        proc, got, log = run_dhclient(cli, short_tmp, "-S")
        try:
            # dhclient 4.4 runs its script for stateless information as RENEW6, no address
            if not wait_for_or_none(lambda: got.exists() and "RENEW6" in got.read_text(), 60):
                pytest.fail(
                    f"dhclient -S got no information ({got.read_text() if got.exists() else None}):\n{dhclient_log(short_tmp)}"
                )
        finally:
            proc.terminate()
            proc.wait(10)
            log.close()
            adapter.close()
        assert not adapter.errors
        (line,) = [x.split(" ") for x in got.read_text().splitlines() if x.startswith("RENEW6")]
        assert line[1:] == ["", f"{PREFIX}1", "a.example.", "b.example."]
        assert server.stats.information_requests >= 1 and server.leases(time.monotonic()) == []
        out = cli.run("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global").stdout
        assert out.strip() == ""
