"""The outbound policy: its rule syntax, first-match order, and the sans-IO core's answers
(RST for TCP, ICMP administratively prohibited for UDP and echo), frame by frame."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from netferry.hostd.policy import Policy, PolicyError, host_addresses, parse_rule
from netferry.hostd.stack.network import FlowDenied, IcmpEchoOutbound, TcpDial, UdpOutbound
from tests.unit.test_network import GUEST_IP, HOST_IP, REMOTE_IP, feed, learn_guest, make_net, to_gw


def packed(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3", "10.1.2.3"),
        ("10.1.2.3/32", "10.1.2.3"),
        ("10.1.2.3/24", "10.1.2.0/24"),
        ("10.0.0.0/8:22", "10.0.0.0/8:22"),
        ("10.0.0.0/8:1000-2000/udp", "10.0.0.0/8:1000-2000/udp"),
        ("0.0.0.0/0/icmp", "0.0.0.0/0/icmp"),
        ("host", "host"),
        ("HOST:5432/TCP", "host:5432/tcp"),
        ("127.0.0.1:80-80/tcp", "127.0.0.1:80/tcp"),
        ("::/0", "::/0"),
        ("::1", "::1"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:DB8::1/48/udp", "2001:db8::/48/udp"),
        ("[::1]", "::1"),
        ("[::1]:22/tcp", "[::1]:22/tcp"),
        ("[2001:db8::/32]:1000-2000", "[2001:db8::/32]:1000-2000"),
        ("[::/0]/icmp", "::/0/icmp"),
    ],
)
def test_rules_parse_to_their_canonical_text(text, target):
    assert parse_rule("deny", text).target == target
    assert str(parse_rule("allow", text)) == f"allow {target}"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "is empty"),
        ("10.0.0.0/33", "not an IPv4/IPv6 CIDR"),
        ("::/129", "not an IPv4/IPv6 CIDR"),
        ("2001:db8::1:80-90", "[IPv6 CIDR]:PORT"),
        ("[::1", "expected [IPv6 CIDR]:PORT"),
        ("[::1]22", "expected [IPv6 CIDR]:PORT"),
        ("[10.0.0.1]:22", "brackets are for IPv6"),
        ("[::1]:0", "ports must be 1..65535"),
        ("[::1]:22/icmp", "icmp has no ports"),
        ("10.0.0.0/8:0", "ports must be 1..65535"),
        ("10.0.0.0/8:70000", "ports must be 1..65535"),
        ("10.0.0.0/8:9-8", "ports must be 1..65535"),
        ("10.0.0.0/8:x", "is not N or N-M"),
        ("host:22/icmp", "icmp has no ports"),
        ("10.0.0.0/8/sctp", "not an IPv4/IPv6 CIDR"),
        ("y" * 100_000, "not an IPv4/IPv6 CIDR"),
    ],
)
def test_bad_rules_say_what_is_wrong(text, words):
    with pytest.raises(PolicyError) as e:
        parse_rule("deny", text)
    assert words in str(e.value) and len(str(e.value)) < 300


def test_first_match_wins_default_allow_runtime_rules_first():
    p = Policy(host_addresses=frozenset({packed("10.9.9.9")}))
    p.static_rules = [
        parse_rule("allow", "127.0.0.1:5432/tcp", static=True),
        parse_rule("deny", "host", static=True),
    ]
    lo, mine, far = packed("127.0.0.1"), packed("10.9.9.9"), packed("192.0.2.1")
    assert p.decide("tcp", lo, 5432).action == "allow"
    assert p.decide("udp", lo, 5432).action == "deny"  # the allow is TCP only
    assert p.decide("tcp", packed("127.1.2.3"), 80).action == "deny"  # all of loopback
    assert p.decide("icmp", mine, 0).action == "deny"  # the host's own address
    assert p.decide("tcp", far, 80) is None  # default: allow
    p.add(parse_rule("deny", "127.0.0.1:5432/tcp"))
    assert p.decide("tcp", lo, 5432).action == "deny"  # run-time rules come first
    assert p.remove(0).target == "127.0.0.1:5432/tcp"
    with pytest.raises(PolicyError):
        p.remove(0)  # the flags' rules are not removable


def syn(dst: str, dport: int) -> bytes:
    return to_gw(IP(src=GUEST_IP, dst=dst) / TCP(sport=40000, dport=dport, flags="S", seq=1))


def test_denied_syn_gets_rst_and_no_dial():
    net = make_net()
    learn_guest(net)
    net.policy.static_rules = [parse_rule("deny", "127.0.0.0/8:22/tcp", static=True)]
    out = feed(net, syn(HOST_IP, 22))
    (rst,) = [Ether(f) for f in out[1]]
    assert rst[TCP].flags == "RA" and rst[IP].src == HOST_IP and rst[TCP].sport == 22
    (ev,) = net.events
    assert isinstance(ev, FlowDenied)
    assert (ev.verdict.protocol, ev.verdict.destination) == ("tcp", "127.0.0.1:22")
    assert ev.verdict.rule == "deny 127.0.0.0/8:22/tcp"
    assert net.stats["policy_tcp_refused"] == 1 and not net.tcp_conns
    net.events.clear()
    feed(net, syn(HOST_IP, 23))  # another port: allowed, dialled
    (dial,) = net.events
    assert isinstance(dial, TcpDial) and dial.target_ip == "127.0.0.1"
    assert [(v.destination, v.allowed) for v in net.policy.recent] == [
        ("127.0.0.1:22", False),
        ("127.0.0.1:23", True),
    ]


@pytest.mark.parametrize(
    "packet",
    [
        IP(src=GUEST_IP, dst=REMOTE_IP) / UDP(sport=1000, dport=53) / b"q",
        IP(src=GUEST_IP, dst=REMOTE_IP) / ICMP(id=1, seq=1) / b"ping",
    ],
)
def test_denied_udp_and_echo_get_admin_prohibited(packet):
    net = make_net()
    learn_guest(net)
    net.policy.static_rules = [parse_rule("deny", f"{REMOTE_IP}/32", static=True)]
    out = feed(net, to_gw(packet))
    (err,) = [Ether(f) for f in out[1]]
    assert err[ICMP].type == 3 and err[ICMP].code == 13 and err[IP].dst == GUEST_IP
    assert bytes(err[ICMP].payload) == bytes(IP(bytes(packet)))[:28]
    assert [type(e) for e in net.events] == [FlowDenied]


def test_no_rules_no_verdicts_recorded():
    net = make_net()
    learn_guest(net)
    feed(net, to_gw(IP(src=GUEST_IP, dst=REMOTE_IP) / UDP(sport=1000, dport=53) / b"q"))
    feed(net, to_gw(IP(src=GUEST_IP, dst=REMOTE_IP) / ICMP(id=1, seq=1)))
    assert [type(e) for e in net.events] == [UdpOutbound, IcmpEchoOutbound]
    assert not net.policy.recent and not net.policy.counters


def test_host_group_covers_the_hosts_addresses():
    found = host_addresses()
    assert ipaddress.IPv4Address("127.0.0.1").packed in found
    assert ipaddress.IPv6Address("::1").packed in found
    assert all(len(a) in (4, 16) for a in found)


def test_host_group_reads_ipv6_addresses(tmp_path):
    fib = tmp_path / "fib_trie"
    fib.write_text("  |-- 10.9.9.9\n     /32 host LOCAL\n")
    inet6 = tmp_path / "if_inet6"
    inet6.write_text(
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "fd00000000000000000000000000abcd 02 40 00 80     eth0\n"
        "20010db8000000000000000000000042 02 40 00 80     eth0\n"
        "fe800000000000000000000000000001 02 40 20 80     eth0\n"
        "garbage line\n"
        "zz00000000000000000000000000abcd 02 40 00 80     eth0\n"
    )
    found = host_addresses(str(fib), str(inet6))
    assert found == {
        packed("127.0.0.1"),
        packed("10.9.9.9"),
        packed("::1"),
        packed("fd00::abcd"),
        packed("2001:db8::42"),
        packed("fe80::1"),
    }
    p = Policy(host_addresses=found)
    p.static_rules = [parse_rule("deny", "host", static=True)]
    for mine in ("::1", "fd00::abcd", "2001:db8::42", "fe80::1", "10.9.9.9", "127.3.2.1"):
        assert p.decide("tcp", packed(mine), 80).action == "deny", mine
    assert p.decide("tcp", packed("2001:db8::43"), 80) is None
    # 127/8 is IPv4 loopback only: 7f00::/8 is not the host
    assert p.decide("tcp", packed("7f00::1"), 80) is None
    missing = host_addresses(str(tmp_path / "none"), str(tmp_path / "none6"))
    assert missing == {packed("127.0.0.1"), packed("::1")}


def test_ipv6_rules_match_ipv6_destinations_only():
    p = Policy()
    p.static_rules = [
        parse_rule("allow", "[2001:db8::/32]:443/tcp", static=True),
        parse_rule("deny", "2001:db8::/32", static=True),
        parse_rule("deny", "[::1]:22", static=True),
    ]
    assert p.decide("tcp", packed("2001:db8::1"), 443).action == "allow"
    assert p.decide("udp", packed("2001:db8::1"), 443).action == "deny"
    assert p.decide("tcp", packed("2001:db9::1"), 443) is None
    assert p.decide("tcp", packed("::1"), 22).action == "deny"
    assert p.decide("tcp", packed("::1"), 23) is None
    assert p.decide("tcp", packed("127.0.0.1"), 22) is None  # a v6 rule is not v4
    p.static_rules = [parse_rule("deny", "::/0", static=True)]
    assert p.decide("tcp", packed("2606:4700::1"), 443).action == "deny"
    assert p.decide("tcp", packed("192.0.2.1"), 443) is None  # ::/0 is IPv6 only


def test_v4_only_policy_still_denies_ipv6_it_did_not_allow():
    """A policy written with IPv4 rules only: its `--deny 0.0.0.0/0` is "everything else",
    IPv6 included; narrower IPv4 rules stay IPv4."""
    p = Policy()
    p.static_rules = [
        parse_rule("allow", "10.0.0.0/8", static=True),
        parse_rule("deny", "192.0.2.0/24", static=True),
        parse_rule("deny", "0.0.0.0/0", static=True),
    ]
    v6 = packed("2606:4700::1")
    assert p.decide("tcp", packed("10.1.2.3"), 443).action == "allow"
    rule = p.decide("tcp", v6, 443)
    assert rule is not None and str(rule) == "deny 0.0.0.0/0"
    assert p.check("tcp", packed("fd00::2"), 40000, v6, 443, 1.0).allowed is False
    p.add(parse_rule("allow", "[2606:4700::/32]:443/tcp"))
    assert p.decide("tcp", v6, 443).action == "allow"  # an explicit v6 allow before it
    # a v4 catch-all with ports covers both families too; 192.0.2.0/24 stays IPv4
    p.rules.clear()
    p.static_rules = [
        parse_rule("deny", "0.0.0.0/0:25/tcp", static=True),
        parse_rule("deny", "192.0.2.0/24", static=True),
    ]
    assert p.decide("tcp", v6, 25).action == "deny"
    assert p.decide("tcp", v6, 26) is None


def test_verdicts_format_ipv6_endpoints():
    p = Policy()
    p.static_rules = [parse_rule("deny", "[2001:db8::/32]:443/tcp", static=True)]
    v = p.check("tcp", packed("fd00::2"), 40000, packed("2001:db8::1"), 443, 1.0)
    assert (v.source, v.destination, v.allowed) == ("[fd00::2]:40000", "[2001:db8::1]:443", False)
    assert v.rule == "deny [2001:db8::/32]:443/tcp"
    assert parse_rule("deny", v.rule.split(" ", 1)[1]).target == "[2001:db8::/32]:443/tcp"
    e = p.check("icmp", packed("fd00::2"), 0, packed("2001:db8::1"), 0, 2.0)
    assert (e.source, e.destination, e.allowed) == ("fd00::2", "2001:db8::1", True)
