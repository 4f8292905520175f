"""guestd/ipv6_setup.py: the RA options the kernel passes up by netlink, resolv.conf merging,
`ip -6 addr` parsing and the DHCPv6 lease line (the kernel path is in tests/e2e)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from ipaddress import IPv6Address

from netferry.guestd import ipv6_setup as v6
from netferry.hostd.stack import ndp

GW = IPv6Address("fd00:192:168:127::1").packed
LL = IPv6Address("fe80::1").packed


def useropt_message(options: bytes, ifindex: int = 7, icmp_type: int = 134) -> bytes:
    """An RTM_NEWNDUSEROPT netlink message as the kernel builds it (ndisc_ra_useropt)."""
    body = v6.NDUSEROPT_HDR.pack(socket.AF_INET6, 0, len(options), ifindex, icmp_type, 0, 0, 0)
    body += options
    body += struct.pack("=HH", 20, v6.NDUSEROPT_SRCADDR) + LL  # the RA's source address
    return v6.NLMSG_HDR.pack(16 + len(body), v6.RTM_NEWNDUSEROPT, 0, 0, 0) + body


def ra_options(ra: ndp.RouterAdvertisement) -> bytes:
    return ndp.build_ra(LL, GW, ra)[16:]  # after the ICMPv6 and RA headers


def test_rdnss_and_dnssl_from_a_netlink_message():
    ra = ndp.RouterAdvertisement(
        source_lla=bytes(6),
        rdnss=[GW, IPv6Address("fd00::3").packed],
        dnssl=["netferry.internal", "example.org"],
    )
    msg = useropt_message(ra_options(ra))
    other = v6.NLMSG_HDR.pack(20, 16, 0, 0, 0) + bytes(4)  # an RTM_NEWLINK-sized neighbour
    (got,) = v6.parse_nd_useropt(other + msg)
    assert got.ifindex == 7
    assert got.servers == [("fd00:192:168:127::1", 1800), ("fd00::3", 1800)]
    assert got.search == [("netferry.internal", 1800), ("example.org", 1800)]


def test_malformed_options_and_other_messages_are_skipped():
    assert v6.parse_nd_useropt(useropt_message(ra_options(ndp.RouterAdvertisement()), 1, 133)) == []
    assert v6.parse_nd_useropt(b"\x01\x02") == []
    zero_length = bytes([25, 0]) + bytes(6)  # would loop forever if followed
    assert v6.parse_nd_options(1, zero_length).servers == []
    truncated = bytes([25, 3, 0, 0, 0, 0, 7, 8]) + GW  # claims 24 bytes, has 24: one server
    assert v6.parse_nd_options(1, truncated).servers == [("fd00:192:168:127::1", 0x708)]
    assert v6.parse_nd_options(1, truncated[:-1]).servers == []
    bad_label = bytes([31, 2, 0, 0, 0, 0, 0, 9]) + bytes([70]) + b"abc" + bytes(4)
    assert v6.parse_nd_options(1, bad_label).search == []


class FakeLoop:
    def __init__(self) -> None:
        self.now = 100.0

    def time(self) -> float:
        return self.now


def test_watcher_tracks_lifetimes_and_withdrawals():
    changes: list[tuple[list[str], list[str]]] = []
    w = v6.RdnssWatcher.__new__(v6.RdnssWatcher)  # no socket: feed it directly
    w.servers, w.search, w.on_change = {}, {}, lambda s, d: changes.append((s, d))
    w.update(v6.UserOptions(1, [("fd00::1", 60)], [("a.example", 60)]), 0.0)
    w.update(v6.UserOptions(1, [("fd00::1", 60)], [("a.example", 60)]), 1.0)  # no change
    w.update(v6.UserOptions(1, [("fd00::1", 0)], []), 2.0)  # withdrawn
    w.update(v6.UserOptions(1, [("fd00::2", 10)], []), 100.0)  # a.example expired meanwhile
    assert changes == [(["fd00::1"], ["a.example"]), ([], ["a.example"]), (["fd00::2"], [])]


def test_resolv_conf_merges_families_in_place(tmp_path):
    path = tmp_path / "resolv.conf"
    rc = v6.ResolvConf(str(path))
    rc.set_v6("ra", ["fd00::1"], ["netferry.internal."])
    assert path.read_text() == "search netferry.internal\nnameserver fd00::1\n"
    inode = os.stat(path).st_ino
    rc.set_v4(["192.168.127.1"], ["netferry.internal"])
    rc.set_v6("dhcpv6", ["fd00::1", "fd00::3"], ["other.example"])
    assert path.read_text() == (
        "search netferry.internal other.example\n"
        "nameserver 192.168.127.1\nnameserver fd00::1\nnameserver fd00::3\n"
    )
    assert os.stat(path).st_ino == inode  # a bind mount of it sees the update
    rc.set_v6("dhcpv6", [], [])
    assert path.read_text().count("nameserver") == 2 and rc.has_v6
    v6.ResolvConf(None).set_v4(["192.168.127.1"], [])  # no path: writes nothing


def test_ip_addr_lines():
    text = (
        "2: eth0    inet6 fd00:192:168:127::2/128 scope global tentative \\       valid_lft\n"
        "2: eth0    inet6 fd00:192:168:127:5894:efff:fee4:cee/64 scope global dynamic mngtmpaddr\n"
        "2: eth0    inet6 fe80::1/64 scope link dadfailed tentative\n"
    )
    assert v6.parse_ip_addr(text) == [
        ("fd00:192:168:127::2", 128, False),
        ("fd00:192:168:127:5894:efff:fee4:cee", 64, True),
        ("fe80::1", 64, False),
    ]


def test_router_solicitation_and_lease_line():
    rs = v6.router_solicitation()  # the kernel fills in the checksum
    built = ndp.build_rs(bytes(16), IPv6Address("ff02::2").packed)
    assert rs[:2] + rs[4:] == built[:2] + built[4:] and rs[2:4] == bytes(2)
    line = "NETFERRY-LEASE6 ip=fd00:192:168:127::2 dns=fd00:192:168:127::1 search=a.example."
    assert v6.parse_lease6_line(line) == {
        "ip": "fd00:192:168:127::2",
        "dns": "fd00:192:168:127::1",
        "search": "a.example.",
    }
    assert (
        "%(out)s" in v6.DHCLIENT_SCRIPT
        and "/etc/resolv.conf" not in v6.DHCLIENT_SCRIPT.split("\n", 2)[2]
    )


def test_readiness_stops_waiting_for_ipv6_when_no_router_answers():
    """A hostd without IPv6 never answers the solicitation: `wait_up` gives up after the
    router wait, not after the (here hour-long) timeout; once an RA is seen it waits for
    the address as long as the timeout allows."""

    async def scenario() -> tuple[bool, bool]:
        silent = v6.Ipv6Guest("eth0", v6.ResolvConf(None), dhcpv6=False)
        silent.solicited.set()
        no_router = await silent.wait_up(3600, router_wait=0.05)
        answered = v6.Ipv6Guest("eth0", v6.ResolvConf(None), dhcpv6=False)
        answered.solicited.set()
        answered.router_seen.set()
        asyncio.get_running_loop().call_later(0.1, answered.ready.set)  # after router_wait
        up = await answered.wait_up(3600, router_wait=0.05)
        return no_router, up

    assert asyncio.run(scenario()) == (False, True)
