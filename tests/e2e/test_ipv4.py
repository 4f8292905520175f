"""IPv4 end to end: the Linux kernel in a namespace, through vm-switch's tap, to hostd."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def test_lease_route_dns_and_mtu(hostd, guest):
    h = hostd("--mtu", "4000")
    g = guest(h)
    assert g.addr() == "192.168.127.2/24"
    route = g.ns.run("ip", "-4", "route", "show", "default").stdout
    assert "default via 192.168.127.1 dev eth0" in route
    link = g.ns.run("ip", "link", "show", "eth0").stdout
    assert "mtu 4000" in link
    assert "nameserver 192.168.127.1" in g.resolv_conf.read_text()
