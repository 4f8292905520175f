"""The IPv6 address plan of NetworkConfig: defaults, the slirp4netns plan, validation."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Address, IPv6Network

import pytest

from netferry import slirp4netns as s4n
from netferry.hostd.config import (
    DEFAULT_GUEST_MAC,
    NetworkConfig,
    parse_address6,
    parse_subnet6,
    slirp4netns_plan6,
)

A = IPv6Address


def test_defaults():
    c = NetworkConfig()
    assert c.ipv6 is True
    assert c.subnet6 == IPv6Network("fd00:192:168:127::/64")
    assert c.gateway6 == A("fd00:192:168:127::1")
    assert c.host6 == A("fd00:192:168:127::254")
    assert c.guest6 == A("fd00:192:168:127::2")
    assert c.dns6 == c.gateway6
    # the EUI-64 link-local of 5a:94:ef:e4:0c:dd (U/L bit flipped, ff:fe in the middle)
    assert c.gateway6_link_local == A("fe80::5894:efff:fee4:cdd")
    assert c.virtual_addresses6 == {c.gateway6, c.host6, c.gateway6_link_local}
    assert c.static_leases6 == {DEFAULT_GUEST_MAC: c.guest6}
    assert c.dhcp6_range == (A("fd00:192:168:127::1000"), A("fd00:192:168:127::1fff"))


def test_derived_from_another_prefix_and_gateway_mac():
    c = NetworkConfig(
        subnet6=IPv6Network("fd12:3456::/64"), gateway_mac=bytes.fromhex("020000000001")
    )
    assert (c.gateway6, c.host6, c.guest6) == (
        A("fd12:3456::1"),
        A("fd12:3456::254"),
        A("fd12:3456::2"),
    )
    assert c.gateway6_link_local == A("fe80::ff:fe00:1")


def test_slirp4netns_plan():
    c = NetworkConfig(
        subnet=IPv4Network("10.0.2.0/24"),
        gateway_ip=IPv4Network("10.0.2.0/24")[2],
        host_ip=IPv4Network("10.0.2.0/24")[2],
        guest_ip=IPv4Network("10.0.2.0/24")[100],
        **slirp4netns_plan6(),
    )
    assert c.subnet6 == IPv6Network("fd00::/64")
    assert (c.gateway6, c.host6, c.dns6, c.guest6) == (
        A("fd00::2"),
        A("fd00::2"),
        A("fd00::3"),
        A("fd00::100"),
    )
    assert c.virtual_addresses6 == {A("fd00::2"), A("fd00::3"), c.gateway6_link_local}


def test_netferry_slirp4netns_builds_the_slirp_plan_and_keeps_ipv6_off_unless_asked():
    args = s4n.build_parser().parse_args(["--disable-dns", "1234"])
    c = s4n.network_config(args, 1500)
    assert c.ipv6 is False and c.guest6 == A("fd00::100") and c.dns6 == A("fd00::3")
    args = s4n.build_parser().parse_args(["--disable-dns", "--enable-ipv6", "1234"])
    assert s4n.network_config(args, 1500).ipv6 is True


def test_ipv6_off_still_validates():
    c = NetworkConfig(ipv6=False)
    assert c.ipv6 is False and c.gateway6 == A("fd00:192:168:127::1")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subnet6": IPv6Network("fd00::/56")}, "must be a /64"),
        ({"subnet6": IPv6Network("fd00::/80")}, "must be a /64"),
        ({"subnet6": IPv4Network("10.0.0.0/24")}, "not an IPv6 network"),
        ({"gateway6": A("fd00:1::1")}, "gateway IPv6 address fd00:1::1 is not a host of"),
        ({"host6": A("fd00:192:168:127::")}, "host IPv6 address"),
        ({"dns6": A("2001:db8::53")}, "dns IPv6 address"),
        ({"guest6": A("fd00:192:168:127::1")}, "one of the switch's own"),
        ({"guest6": A("fd00:192:168:127::254")}, "one of the switch's own"),
        ({"dhcp6_range": (A("fd00:192:168:127::9"), A("fd00:192:168:127::5"))}, "DHCPv6 range"),
        ({"dhcp6_range": (A("fd00:192:168:127::9"), A("fd00:1::5"))}, "DHCPv6 range"),
        ({"static_leases6": {DEFAULT_GUEST_MAC: A("2001:db8::2")}}, "static IPv6 lease"),
        ({"static_leases6": {DEFAULT_GUEST_MAC: A("fd00:192:168:127::1")}}, "static IPv6 lease"),
    ],
)
def test_validation_errors_are_clear(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NetworkConfig(**kwargs)


def test_parsers():
    assert parse_subnet6("fd00::/64") == IPv6Network("fd00::/64")
    assert parse_address6("fd00::2", "guest") == A("fd00::2")
    with pytest.raises(ValueError, match="not an IPv6 network"):
        parse_subnet6("10.0.0.0/24")
    with pytest.raises(ValueError, match="bad IPv6 subnet"):
        parse_subnet6("fd00::1/64")
    with pytest.raises(ValueError, match="expected an IPv6 address"):
        parse_address6("10.0.0.1", "guest")


def test_ipv4_plan_unchanged():
    c = NetworkConfig()
    assert str(c.gateway_ip) == "192.168.127.1" and str(c.guest_ip) == "192.168.127.2"
