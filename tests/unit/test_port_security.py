"""Port security (issue 16.1): one guest cannot take another's addresses, MACs or leases.

The sans-IO core only: frames built with scapy go in through `Network.receive_frame(s)`;
what comes out per port is checked. No sockets, no clock.
"""

from __future__ import annotations

import random

from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from netferry.hostd.stack.ethernet import CamTable
from netferry.hostd.stack.port_security import PortSecurity
from tests.unit.test_network import (
    BCAST,
    GUEST2_IP,
    GUEST_IP,
    MAC1,
    MAC2,
    REMOTE_IP,
    b,
    dhcp_frame,
    feed,
    learn_guest,
    m,
    make_net,
    to_gw,
)

VICTIM, ATTACKER, THIRD = 1, 2, 3


def rand_mac(rng: random.Random) -> str:
    return "02:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(5))


def dhcp_lease(net, port: int, mac: str, now: float = 0.0) -> str | None:
    """DISCOVER + REQUEST from `mac` on `port`; the address ACKed, or None."""
    out = feed(net, dhcp_frame(mac, 1, [("message-type", "discover")]), port, now)
    offers = [Ether(f) for f in out.get(port, []) if Ether(f).haslayer(BOOTP)]
    if not offers:
        return None
    ip = offers[0][BOOTP].yiaddr
    req = [("message-type", "request"), ("server_id", "192.168.127.1"), ("requested_addr", ip)]
    out = feed(net, dhcp_frame(mac, 2, req), port, now)
    acks = [Ether(f) for f in out.get(port, []) if Ether(f).haslayer(DHCP)]
    return ip if acks and acks[0][BOOTP].yiaddr == ip else None


# ---- the CAM table -----------------------------------------------------------------------


def test_cam_secure_refuses_theft_until_aged():
    cam = CamTable(max_per_port=4, max_age=300.0, secure=True)
    assert cam.learn(m(MAC1), 1, 0.0)
    assert not cam.learn(m(MAC1), 2, 100.0) and cam.lookup(m(MAC1)) == 1
    assert cam.stats["mac_theft_dropped"] == 1 and cam.last_refusal == "mac_theft_dropped"
    assert cam.learn(m(MAC1), 1, 200.0)  # seen again: fresh again
    assert not cam.learn(m(MAC1), 2, 450.0)
    assert cam.learn(m(MAC1), 2, 501.0) and cam.lookup(m(MAC1)) == 2  # aged: moves
    assert cam.stats["mac_moved"] == 1 and cam.macs(1) == []


def test_cam_per_port_limit_and_aging_make_room():
    cam = CamTable(max_per_port=3, max_age=300.0, secure=True)
    rng = random.Random(3)
    macs = [m(rand_mac(rng)) for _ in range(5000)]
    accepted = sum(cam.learn(mac, 2, 0.0) for mac in macs)
    assert accepted == 3 and len(cam) == 3
    assert cam.stats["port_mac_limit_dropped"] == 4997
    assert cam.learn(m(MAC1), 1, 1.0)  # another port is not affected
    # Once aged, the port's oldest entries give way to new MACs.
    assert cam.learn(m(MAC2), 2, 400.0) and cam.stats["mac_aged_out"] == 1
    assert len(cam.macs(2)) == 3


def test_cam_global_bound_evicts_aged_only():
    cam = CamTable(max_entries=2, secure=False)
    assert cam.learn(b"\x02" * 6, 1, 0.0) and cam.learn(b"\x04" * 6, 1, 10.0)
    assert not cam.learn(b"\x06" * 6, 2, 20.0) and cam.stats["cam_full_dropped"] == 1
    assert cam.learn(b"\x06" * 6, 2, 301.0) and cam.lookup(b"\x02" * 6) is None


# ---- the binding table -------------------------------------------------------------------


def test_binding_by_first_use_and_by_lease():
    ps = PortSecurity(CamTable(secure=True), max_addresses_per_port=2)
    assert ps.source_allowed(1, m(MAC1), b(GUEST_IP))  # a static guest binds by first use
    assert not ps.source_allowed(2, m(MAC2), b(GUEST_IP))
    assert not ps.arp_allowed(2, m(MAC2), b(GUEST_IP))
    assert ps.stats["ipv4_source_conflict_dropped"] == 1
    assert ps.stats["arp_address_theft_dropped"] == 1
    assert ps.arp_allowed(2, m(MAC2), b"\0\0\0\0")  # a probe claims nothing
    ps.bind(2, m(MAC2), b(GUEST_IP))  # a DHCP lease is authoritative
    assert ps.source_allowed(2, m(MAC2), b(GUEST_IP))
    assert not ps.source_allowed(1, m(MAC1), b(GUEST_IP))
    ps.unbind(b(GUEST_IP), m(MAC2))
    assert ps.owner(b(GUEST_IP)) is None
    # A port binds at most `max_addresses_per_port` addresses.
    assert ps.source_allowed(3, m(MAC1), b"\xc0\xa8\x7f\x0a")
    assert ps.source_allowed(3, m(MAC1), b"\xc0\xa8\x7f\x0b")
    assert not ps.source_allowed(3, m(MAC1), b"\xc0\xa8\x7f\x0c")
    assert ps.stats["ip_limit_dropped"] == 1
    ps.forget_port(3)
    assert ps.source_allowed(4, m(MAC2), b"\xc0\xa8\x7f\x0a")


def test_ipv6_leases_counted_apart_from_ipv4_addresses():
    """DHCPv6 leases do not use up a port's IPv4 addresses; they have their own limit."""
    ps = PortSecurity(CamTable(secure=True), max_addresses_per_port=2)
    v6 = [bytes.fromhex("fd000192016801270000000000000a0" + str(i)) for i in range(4)]
    ps.bind(1, m(MAC1), v6[0])
    ps.bind(1, m(MAC1), v6[1])
    assert ps.source_allowed(1, m(MAC1), b"\xc0\xa8\x7f\x0a")
    assert ps.source_allowed(1, m(MAC1), b"\xc0\xa8\x7f\x0b")
    assert ps.owner(v6[1]) == (m(MAC1), 1)
    ps.bind(1, m(MAC1), v6[2])  # beyond the IPv6 share: left unbound, counted
    assert ps.owner(v6[2]) is None and ps.stats["ipv6_lease_limit_unbound"] == 1
    ps.unbind(v6[0], m(MAC1))
    ps.bind(1, m(MAC1), v6[3])
    assert ps.owner(v6[3]) == (m(MAC1), 1)
    ps.forget_port(1)
    assert len(ps) == 0


def test_disabled_allows_everything_and_binds_nothing():
    ps = PortSecurity(CamTable(secure=False), enabled=False)
    assert ps.source_allowed(1, m(MAC1), b(GUEST_IP))
    assert ps.source_allowed(2, m(MAC2), b(GUEST_IP))
    ps.bind(1, m(MAC1), b(GUEST_IP))
    assert len(ps) == 0 and not ps.stats


# ---- through the switch ------------------------------------------------------------------


def three_guests():
    net = make_net(ports=3)
    learn_guest(net, VICTIM, MAC1, GUEST_IP)
    net.frames_to_send()
    return net


def test_gratuitous_arp_for_a_guest_neither_flooded_nor_learned():
    net = three_guests()
    grat = Ether(src=MAC2, dst=BCAST) / ARP(op=2, hwsrc=MAC2, psrc=GUEST_IP, pdst=GUEST_IP)
    assert feed(net, grat, ATTACKER) == {}  # not flooded to the victim or the third guest
    assert net.neighbours.lookup(b(GUEST_IP)) == m(MAC1)
    assert net.stats["arp_address_theft_dropped"] == 1
    # IPv4 with the victim's source from the attacker's port is dropped too.
    spoof = to_gw(IP(src=GUEST_IP, dst=REMOTE_IP) / UDP(sport=1, dport=2) / b"x", MAC2)
    feed(net, spoof, ATTACKER)
    assert not net.events and net.stats["ipv4_source_conflict_dropped"] == 1
    assert net.neighbours.lookup(b(GUEST_IP)) == m(MAC1)


def test_mac_theft_dropped_and_traffic_keeps_going_to_the_owner():
    net = three_guests()
    stolen = to_gw(IP(src=GUEST2_IP, dst=REMOTE_IP) / UDP(sport=1, dport=2) / b"x", MAC1)
    feed(net, stolen, ATTACKER)
    assert net.stats["mac_theft_dropped"] == 1 and net.cam.lookup(m(MAC1)) == VICTIM
    net.send_udp(b(REMOTE_IP), 2, b(GUEST_IP), 1, b"reply")
    assert set(net.frames_to_send()) == {VICTIM}


def test_spoofed_source_macs_do_not_fill_the_table_and_a_new_guest_still_works():
    net = three_guests()
    rng = random.Random(7)
    for _ in range(5000):
        feed(net, Ether(src=rand_mac(rng), dst=BCAST, type=0x88B5) / b"junk", ATTACKER)
    assert len(net.cam.macs(ATTACKER)) == net.config.port_max_macs
    assert net.stats["port_mac_limit_dropped"] == 5000 - net.config.port_max_macs
    assert dhcp_lease(net, THIRD, "5a:94:ef:e4:0c:77") is not None


def test_random_dhcp_clients_from_one_port_do_not_take_the_pool():
    net = three_guests()
    rng = random.Random(11)
    granted = 0
    for i in range(300):
        # Random chaddr, one Ethernet source: only the lease cap stops this one.
        mac = rand_mac(rng)
        frame = (
            Ether(src=MAC2, dst=BCAST)
            / IP(src="0.0.0.0", dst="255.255.255.255")
            / UDP(sport=68, dport=67)
            / BOOTP(chaddr=m(mac) + bytes(10), xid=i, flags=0x8000)
            / DHCP(options=[("message-type", "discover"), "end"])
        )
        out = feed(net, frame, ATTACKER)
        granted += sum(1 for f in out.get(ATTACKER, []) if Ether(f).haslayer(BOOTP))
    assert granted == net.config.port_max_leases
    assert net.dhcp.stats.port_limit_dropped == 300 - granted
    assert dhcp_lease(net, THIRD, "5a:94:ef:e4:0c:77") is not None


def test_lease_binds_address_to_its_port():
    net = make_net(ports=3)
    ip = dhcp_lease(net, THIRD, "5a:94:ef:e4:0c:77")
    assert ip is not None
    assert net.port_security.owner(b(ip)) == (m("5a:94:ef:e4:0c:77"), THIRD)
    grat = Ether(src=MAC2, dst=BCAST) / ARP(op=2, hwsrc=MAC2, psrc=ip, pdst=ip)
    assert feed(net, grat, ATTACKER) == {}
    assert net.stats["arp_address_theft_dropped"] == 1
    net.remove_port(THIRD)
    assert net.port_security.owner(b(ip)) is None


def test_flow_path_checks_the_source_too():
    """Segments of an open connection skip the generic path: theft is refused there too."""
    net = three_guests()
    syn = to_gw(IP(src=GUEST_IP, dst=REMOTE_IP) / TCP(sport=1000, dport=80, flags="S", seq=1))
    net.receive_frames(VICTIM, [syn], 0.0)
    (dial,) = [e for e in net.events if type(e).__name__ == "TcpDial"]
    net.tcp_accept(dial.conn, 0.0)
    net.frames_to_send(0.0)
    state = dial.conn.state
    segments_in = net.stats["tcp_segments_in"]
    inject = to_gw(
        IP(src=GUEST_IP, dst=REMOTE_IP) / TCP(sport=1000, dport=80, flags="R", seq=2), MAC2
    )
    net.receive_frames(ATTACKER, [inject], 1.0)
    assert net.stats["ipv4_source_conflict_dropped"] == 1
    assert net.stats["tcp_segments_in"] == segments_in
    assert dial.conn.state is state


def test_port_security_off_lets_a_mac_and_an_address_move():
    net = make_net(ports=2, port_security=False)
    learn_guest(net, 1, MAC1, GUEST_IP)
    grat = Ether(src=MAC1, dst=BCAST) / ARP(op=2, hwsrc=MAC1, psrc=GUEST_IP, pdst=GUEST_IP)
    feed(net, grat, 2)
    assert net.cam.lookup(m(MAC1)) == 2
    assert not any(k.endswith("_dropped") for k in net.stats)


def test_flags():
    import pytest

    from netferry.hostd.cli import build_parser, config_from_args

    base = ["--listen=stdio://", "--dns-upstream=127.0.0.1"]
    config = config_from_args(build_parser().parse_args(base))
    assert config.port_security and config.port_max_macs == 64 and config.port_max_leases == 16
    args = build_parser().parse_args(
        [*base, "--no-port-security", "--port-max-leases=0", "--mac-age=60"]
    )
    config = config_from_args(args)
    assert not config.port_security and config.port_max_leases == 0 and config.mac_age == 60
    net = make_net(ports=1, port_security=False, port_max_leases=0)
    assert not net.port_security.enabled and net.dhcp.config.max_leases_per_port == 0
    assert (
        config_from_args(build_parser().parse_args([*base, "--port-security=off"])).port_security
        is False
    )
    with pytest.raises(ValueError, match="port-max-macs"):
        config_from_args(build_parser().parse_args([*base, "--port-max-macs=-1"]))


def test_refusals_are_logged_at_most_every_five_seconds_with_the_count():
    """A flood of refusals gives one log line per reason per 5 s of the batches' time,
    carrying how many were dropped since the last line; gateway claims are logged too."""
    from structlog.testing import capture_logs

    net = three_guests()
    grat = Ether(src=MAC2, dst=BCAST) / ARP(op=2, hwsrc=MAC2, psrc=GUEST_IP, pdst=GUEST_IP)
    claim = Ether(src=MAC2, dst=BCAST) / ARP(op=2, hwsrc=MAC2, psrc="192.168.127.1")
    with capture_logs() as logs:
        for i in range(10):
            feed(net, grat, ATTACKER, now=float(i))  # t = 0 .. 9
            feed(net, claim, ATTACKER, now=float(i))
    lines = [(e["reason"], e["dropped_since_last_log"]) for e in logs]
    assert lines.count(("arp_address_theft_dropped", 1)) == 1  # t = 0
    assert ("arp_address_theft_dropped", 5) in lines  # t = 5: the five since
    assert [r for r, _ in lines].count("arp_address_theft_dropped") == 2
    assert [r for r, _ in lines].count("arp_gateway_claim_dropped") == 2
    assert net.stats["arp_address_theft_dropped"] == 10
    assert net.stats["arp_gateway_claim_dropped"] == 10
