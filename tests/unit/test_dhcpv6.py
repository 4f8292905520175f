"""The sans-IO DHCPv6 server against messages built and dissected by scapy (scapy.layers.dhcp6),
with a fake clock."""

from __future__ import annotations

import random
import struct
from ipaddress import IPv6Address, IPv6Network

import pytest
import scapy.layers.dhcp6 as d6
from scapy.layers.inet import UDP
from scapy.packet import Raw

from netferry.hostd.services import dhcpv6
from netferry.hostd.services.dhcpv6 import Dhcpv6Config, Dhcpv6Server

PREFIX = IPv6Network("fd00:192:168:127::/64")
GUEST_MAC = "5a:94:ef:e4:0c:ee"
OTHER_MAC = "02:00:00:00:00:07"
CLIENT_LL = IPv6Address("fe80::5894:efff:fee4:cee")


def server(**kw) -> Dhcpv6Server:
    kw.setdefault("domain_search", ["netferry.internal"])
    return Dhcpv6Server(Dhcpv6Config(**kw))


def client_id(mac: str = GUEST_MAC):
    return d6.DHCP6OptClientId(duid=d6.DUID_LL(lladdr=mac))


def server_id(srv: Dhcpv6Server):
    return d6.DHCP6OptServerId(duid=d6.DUID_LL(lladdr="5a:94:ef:e4:0c:dd"))


def dissect(payload: bytes):
    return UDP(bytes(UDP(sport=547, dport=546) / Raw(payload))).payload


def send(srv, msg, mac: str | None = GUEST_MAC, now: float = 0.0, port: int | None = None):
    raw_mac = bytes.fromhex(mac.replace(":", "")) if mac else None
    kw = {} if port is None else {"port": port}
    reply = srv.handle(bytes(msg), CLIENT_LL, raw_mac, now, **kw)
    return None if reply is None else dissect(reply.payload)


def addresses(reply) -> list[tuple[str, int, int]]:
    return [
        (o.addr, o.preflft, o.validlft)
        for ia in reply.iterpayloads()
        if isinstance(ia, d6.DHCP6OptIA_NA)
        for o in ia.ianaopts
        if isinstance(o, d6.DHCP6OptIAAddress)
    ]


def test_server_duid_is_duid_ll_of_the_gateway_mac():
    srv = server()
    assert srv.server_duid == bytes.fromhex("000300015a94efe40cdd")
    assert dhcpv6.mac_from_duid(srv.server_duid) == bytes.fromhex("5a94efe40cdd")


def test_solicit_advertise_request_reply_static_for_the_default_mac():
    srv = server()
    sol = d6.DHCP6_Solicit(trid=0x123) / client_id() / d6.DHCP6OptIA_NA(iaid=7)
    adv = send(srv, sol / d6.DHCP6OptElapsedTime())
    assert isinstance(adv, d6.DHCP6_Advertise) and adv.trid == 0x123
    assert adv[d6.DHCP6OptServerId].duid.lladdr == "5a:94:ef:e4:0c:dd"
    assert adv[d6.DHCP6OptClientId].duid.lladdr == GUEST_MAC
    assert addresses(adv) == [(str(PREFIX[2]), 3600, 3600)]
    assert adv[d6.DHCP6OptPref].prefval == 255
    assert adv[d6.DHCP6OptDNSServers].dnsservers == [str(PREFIX[1])]
    assert adv[d6.DHCP6OptDNSDomains].dnsdomains == ["netferry.internal."]
    assert srv.leases(0.0) == []  # an advertisement binds nothing
    req = d6.DHCP6_Request(trid=0x124) / client_id() / server_id(srv)
    rep = send(srv, req / d6.DHCP6OptIA_NA(iaid=7), now=1.0)
    assert isinstance(rep, d6.DHCP6_Reply) and rep.trid == 0x124
    ia = rep[d6.DHCP6OptIA_NA]
    assert ia.iaid == 7 and ia.T1 == 1800 and ia.T2 == 2880
    assert addresses(rep) == [(str(PREFIX[2]), 3600, 3600)]
    (lease,) = srv.leases(1.0)
    assert (lease.mac, lease.ip, lease.expires, lease.static) == (GUEST_MAC, PREFIX[2], 3601, True)
    ev = srv.next_event()
    assert isinstance(ev, dhcpv6.LeaseGranted) and ev.ip == PREFIX[2] and ev.static


def test_pool_address_for_other_clients_and_distinct():
    srv = server()
    got = set()
    for i in range(5):
        mac = f"02:00:00:00:01:{i:02x}"
        msg = d6.DHCP6_Solicit(trid=i) / client_id(mac) / d6.DHCP6OptIA_NA(iaid=1)
        rep = send(srv, msg / d6.DHCP6OptRapidCommit(), mac=mac)
        assert isinstance(rep, d6.DHCP6_Reply) and d6.DHCP6OptRapidCommit in rep
        ((addr, _p, _v),) = addresses(rep)
        got.add(IPv6Address(addr))
    assert len(got) == 5 and all(PREFIX[0x1000] <= a <= PREFIX[0x1FFF] for a in got)
    assert len(srv.leases(0.0)) == 5 and srv.stats.rapid_commits == 5


def test_rapid_commit_off_gives_an_advertisement():
    srv = server(rapid_commit=False)
    msg = d6.DHCP6_Solicit() / client_id() / d6.DHCP6OptIA_NA(iaid=1) / d6.DHCP6OptRapidCommit()
    assert isinstance(send(srv, msg), d6.DHCP6_Advertise)


def test_static_lease_by_duid_and_mac_inside_duid_llt():
    duid = d6.DUID_EN(enterprisenum=32473, id=b"guest-1")
    srv = server(static_leases={bytes(duid).hex(): PREFIX[0x42], OTHER_MAC: PREFIX[0x43]})
    msg = d6.DHCP6_Solicit() / d6.DHCP6OptClientId(duid=duid) / d6.DHCP6OptIA_NA(iaid=1)
    assert addresses(send(srv, msg / d6.DHCP6OptRapidCommit(), mac=None))[0][0] == str(PREFIX[0x42])
    llt = d6.DHCP6OptClientId(duid=d6.DUID_LLT(lladdr=OTHER_MAC, timeval=1234))
    msg = d6.DHCP6_Solicit() / llt / d6.DHCP6OptIA_NA(iaid=1) / d6.DHCP6OptRapidCommit()
    (lease_addr,) = addresses(send(srv, msg, mac=None))
    assert lease_addr[0] == str(PREFIX[0x43])
    assert {lease.mac for lease in srv.leases(0.0)} == {"", OTHER_MAC}


def test_second_ia_of_the_static_client_gets_a_pool_address():
    srv = server()
    msg = d6.DHCP6_Solicit() / client_id() / d6.DHCP6OptIA_NA(iaid=1) / d6.DHCP6OptIA_NA(iaid=2)
    rep = send(srv, msg / d6.DHCP6OptRapidCommit())
    a1, a2 = (IPv6Address(a) for a, _, _ in addresses(rep))
    assert a1 == PREFIX[2] and a2 == PREFIX[0x1000]


def test_renew_extends_and_rebind_recovers_after_a_restart():
    srv = server()
    send(
        srv, d6.DHCP6_Solicit() / client_id() / d6.DHCP6OptIA_NA(iaid=1) / d6.DHCP6OptRapidCommit()
    )
    ren = d6.DHCP6_Renew(trid=9) / client_id() / server_id(srv)
    ren = ren / d6.DHCP6OptIA_NA(iaid=1, ianaopts=[d6.DHCP6OptIAAddress(addr=str(PREFIX[2]))])
    rep = send(srv, ren, now=1800.0)
    assert isinstance(rep, d6.DHCP6_Reply) and addresses(rep) == [(str(PREFIX[2]), 3600, 3600)]
    assert srv.leases(1800.0)[0].expires == 5400.0
    # after a restart the server has no binding: RENEW says NoBinding, REBIND rebinds
    fresh = server()
    rep = send(fresh, ren, now=1.0)
    assert rep[d6.DHCP6OptIA_NA].ianaopts[0].statuscode == dhcpv6.NO_BINDING
    reb = d6.DHCP6_Rebind() / client_id()
    reb = reb / d6.DHCP6OptIA_NA(iaid=1, ianaopts=[d6.DHCP6OptIAAddress(addr=str(PREFIX[2]))])
    rep = send(fresh, reb, now=1.0)
    assert addresses(rep) == [(str(PREFIX[2]), 3600, 3600)] and len(fresh.leases(1.0)) == 1


def test_rebind_with_an_address_from_elsewhere_gets_zero_lifetimes():
    srv = server()
    reb = d6.DHCP6_Rebind() / client_id(OTHER_MAC)
    reb = reb / d6.DHCP6OptIA_NA(iaid=1, ianaopts=[d6.DHCP6OptIAAddress(addr="2001:db8::5")])
    rep = send(srv, reb, mac=OTHER_MAC)
    assert addresses(rep) == [("2001:db8::5", 0, 0)] and srv.leases(0.0) == []


def test_release_and_decline():
    srv = server()
    mac = OTHER_MAC
    send(
        srv,
        d6.DHCP6_Solicit() / client_id(mac) / d6.DHCP6OptIA_NA(iaid=1) / d6.DHCP6OptRapidCommit(),
        mac=mac,
    )
    (lease,) = srv.leases(0.0)
    ia = d6.DHCP6OptIA_NA(iaid=1, ianaopts=[d6.DHCP6OptIAAddress(addr=str(lease.ip))])
    rep = send(srv, d6.DHCP6_Release() / client_id(mac) / server_id(srv) / ia, mac=mac)
    assert isinstance(rep, d6.DHCP6_Reply) and rep[d6.DHCP6OptStatusCode].statuscode == 0
    assert srv.leases(0.0) == []
    srv.next_event()
    assert srv.next_event() == dhcpv6.LeaseReleased(mac, lease.ip, None, "released")
    # decline: the address is quarantined, the client gets another one next time
    send(
        srv,
        d6.DHCP6_Solicit() / client_id(mac) / d6.DHCP6OptIA_NA(iaid=1) / d6.DHCP6OptRapidCommit(),
        mac=mac,
    )
    (lease,) = srv.leases(0.0)
    ia = d6.DHCP6OptIA_NA(iaid=1, ianaopts=[d6.DHCP6OptIAAddress(addr=str(lease.ip))])
    rep = send(srv, d6.DHCP6_Decline() / client_id(mac) / server_id(srv) / ia, mac=mac)
    assert isinstance(rep, d6.DHCP6_Reply) and srv.leases(0.0) == []
    rep = send(srv, d6.DHCP6_Solicit() / client_id(mac) / d6.DHCP6OptIA_NA(iaid=1), mac=mac)
    assert addresses(rep)[0][0] != str(lease.ip)
    # the quarantine ends after decline_hold
    srv.expire(601.0)
    rep = send(
        srv,
        d6.DHCP6_Solicit() / client_id("02:00:00:00:00:99") / d6.DHCP6OptIA_NA(iaid=1),
        mac=None,
        now=700.0,
    )
    assert addresses(rep)[0][0] == str(lease.ip)
    # release of an unknown binding: success overall, NoBinding for the IA
    rep = send(
        srv, d6.DHCP6_Release() / client_id("02:00:00:00:00:55") / server_id(srv) / ia, mac=None
    )
    assert rep[d6.DHCP6OptIA_NA].ianaopts[0].statuscode == dhcpv6.NO_BINDING


def test_confirm():
    srv = server()
    ok = d6.DHCP6OptIA_NA(iaid=1, ianaopts=[d6.DHCP6OptIAAddress(addr=str(PREFIX[77]))])
    rep = send(srv, d6.DHCP6_Confirm() / client_id() / ok)
    assert rep[d6.DHCP6OptStatusCode].statuscode == dhcpv6.SUCCESS
    bad = d6.DHCP6OptIA_NA(iaid=1, ianaopts=[d6.DHCP6OptIAAddress(addr="2001:db8::1")])
    rep = send(srv, d6.DHCP6_Confirm() / client_id() / bad)
    assert rep[d6.DHCP6OptStatusCode].statuscode == dhcpv6.NOT_ON_LINK
    assert send(srv, d6.DHCP6_Confirm() / client_id() / d6.DHCP6OptIA_NA(iaid=1)) is None


def test_information_request_is_stateless():
    srv = server(domain_search=["a.example", "b.example"])
    rep = send(srv, d6.DHCP6_InfoRequest(trid=3) / d6.DHCP6OptOptReq(reqopts=[23, 24]))
    assert isinstance(rep, d6.DHCP6_Reply) and rep.trid == 3
    assert rep[d6.DHCP6OptDNSServers].dnsservers == [str(PREFIX[1])]
    assert rep[d6.DHCP6OptDNSDomains].dnsdomains == ["a.example.", "b.example."]
    assert rep[d6.DHCP6OptInfoRefreshTime].reftime == 86400
    assert d6.DHCP6OptIA_NA not in rep and srv.leases(0.0) == []


def test_discarded_messages_per_rfc8415_section16():
    srv = server()
    other_server = d6.DHCP6OptServerId(duid=d6.DUID_LL(lladdr="02:11:11:11:11:11"))
    ignored = [
        d6.DHCP6_Solicit() / d6.DHCP6OptIA_NA(iaid=1),  # no client id
        d6.DHCP6_Solicit() / client_id() / server_id(srv),  # server id in a solicit
        d6.DHCP6_Request() / client_id() / d6.DHCP6OptIA_NA(iaid=1),  # no server id
        d6.DHCP6_Request() / client_id() / other_server,  # another server's
        d6.DHCP6_Renew() / client_id() / other_server,
        d6.DHCP6_Rebind() / client_id() / server_id(srv),
        d6.DHCP6_InfoRequest() / d6.DHCP6OptIA_NA(iaid=1),
        d6.DHCP6_InfoRequest() / other_server,
        d6.DHCP6_Advertise() / client_id() / server_id(srv),
        d6.DHCP6_Reply() / client_id() / server_id(srv),
        d6.DHCP6_RelayForward(),
    ]
    for msg in ignored:
        assert send(srv, msg) is None, msg.summary()
    assert srv.stats.ignored == len(ignored) and srv.stats.malformed == 0


def test_malformed_messages_are_counted_never_raised():
    srv = server()
    good = bytes(
        d6.DHCP6_Solicit()
        / client_id()
        / d6.DHCP6OptIA_NA(iaid=1, ianaopts=[d6.DHCP6OptIAAddress(addr=str(PREFIX[9]))])
    )
    cases = [
        b"",
        b"\x01\x00\x00",
        good[:-3],  # an option overruns the message
        good + b"\x00",  # a truncated option header
        bytes(d6.DHCP6_Solicit() / d6.DHCP6OptClientId(duid=b"\x00")),  # DUID too short
        bytes(d6.DHCP6_Solicit() / client_id() / client_id()),  # repeated client id
        bytes(
            d6.DHCP6_Solicit() / client_id() / d6.DHCP6OptIA_NA(iaid=1) / d6.DHCP6OptIA_NA(iaid=1)
        ),
        bytes(d6.DHCP6_Solicit()) + b"\x00\x03\x00\x04abcd",  # IA_NA shorter than 12
        bytes(d6.DHCP6_Solicit()) + b"\x00\x08\x00\x00" * 100,  # too many options
    ]
    for data in cases:
        assert srv.handle(data, CLIENT_LL, None, 0.0) is None
    assert srv.stats.malformed == len(cases)
    rng = random.Random(8415)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 5)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
        srv.handle(bytes(data[: rng.randint(0, len(data))]), CLIENT_LL, None, 0.0)


def test_lease_table_bounded_and_expiry():
    srv = server(max_leases=3, lease_time=100)
    for i in range(5):
        mac = f"02:00:00:00:02:{i:02x}"
        sol = d6.DHCP6_Solicit() / client_id(mac) / d6.DHCP6OptIA_NA(iaid=1)
        rep = send(srv, sol / d6.DHCP6OptRapidCommit(), mac=mac)
        if i >= 3:
            assert rep[d6.DHCP6OptIA_NA].ianaopts[0].statuscode == dhcpv6.NO_ADDRS_AVAIL
    assert len(srv.leases(0.0)) == 3 and srv.stats.no_addrs == 2
    assert srv.leases(100.0) == [] and srv.stats.expired == 3
    reasons = [e.reason for e in iter(srv.next_event, None) if isinstance(e, dhcpv6.LeaseReleased)]
    assert reasons == ["expired"] * 3


def test_returning_client_gets_its_old_address():
    srv = server(lease_time=100)
    sol = (
        d6.DHCP6_Solicit()
        / client_id(OTHER_MAC)
        / d6.DHCP6OptIA_NA(iaid=1)
        / d6.DHCP6OptRapidCommit()
    )
    first = addresses(send(srv, sol, mac=OTHER_MAC))[0][0]
    other = d6.DHCP6_Solicit() / client_id("02:00:00:00:00:08") / d6.DHCP6OptIA_NA(iaid=1)
    send(srv, other / d6.DHCP6OptRapidCommit(), mac=None, now=200.0)
    assert addresses(send(srv, sol, mac=OTHER_MAC, now=300.0))[0][0] == first


def test_advertised_address_is_held_for_the_offer_timeout():
    srv = server()
    a = d6.DHCP6_Solicit() / client_id("02:00:00:00:00:0a") / d6.DHCP6OptIA_NA(iaid=1)
    b = d6.DHCP6_Solicit() / client_id("02:00:00:00:00:0b") / d6.DHCP6OptIA_NA(iaid=1)
    first = addresses(send(srv, a, mac=None))[0][0]
    assert addresses(send(srv, b, mac=None, now=30.0))[0][0] != first
    c = d6.DHCP6_Solicit() / client_id("02:00:00:00:00:0c") / d6.DHCP6OptIA_NA(iaid=1)
    assert addresses(send(srv, c, mac=None, now=59.0))[0][0] not in (first,)
    d = d6.DHCP6_Solicit() / client_id("02:00:00:00:00:0d") / d6.DHCP6OptIA_NA(iaid=1)
    assert addresses(send(srv, d, mac=None, now=61.0))[0][0] == first  # a's offer lapsed


def test_config_validation():
    with pytest.raises(ValueError, match="not a host address"):
        Dhcpv6Config(static_leases={GUEST_MAC: IPv6Address("2001:db8::2")})
    with pytest.raises(ValueError, match="neither a MAC nor a DUID"):
        Dhcpv6Config(static_leases={"zz": PREFIX[2]})
    with pytest.raises(ValueError, match="given to both"):
        Dhcpv6Config(static_leases={GUEST_MAC: PREFIX[2], OTHER_MAC: PREFIX[2]})
    with pytest.raises(ValueError, match="not inside"):
        Dhcpv6Config(pool=(PREFIX[5], IPv6Address("fd00:192:168:128::9")))
    with pytest.raises(ValueError, match="after"):
        Dhcpv6Config(pool=(PREFIX[9], PREFIX[5]))
    with pytest.raises(ValueError, match="not an IPv6"):
        Dhcpv6Config(dns_servers=["10.0.0.1"])
    with pytest.raises(ValueError):
        Dhcpv6Config(domain_search=["a" * 70 + ".example"])


def test_restore_lease_from_an_earlier_run():
    srv = server()
    mac = OTHER_MAC
    sol = d6.DHCP6_Solicit() / client_id(mac) / d6.DHCP6OptIA_NA(iaid=4) / d6.DHCP6OptRapidCommit()
    send(srv, sol, mac=mac)
    (lease,) = srv.leases(0.0)
    fresh = server()
    assert fresh.restore_lease(lease, 10.0)
    assert fresh.leases(10.0) == [lease]
    assert not fresh.restore_lease(lease, 10.0)  # already bound
    # the client renews what it had, without NoBinding
    ia = d6.DHCP6OptIA_NA(iaid=4, ianaopts=[d6.DHCP6OptIAAddress(addr=str(lease.ip))])
    rep = send(fresh, d6.DHCP6_Renew() / client_id(mac) / server_id(fresh) / ia, mac=mac, now=20.0)
    assert addresses(rep) == [(str(lease.ip), 3600, 3600)]
    other = server()
    assert not other.restore_lease(lease, lease.expires)  # expired
    bad = dhcpv6.Lease(mac, PREFIX[2], 100.0, None, False, lease.duid, 4)
    assert not other.restore_lease(bad, 0.0)  # a static address is not in the pool
    assert not other.restore_lease(dhcpv6.Lease(mac, lease.ip, 100.0, None, False, "zz", 4), 0.0)


def test_config_from_the_network_plan():
    from netferry.hostd.config import NetworkConfig, slirp4netns_plan6

    c = dhcpv6.dhcpv6_config_for(NetworkConfig(dns_search=["corp.example"]))
    assert c.prefix == PREFIX and c.dns_servers == [PREFIX[1]]
    assert c.static_leases == {GUEST_MAC: PREFIX[2]} and c.domain_search == ["corp.example"]
    assert PREFIX[0x254] in c.reserved and c.pool == (PREFIX[0x1000], PREFIX[0x1FFF])
    assert c.server_duid == bytes.fromhex("000300015a94efe40cdd")
    slirp = dhcpv6.dhcpv6_config_for(NetworkConfig(**slirp4netns_plan6()))
    assert slirp.static_leases == {GUEST_MAC: IPv6Address("fd00::100")}
    assert slirp.dns_servers == [IPv6Address("fd00::3")]


# ---- limits: one guest inventing DUIDs takes neither the pool nor the loop


def stall_solicit(i: int, ias: int = 62, rapid: bool = False) -> bytes:
    """A SOLICIT with a fresh DUID and `ias` IA_NAs, as a guest trying to take the pool
    (built by hand: scapy takes seconds over 65 messages of 62 IAs)."""
    duid = dhcpv6.duid_ll(bytes.fromhex(f"02660000{i:04x}"))
    msg = bytes([dhcpv6.SOLICIT]) + i.to_bytes(3, "big") + dhcpv6._opt(dhcpv6.OPT_CLIENTID, duid)
    for iaid in range(ias):
        msg += dhcpv6._opt(dhcpv6.OPT_IA_NA, struct.pack("!III", iaid, 0, 0))
    return msg + dhcpv6._opt(dhcpv6.OPT_RAPID_COMMIT, b"") if rapid else msg


def granted(srv, msg: bytes, mac: str | None, now: float, port: int | None) -> list[str]:
    """The addresses a reply gives (parsed with the server's own option walker, fast)."""
    raw_mac = bytes.fromhex(mac.replace(":", "")) if mac else None
    kw = {} if port is None else {"port": port}
    reply = srv.handle(msg, CLIENT_LL, raw_mac, now, **kw)
    assert reply is not None
    out = []
    for code, value in walk_options(reply.payload[4:]):
        if code == dhcpv6.OPT_IA_NA:
            for sub, sval in walk_options(value[12:]):
                if sub == dhcpv6.OPT_IAADDR:
                    out.append(str(IPv6Address(sval[:16])))
    return out


def walk_options(data: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i < len(data):
        code, length = struct.unpack_from("!HH", data, i)
        out.append((code, data[i + 4 : i + 4 + length]))
        i += 4 + length
    return out


def count_probes(monkeypatch, srv: Dhcpv6Server) -> list[int]:
    """Count the server's `_is_free` calls: the pool probes a request costs."""
    calls = [0]
    real = srv._is_free

    def counted(ip, key):
        calls[0] += 1
        return real(ip, key)

    monkeypatch.setattr(srv, "_is_free", counted)
    return calls


@pytest.mark.parametrize("rapid", [False, True])
def test_stall_input_refused_at_the_port_limit(monkeypatch, rapid):
    srv = server(max_leases_per_port=16)
    probes = count_probes(monkeypatch, srv)
    held = []
    for i in range(65):
        held += granted(srv, stall_solicit(i, rapid=rapid), OTHER_MAC, 1.0, 1)
    assert len(held) == 16 and len(set(held)) == 16
    assert srv.stats.ia_limit_refused == 65 * (62 - dhcpv6.MAX_IA_PER_REQUEST)
    assert srv.stats.port_limit_refused == 65 * dhcpv6.MAX_IA_PER_REQUEST - 16
    assert len(srv.leases(1.0)) == (16 if rapid else 0)
    # each refused SOLICIT probes no pool address at all (before: the whole pool per IA)
    before = probes[0]
    assert granted(srv, stall_solicit(1000, rapid=rapid), OTHER_MAC, 2.0, 1) == []
    assert probes[0] == before
    # a guest on another port is served, and the lowest free address is next
    other = d6.DHCP6_Solicit() / client_id("02:00:00:00:00:09") / d6.DHCP6OptIA_NA(iaid=1)
    assert addresses(send(srv, other, mac="02:00:00:00:00:09", now=2.0, port=2)) == [
        (str(PREFIX[0x1010]), 3600, 3600)
    ]


def test_port_limit_counts_offers_until_they_lapse_and_leases_until_released():
    srv = server(max_leases_per_port=2)
    for i in range(2):
        assert granted(srv, stall_solicit(i, ias=1), OTHER_MAC, 0.0, 1)
    assert not granted(srv, stall_solicit(2, ias=1), OTHER_MAC, 1.0, 1)
    assert srv.stats.port_limit_refused == 1
    # the offers lapse: the port may hold two again; rapid commit makes them leases
    for i in (2, 3):
        assert granted(srv, stall_solicit(i, ias=1, rapid=True), OTHER_MAC, 61.0, 1)
    assert not granted(srv, stall_solicit(4, ias=1), OTHER_MAC, 62.0, 1)
    # releasing one lease frees its place on the port
    duid = d6.DUID_LL(lladdr="02:66:00:00:00:02")
    rel = d6.DHCP6_Release() / d6.DHCP6OptClientId(duid=duid) / server_id(srv)
    send(srv, rel / d6.DHCP6OptIA_NA(iaid=0), mac=OTHER_MAC, now=63.0, port=1)
    assert granted(srv, stall_solicit(4, ias=1), OTHER_MAC, 64.0, 1)
    # the static lease is exempt from the limit
    static = d6.DHCP6_Solicit() / client_id() / d6.DHCP6OptIA_NA(iaid=1)
    assert addresses(send(srv, static, now=64.0, port=1))[0][0] == str(PREFIX[2])


def test_offers_count_against_max_leases():
    srv = server(max_leases=3)
    got = [granted(srv, stall_solicit(i, ias=1), None, 0.0, None) for i in range(5)]
    assert [len(a) for a in got] == [1, 1, 1, 0, 0] and srv.stats.no_addrs == 2


def test_full_pool_costs_no_probes_and_freed_addresses_come_back(monkeypatch):
    srv = server(pool=(PREFIX[0x1000], PREFIX[0x103F]))  # no per-port limit
    probes = count_probes(monkeypatch, srv)
    taken = []
    for i in range(9):
        taken += granted(srv, stall_solicit(i, rapid=True), None, 1.0, None)
    assert sorted(taken) == sorted(str(PREFIX[0x1000 + n]) for n in range(64))
    assert probes[0] <= 64 + 8  # the cursor passed each address once
    before = probes[0]
    assert granted(srv, stall_solicit(100, rapid=True), None, 2.0, None) == []
    assert probes[0] == before
    # addresses handed back are found again, lowest first
    for i, iaid in ((0, 3), (0, 1)):
        duid = d6.DUID_LL(lladdr=f"02:66:00:00:00:{i:02x}")
        rel = d6.DHCP6_Release() / d6.DHCP6OptClientId(duid=duid) / server_id(srv)
        send(srv, rel / d6.DHCP6OptIA_NA(iaid=iaid), mac=None, now=3.0)
    got = granted(srv, stall_solicit(101, ias=3, rapid=True), None, 4.0, None)
    assert got == [str(PREFIX[0x1001]), str(PREFIX[0x1003])]
    assert probes[0] - before <= 2


def test_restore_lease_refuses_malformed_ones():
    srv = server()
    duid = bytes(d6.DUID_LL(lladdr=OTHER_MAC)).hex()
    ip = PREFIX[0x1005]
    bad = [
        dhcpv6.Lease("not-a-mac", ip, 100.0, None, False, duid, 1),
        dhcpv6.Lease(OTHER_MAC, ip, 100.0, None, False, duid, -1),
        dhcpv6.Lease(OTHER_MAC, ip, 100.0, None, False, duid, 1 << 32),
        dhcpv6.Lease(OTHER_MAC, ip, float("nan"), None, False, duid, 1),
        dhcpv6.Lease(OTHER_MAC, ip, 100.0, 7, False, duid, 1),  # type: ignore[arg-type]
        dhcpv6.Lease(OTHER_MAC, "fd00::5", 100.0, None, False, duid, 1),  # type: ignore[arg-type]
    ]
    assert [srv.restore_lease(lease, 0.0) for lease in bad] == [False] * len(bad)
    assert srv.stats.restore_rejected == len(bad) and srv.leases(0.0) == []
    good = dhcpv6.Lease("02-00-00-00-00-07", ip, 100.0, None, False, duid, 1)
    assert srv.restore_lease(good, 0.0)
    assert [lease.mac for lease in srv.leases(0.0)] == [OTHER_MAC]  # normalised


def test_expiry_from_a_deadline_heap_bounded_under_renewals():
    srv = server(lease_time=100)
    sol = d6.DHCP6_Solicit() / client_id(OTHER_MAC) / d6.DHCP6OptIA_NA(iaid=1)
    ((ip, _, _),) = addresses(send(srv, sol / d6.DHCP6OptRapidCommit(), mac=OTHER_MAC))
    renew = (
        d6.DHCP6_Renew()
        / client_id(OTHER_MAC)
        / server_id(srv)
        / d6.DHCP6OptIA_NA(iaid=1, ianaopts=[d6.DHCP6OptIAAddress(addr=ip)])
    )
    raw = bytes(renew)
    for n in range(1, 501):  # each renewal leaves a stale deadline behind
        srv.handle(raw, CLIENT_LL, bytes.fromhex(OTHER_MAC.replace(":", "")), n * 0.1)
    assert len(srv._deadlines) <= 2 * 1 + 64 + 1  # stale ones are dropped now and then
    assert [lease.ip for lease in srv.leases(149.0)] == [IPv6Address(ip)]
    assert srv.leases(150.0) == [] and srv.stats.expired == 1
