"""vm-switch's IPv6 bring-up (guestd/ipv6_setup.py) against the Linux kernel, without hostd:
a veth pair whose gateway end is test_ndp_kernel's GatewayAdapter (the sans-IO NdpResponder
on an AF_PACKET socket). The guest end gets the sysctls, the RDNSS watcher and a router
solicitation; the kernel must configure SLAAC and the default route, and the RA's DNS server
and search list must reach the resolv.conf."""

from __future__ import annotations

import pytest

from netferry.hostd.config import NetworkConfig
from tests.conftest import wait_for
from tests.e2e.test_ndp_kernel import GUEST_MAC, GatewayAdapter

pytestmark = pytest.mark.e2e

GUEST_SIDE = """
import asyncio, sys
from netferry.guestd.ipv6_setup import Ipv6Guest, ResolvConf, configure_sysctls

async def main():
    resolv = ResolvConf(sys.argv[1])
    resolv.set_v4(["192.168.127.1"], [])
    v6 = Ipv6Guest("eth0", resolv, dhcpv6=False)
    assert configure_sysctls("eth0", True) is None
    v6.open()  # before the link comes up, as vm-switch does
    proc = await asyncio.create_subprocess_exec("ip", "link", "set", "eth0", "up")
    await proc.wait()
    v6.start()
    await asyncio.wait_for(v6.ready.wait(), 60)
    print("ready", v6.watcher.messages >= 1)
    await v6.stop()

asyncio.run(main())
"""


def test_slaac_route_and_rdnss_into_resolv_conf(netns, short_tmp):
    gw, guest = netns(), netns()
    for key in ("all", "default"):
        gw.run("sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=1")
        # as a host with IPv6 turned off by default would hand it to a new namespace: the
        # guest side must turn it on for its own interface
        guest.run("sysctl", "-q", "-w", f"net.ipv6.conf.{key}.accept_ra=0")
    gw.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", guest.name)
    gw.run("ip", "link", "set", "eth0", "address", "5a:94:ef:e4:0c:dd", "up")
    guest.run("ip", "link", "set", "eth0", "address", GUEST_MAC)
    config = NetworkConfig(mtu=1500, dns_search=["netferry.internal"])
    adapter = GatewayAdapter(gw, config)
    resolv = short_tmp / "resolv.conf"
    try:
        r = guest.python(GUEST_SIDE, str(resolv), timeout=90)
        assert r.stdout.splitlines()[-1].split() == ["ready", "True"], r.stdout + r.stderr
        assert "solicit_failed" not in r.stdout
        addrs = guest.run("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global")
        assert "inet6 fd00:192:168:127:" in addrs.stdout
        route = guest.run("ip", "-6", "route", "show", "default").stdout
        assert f"via {config.gateway6_link_local} dev eth0" in route
        text = resolv.read_text()
        assert text == (
            f"search netferry.internal\nnameserver 192.168.127.1\nnameserver {config.dns6}\n"
        ), text
        assert guest.run("cat", "/proc/sys/net/ipv6/conf/eth0/accept_ra").stdout.strip() == "2"
        wait_for(lambda: adapter.responder.stats.get("ndp_rs_in", 0) >= 1, 10, "an RS")
    finally:
        adapter.close()
    assert not adapter.errors


def test_no_ipv6_disables_it_on_the_tap(netns):
    ns = netns()
    ns.run("ip", "tuntap", "add", "eth0", "mode", "tap")
    r = ns.python(
        "from netferry.guestd.ipv6_setup import configure_sysctls as c; print(c('eth0', False))"
    )
    assert r.stdout.strip() == "None"
    assert ns.run("cat", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6").stdout.strip() == "1"
    ns.run("ip", "link", "set", "eth0", "up")
    assert ns.run("ip", "-6", "-o", "addr", "show", "dev", "eth0").stdout.strip() == ""


DHCP6_SIDE = """
import asyncio, os, sys
from netferry.guestd.ipv6_setup import Dhcpv6Client

async def main():
    got = asyncio.Event()
    seen = []
    def on_lease(ip, servers, search):
        seen.append((ip, servers, search))
        got.set()
    client = Dhcpv6Client("eth0", on_lease)
    client.start()
    await asyncio.wait_for(got.wait(), 60)
    proc = await asyncio.create_subprocess_exec(
        "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global",
        stdout=asyncio.subprocess.PIPE)
    out = (await proc.communicate())[0].decode()
    print("applied", "inet6 fd00:192:168:127::2/128" in out)
    tmp = client.tmp
    await client.stop()
    print("lease", *seen[0][0:1], ",".join(seen[0][1]), ",".join(seen[0][2]), os.path.exists(tmp))

asyncio.run(main())
"""


def test_dhcpv6_client_applies_the_address_and_reports_dns(netns):
    from ipaddress import IPv6Address

    from netferry.hostd.services.dhcpv6 import Dhcpv6Config, Dhcpv6Server
    from tests.e2e.test_dhcpv6_client import UdpAdapter, link

    server = Dhcpv6Server(
        Dhcpv6Config(
            dns_servers=[IPv6Address("fd00:192:168:127::1")], domain_search=["netferry.internal"]
        )
    )
    with link(netns, GUEST_MAC) as (srv, cli):
        adapter = UdpAdapter(srv, "eth0", server)
        try:
            r = cli.python(DHCP6_SIDE, timeout=90)
            assert "applied True" in r.stdout, r.stdout + r.stderr
            last = r.stdout.splitlines()[-1].split()
            assert last == [
                "lease",
                "fd00:192:168:127::2",
                "fd00:192:168:127::1",
                "netferry.internal.",
                "False",  # its temp dir is gone
            ], r.stdout + r.stderr
        finally:
            adapter.close()
        assert not adapter.errors
