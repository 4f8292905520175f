"""Tests for hostd.services.dns: the sans-IO resolver, zones and configuration parsing
(the forwarder's are in test_nat_dns.py). No sockets: the resolver is sans-IO.
"""

from __future__ import annotations

import struct

import pytest
from dnslib import EDNS0, QTYPE, A, DNSRecord

from netferry.hostd.services.dns import (
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    DnsRecord,
    DnsResolver,
    DnsZones,
    ForwardQuery,
    default_zones,
    parse_record_spec,
    parse_upstream,
    upstreams_from_resolv_conf,
)

GW = "192.168.127.1"
HOST = "192.168.127.254"


# --------------------------------------------------------------------------- helpers


def q(name: str, qtype: str = "A", **kw) -> DNSRecord:
    return DNSRecord.question(name, qtype, **kw)


def ask(resolver: DnsResolver, name: str, qtype: str = "A", *, tcp: bool = False) -> DNSRecord:
    query = q(name, qtype)
    out = resolver.handle_query(bytes(query.pack()), tcp=tcp)
    assert isinstance(out, bytes), out
    reply = DNSRecord.parse(out)
    assert reply.header.id == query.header.id
    assert reply.header.qr == 1
    return reply


@pytest.fixture
def resolver() -> DnsResolver:
    return DnsResolver(default_zones(GW, HOST))


# --------------------------------------------------------------------------- local zones


@pytest.mark.parametrize("zone", ["containers.internal", "docker.internal"])
@pytest.mark.parametrize(("label", "ip"), [("host", HOST), ("gateway", GW)])
def test_default_zone_a_records(resolver: DnsResolver, zone: str, label: str, ip: str) -> None:
    for spelling in (f"{label}.{zone}", f"{label}.{zone}.".upper(), f"{label.title()}.{zone}"):
        reply = ask(resolver, spelling)
        assert reply.header.rcode == 0
        assert reply.header.aa == 1 and reply.header.ra == 1
        assert [str(rr.rdata) for rr in reply.rr] == [ip]
        rr = reply.rr[0]
        assert rr.rtype == QTYPE.A and rr.ttl == 0
        # answer keeps the question's case
        assert str(rr.rname) == str(reply.q.qname)
        assert str(rr.rname).rstrip(".") == spelling.rstrip(".")


def test_aaaa_on_local_name_is_nodata(resolver: DnsResolver) -> None:
    reply = ask(resolver, "host.containers.internal", "AAAA")
    assert reply.header.rcode == 0
    assert reply.rr == []
    assert reply.header.aa == 1
    assert [QTYPE[rr.rtype] for rr in reply.auth] == ["SOA"]
    assert reply.auth[0].rdata.times[-1] == 0  # negative TTL 0: no caching
    for qtype in ("MX", "TXT", "HTTPS"):
        assert ask(resolver, "Gateway.Docker.Internal", qtype).header.rcode == 0


def test_unknown_name_in_zone_is_nxdomain(resolver: DnsResolver) -> None:
    reply = ask(resolver, "nope.containers.internal")
    assert reply.header.rcode == 3
    assert reply.header.aa == 1
    assert reply.rr == []
    assert QTYPE[reply.auth[0].rtype] == "SOA"
    assert ask(resolver, "a.b.docker.internal", "AAAA").header.rcode == 3
    assert resolver.stats.nxdomain == 2


def test_zone_apex(resolver: DnsResolver) -> None:
    reply = ask(resolver, "containers.internal")
    assert reply.header.rcode == 0 and reply.rr == []
    soa = ask(resolver, "Containers.Internal", "SOA")
    assert soa.header.rcode == 0
    assert [QTYPE[rr.rtype] for rr in soa.rr] == ["SOA"]


def test_not_ours_is_forwarded(resolver: DnsResolver) -> None:
    query = q("www.example.test", "AAAA")
    data = bytes(query.pack())
    out = resolver.handle_query(data)
    assert isinstance(out, ForwardQuery)
    assert out.data == data and out.qid == query.header.id
    assert out.qname == "www.example.test." and out.qtype == "AAAA" and not out.tcp
    # a name that merely ends like a zone is not inside it
    assert isinstance(resolver.handle_query(bytes(q("xcontainers.internal").pack())), ForwardQuery)
    # CHAOS class queries are never answered locally
    chaos = DNSRecord.question("host.containers.internal", "TXT", "CH")
    assert isinstance(resolver.handle_query(bytes(chaos.pack())), ForwardQuery)
    assert resolver.stats.forwarded == 3


def test_add_and_remove_records(resolver: DnsResolver) -> None:
    zones = resolver.zones
    zones.add_records(
        "containers.internal",
        [
            DnsRecord("DB.containers.internal", "A", "192.168.127.2", ttl=42),
            DnsRecord("db.containers.internal.", "AAAA", "fd00::2"),
            DnsRecord("multi.containers.internal", "A", "192.168.127.3"),
            DnsRecord("multi.containers.internal", "A", "192.168.127.4"),
        ],
    )
    reply = ask(resolver, "db.Containers.internal")
    assert [(str(rr.rdata), rr.ttl) for rr in reply.rr] == [("192.168.127.2", 42)]
    assert [str(rr.rdata) for rr in ask(resolver, "db.containers.internal", "AAAA").rr] == [
        "fd00::2"
    ]
    assert sorted(str(rr.rdata) for rr in ask(resolver, "multi.containers.internal").rr) == [
        "192.168.127.3",
        "192.168.127.4",
    ]
    # re-adding the same record updates the TTL instead of duplicating it
    zones.add_records(
        "containers.internal", [DnsRecord("db.containers.internal", "A", "192.168.127.2", 7)]
    )
    assert [rr.ttl for rr in ask(resolver, "db.containers.internal").rr] == [7]
    # empty non-terminal is NODATA, not NXDOMAIN
    zones.add_records(
        "containers.internal", [DnsRecord("a.b.containers.internal", "A", "10.0.0.1")]
    )
    assert ask(resolver, "b.containers.internal").header.rcode == 0

    assert zones.remove_records("containers.internal", ["DB.containers.internal", "nope"]) == 2
    assert ask(resolver, "db.containers.internal").header.rcode == 3
    assert zones.remove_records("nosuch.zone", ["x.nosuch.zone"]) == 0
    # new zone, listed by zones()
    zones.add_records("corp.test", [DnsRecord("svc.corp.test", "A", "10.1.2.3")])
    names = [z for z, _ in zones.zones()]
    assert names == ["containers.internal.", "corp.test.", "docker.internal."]
    assert ask(resolver, "svc.corp.test").rr[0].rdata == A("10.1.2.3")
    assert ask(resolver, "other.corp.test").header.rcode == 3
    # default zone content is exposed
    docker = dict(zones.zones())["docker.internal."]
    assert {(r.name, r.rtype, r.value) for r in docker} == {
        ("gateway.docker.internal.", "A", GW),
        ("host.docker.internal.", "A", HOST),
    }


@pytest.mark.parametrize(
    ("zone", "record", "field"),
    [
        ("containers.internal", DnsRecord("x.containers.internal", "A", "300.1.1.1"), "value"),
        ("containers.internal", DnsRecord("x.containers.internal", "A", "fd00::1"), "value"),
        ("containers.internal", DnsRecord("x.containers.internal", "AAAA", "1.2.3.4"), "value"),
        ("containers.internal", DnsRecord("bad name.containers.internal", "A", "1.2.3.4"), "name"),
        ("containers.internal", DnsRecord("-x.containers.internal", "A", "1.2.3.4"), "name"),
        ("containers.internal", DnsRecord("a..containers.internal", "A", "1.2.3.4"), "name"),
        (
            "containers.internal",
            DnsRecord("x" * 64 + ".containers.internal", "A", "1.2.3.4"),
            "name",
        ),
        ("containers.internal", DnsRecord("x.other.test", "A", "1.2.3.4"), "name"),
        ("containers.internal", DnsRecord("x.containers.internal", "MX", "1.2.3.4"), "rtype"),
        ("containers.internal", DnsRecord("x.containers.internal", "A", "1.2.3.4", -1), "ttl"),
        (
            "containers.internal",
            DnsRecord("x.containers.internal", "CNAME", "bad..target"),
            "value",
        ),
        (
            "containers.internal",
            DnsRecord("x.containers.internal", "CNAME", "x.containers.internal"),
            "value",
        ),
        ("containers.internal", DnsRecord("containers.internal", "CNAME", "a.test"), "rtype"),
        ("containers.internal", DnsRecord("host.containers.internal", "CNAME", "a.test"), "rtype"),
        ("bad zone!", DnsRecord("x.containers.internal", "A", "1.2.3.4"), "zone"),
    ],
)
def test_add_records_validation(
    resolver: DnsResolver, zone: str, record: DnsRecord, field: str
) -> None:
    before = resolver.zones.zones()
    with pytest.raises(ValueError, match=rf"^{field}\b|\b{field}\b"):
        resolver.zones.add_records(
            zone, [DnsRecord("ok.containers.internal", "A", "1.1.1.1"), record]
        )
    assert resolver.zones.zones() == before  # all-or-nothing


def test_cname_cannot_gain_siblings(resolver: DnsResolver) -> None:
    zones = resolver.zones
    zones.add_records(
        "containers.internal",
        [DnsRecord("alias.containers.internal", "CNAME", "host.containers.internal")],
    )
    with pytest.raises(ValueError, match="already has a CNAME"):
        zones.add_records(
            "containers.internal", [DnsRecord("alias.containers.internal", "A", "1.2.3.4")]
        )


def test_cname_chains(resolver: DnsResolver) -> None:
    zones = resolver.zones
    zone, rec = parse_record_spec("db.containers.internal=A:192.168.127.2", zones)
    zones.add_records(zone, [rec])
    zone, rec = parse_record_spec("x.example.test=CNAME:db.containers.internal", zones)
    assert zone == "example.test."
    zones.add_records(zone, [rec])
    zones.add_records(
        "docker.internal",
        [
            DnsRecord("y.docker.internal", "CNAME", "X.example.test", ttl=5),
            DnsRecord("out.docker.internal", "CNAME", "www.elsewhere.test"),
            DnsRecord("dangling.docker.internal", "CNAME", "missing.containers.internal"),
            DnsRecord("loop1.docker.internal", "CNAME", "loop2.docker.internal"),
            DnsRecord("loop2.docker.internal", "CNAME", "loop1.docker.internal"),
        ],
    )
    reply = ask(resolver, "Y.docker.internal")
    assert reply.header.rcode == 0 and reply.header.aa == 1
    assert [(str(rr.rname), QTYPE[rr.rtype], str(rr.rdata)) for rr in reply.rr] == [
        ("Y.docker.internal.", "CNAME", "x.example.test."),
        ("x.example.test.", "CNAME", "db.containers.internal."),
        ("db.containers.internal.", "A", "192.168.127.2"),
    ]
    assert reply.rr[0].ttl == 5
    # asking for the CNAME itself does not chase
    assert [QTYPE[rr.rtype] for rr in ask(resolver, "y.docker.internal", "CNAME").rr] == ["CNAME"]
    # AAAA through the chain: NODATA, chain still given
    aaaa = ask(resolver, "y.docker.internal", "AAAA")
    assert aaaa.header.rcode == 0 and len(aaaa.rr) == 2
    # target outside our zones: the CNAME alone (the guest chases it)
    out = ask(resolver, "out.docker.internal")
    assert out.header.rcode == 0
    assert [str(rr.rdata) for rr in out.rr] == ["www.elsewhere.test."]
    # target in our zone but missing: NXDOMAIN (rcode of the last name), chain kept
    dangling = ask(resolver, "dangling.docker.internal")
    assert dangling.header.rcode == 3 and len(dangling.rr) == 1
    # loop: SERVFAIL, not a hang
    assert ask(resolver, "loop1.docker.internal").header.rcode == 2


def test_edns_and_truncation(resolver: DnsResolver) -> None:
    resolver.zones.add_records(
        "containers.internal",
        [DnsRecord("many.containers.internal", "A", f"10.0.{i}.1") for i in range(60)],
    )
    # plain UDP query: >512 bytes -> TC, no records
    reply = ask(resolver, "many.containers.internal")
    assert reply.header.tc == 1 and reply.rr == []
    assert resolver.stats.truncated == 1
    # same over TCP: everything
    full = ask(resolver, "many.containers.internal", tcp=True)
    assert full.header.tc == 0 and len(full.rr) == 60
    # EDNS0 4096 (capped to 1232) fits 60 A records (~1000 bytes)
    query = q("many.containers.internal")
    query.add_ar(EDNS0(udp_len=4096))
    out = resolver.handle_query(bytes(query.pack()))
    assert isinstance(out, bytes) and len(out) <= 1232
    edns = DNSRecord.parse(out)
    assert edns.header.tc == 0 and len(edns.rr) == 60
    assert [rr.rtype for rr in edns.ar] == [QTYPE.OPT]


def test_garbage_queries(resolver: DnsResolver) -> None:
    assert resolver.handle_query(b"") == b""
    assert resolver.handle_query(b"\x12\x34\x01") == b""
    assert resolver.handle_query(bytes(11)) == b""
    # header claiming one question but nothing behind it -> FORMERR, id echoed
    junk = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0)
    out = resolver.handle_query(junk)
    assert isinstance(out, bytes) and len(out) == 12
    qid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", out)
    assert qid == 0xBEEF and flags & 0x8000 and flags & 0xF == 1 and flags & 0x0100
    assert (qd, an, ns, ar) == (0, 0, 0, 0)
    # random tail / label overrunning the message
    out = resolver.handle_query(struct.pack("!HHHHHH", 7, 0, 1, 0, 0, 0) + b"\x3fabc")
    assert struct.unpack("!H", out[:2])[0] == 7 and out[3] & 0xF == 1
    # no question at all
    out = resolver.handle_query(struct.pack("!HHHHHH", 8, 0x0100, 0, 0, 0, 0))
    assert out[3] & 0xF == 1
    # two questions
    two = q("host.containers.internal")
    two.add_question(q("gateway.containers.internal").q)
    assert DNSRecord.parse(resolver.handle_query(bytes(two.pack()))).header.rcode == 1
    # a response (QR set) is never answered
    resp = q("host.containers.internal").reply()
    assert resolver.handle_query(bytes(resp.pack())) == b""
    # non-QUERY opcode (e.g. UPDATE = 5) -> NOTIMP
    upd = bytearray(q("host.containers.internal").pack())
    upd[2] = (upd[2] & 0x87) | (5 << 3)
    notimp = DNSRecord.parse(resolver.handle_query(bytes(upd)))
    assert notimp.header.rcode == 4
    s = resolver.stats
    assert s.formerr == 4 and s.dropped == 4 and s.notimp == 1 and s.queries == 6


def test_servfail_builder(resolver: DnsResolver) -> None:
    query = q("WWW.Example.test", "MX")
    sf = DNSRecord.parse(resolver.servfail(bytes(query.pack())))
    assert sf.header.id == query.header.id and sf.header.rcode == 2 and sf.header.qr == 1
    assert sf.header.rd == 1
    assert str(sf.q.qname) == "WWW.Example.test." and sf.q.qtype == QTYPE.MX
    assert resolver.servfail(b"\x01") == b""
    assert resolver.stats.servfail == 1 + 1


def test_stats(resolver: DnsResolver) -> None:
    ask(resolver, "host.containers.internal")
    ask(resolver, "host.containers.internal", "AAAA")
    ask(resolver, "x.containers.internal")
    resolver.handle_query(bytes(q("example.test").pack()))
    s = resolver.stats
    assert (s.queries, s.local_answers, s.nxdomain, s.forwarded) == (4, 2, 1, 1)


def test_zone_changes_between_lookups_are_seen_at_once() -> None:
    """The API changes zones on the loop that resolves (no lock, no thread): each lookup
    sees every change made before it, and records untouched by the churn keep answering."""
    zones = default_zones(GW, HOST)
    resolver = DnsResolver(zones)
    for i in range(200):
        name = f"n{i % 50}.containers.internal"
        zones.add_records("containers.internal", [DnsRecord(name, "A", "10.0.0.1")])
        assert ask(resolver, name).rr[0].rdata == A("10.0.0.1")
        zones.remove_records("containers.internal", [name])
        assert ask(resolver, name).header.rcode == RCODE_NXDOMAIN
        assert ask(resolver, "host.containers.internal").rr[0].rdata == A(HOST)


# --------------------------------------------------------------------------- parse_record_spec


def test_parse_record_spec_forms() -> None:
    assert parse_record_spec("db.containers.internal=A:192.168.127.2") == (
        "containers.internal.",
        DnsRecord("db.containers.internal.", "A", "192.168.127.2"),
    )
    zone, rec = parse_record_spec("V6.Docker.Internal.=aaaa:fd00::2@60")
    assert zone == "docker.internal."
    assert (rec.name, rec.rtype, rec.value, rec.ttl) == (
        "v6.docker.internal.",
        "AAAA",
        "fd00::2",
        60,
    )
    zone, rec = parse_record_spec("x.example.test=CNAME:db.containers.internal")
    assert zone == "example.test."
    assert rec.value == "db.containers.internal."
    # longest existing zone suffix wins
    zone, _ = parse_record_spec("a.b.corp.test=A:10.0.0.1", ["corp.test", "b.corp.test."])
    assert zone == "b.corp.test."
    zones = default_zones(GW, HOST)
    zones.add_zone("lab")
    assert parse_record_spec("pc.lab=A:10.0.0.9", zones)[0] == "lab."
    assert parse_record_spec("deep.a.b.example=A:10.0.0.9", zones)[0] == "a.b.example."


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("db.containers.internal", "expected NAME=TYPE:VALUE"),
        ("=A:1.2.3.4", "NAME is empty"),
        ("db.containers.internal=1.2.3.4", "expected TYPE:VALUE"),
        ("db.containers.internal=MX:mail.x", "TYPE 'MX' is not supported"),
        ("db.containers.internal=:1.2.3.4", "TYPE is empty"),
        ("db.containers.internal=A:", "VALUE is empty"),
        ("db.containers.internal=A:1.2.3", "not a valid IPv4 address"),
        ("db.containers.internal=AAAA:1.2.3.4", "not a valid IPv6 address"),
        ("db.containers.internal=A:1.2.3.4@soon", "TTL 'soon' is not an integer"),
        ("db.containers.internal=A:1.2.3.4@-5", "ttl -5 is out of range"),
        ("bad_name!.containers.internal=A:1.2.3.4", "invalid characters"),
        ("db.containers.internal=CNAME:bad..name", "CNAME target"),
        ("myhost=A:1.2.3.4", "single label"),
    ],
)
def test_parse_record_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_record_spec(spec)
    assert repr(spec) in str(info.value)


# --------------------------------------------------------------------------- upstream config


def test_parse_upstream() -> None:
    assert parse_upstream("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_upstream(" 127.0.0.1:5353 ") == ("127.0.0.1", 5353)
    assert parse_upstream("[::1]:53") == ("::1", 53)
    assert parse_upstream("[fd00::53]") == ("fd00::53", 53)
    assert parse_upstream("::1") == ("::1", 53)
    for bad, msg in [
        ("", "expected IP"),
        ("dns.google", "not an IP address"),
        ("dns.google:53", "not an IP address"),
        ("127.0.0.1:0", "out of range"),
        ("127.0.0.1:65536", "out of range"),
        ("127.0.0.1:x", "not a number"),
        ("127.0.0.1:", "not a number"),
        ("[::1", "missing ']'"),
        ("[::1]x", "expected ':PORT'"),
        ("[127.0.0.1]:53", "must be written"),
        ("1.2.3.4.5", "not an IP address"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_upstream(bad)


def test_upstreams_from_resolv_conf(tmp_path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text(
        "# generated\n"
        "search corp.test\n"
        "nameserver 127.0.0.53\n"
        "nameserver   ::1   # loopback v6\n"
        "; nameserver 10.9.9.9\n"
        "nameserver fe80::1%lo\n"
        "nameserver not-an-ip\n"
        "nameserver\n"
        "nameserver 127.0.0.53\n"
        "options edns0 trust-ad\n"
    )
    assert upstreams_from_resolv_conf(str(path)) == [
        ("127.0.0.53", 53),
        ("::1", 53),
        ("fe80::1%lo", 53),
    ]
    assert upstreams_from_resolv_conf(str(tmp_path / "missing")) == []
    empty = tmp_path / "empty"
    empty.write_text("")
    assert upstreams_from_resolv_conf(str(empty)) == []


# ---- gvproxy's zone extras: regexp records and a catch-all address ------------------


def test_regexp_record_answers_names_without_their_own_records() -> None:
    zones = DnsZones()
    zones.add_records("apps.test.", [DnsRecord("fixed.apps.test.", "A", "192.168.127.5")])
    zones.add_pattern("apps.test.", r"^[a-z]+-crc$", "192.168.127.11")
    hit = zones.lookup("console-crc.apps.test.", "A")
    assert hit is not None and [r.value for r in hit.answers] == ["192.168.127.11"]
    assert hit.answers[0].name == "console-crc.apps.test."
    # its own record wins over the pattern; a name the pattern misses is NXDOMAIN
    assert [r.value for r in zones.lookup("fixed.apps.test.", "A").answers] == ["192.168.127.5"]
    assert zones.lookup("Console2.apps.test.", "A").rcode == RCODE_NXDOMAIN
    # an A-only pattern answers AAAA with NODATA, not NXDOMAIN
    nodata = zones.lookup("console-crc.apps.test.", "AAAA")
    assert nodata.rcode == RCODE_NOERROR and nodata.answers == []
    assert zones.extras("apps.test.") == ([(r"^[a-z]+-crc$", "192.168.127.11")], None)
    assert zones.remove_pattern("apps.test.", r"^[a-z]+-crc$") == 1
    assert zones.lookup("console-crc.apps.test.", "A").rcode == RCODE_NXDOMAIN


def test_zone_default_address_and_bad_extras() -> None:
    zones = DnsZones()
    zones.set_default("catch.test.", "192.168.127.9")
    assert [r.value for r in zones.lookup("anything.catch.test.", "A").answers] == ["192.168.127.9"]
    zones.set_default("catch.test.", None)
    assert zones.lookup("anything.catch.test.", "A").rcode == RCODE_NXDOMAIN
    with pytest.raises(ValueError, match="regexp"):
        zones.add_pattern("catch.test.", "(unclosed", "192.168.127.9")
    with pytest.raises(ValueError, match="not an IPv4 or IPv6"):
        zones.set_default("catch.test.", "nope")
    zones.add_pattern("catch.test.", ".*", "192.168.127.9")
    assert zones.remove_zone("catch.test.")
    assert zones.extras("catch.test.") == ([], None)
