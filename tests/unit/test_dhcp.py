"""Tests for the sans-IO DHCPv4 server; client messages are built and parsed with scapy."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from scapy.layers.dhcp import BOOTP, DHCP

from netferry.hostd.services.dhcp import (
    DhcpConfig,
    DhcpReply,
    DhcpServer,
    LeaseGranted,
    LeaseReleased,
    encode_domain_search,
    normalize_mac,
    parse_static_lease,
)

STATIC_MAC = "5a:94:ef:e4:0c:ee"
MAC_A = "02:00:00:00:00:0a"
MAC_B = "02:00:00:00:00:0b"
MAC_C = "02:00:00:00:00:0c"
MAC_D = "02:00:00:00:00:0d"
GW = IPv4Address("192.168.127.1")
BCAST = IPv4Address("255.255.255.255")
BCAST_MAC = b"\xff" * 6

MSG = {"discover": 1, "offer": 2, "request": 3, "decline": 4, "ack": 5, "nak": 6}


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def client_msg(
    mac: str,
    mtype: str,
    *,
    xid: int = 0x1234,
    ciaddr: str = "0.0.0.0",
    broadcast: bool = False,
    options: list[Any] | None = None,
) -> bytes:
    pkt = BOOTP(
        op=1,
        chaddr=mac_bytes(mac) + bytes(10),
        xid=xid,
        ciaddr=ciaddr,
        flags=0x8000 if broadcast else 0,
    ) / DHCP(options=[("message-type", mtype), *(options or []), "end"])
    return bytes(pkt)


def opts(reply: DhcpReply) -> dict[str, Any]:
    pkt = BOOTP(reply.payload)
    return {o[0]: o[1] if len(o) == 2 else o[1:] for o in pkt[DHCP].options if isinstance(o, tuple)}


def raw_options(reply: DhcpReply) -> dict[int, bytes]:
    """Independent option walker (checks multi-valued options byte for byte)."""
    data = reply.payload[240:]
    out: dict[int, bytes] = {}
    i = 0
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        code, length = data[i], data[i + 1]
        out[code] = out.get(code, b"") + data[i + 2 : i + 2 + length]
        i += 2 + length
    return out


def mtype_of(reply: DhcpReply) -> int:
    return opts(reply)["message-type"]


def yiaddr(reply: DhcpReply) -> IPv4Address:
    return IPv4Address(BOOTP(reply.payload).yiaddr)


class Client:
    """A tiny scripted DHCP client."""

    def __init__(self, server: DhcpServer, mac: str) -> None:
        self.server, self.mac = server, mac

    def send(self, payload: bytes, now: float) -> DhcpReply | None:
        return self.server.handle(payload, mac_bytes(self.mac), now)

    def discover(self, now: float = 0.0, **kw: Any) -> DhcpReply | None:
        return self.send(client_msg(self.mac, "discover", **kw), now)

    def request_selecting(
        self, ip: IPv4Address, now: float = 0.0, server: IPv4Address = GW, **kw: Any
    ) -> DhcpReply | None:
        extra = [("server_id", str(server)), ("requested_addr", str(ip)), *kw.pop("options", [])]
        return self.send(client_msg(self.mac, "request", options=extra, **kw), now)

    def dora(self, now: float = 0.0, **kw: Any) -> IPv4Address:
        offer = self.discover(now, **kw)
        assert offer is not None and mtype_of(offer) == MSG["offer"]
        ack = self.request_selecting(yiaddr(offer), now, **kw)
        assert ack is not None and mtype_of(ack) == MSG["ack"], ack
        assert yiaddr(ack) == yiaddr(offer)
        return yiaddr(ack)

    def init_reboot(self, ip: str, now: float = 0.0) -> DhcpReply | None:
        return self.send(client_msg(self.mac, "request", options=[("requested_addr", ip)]), now)

    def renew(self, ip: IPv4Address, now: float) -> DhcpReply | None:
        return self.send(client_msg(self.mac, "request", ciaddr=str(ip)), now)

    def release(self, ip: IPv4Address, now: float = 0.0) -> DhcpReply | None:
        return self.send(
            client_msg(self.mac, "release", ciaddr=str(ip), options=[("server_id", str(GW))]),
            now,
        )


@pytest.fixture
def server() -> DhcpServer:
    return DhcpServer(DhcpConfig())


def drain(server: DhcpServer) -> list[LeaseGranted | LeaseReleased]:
    events = []
    while (ev := server.next_event()) is not None:
        events.append(ev)
    return events


# --------------------------------------------------------------------------- DORA


def test_full_dora_static_default_mac(server: DhcpServer) -> None:
    c = Client(server, STATIC_MAC)
    offer = c.discover(options=[("hostname", "vm1")])
    assert offer is not None
    assert mtype_of(offer) == MSG["offer"]
    pkt = BOOTP(offer.payload)
    assert pkt.op == 2 and pkt.xid == 0x1234
    assert pkt.chaddr[:6] == mac_bytes(STATIC_MAC)
    assert yiaddr(offer) == IPv4Address("192.168.127.2")
    assert IPv4Address(pkt.ciaddr) == IPv4Address("0.0.0.0")
    # Nothing is bound on OFFER.
    assert server.leases(0.0) == []
    assert server.next_event() is None

    ack = c.request_selecting(yiaddr(offer), options=[("hostname", "vm1")])
    assert ack is not None and mtype_of(ack) == MSG["ack"]
    assert yiaddr(ack) == IPv4Address("192.168.127.2")
    (lease,) = server.leases(1.0)
    assert lease.mac == STATIC_MAC
    assert lease.ip == IPv4Address("192.168.127.2")
    assert lease.static is True
    assert lease.hostname == "vm1"
    assert lease.expires == 3600.0
    (ev,) = drain(server)
    assert ev == LeaseGranted(
        mac=STATIC_MAC,
        ip=IPv4Address("192.168.127.2"),
        hostname="vm1",
        static=True,
        expires=3600.0,
        renewed=False,
    )
    s = server.stats
    assert (s.discovers, s.offers, s.requests, s.acks, s.naks) == (1, 1, 1, 1, 0)


def test_static_lease_mac_matching_is_case_and_separator_insensitive() -> None:
    srv = DhcpServer(DhcpConfig(static_leases={"02-00-00-00-00-0A": IPv4Address("192.168.127.77")}))
    assert srv.config.static_leases == {MAC_A: IPv4Address("192.168.127.77")}
    assert Client(srv, MAC_A).dora() == IPv4Address("192.168.127.77")
    # The default static lease is replaced, so the gvproxy MAC now gets a pool address.
    assert Client(srv, STATIC_MAC).dora() == IPv4Address("192.168.127.3")


def test_second_mac_gets_pool_address_and_same_mac_same_address(server: DhcpServer) -> None:
    assert Client(server, STATIC_MAC).dora() == IPv4Address("192.168.127.2")
    a = Client(server, MAC_A)
    b = Client(server, MAC_B)
    assert a.dora() == IPv4Address("192.168.127.3")
    assert b.dora() == IPv4Address("192.168.127.4")
    # Same MAC again (e.g. after a reboot without INIT-REBOOT) -> same address.
    assert a.dora(now=10.0) == IPv4Address("192.168.127.3")
    assert b.dora(now=20.0) == IPv4Address("192.168.127.4")
    assert [lease.ip for lease in server.leases(30.0)] == [
        IPv4Address("192.168.127.2"),
        IPv4Address("192.168.127.3"),
        IPv4Address("192.168.127.4"),
    ]
    renewed = [ev for ev in drain(server) if isinstance(ev, LeaseGranted) and ev.renewed]
    assert {ev.mac for ev in renewed} == {MAC_A, MAC_B}


def test_outstanding_offer_is_not_given_to_another_client(server: DhcpServer) -> None:
    a, b = Client(server, MAC_A), Client(server, MAC_B)
    offer_a = a.discover()
    offer_b = b.discover()
    assert offer_a is not None and offer_b is not None
    assert yiaddr(offer_a) != yiaddr(offer_b)
    # B cannot grab A's offered address.
    nak = b.request_selecting(yiaddr(offer_a))
    assert nak is not None and mtype_of(nak) == MSG["nak"]
    # A repeating DISCOVER gets the same offer.
    again = a.discover(now=5.0)
    assert again is not None and yiaddr(again) == yiaddr(offer_a)


def test_requested_address_honoured_on_discover(server: DhcpServer) -> None:
    c = Client(server, MAC_A)
    offer = c.discover(options=[("requested_addr", "192.168.127.100")])
    assert offer is not None and yiaddr(offer) == IPv4Address("192.168.127.100")
    # Reserved (.254), gateway, static and out-of-subnet requests fall back to the pool.
    for i, bad in enumerate(["192.168.127.254", "192.168.127.1", "192.168.127.2", "10.0.0.5"]):
        other = Client(server, f"02:00:00:00:01:{i:02x}")
        o = other.discover(options=[("requested_addr", bad)])
        assert o is not None and yiaddr(o) != IPv4Address(bad)
        assert yiaddr(o) in IPv4Network("192.168.127.0/24")


def test_request_for_other_server_withdraws_offer(server: DhcpServer) -> None:
    a, b = Client(server, MAC_A), Client(server, MAC_B)
    offer = a.discover()
    assert offer is not None and yiaddr(offer) == IPv4Address("192.168.127.3")
    assert a.request_selecting(yiaddr(offer), server=IPv4Address("192.168.127.200")) is None
    assert server.stats.ignored == 1
    # The withdrawn offer is free for someone else right away.
    assert b.dora() == IPv4Address("192.168.127.3")


def test_selecting_request_for_unavailable_address_is_naked(server: DhcpServer) -> None:
    c = Client(server, MAC_A)
    nak = c.request_selecting(IPv4Address("192.168.127.254"))
    assert nak is not None and mtype_of(nak) == MSG["nak"]
    # Static MAC asking for a pool address is NAKed too.
    s = Client(server, STATIC_MAC)
    nak2 = s.request_selecting(IPv4Address("192.168.127.50"))
    assert nak2 is not None and mtype_of(nak2) == MSG["nak"]
    assert server.stats.naks == 2
    assert server.leases(0.0) == []


# --------------------------------------------------------------------------- INIT-REBOOT


def test_init_reboot(server: DhcpServer) -> None:
    a = Client(server, MAC_A)
    ip = a.dora()
    b = Client(server, MAC_B)
    b.dora()

    ok = a.init_reboot(str(ip), now=100.0)
    assert ok is not None and mtype_of(ok) == MSG["ack"] and yiaddr(ok) == ip

    # Another client's address -> NAK.
    wrong = a.init_reboot("192.168.127.4", now=100.0)
    assert wrong is not None and mtype_of(wrong) == MSG["nak"]
    # A free but different address while A holds a lease -> NAK (one lease per MAC).
    wrong2 = a.init_reboot("192.168.127.50", now=100.0)
    assert wrong2 is not None and mtype_of(wrong2) == MSG["nak"]
    # Other network (moved from another LAN) -> NAK.
    foreign = Client(server, MAC_C).init_reboot("10.1.2.3")
    assert foreign is not None and mtype_of(foreign) == MSG["nak"]
    assert opts(foreign)["error_message"] == b"wrong network"
    # NAK: broadcast, yiaddr 0, server id present, no lease time.
    pkt = BOOTP(wrong.payload)
    assert IPv4Address(pkt.yiaddr) == IPv4Address("0.0.0.0")
    assert wrong.dst_ip == BCAST and wrong.dst_mac == BCAST_MAC
    assert opts(wrong)["server_id"] == str(GW)
    assert "lease_time" not in opts(wrong)
    # The static MAC must use its static address.
    s = Client(server, STATIC_MAC)
    bad = s.init_reboot("192.168.127.60")
    assert bad is not None and mtype_of(bad) == MSG["nak"]
    good = s.init_reboot("192.168.127.2")
    assert good is not None and mtype_of(good) == MSG["ack"]


def test_init_reboot_unknown_client_keeps_free_address(server: DhcpServer) -> None:
    # After a netferry restart the server has no record; a free address is confirmed.
    c = Client(server, MAC_A)
    ack = c.init_reboot("192.168.127.42")
    assert ack is not None and mtype_of(ack) == MSG["ack"]
    assert yiaddr(ack) == IPv4Address("192.168.127.42")
    assert [lease.ip for lease in server.leases(1.0)] == [IPv4Address("192.168.127.42")]


# --------------------------------------------------------------------------- renew / release


def test_renew_extends_lease_and_is_unicast(server: DhcpServer) -> None:
    a = Client(server, MAC_A)
    ip = a.dora(now=0.0)
    drain(server)
    ack = a.renew(ip, now=1800.0)
    assert ack is not None and mtype_of(ack) == MSG["ack"]
    assert yiaddr(ack) == ip
    assert IPv4Address(BOOTP(ack.payload).ciaddr) == ip
    assert ack.dst_ip == ip and ack.dst_mac == mac_bytes(MAC_A)
    assert opts(ack)["lease_time"] == 3600
    (lease,) = server.leases(1801.0)
    assert lease.expires == 1800.0 + 3600
    (ev,) = drain(server)
    assert isinstance(ev, LeaseGranted) and ev.renewed
    # Still alive after the original expiry time.
    assert server.leases(3700.0) != []


def test_renew_of_someone_elses_address_is_naked(server: DhcpServer) -> None:
    a, b = Client(server, MAC_A), Client(server, MAC_B)
    ip_a = a.dora()
    b.dora()
    nak = b.renew(ip_a, now=10.0)
    assert nak is not None and mtype_of(nak) == MSG["nak"]
    # NAK is broadcast even though ciaddr was set (RFC 2131 4.1).
    assert nak.dst_ip == BCAST and nak.dst_mac == BCAST_MAC
    assert IPv4Address(BOOTP(nak.payload).ciaddr) == IPv4Address("0.0.0.0")
    # A's lease is untouched.
    assert {lease.mac: lease.ip for lease in server.leases(11.0)}[MAC_A] == ip_a


def test_release_then_reuse(server: DhcpServer) -> None:
    a, b = Client(server, MAC_A), Client(server, MAC_B)
    ip = a.dora()
    drain(server)
    assert a.release(ip, now=5.0) is None
    assert server.stats.releases == 1
    assert server.leases(5.0) == []
    (ev,) = drain(server)
    assert ev == LeaseReleased(mac=MAC_A, ip=ip, hostname=None, reason="released")
    # The lowest free address is handed to the next client.
    assert b.dora(now=6.0) == ip
    # A comes back and gets something else.
    assert a.dora(now=7.0) == IPv4Address("192.168.127.4")


def test_release_from_wrong_mac_is_ignored(server: DhcpServer) -> None:
    a, b = Client(server, MAC_A), Client(server, MAC_B)
    ip = a.dora()
    b.release(ip)
    assert [lease.mac for lease in server.leases(1.0)] == [MAC_A]


def test_released_client_returns_to_previous_address(server: DhcpServer) -> None:
    a = Client(server, MAC_A)
    Client(server, MAC_B).dora()  # .3
    ip = a.dora()  # .4
    a.release(ip)
    assert a.dora(now=1.0) == ip  # previous address preferred over the lowest free


def test_static_release_keeps_address_reserved(server: DhcpServer) -> None:
    s = Client(server, STATIC_MAC)
    ip = s.dora()
    s.release(ip)
    assert server.leases(1.0) == []
    # Another client asking for the static address does not get it.
    other = Client(server, MAC_A)
    offer = other.discover(options=[("requested_addr", str(ip))])
    assert offer is not None and yiaddr(offer) != ip
    assert s.dora(now=2.0) == ip


# --------------------------------------------------------------------------- INFORM / DECLINE


def test_inform(server: DhcpServer) -> None:
    c = Client(server, MAC_A)
    reply = c.send(client_msg(MAC_A, "inform", ciaddr="192.168.127.99"), 0.0)
    assert reply is not None and mtype_of(reply) == MSG["ack"]
    pkt = BOOTP(reply.payload)
    assert IPv4Address(pkt.yiaddr) == IPv4Address("0.0.0.0")
    assert IPv4Address(pkt.ciaddr) == IPv4Address("192.168.127.99")
    o = opts(reply)
    for absent in ("lease_time", "renewal_time", "rebinding_time"):
        assert absent not in o
    assert o["subnet_mask"] == "255.255.255.0"
    assert o["router"] == str(GW)
    assert reply.dst_ip == IPv4Address("192.168.127.99")
    assert reply.dst_mac == mac_bytes(MAC_A)
    assert server.stats.informs == 1
    assert server.leases(0.0) == []
    assert server.next_event() is None


def test_decline_quarantines_address(server: DhcpServer) -> None:
    a, b = Client(server, MAC_A), Client(server, MAC_B)
    ip = a.dora()
    drain(server)
    decline = client_msg(
        MAC_A, "decline", options=[("requested_addr", str(ip)), ("server_id", str(GW))]
    )
    assert a.send(decline, 1.0) is None
    assert server.stats.declines == 1
    assert server.leases(1.0) == []
    (ev,) = drain(server)
    assert isinstance(ev, LeaseReleased) and ev.reason == "declined"
    # Neither the decliner nor anyone else gets it while quarantined.
    assert a.dora(now=2.0) != ip
    assert b.dora(now=3.0) != ip
    req = b.request_selecting(ip, now=4.0)
    assert req is not None and mtype_of(req) == MSG["nak"]
    # After decline_hold it is usable again.
    c = Client(server, MAC_C)
    assert c.dora(now=1.0 + server.config.decline_hold + 1) == ip


def test_decline_from_non_holder_is_ignored(server: DhcpServer) -> None:
    a, b = Client(server, MAC_A), Client(server, MAC_B)
    ip = a.dora()
    decline = client_msg(MAC_B, "decline", options=[("requested_addr", str(ip))])
    b.send(decline, 1.0)
    assert server.stats.declines == 1
    assert [lease.ip for lease in server.leases(1.0)] == [ip]


# --------------------------------------------------------------------------- exhaustion / expiry


def tiny_config(**kw: Any) -> DhcpConfig:
    # /29: .1 gateway, .2 static, .3-.5 pool, .6 reserved for the host.
    return DhcpConfig(subnet=IPv4Network("10.9.8.0/29"), **kw)


def test_tiny_subnet_defaults() -> None:
    cfg = tiny_config()
    assert cfg.server_ip == IPv4Address("10.9.8.1")
    assert cfg.static_leases == {STATIC_MAC: IPv4Address("10.9.8.2")}
    assert cfg.pool == (IPv4Address("10.9.8.3"), IPv4Address("10.9.8.5"))
    assert cfg.reserved == {IPv4Address(f"10.9.8.{n}") for n in (1, 2, 6)}
    assert cfg.dns_servers == [IPv4Address("10.9.8.1")]


def test_pool_exhaustion() -> None:
    srv = DhcpServer(tiny_config())
    gw = IPv4Address("10.9.8.1")
    macs = [f"02:00:00:00:01:{i:02x}" for i in range(4)]
    got = []
    for mac in macs[:3]:
        c = Client(srv, mac)
        offer = c.discover()
        assert offer is not None
        ack = c.request_selecting(yiaddr(offer), server=gw)
        assert ack is not None and mtype_of(ack) == MSG["ack"]
        got.append(yiaddr(ack))
    assert got == [IPv4Address(f"10.9.8.{n}") for n in (3, 4, 5)]
    assert srv.free_addresses(0.0) == 0
    assert Client(srv, macs[3]).discover(now=1.0) is None
    assert srv.stats.pool_exhausted == 1
    assert srv.stats.offers == 3
    # The static client is unaffected by exhaustion.
    s = Client(srv, STATIC_MAC)
    offer = s.discover()
    assert offer is not None and yiaddr(offer) == IPv4Address("10.9.8.2")
    # Releasing one frees room.
    Client(srv, macs[0]).release(got[0])
    offer = Client(srv, macs[3]).discover(now=2.0)
    assert offer is not None and yiaddr(offer) == got[0]


def test_outstanding_offers_count_against_pool_and_expire() -> None:
    srv = DhcpServer(tiny_config())
    for i in range(3):
        assert Client(srv, f"02:00:00:00:02:{i:02x}").discover(now=0.0) is not None
    late = Client(srv, MAC_D)
    assert late.discover(now=30.0) is None
    offer = late.discover(now=61.0)  # offers held for ~60 s
    assert offer is not None and yiaddr(offer) == IPv4Address("10.9.8.3")


def test_lease_expiry_with_fake_clock() -> None:
    srv = DhcpServer(DhcpConfig(lease_time=100))
    a, b = Client(srv, MAC_A), Client(srv, MAC_B)
    ip = a.dora(now=1000.0)
    drain(srv)
    assert [lease.ip for lease in srv.leases(1099.0)] == [ip]
    assert srv.leases(1100.0) == []
    (ev,) = drain(srv)
    assert ev == LeaseReleased(mac=MAC_A, ip=ip, hostname=None, reason="expired")
    assert srv.stats.expired == 1
    # Reclaimed: another client gets it.
    assert b.dora(now=1101.0) == ip
    # A renewing its expired lease is refused now that B owns the address.
    nak = a.renew(ip, now=1102.0)
    assert nak is not None and mtype_of(nak) == MSG["nak"]


def test_expired_offer_is_acked_if_still_free(server: DhcpServer) -> None:
    a = Client(server, MAC_A)
    offer = a.discover(now=0.0)
    assert offer is not None
    ack = a.request_selecting(yiaddr(offer), now=500.0)
    assert ack is not None and mtype_of(ack) == MSG["ack"]


# --------------------------------------------------------------------------- options


def test_option_contents() -> None:
    cfg = DhcpConfig(
        dns_servers=[IPv4Address("192.168.127.1"), IPv4Address("8.8.8.8")],
        mtu=1400,
        lease_time=7200,
        domain_search=["example.com", "test.local"],
        domain_name="netferry.internal",
    )
    srv = DhcpServer(cfg)
    offer = Client(srv, MAC_A).discover()
    assert offer is not None
    o = opts(offer)
    assert o["message-type"] == MSG["offer"]
    assert o["server_id"] == "192.168.127.1"
    assert o["lease_time"] == 7200
    assert o["renewal_time"] == 3600
    assert o["rebinding_time"] == 6300
    assert o["subnet_mask"] == "255.255.255.0"
    assert o["router"] == "192.168.127.1"
    assert o["interface-mtu"] == 1400
    assert o["domain"] == b"netferry.internal"
    raw = raw_options(offer)
    assert raw[6] == IPv4Address("192.168.127.1").packed + IPv4Address("8.8.8.8").packed
    assert raw[119] == b"\x07example\x03com\x00\x04test\x05local\x00"
    assert raw[26] == struct.pack("!H", 1400)
    assert raw[53] == b"\x02"
    # 53 and 54 lead the options.
    assert offer.payload[240:246] == bytes([53, 1, 2, 54, 4, 192])
    assert len(offer.payload) >= 300


def test_no_domain_options_by_default(server: DhcpServer) -> None:
    offer = Client(server, MAC_A).discover()
    assert offer is not None
    raw = raw_options(offer)
    assert 119 not in raw and 15 not in raw
    assert raw[6] == GW.packed


def test_parameter_request_list_order_first(server: DhcpServer) -> None:
    offer = Client(server, MAC_A).discover(options=[("param_req_list", [26, 6, 3, 1])])
    assert offer is not None
    codes = [o[0] for o in BOOTP(offer.payload)[DHCP].options if isinstance(o, tuple)]
    config_codes = [c for c in codes if c not in ("message-type", "server_id")]
    assert config_codes[3:7] == ["interface-mtu", "name_server", "router", "subnet_mask"]


def test_domain_search_encoding() -> None:
    assert encode_domain_search(["example.com", "test.local"]) == (
        b"\x07example\x03com\x00\x04test\x05local\x00"
    )
    # RFC 3397 section 2 example, with compression pointers.
    assert encode_domain_search(["eng.apple.com", "marketing.apple.com"]) == (
        b"\x03eng\x05apple\x03com\x00\x09marketing\xc0\x04"
    )
    assert encode_domain_search(["a.example.com", "a.example.com."], compress=False) == (
        b"\x01a\x07example\x03com\x00" * 2
    )
    with pytest.raises(ValueError, match="label length"):
        encode_domain_search(["a..b"])


def test_long_domain_search_split_over_several_options() -> None:
    names = [f"{'x' * 60}{i}.example.com" for i in range(6)]
    srv = DhcpServer(DhcpConfig(domain_search=names))
    offer = Client(srv, MAC_A).discover()
    assert offer is not None
    assert raw_options(offer)[119] == encode_domain_search(names)
    assert offer.payload.count(bytes([119, 255])) >= 1


def test_hostname_recorded_and_kept_on_renew(server: DhcpServer) -> None:
    a = Client(server, MAC_A)
    ip = a.dora(options=[("hostname", b"guest-1")])
    a.renew(ip, now=10.0)
    (lease,) = server.leases(11.0)
    assert lease.hostname == "guest-1"


# --------------------------------------------------------------------------- addressing


def test_broadcast_flag_addressing(server: DhcpServer) -> None:
    c = Client(server, MAC_A)
    offer = c.discover(broadcast=True)
    assert offer is not None
    assert offer.dst_ip == BCAST and offer.dst_mac == BCAST_MAC
    assert BOOTP(offer.payload).flags == 0x8000
    ack = c.request_selecting(yiaddr(offer), broadcast=True)
    assert ack is not None and ack.dst_ip == BCAST and ack.dst_mac == BCAST_MAC


def test_unicast_addressing_to_yiaddr(server: DhcpServer) -> None:
    c = Client(server, MAC_A)
    offer = c.discover()
    assert offer is not None
    assert offer.dst_ip == yiaddr(offer) and offer.dst_mac == mac_bytes(MAC_A)
    assert BOOTP(offer.payload).flags == 0
    ack = c.request_selecting(yiaddr(offer))
    assert ack is not None and ack.dst_ip == yiaddr(offer) and ack.dst_mac == mac_bytes(MAC_A)


def test_nak_always_broadcast(server: DhcpServer) -> None:
    nak = Client(server, MAC_A).init_reboot("192.168.127.254")
    assert nak is not None and mtype_of(nak) == MSG["nak"]
    assert nak.dst_ip == BCAST and nak.dst_mac == BCAST_MAC


# --------------------------------------------------------------------------- robustness


def _valid_discover() -> bytes:
    return client_msg(MAC_A, "discover")


def _with(payload: bytes, offset: int, value: bytes) -> bytes:
    return payload[:offset] + value + payload[offset + len(value) :]


MALFORMED = {
    "empty": b"",
    "garbage": b"\xde\xad\xbe\xef" * 3,
    "truncated_header": _valid_discover()[:100],
    "header_without_cookie": _valid_discover()[:236],
    "bad_cookie": _with(_valid_discover(), 236, b"\x00\x00\x00\x00"),
    "bootreply": _with(_valid_discover(), 0, b"\x02"),
    "token_ring": _with(_valid_discover(), 1, b"\x06"),
    "hlen_16": _with(_valid_discover(), 2, b"\x10"),
    "no_options": _valid_discover()[:240],
    "no_message_type": bytes(BOOTP(op=1, chaddr=mac_bytes(MAC_A)) / DHCP(options=["end"])),
    "truncated_option_length": _valid_discover()[:240] + b"\x35",
    "truncated_option_value": _valid_discover()[:240] + b"\x35\x01\x01\x32\x04\xc0\xa8",
    "message_type_too_long": _valid_discover()[:240] + b"\x35\x02\x01\x01\xff",
    "bad_overload": _valid_discover()[:240] + b"\x35\x01\x01\x34\x01\x07\xff",
    "overload_garbage_file": _with(
        _valid_discover()[:240] + b"\x35\x01\x01\x34\x01\x01\xff", 108, b"\x0c\x50abc"
    ),
    "random_bytes_300": bytes((i * 37 + 11) % 256 for i in range(300)),
    "all_ones": b"\xff" * 400,
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_is_counted_and_ignored(server: DhcpServer, name: str) -> None:
    assert server.handle(MALFORMED[name], mac_bytes(MAC_A), 0.0) is None
    assert server.stats.malformed == 1
    assert server.leases(0.0) == []


def test_all_truncations_never_raise(server: DhcpServer) -> None:
    full = client_msg(
        MAC_A,
        "request",
        options=[("server_id", str(GW)), ("requested_addr", "192.168.127.3"), ("hostname", "h")],
    )
    for n in range(len(full)):
        server.handle(full[:n], mac_bytes(MAC_A), 0.0)
    assert server.stats.malformed > 0


def test_server_side_and_unknown_types_are_ignored(server: DhcpServer) -> None:
    for t in (2, 5, 6, 42):
        payload = _valid_discover()[:240] + bytes([53, 1, t, 255])
        assert server.handle(payload, mac_bytes(MAC_A), 0.0) is None
    assert server.stats.ignored == 4
    assert server.stats.malformed == 0


def test_relayed_messages_are_ignored(server: DhcpServer) -> None:
    payload = _with(_valid_discover(), 24, IPv4Address("10.0.0.1").packed)
    assert server.handle(payload, mac_bytes(MAC_A), 0.0) is None
    assert server.stats.ignored == 1


def test_option_overload_is_parsed(server: DhcpServer) -> None:
    # Message type lives in the 'file' field (overload = 1).
    base = bytearray(_valid_discover()[:240])
    base[108:111] = b"\x35\x01\x01"
    base[111] = 255
    payload = bytes(base) + b"\x34\x01\x01\xff"
    reply = server.handle(payload, mac_bytes(MAC_A), 0.0)
    assert reply is not None and mtype_of(reply) == MSG["offer"]


def test_pad_options_and_missing_end_are_tolerated(server: DhcpServer) -> None:
    payload = _valid_discover()[:240] + b"\x00\x00\x35\x01\x01\x00"  # no end option
    reply = server.handle(payload, mac_bytes(MAC_A), 0.0)
    assert reply is not None and mtype_of(reply) == MSG["offer"]


def test_chaddr_mismatch_still_served_by_chaddr(server: DhcpServer) -> None:
    reply = server.handle(_valid_discover(), mac_bytes(MAC_B), 0.0)
    assert reply is not None and reply.dst_mac == mac_bytes(MAC_A)
    assert server.stats.chaddr_mismatch == 1


def test_stats_as_dict(server: DhcpServer) -> None:
    Client(server, MAC_A).dora()
    d = server.stats.as_dict()
    for key in (
        "discovers",
        "offers",
        "requests",
        "acks",
        "naks",
        "releases",
        "informs",
        "declines",
        "malformed",
        "ignored",
        "pool_exhausted",
    ):
        assert isinstance(d[key], int)
    assert d["acks"] == 1


# --------------------------------------------------------------------------- config / CLI parsing


def test_parse_static_lease_ok() -> None:
    assert parse_static_lease("5A:94:EF:E4:0C:EE=192.168.127.2") == (
        STATIC_MAC,
        IPv4Address("192.168.127.2"),
    )
    assert parse_static_lease(" 5a-94-ef-e4-0c-ee = 192.168.127.9 ") == (
        STATIC_MAC,
        IPv4Address("192.168.127.9"),
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("5a:94:ef:e4:0c:ee", "expected MAC=IP"),
        ("=192.168.127.2", "missing MAC"),
        ("5a:94:ef:e4:0c:ee=", "missing IP"),
        ("5a:94:ef:e4:0c=192.168.127.2", "expected six hex pairs"),
        ("5a:94:ef:e4:0c:zz=192.168.127.2", "'5a:94:ef:e4:0c:zz': not hexadecimal"),
        ("5a:94:ef:e4:0c:eee=192.168.127.2", "expected six hex pairs"),
        ("5a:94:ef:e4:0c:ee=192.168.127.256", "is not an IP address"),
        ("5a:94:ef:e4:0c:ee=host.example", "is not an IP address"),
        ("5a:94:ef:e4:0c:ee=fe80::1", "is not an IPv4 address"),
    ],
)
def test_parse_static_lease_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_static_lease(spec)


def test_normalize_mac() -> None:
    assert normalize_mac("5A-94-EF-E4-0C-EE") == STATIC_MAC
    assert normalize_mac(b"\x5a\x94\xef\xe4\x0c\xee") == STATIC_MAC
    with pytest.raises(ValueError):
        normalize_mac(b"\x00" * 5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"static_leases": {MAC_A: IPv4Address("10.0.0.1")}}, "not a host address"),
        ({"static_leases": {MAC_A: IPv4Address("192.168.127.1")}}, "collides with server_ip"),
        (
            {
                "static_leases": {
                    MAC_A: IPv4Address("192.168.127.9"),
                    MAC_B: IPv4Address("192.168.127.9"),
                }
            },
            "given to both",
        ),
        (
            {
                "static_leases": {
                    MAC_A: IPv4Address("192.168.127.9"),
                    MAC_A.upper(): IPv4Address("192.168.127.10"),
                }
            },
            "duplicate static lease",
        ),
        ({"server_ip": IPv4Address("10.0.0.1")}, "server_ip"),
        ({"pool": (IPv4Address("192.168.127.50"), IPv4Address("192.168.127.10"))}, "after"),
        ({"pool": (IPv4Address("192.168.127.10"), IPv4Address("192.168.128.10"))}, "within"),
        ({"mtu": 10}, "mtu"),
        ({"lease_time": 0}, "lease_time"),
        ({"domain_search": ["x" * 64 + ".com"]}, "label length"),
        ({"subnet": IPv4Network("10.0.0.0/31")}, "too small"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DhcpConfig(**kwargs)


def test_custom_pool_and_reserved() -> None:
    cfg = DhcpConfig(
        pool=(IPv4Address("192.168.127.100"), IPv4Address("192.168.127.102")),
        reserved={IPv4Address("192.168.127.101")},
    )
    assert GW in cfg.reserved and IPv4Address("192.168.127.2") in cfg.reserved
    srv = DhcpServer(cfg)
    got = [Client(srv, f"02:00:00:00:03:{i:02x}").discover() for i in range(3)]
    assert [yiaddr(r) for r in got[:2] if r is not None] == [
        IPv4Address("192.168.127.100"),
        IPv4Address("192.168.127.102"),
    ]
    assert got[2] is None


def test_expiry_from_a_deadline_heap_stays_bounded_under_renewals():
    """Expiry costs what expired, and renewals (stale deadlines) do not pile up."""
    from netferry.hostd.services.dhcp import DhcpConfig, DhcpServer

    server = DhcpServer(DhcpConfig(lease_time=100))
    for i in range(50):
        assert server.restore_lease(
            f"02:00:00:00:00:{i:02x}", IPv4Address(f"192.168.127.{i + 3}"), 100.0 + i, None, 0.0
        )
    for _ in range(500):
        server.expire(1.0)
    assert len(server._deadlines) <= 2 * 50 + 64
    server.expire(120.0)  # deadlines 100..120 passed
    assert len(server.leases(120.0)) == 29 and server.stats.expired == 21
    server.expire(1000.0)
    assert server.leases(1000.0) == [] and server.stats.expired == 50
