"""Neighbour Discovery (RFC 4861) for the gateway: NS/NA, RS/RA, a neighbour cache, RA timing.

NDP is ICMPv6 types 133-136; `parse_ndp` takes the ICMPv6 message with its IPv6 source,
destination and hop limit and applies RFC 4861's validity checks (hop limit 255, so the
message cannot have come from off-link; code 0; minimum lengths; every option's length
non-zero and inside the message; the unspecified-source rules of 7.1.1 and 6.1.1; a router
advertisement's source link-local). Anything invalid raises `NdpError` (a drop counter name).

The gateway answers solicitations only for its own addresses (`answer_solicitation`): its
global and link-local addresses and the virtual ones (host loopback, DNS). A duplicate address
detection probe (source ::) for one of them is defended with an advertisement to all nodes, so a
guest cannot take the gateway's address; a probe for any other address is left unanswered, so
a guest's SLAAC or DHCPv6 address passes DAD (RFC 4862 5.4) and guests answer for themselves.

`NeighborCache` maps guests' IPv6 addresses to MACs, learned from NS/NA/RS options and from
traffic; it is bounded and evicts the least recently used entry, within a per-port share and
never an entry of another live port (so flooding it cannot make a guest's address look free
to another). It refuses to learn the switch's own addresses, so a guest advertising the
gateway's address changes nothing.

`RaScheduler` decides, sans-IO, when the gateway multicasts a router advertisement: every
`min_interval`..`max_interval` seconds (uniformly jittered, RFC 4861 6.2.4), the first
`MAX_INITIAL_ADVERTISEMENTS` at most `MAX_INITIAL_INTERVAL` apart, and soon after a router
solicitation (within `MAX_RA_DELAY`, never closer than `MIN_DELAY_BETWEEN_RAS` to the last).
The caller asks `next_deadline()` and calls `handle_timer(now)`, which says whether to send.

`NdpResponder` puts these together as the gateway's policy, so that the receive path makes
one call per NDP message (`handle`) and one per timer (`handle_timer`): it validates, learns
neighbours (only when the link-layer option matches the Ethernet source, as ARP does), drops
and counts advertisements claiming the switch's addresses and every router advertisement from
a guest, answers solicitations for its own addresses and schedules advertisements.
`router_advertisement_for` builds the advertisement from the NetworkConfig's IPv6 plan.
"""

from __future__ import annotations

import random
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from netferry.hostd.config import RA_INTERVAL_MAX, RA_INTERVAL_MIN
from netferry.hostd.services.dhcp import encode_domain_search
from netferry.hostd.stack.icmpv6 import (
    NEIGHBOR_ADVERTISEMENT,
    NEIGHBOR_SOLICITATION,
    ROUTER_ADVERTISEMENT,
    ROUTER_SOLICITATION,
    Icmpv6Error,
    build_icmpv6,
    parse_icmpv6,
)
from netferry.hostd.stack.ipv6 import (
    ALL_NODES,
    UNSPECIFIED,
    is_link_local,
    is_multicast,
    link_local_from_mac,
    multicast_mac,
    solicited_node,
)

HOP_LIMIT = 255  # NDP is link-local only: anything less was forwarded
EVICT_SCAN = 64  # a full neighbour cache looks this deep for an entry it may evict

OPT_SOURCE_LLA = 1
OPT_TARGET_LLA = 2
OPT_PREFIX_INFO = 3
OPT_REDIRECTED_HEADER = 4
OPT_MTU = 5
OPT_RDNSS = 25
OPT_DNSSL = 31

NA_ROUTER = 0x80000000
NA_SOLICITED = 0x40000000
NA_OVERRIDE = 0x20000000
RA_MANAGED = 0x80
RA_OTHER = 0x40
PREFIX_ON_LINK = 0x80
PREFIX_AUTONOMOUS = 0x40

INFINITE = 0xFFFFFFFF

_RA_FIXED = struct.Struct("!BBHII")  # hop limit, flags, lifetime, reachable, retrans
_PREFIX = struct.Struct("!BBBBIII16s")  # type, len, prefix len, flags, valid, preferred, res
_MTU = struct.Struct("!BBHI")
_DNS_HEAD = struct.Struct("!BBHI")  # RDNSS and DNSSL: type, len, reserved, lifetime

# RFC 4861 10: router constants
MAX_INITIAL_INTERVAL = 16.0
MAX_INITIAL_ADVERTISEMENTS = 3
MIN_DELAY_BETWEEN_RAS = 3.0
MAX_RA_DELAY = 0.5


class NdpError(ValueError):
    """An invalid NDP message; `args[0]` is the counter name for the reason."""


@dataclass(slots=True)
class NeighborSolicitation:
    target: bytes
    source_lla: bytes | None = None


@dataclass(slots=True)
class NeighborAdvertisement:
    target: bytes
    target_lla: bytes | None = None
    router: bool = False
    solicited: bool = False
    override: bool = False


@dataclass(slots=True)
class RouterSolicitation:
    source_lla: bytes | None = None


@dataclass(slots=True)
class PrefixInfo:
    prefix: bytes  # 16 bytes, bits beyond `length` zero
    length: int = 64
    on_link: bool = True
    autonomous: bool = True
    valid_lifetime: int = 86400
    preferred_lifetime: int = 14400


@dataclass(slots=True)
class RouterAdvertisement:
    """Both what `parse_ndp` returns and what `build_ra` sends."""

    cur_hop_limit: int = 64
    managed: bool = False  # M: addresses from DHCPv6
    other: bool = False  # O: other configuration from DHCPv6
    router_lifetime: int = 1800  # seconds as default router; 0: not a default router
    reachable_time: int = 0  # ms, 0: unspecified
    retrans_timer: int = 0  # ms, 0: unspecified
    source_lla: bytes | None = None
    mtu: int | None = None
    prefixes: list[PrefixInfo] = field(default_factory=list)
    rdnss: list[bytes] = field(default_factory=list)  # recursive DNS servers (RFC 8106)
    rdnss_lifetime: int = 1800
    dnssl: list[str] = field(default_factory=list)  # DNS search list (RFC 8106)
    dnssl_lifetime: int = 1800


NdpMessage = NeighborSolicitation | NeighborAdvertisement | RouterSolicitation | RouterAdvertisement


def parse_options(data: bytes | memoryview) -> list[tuple[int, bytes]]:
    """(type, whole option including its type and length bytes) for each option."""
    out = []
    i, n = 0, len(data)
    while i < n:
        if i + 2 > n:
            raise NdpError("ndp_truncated_option")
        length = data[i + 1] * 8
        if length == 0:
            raise NdpError("ndp_zero_option_length")
        if i + length > n:
            raise NdpError("ndp_truncated_option")
        out.append((data[i], bytes(data[i : i + length])))
        i += length
    return out


def _lla(opt: bytes) -> bytes:
    if len(opt) != 8:  # Ethernet: one 8-byte unit (RFC 2464 8)
        raise NdpError("ndp_bad_lla_option")
    return opt[2:8]


def parse_ndp(src: bytes, dst: bytes, hop_limit: int, data: bytes | memoryview) -> NdpMessage:
    """A validated NS, NA, RS or RA; `data` is the ICMPv6 message (checksum verified here)."""
    try:
        msg = parse_icmpv6(src, dst, data)
    except Icmpv6Error as e:
        raise NdpError(e.args[0]) from None
    if msg.type not in (
        NEIGHBOR_SOLICITATION,
        NEIGHBOR_ADVERTISEMENT,
        ROUTER_SOLICITATION,
        ROUTER_ADVERTISEMENT,
    ):
        raise NdpError("ndp_not_ndp")
    if hop_limit != HOP_LIMIT:
        raise NdpError("ndp_bad_hop_limit")
    if msg.code != 0:
        raise NdpError("ndp_bad_code")
    body = bytes(msg.body)
    if msg.type == ROUTER_SOLICITATION:
        opts = parse_options(body)
        slla = [o for t, o in opts if t == OPT_SOURCE_LLA]
        if slla and src == UNSPECIFIED:
            raise NdpError("ndp_slla_from_unspecified")
        return RouterSolicitation(_lla(slla[0]) if slla else None)
    if msg.type == ROUTER_ADVERTISEMENT:
        if not is_link_local(src):
            raise NdpError("ndp_ra_not_link_local")
        return _parse_ra(msg.word, body)
    if len(body) < 16:
        raise NdpError("ndp_truncated")
    target = body[:16]
    if is_multicast(target):
        raise NdpError("ndp_multicast_target")
    opts = parse_options(body[16:])
    if msg.type == NEIGHBOR_SOLICITATION:
        slla = [o for t, o in opts if t == OPT_SOURCE_LLA]
        if src == UNSPECIFIED:
            if not dst.startswith(bytes.fromhex("ff0200000000000000000001ff")):
                raise NdpError("ndp_dad_not_to_solicited_node")
            if slla:
                raise NdpError("ndp_slla_from_unspecified")
        return NeighborSolicitation(target, _lla(slla[0]) if slla else None)
    flags = msg.word
    if is_multicast(dst) and flags & NA_SOLICITED:
        raise NdpError("ndp_solicited_na_to_multicast")
    tlla = [o for t, o in opts if t == OPT_TARGET_LLA]
    return NeighborAdvertisement(
        target,
        _lla(tlla[0]) if tlla else None,
        bool(flags & NA_ROUTER),
        bool(flags & NA_SOLICITED),
        bool(flags & NA_OVERRIDE),
    )


def _parse_ra(word: int, body: bytes) -> RouterAdvertisement:
    if len(body) < 8:
        raise NdpError("ndp_truncated")
    hop, flags, lifetime = word >> 24, (word >> 16) & 0xFF, word & 0xFFFF
    reachable, retrans = struct.unpack_from("!II", body)
    ra = RouterAdvertisement(
        hop, bool(flags & RA_MANAGED), bool(flags & RA_OTHER), lifetime, reachable, retrans
    )
    for t, opt in parse_options(body[8:]):
        if t == OPT_SOURCE_LLA:
            ra.source_lla = _lla(opt)
        elif t == OPT_MTU:
            if len(opt) != 8:
                raise NdpError("ndp_bad_mtu_option")
            ra.mtu = _MTU.unpack(opt)[3]
        elif t == OPT_PREFIX_INFO:
            if len(opt) != 32:
                raise NdpError("ndp_bad_prefix_option")
            _t, _l, plen, pflags, valid, preferred, _res, prefix = _PREFIX.unpack(opt)
            if plen > 128:
                raise NdpError("ndp_bad_prefix_option")
            ra.prefixes.append(
                PrefixInfo(
                    prefix,
                    plen,
                    bool(pflags & PREFIX_ON_LINK),
                    bool(pflags & PREFIX_AUTONOMOUS),
                    valid,
                    preferred,
                )
            )
        elif t == OPT_RDNSS:
            if len(opt) < 24 or (len(opt) - 8) % 16:
                raise NdpError("ndp_bad_rdnss_option")  # RFC 8106 5.1: length 3 or more, odd
            ra.rdnss_lifetime = _DNS_HEAD.unpack_from(opt)[3]
            ra.rdnss += [opt[i : i + 16] for i in range(8, len(opt), 16)]
        elif t == OPT_DNSSL:
            if len(opt) < 16:
                raise NdpError("ndp_bad_dnssl_option")
            ra.dnssl_lifetime = _DNS_HEAD.unpack_from(opt)[3]
            ra.dnssl += _decode_names(opt[8:])
    return ra


def _decode_names(data: bytes) -> list[str]:
    """Uncompressed DNS names, then zero padding (RFC 8106 5.2)."""
    names, labels, i = [], [], 0
    while i < len(data):
        n = data[i]
        if n == 0:
            if labels:
                names.append(".".join(labels))
                labels = []
            i += 1
            continue
        if n > 63 or i + 1 + n > len(data):
            raise NdpError("ndp_bad_dnssl_option")
        labels.append(data[i + 1 : i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    if labels:
        raise NdpError("ndp_bad_dnssl_option")
    return names


def lla_option(kind: int, mac: bytes) -> bytes:
    return bytes([kind, 1]) + mac


def build_ns(src: bytes, dst: bytes, target: bytes, source_lla: bytes | None = None) -> bytes:
    opts = lla_option(OPT_SOURCE_LLA, source_lla) if source_lla and src != UNSPECIFIED else b""
    return build_icmpv6(src, dst, NEIGHBOR_SOLICITATION, 0, 0, target + opts)


def build_na(
    src: bytes,
    dst: bytes,
    target: bytes,
    target_lla: bytes | None,
    router: bool = True,
    solicited: bool = True,
    override: bool = True,
) -> bytes:
    flags = (NA_ROUTER if router else 0) | (NA_SOLICITED if solicited else 0)
    flags |= NA_OVERRIDE if override else 0
    opts = lla_option(OPT_TARGET_LLA, target_lla) if target_lla else b""
    return build_icmpv6(src, dst, NEIGHBOR_ADVERTISEMENT, 0, flags, target + opts)


def build_rs(src: bytes, dst: bytes, source_lla: bytes | None = None) -> bytes:
    opts = lla_option(OPT_SOURCE_LLA, source_lla) if source_lla and src != UNSPECIFIED else b""
    return build_icmpv6(src, dst, ROUTER_SOLICITATION, 0, 0, opts)


def build_ra(src: bytes, dst: bytes, ra: RouterAdvertisement) -> bytes:
    flags = (RA_MANAGED if ra.managed else 0) | (RA_OTHER if ra.other else 0)
    word = ra.cur_hop_limit << 24 | flags << 16 | ra.router_lifetime
    body = bytearray(struct.pack("!II", ra.reachable_time, ra.retrans_timer))
    if ra.source_lla:
        body += lla_option(OPT_SOURCE_LLA, ra.source_lla)
    if ra.mtu:
        body += _MTU.pack(OPT_MTU, 1, 0, ra.mtu)
    for p in ra.prefixes:
        pflags = (PREFIX_ON_LINK if p.on_link else 0) | (PREFIX_AUTONOMOUS if p.autonomous else 0)
        body += _PREFIX.pack(
            OPT_PREFIX_INFO, 4, p.length, pflags, p.valid_lifetime, p.preferred_lifetime, 0,
            p.prefix,
        )  # fmt: skip
    if ra.rdnss:
        body += _DNS_HEAD.pack(OPT_RDNSS, 1 + 2 * len(ra.rdnss), 0, ra.rdnss_lifetime)
        body += b"".join(ra.rdnss)
    if ra.dnssl:
        names = encode_domain_search(ra.dnssl, compress=False)  # RFC 8106: no compression
        names += bytes(-len(names) % 8)
        body += _DNS_HEAD.pack(OPT_DNSSL, 1 + len(names) // 8, 0, ra.dnssl_lifetime) + names
    return build_icmpv6(src, dst, ROUTER_ADVERTISEMENT, 0, word, bytes(body))


@dataclass(slots=True, frozen=True)
class NdpReply:
    """An NDP message to send: the ICMPv6 bytes and their IPv6/Ethernet destination."""

    src: bytes
    dst: bytes
    dst_mac: bytes | None  # None: the caller uses the requester's Ethernet source
    message: bytes
    hop_limit: int = HOP_LIMIT  # NDP always leaves with 255 (receivers check it)


def answer_solicitation(
    ns_src: bytes, ns: NeighborSolicitation, own_addresses: frozenset[bytes] | set[bytes],
    router_mac: bytes,
) -> NdpReply | None:  # fmt: skip
    """The advertisement for a solicitation of one of `own_addresses`, else None (RFC 4861
    7.2.4; for a DAD probe from :: RFC 4862 5.4.3: to all nodes, not solicited)."""
    if ns.target not in own_addresses:
        return None
    if ns_src == UNSPECIFIED:
        msg = build_na(ns.target, ALL_NODES, ns.target, router_mac, solicited=False)
        return NdpReply(ns.target, ALL_NODES, multicast_mac(ALL_NODES), msg)
    msg = build_na(ns.target, ns_src, ns.target, router_mac)
    return NdpReply(ns.target, ns_src, ns.source_lla, msg)


class NeighborCache:
    """IPv6 → MAC for guests, least recently used evicted first; never the switch's own.

    With `port_of` set (the switch's CAM lookup: MAC → live port or None), one port cannot
    push another's entries out: a port holds at most `per_port` entries (beyond, its own
    least recently used goes), and a full cache evicts only entries of the learning port or
    of no live port; when none of those is near the LRU end, the new entry is refused
    (counted as `refused_full`), as port security refuses a claim beyond its limit."""

    __slots__ = (
        "_by_port",
        "_macs",
        "_port",
        "max_entries",
        "per_port",
        "port_of",
        "protected",
        "stats",
    )  # fmt: skip

    def __init__(self, max_entries: int = 4096, protected: frozenset[bytes] = frozenset()) -> None:
        self._macs: OrderedDict[bytes, bytes] = OrderedDict()
        self._port: dict[bytes, int] = {}  # ip → the port that taught it (with `port_of`)
        self._by_port: dict[int, OrderedDict[bytes, None]] = {}  # per port, LRU first
        self.max_entries = max_entries
        # A constant share: it follows the cache size, and 16 guests fill the cache; a port
        # needs few (link-local, SLAAC stable and temporary, a DHCPv6 lease, per MAC).
        self.per_port = max(16, max_entries // 16)
        self.port_of = None  # callable: MAC → live port or None; None: one global LRU
        self.protected = protected
        self.stats = {
            "learned": 0, "changed": 0, "evicted": 0, "refused": 0, "port_evicted": 0,
            "refused_full": 0,
        }  # fmt: skip

    def learn(self, ip: bytes, mac: bytes) -> bool:
        """Record `ip` at `mac`; False when refused (unspecified, multicast, ours, or no room
        without taking another live port's entry)."""
        if ip == UNSPECIFIED or is_multicast(ip) or mac[0] & 1:
            return False
        if ip in self.protected:
            self.stats["refused"] += 1
            return False
        port = self.port_of(mac) if self.port_of is not None else None
        old = self._macs.get(ip)
        if old is not None:
            self._macs.move_to_end(ip)
            if old != mac:
                self._macs[ip] = mac
                self.stats["changed"] += 1
                self._unindex(ip)
                self._index(ip, port)
            elif ip in self._port:
                self._by_port[self._port[ip]].move_to_end(ip)
            elif port is not None:
                self._index(ip, port)  # learnt before its MAC was on a port
            return True
        if port is not None:
            own = self._by_port.get(port)
            if own is not None and len(own) >= self.per_port:
                self._remove(next(iter(own)))  # the port's own least recently used
                self.stats["port_evicted"] += 1
        if len(self._macs) >= self.max_entries and not self._evict_for(port):
            self.stats["refused_full"] += 1
            return False
        self._macs[ip] = mac
        self._index(ip, port)
        self.stats["learned"] += 1
        return True

    def _evict_for(self, port: int | None) -> bool:
        """Make room for `port`'s entry: the least recently used entry that belongs to no
        live port or to `port` itself, looking at most `EVICT_SCAN` entries deep."""
        port_of = self.port_of
        for n, (ip, mac) in enumerate(self._macs.items()):
            if n >= EVICT_SCAN:
                return False
            owner = port_of(mac) if port_of is not None else None
            if owner is None or owner == port:
                self._remove(ip)
                self.stats["evicted"] += 1
                return True
        return False

    def _index(self, ip: bytes, port: int | None) -> None:
        if port is not None:
            self._port[ip] = port
            self._by_port.setdefault(port, OrderedDict())[ip] = None

    def _unindex(self, ip: bytes) -> None:
        port = self._port.pop(ip, None)
        if port is not None:
            own = self._by_port[port]
            del own[ip]
            if not own:
                del self._by_port[port]

    def _remove(self, ip: bytes) -> None:
        del self._macs[ip]
        self._unindex(ip)

    def lookup(self, ip: bytes) -> bytes | None:
        mac = self._macs.get(ip)
        if mac is not None:
            self._macs.move_to_end(ip)
            port = self._port.get(ip)
            if port is not None:
                self._by_port[port].move_to_end(ip)
        return mac

    def peek(self, ip: bytes) -> bytes | None:
        """`lookup` without counting as a use (the source rules ask before they learn)."""
        return self._macs.get(ip)

    def addresses_of(self, mac: bytes) -> list[bytes]:
        """A guest's IPv6 addresses by MAC (forwards resolve the guest this way)."""
        return [ip for ip, m in self._macs.items() if m == mac]

    def forget_macs(self, macs: list[bytes]) -> None:
        gone = set(macs)
        for ip in [ip for ip, m in self._macs.items() if m in gone]:
            self._remove(ip)

    def items(self) -> list[tuple[bytes, bytes]]:
        return list(self._macs.items())

    def __len__(self) -> int:
        return len(self._macs)


class RaScheduler:
    """When to multicast a router advertisement (RFC 4861 6.2.4 and 6.2.6), sans-IO."""

    def __init__(
        self,
        now: float,
        max_interval: float = 600.0,
        min_interval: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not RA_INTERVAL_MIN <= max_interval <= RA_INTERVAL_MAX:
            raise ValueError(f"RA interval {max_interval} s out of range 4..1800")
        self.max_interval = max_interval
        # RFC 4861's default minimum, a third of the maximum, but never under its 3 s floor
        # (so a short --ra-interval, 4..9 s, is valid too).
        if min_interval is None:
            min_interval = max(max_interval * 0.33, MIN_DELAY_BETWEEN_RAS)
        self.min_interval = min_interval
        if not 3.0 <= self.min_interval <= 0.75 * max_interval:
            raise ValueError(f"minimum RA interval {self.min_interval} s out of range")
        self._rng = rng or random.Random()
        self._next = now  # the first advertisement goes out at once
        self._last: float | None = None
        self.sent = 0
        self.solicited = 0

    def next_deadline(self) -> float:
        return self._next

    def handle_timer(self, now: float) -> bool:
        """True when an advertisement is due now (the caller sends one to all nodes)."""
        if now < self._next:
            return False
        self._last = now
        self.sent += 1
        interval = self._rng.uniform(self.min_interval, self.max_interval)
        if self.sent <= MAX_INITIAL_ADVERTISEMENTS:
            interval = min(interval, MAX_INITIAL_INTERVAL)
        self._next = now + interval
        return True

    def on_solicitation(self, now: float) -> None:
        """A router solicitation arrived: answer soon, but not closer than 3 s to the last."""
        self.solicited += 1
        at = now + self._rng.uniform(0.0, MAX_RA_DELAY)
        if self._last is not None:
            at = max(at, self._last + MIN_DELAY_BETWEEN_RAS)
        self._next = min(self._next, at)


def router_advertisement_for(config, managed: bool = True) -> RouterAdvertisement:
    """The gateway's advertisement for a `hostd.config.NetworkConfig`: its /64 on-link and
    autonomous (SLAAC), the link MTU, the DNS server and search list (RFC 8106), and M/O set
    when the DHCPv6 server hands out addresses (M) and configuration (O)."""
    return RouterAdvertisement(
        managed=managed,
        other=True,
        source_lla=config.gateway_mac,
        mtu=config.mtu,
        prefixes=[PrefixInfo(config.subnet6.network_address.packed, config.subnet6.prefixlen)],
        rdnss=[config.dns6.packed],
        dnssl=list(config.dns_search),
    )


class NdpResponder:
    """The gateway's side of neighbour discovery, sans-IO: `handle` per received NDP message,
    `handle_timer` when `next_deadline` has come; both return the messages to send."""

    def __init__(
        self,
        router_mac: bytes,
        own_addresses: frozenset[bytes],
        advertisement: RouterAdvertisement,
        now: float,
        max_neighbours: int = 4096,
        ra_interval: float = 600.0,
        rng: random.Random | None = None,
    ) -> None:
        self.router_mac = router_mac
        self.link_local = link_local_from_mac(router_mac)
        self.own_addresses = frozenset(own_addresses) | {self.link_local}
        self.advertisement = advertisement
        self.cache = NeighborCache(max_neighbours, protected=self.own_addresses)
        self.scheduler = RaScheduler(now, max_interval=ra_interval, rng=rng)
        self.stats: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.stats[name] = self.stats.get(name, 0) + 1

    def handle(
        self, src_mac: bytes, src: bytes, dst: bytes, hop_limit: int, icmp: bytes | memoryview,
        now: float,
    ) -> list[NdpReply]:  # fmt: skip
        """One NDP message (the ICMPv6 bytes) from a guest; never raises."""
        try:
            msg = parse_ndp(src, dst, hop_limit, icmp)
        except NdpError as e:
            self._count(e.args[0])
            return []
        if isinstance(msg, RouterAdvertisement):
            self._count("ndp_ra_from_guest_dropped")  # the gateway is the only router here
            return []
        if src in self.own_addresses:
            self._count("ndp_spoof_dropped")  # a guest using the switch's own address
            return []
        if isinstance(msg, NeighborAdvertisement):
            if msg.target in self.own_addresses:
                self._count("ndp_spoof_dropped")  # a guest claiming the gateway
                return []
            self._count("ndp_na_in")
            self._learn(msg.target, msg.target_lla or src_mac, src_mac)
            return []
        lla = msg.source_lla
        if src != UNSPECIFIED and lla is not None:
            self._learn(src, lla, src_mac)
        if isinstance(msg, RouterSolicitation):
            self._count("ndp_rs_in")
            self.scheduler.on_solicitation(now)
            return []
        self._count("ndp_ns_in")
        reply = answer_solicitation(src, msg, self.own_addresses, self.router_mac)
        if reply is None:
            return []
        self._count("ndp_na_out")
        if reply.dst_mac is None:
            reply = NdpReply(reply.src, reply.dst, src_mac, reply.message)
        return [reply]

    def _learn(self, ip: bytes, lla: bytes, src_mac: bytes) -> None:
        if lla != src_mac:
            self._count("ndp_lla_mismatch_dropped")  # as ARP: the option must be the sender
            return
        self.cache.learn(ip, lla)

    def next_deadline(self) -> float:
        return self.scheduler.next_deadline()

    def handle_timer(self, now: float) -> list[NdpReply]:
        if not self.scheduler.handle_timer(now):
            return []
        self._count("ndp_ra_out")
        msg = build_ra(self.link_local, ALL_NODES, self.advertisement)
        return [NdpReply(self.link_local, ALL_NODES, multicast_mac(ALL_NODES), msg)]

    def solicit(self, target: bytes) -> NdpReply:
        """A solicitation for a guest address whose MAC the cache does not know."""
        group = solicited_node(target)
        msg = build_ns(self.link_local, group, target, self.router_mac)
        self._count("ndp_ns_out")
        return NdpReply(self.link_local, group, multicast_mac(group), msg)
