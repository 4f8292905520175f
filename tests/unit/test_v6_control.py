"""IPv6's control plane (issue 15): host-switch's --subnet6/--no-ipv6, the AAAA records of the
local zones, DHCPv6 leases in the lease APIs and the state file, and the slirp4netns drop-in's
--enable-ipv6. The data path is tested in tests/e2e against the kernel."""

from __future__ import annotations

import asyncio
import json
import logging
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from pathlib import Path

import pytest
import scapy.layers.dhcp6 as d6
from dnslib import QTYPE, RCODE, DNSRecord

from netferry import slirp4netns as s4n
from netferry.goflags import parse_args as parse_go_flags
from netferry.hostd import cli as hostd_cli
from netferry.hostd.config import NetworkConfig
from netferry.hostd.services.dhcpv6 import Dhcpv6Server, dhcpv6_config_for
from netferry.hostd.services.dns import DnsResolver, default_zones
from netferry.hostd.stack.network import Network

A6 = IPv6Address
PREFIX = "fd00:192:168:127::"
OTHER_MAC = "02:00:00:00:00:07"


def parse(*extra: str):
    argv = ["--listen", "stdio://", "--dns-upstream", "127.0.0.1", *extra]
    return hostd_cli.config_from_args(parse_go_flags(hostd_cli.build_parser(), argv))


# ---- host-switch's command line ------------------------------------------------------------


def test_ipv6_is_on_by_default_with_the_documented_plan():
    c = parse()
    assert c.ipv6 is True
    assert hostd_cli.address_plan6(c) == {
        "subnet6": f"{PREFIX}/64",
        "gateway6": f"{PREFIX}1",
        "gateway6_link_local": "fe80::5894:efff:fee4:cdd",
        "host_loopback6": f"{PREFIX}254",
        "dns6": f"{PREFIX}1",
        "guest6": f"{PREFIX}2",
        "dhcp6_pool": f"{PREFIX}1000-{PREFIX}1fff",
    }


def test_subnet6_moves_the_plan_and_no_ipv6_turns_it_off():
    c = parse("--subnet6", "fd12:3456:789a:1::/64")
    assert (c.gateway6, c.host6, c.guest6) == (
        A6("fd12:3456:789a:1::1"),
        A6("fd12:3456:789a:1::254"),
        A6("fd12:3456:789a:1::2"),
    )
    off = parse("--no-ipv6")
    assert off.ipv6 is False and hostd_cli.address_plan6(off) == {"ipv6": "off"}
    # Go flag syntax, as the rest of host-switch's flags
    assert parse("-subnet6=fd00:9::/64").subnet6.network_address == A6("fd00:9::")


def test_no_host_loopback_refuses_host6_too():
    c = parse("--no-host-loopback")
    assert c.host_loopback is False  # the one switch the stack reads for .254 and ::254
    assert hostd_cli.address_plan6(c)["host_loopback6"] == "refused"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("fd00::/48", "--subnet6 fd00::/48: must be a /64 (SLAAC forms 64-bit interface "
         "identifiers), e.g. fd00::/64"),
        ("fd00:1:2:3:4::/80", "must be a /64"),
        ("192.168.0.0/24", "--subnet6: bad IPv6 subnet '192.168.0.0/24': not an IPv6 network"),
        ("fd00::1/64", "has host bits set"),
        ("nonsense", "--subnet6: bad IPv6 subnet 'nonsense'"),
    ],
)  # fmt: skip
def test_bad_subnet6_is_a_clear_usage_error(value, message, capsys, monkeypatch):
    monkeypatch.setattr(hostd_cli, "configure_logging", lambda *a: None)  # stderr is captured
    with pytest.raises(SystemExit) as e:
        hostd_cli.main(["--listen", "stdio://", "--dns-upstream", "127.0.0.1", "--subnet6", value])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_help_shows_the_ipv6_plan(capsys, monkeypatch):
    monkeypatch.setattr(hostd_cli, "configure_logging", lambda *a: None)
    with pytest.raises(SystemExit):
        hostd_cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--subnet6 PREFIX" in out and "fd00:192:168:127::/64" in out
    assert "host loopback ::254 → the host's ::1" in out
    assert "--no-ipv6" in out and "::254 → ::1" in out  # --no-host-loopback names it


# ---- the local zones -------------------------------------------------------------------------


def ask(resolver: DnsResolver, name: str, qtype: str) -> DNSRecord:
    reply = resolver.handle_query(DNSRecord.question(name, qtype).pack())
    assert isinstance(reply, bytes)
    return DNSRecord.parse(reply)


@pytest.mark.parametrize("zone", ["containers.internal", "docker.internal"])
def test_default_zones_answer_aaaa_for_gateway_and_host(zone):
    resolver = DnsResolver(
        default_zones(
            "192.168.127.1", "192.168.127.254", gateway6=f"{PREFIX}1", host6=f"{PREFIX}254"
        )
    )
    for name, v4, v6 in (("host", "192.168.127.254", "254"), ("gateway", "192.168.127.1", "1")):
        aaaa = ask(resolver, f"{name}.{zone}", "AAAA")
        assert aaaa.header.aa and [(QTYPE[r.rtype], str(r.rdata)) for r in aaaa.rr] == [
            ("AAAA", f"{PREFIX}{v6}")
        ]
        a = ask(resolver, f"{name}.{zone}", "A")
        assert [(QTYPE[r.rtype], str(r.rdata)) for r in a.rr] == [("A", v4)]


def test_default_zones_without_ipv6_have_no_aaaa():
    resolver = DnsResolver(default_zones("192.168.127.1", "192.168.127.254"))
    reply = ask(resolver, "host.containers.internal", "AAAA")
    assert reply.header.rcode == RCODE.NOERROR and reply.rr == []  # NODATA, not NXDOMAIN
    assert [str(r.rdata) for r in ask(resolver, "host.containers.internal", "A").rr] == [
        "192.168.127.254"
    ]


def test_network_zones_follow_the_plan():
    def records(config: NetworkConfig) -> set[tuple[str, str, str]]:
        zones = Network(config).zones.zones()
        return {(r.name, r.rtype, r.value) for _z, recs in zones for r in recs}

    on = records(NetworkConfig(dns_upstreams=[], subnet6=IPv6Network("fd00:5::/64")))
    assert ("host.containers.internal.", "AAAA", "fd00:5::254") in on
    assert ("gateway.docker.internal.", "AAAA", "fd00:5::1") in on
    assert ("host.containers.internal.", "A", "192.168.127.254") in on
    off = records(NetworkConfig(dns_upstreams=[], ipv6=False))
    assert not any(rtype == "AAAA" for _n, rtype, _v in off)
    assert ("host.containers.internal.", "A", "192.168.127.254") in off
    # slirp4netns's plan: gateway and host are both ::2
    args = s4n.build_parser().parse_args(["--disable-dns", "--enable-ipv6", "1"])
    slirp = records(s4n.network_config(args, 1500))
    assert ("host.containers.internal.", "AAAA", "fd00::2") in slirp
    assert ("gateway.containers.internal.", "AAAA", "fd00::2") in slirp


# ---- leases ----------------------------------------------------------------------------------


def dhcp6_of(switch) -> Dhcpv6Server:  # type: ignore[no-untyped-def]
    """The network's DHCPv6 server (v6core's `Network.dhcp6`)."""
    server = getattr(switch.network, "dhcp6", None)
    if server is None:  # a tree without the core's wiring: the same server, as it makes it
        server = switch.network.dhcp6 = Dhcpv6Server(dhcpv6_config_for(switch.config))
    return server


def bind_pool_lease(server: Dhcpv6Server, mac: str, now: float, iaid: int = 9) -> IPv6Address:
    msg = (
        d6.DHCP6_Solicit(trid=1)
        / d6.DHCP6OptClientId(duid=d6.DUID_LL(lladdr=mac))
        / d6.DHCP6OptIA_NA(iaid=iaid)
        / d6.DHCP6OptRapidCommit()
        / d6.DHCP6OptClientFQDN(fqdn="v6guest")
    )
    raw_mac = bytes.fromhex(mac.replace(":", ""))
    reply = server.handle(bytes(msg), A6("fe80::1:2"), raw_mac, now)
    assert reply is not None
    (lease,) = [lease for lease in server.leases(now) if lease.mac == mac]
    return lease.ip


async def _switch_and_control(config: NetworkConfig | None = None):  # type: ignore[no-untyped-def]
    from netferry.hostd.control import Control
    from netferry.hostd.switch import HostSwitch

    switch = HostSwitch(config or NetworkConfig(dns_upstreams=[]))
    return switch, Control(switch)


def test_dhcpv6_leases_are_listed_after_the_ipv4_ones():
    async def run():  # type: ignore[no-untyped-def]
        switch, control = await _switch_and_control()
        now = switch.loop.time()
        ip = bind_pool_lease(dhcp6_of(switch), OTHER_MAC, now)
        assert switch.network.dhcp.restore_lease(
            "02:00:00:00:00:08", IPv4Address("192.168.127.9"), now + 600, "v4guest", now
        )
        sync, listed = control.leases(), await control.leases_async(chunk=1)
        from netferry.hostd.api.http import GvproxyApi

        http = await GvproxyApi(control, inside=False)._leases()
        await switch.close()
        return ip, sync, listed, http

    ip, sync, listed, http = asyncio.run(run())
    assert A6(f"{PREFIX}1000") <= ip <= A6(f"{PREFIX}1fff")
    for leases in (sync, listed):
        assert [(x.mac, str(x.ip), x.hostname, x.static) for x in leases] == [
            ("02:00:00:00:00:08", "192.168.127.9", "v4guest", False),
            (OTHER_MAC, str(ip), "v6guest", False),
        ]
        assert leases[1].expires > 1e9  # wall clock, as the IPv4 ones
    # gvproxy's /leases map: IP → MAC, the IPv6 one too
    assert http[str(ip)] == OTHER_MAC and http["192.168.127.9"] == "02:00:00:00:00:08"


def test_no_dhcpv6_leases_with_ipv6_off():
    async def run():  # type: ignore[no-untyped-def]
        switch, control = await _switch_and_control(NetworkConfig(dns_upstreams=[], ipv6=False))
        dhcp6 = getattr(switch.network, "dhcp6", None)
        leases = await control.leases_async()
        await switch.close()
        return dhcp6, leases

    dhcp6, leases = asyncio.run(run())
    assert dhcp6 is None and leases == []


def test_grpc_lease_carries_an_ipv6_address_as_is():
    from netferry.v1 import host_pb2 as pb

    lease = pb.Lease(mac="", ip=f"{PREFIX}1000", hostname="h", static=False)
    back = pb.Lease.FromString(lease.SerializeToString())
    assert back.ip == f"{PREFIX}1000" and back.mac == ""


# ---- the state file ---------------------------------------------------------------------------


def test_state_file_keeps_dhcpv6_leases_across_a_restart(tmp_path: Path):
    from netferry.hostd.state import StateStore, dns_snapshot

    path = tmp_path / "state.json"

    async def first():  # type: ignore[no-untyped-def]
        switch, control = await _switch_and_control()
        server = dhcp6_of(switch)
        ip = bind_pool_lease(server, OTHER_MAC, switch.loop.time(), iaid=0x1234)
        bind_pool_lease(server, "5a:94:ef:e4:0c:ee", switch.loop.time())  # static ::2
        store = StateStore(control, str(path))
        store.dns_base = dns_snapshot(control)
        store.write(store.snapshot())
        duid = server.server_duid
        await switch.close()
        return ip, duid

    ip, duid = asyncio.run(first())
    saved = json.loads(path.read_text())
    (entry,) = saved["leases6"]  # the static ::2 is the flags' (it is the same on every start)
    assert entry["ip"] == str(ip) and entry["iaid"] == 0x1234 and entry["mac"] == OTHER_MAC
    assert entry["duid"] == "00030001" + OTHER_MAC.replace(":", "")
    assert entry["hostname"] == "v6guest" and saved["leases"] == []

    async def second():  # type: ignore[no-untyped-def]
        switch, control = await _switch_and_control()
        server = dhcp6_of(switch)
        store = StateStore(control, str(path))
        state = store.read()
        assert state is not None
        await store.restore(state)
        leases = control.leases()
        # the returning client's RENEW finds its binding (no NoBinding, same address)
        renew = (
            d6.DHCP6_Renew(trid=5)
            / d6.DHCP6OptClientId(duid=d6.DUID_LL(lladdr=OTHER_MAC))
            / d6.DHCP6OptServerId(duid=d6.DUID_LL(lladdr="5a:94:ef:e4:0c:dd"))
            / d6.DHCP6OptIA_NA(iaid=0x1234, ianaopts=[d6.DHCP6OptIAAddress(addr=str(ip))])
        )
        reply = server.handle(
            bytes(renew), A6("fe80::1:2"), bytes.fromhex("020000000007"), switch.loop.time()
        )
        await switch.close()
        return leases, reply, server.server_duid

    leases, reply, duid2 = asyncio.run(second())
    assert [(x.mac, x.ip) for x in leases] == [(OTHER_MAC, ip)]
    assert duid2 == duid  # the server's DUID is stable across restarts
    assert reply is not None
    parsed = d6.DHCP6_Reply(reply.payload)
    ia = parsed[d6.DHCP6OptIA_NA]
    assert not [o for o in ia.ianaopts if isinstance(o, d6.DHCP6OptStatusCode)]  # no NoBinding
    assert [o.addr for o in ia.ianaopts if isinstance(o, d6.DHCP6OptIAAddress)] == [str(ip)]


def test_state_file_leases6_malformed_entry_is_a_clear_error(tmp_path: Path):
    from netferry.hostd.state import StateError, StateStore

    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "leases6": [{"ip": "fd00::1"}]}))

    async def run():  # type: ignore[no-untyped-def]
        switch, control = await _switch_and_control()
        dhcp6_of(switch)
        store = StateStore(control, str(path))
        try:
            await store.restore(store.read() or {})
        finally:
            await switch.close()

    with pytest.raises(StateError, match=r"state file .*state.json: KeyError: 'expires'"):
        asyncio.run(run())
    path.write_text(json.dumps({"version": 1, "leases6": {"not": "a list"}}))
    with pytest.raises(StateError, match="leases6: expected a list"):
        StateStore(None, str(path)).read()  # type: ignore[arg-type]


# ---- the slirp4netns drop-in -----------------------------------------------------------------


def test_slirp4netns_enable_ipv6_serves_slirp4netns_plan_without_a_warning(caplog):
    args = s4n.build_parser().parse_args(["--disable-dns", "--enable-ipv6", "1234"])
    c = s4n.network_config(args, 1500)
    assert c.ipv6 is True and str(c.subnet6) == "fd00::/64"
    assert (c.gateway6, c.host6, c.dns6, c.guest6) == (
        A6("fd00::2"),
        A6("fd00::2"),
        A6("fd00::3"),
        A6("fd00::100"),
    )
    with caplog.at_level(logging.DEBUG):
        s4n.warn_unhonoured(args)
    assert "ipv6" not in caplog.text
    assert s4n.network_config(s4n.build_parser().parse_args(["-6", "1"]), 1500).ipv6 is True
    off = s4n.network_config(s4n.build_parser().parse_args(["--disable-dns", "1"]), 1500)
    assert off.ipv6 is False  # as slirp4netns: no IPv6 without the flag


def test_slirp4netns_help_says_what_enable_ipv6_does():
    text = " ".join(s4n.build_parser().format_help().split())
    assert "-6, --enable-ipv6 serve IPv6: fd00::/64" in text
    assert "not served" not in text
