"""Sans-IO DHCPv4 server (RFC 2131 / RFC 2132) for netferry's virtual L2 segment.

Theory of operation
===================

The server owns no socket and no clock.  The network stack hands :meth:`DhcpServer.handle`
the UDP payload of every datagram addressed to port 67, the Ethernet source MAC and the
current time (any monotonic float clock, in seconds); it gets back either ``None`` (nothing
to send) or a :class:`DhcpReply` carrying the BOOTP reply plus the IPv4/Ethernet destination
chosen per RFC 2131 section 4.1.  The stack wraps the reply in UDP (67 -> 68), IPv4 (source
= ``config.server_ip``) and Ethernet itself.  Because nothing here does I/O, the whole
server is deterministic and is tested with a fake clock.

Address plan (defaults for ``192.168.127.0/24``)::

    .1        server_ip: gateway, DHCP server identifier (54), router (3), DNS (6)
    .2        static lease for 5a:94:ef:e4:0c:ee (the gvproxy-compatible default)
    .3-.253   dynamic pool, ``pool=(first, last)`` inclusive
    .254      reserved for the host side (never handed out)

In general the default pool is ``network+3 .. broadcast-2`` and the default reserved set is
``{server_ip, broadcast-1}``.  The server IP and every static address are always added to
the reserved set, and reserved addresses are never handed out dynamically, even when they
fall inside an explicitly configured pool.

State, keyed by the client's hardware address (``chaddr``, normalised to lower-case
``aa:bb:cc:dd:ee:ff``):

* *offers*: ``mac -> (ip, expiry)``; an OFFER holds an address for ``offer_timeout``
  (60 s) so that two clients in INIT do not get the same one.
* *bindings*: ``mac -> lease``; created/extended by ACK, removed by RELEASE, DECLINE or
  expiry (``lease_time`` after the last ACK).  One binding per MAC.
* *history*: ``mac -> last ip`` (bounded), so a returning client gets its old address
  back if it is still free, even after its lease expired or was released.
* *declined*: ``ip -> until``; addresses a client reported as in use (DECLINE) are
  quarantined for ``decline_hold`` seconds.

Expired offers, bindings and quarantines are reclaimed lazily at the start of every
:meth:`DhcpServer.handle`, :meth:`DhcpServer.leases` and :meth:`DhcpServer.expire` call,
from a heap of deadlines: the cost is what expired, not what is held.

Address choice for DISCOVER: the static address for the MAC; else the MAC's current
binding or outstanding offer; else its previous address; else the requested address
(option 50) if free and in the pool; else the lowest free pool address.  With no free
address there is no reply and ``stats.pool_exhausted`` is incremented.

Per-port limit: the stack passes the switch port a datagram came in on; with
``max_leases_per_port`` set, a port whose MACs already hold that many offers and leases gets
no OFFER or ACK for a further MAC (``stats.port_limit_dropped``; static leases are exempt),
so one guest faking many clients cannot take the whole pool from the others.

An address is *acceptable* for a MAC in a REQUEST when: the MAC has a static lease and the
address is that static address; or the MAC holds an active binding and the address is that
binding; or the MAC has no binding and the address is in the pool, not reserved, not
quarantined and neither bound nor offered to another MAC.  The same predicate serves all
three REQUEST flavours:

* SELECTING (option 54 present): if 54 is another server, the client chose someone else;
  our offer is withdrawn and nothing is sent.  Otherwise ACK if option 50 is acceptable,
  else NAK.
* INIT-REBOOT (no 54, option 50 present, ciaddr 0): NAK outside our subnet; ACK if
  acceptable, else NAK.  Because this server is authoritative for its segment, a client
  it has no record of (e.g. after a netferry restart) keeps its address if it is free.
* RENEWING/REBINDING (ciaddr set): ACK (extending the lease) if ciaddr is acceptable,
  else NAK.  The same restart-recovery reasoning applies.

RELEASE drops the binding (a static address stays reserved for its MAC).  DECLINE drops the
binding and quarantines a dynamic address; it is honoured only from the MAC holding or
being offered the address, so a client cannot poison arbitrary addresses.  INFORM gets an
ACK with configuration options but without yiaddr or lease times.

Every new binding or renewal queues a :class:`LeaseGranted` event; release, decline and
expiry queue a :class:`LeaseReleased`.  The stack drains them with
:meth:`DhcpServer.next_event` (a bounded queue: the oldest events are dropped if nobody
reads them).

Robustness: anything that is not a well-formed BOOTREQUEST from an Ethernet client (short,
wrong op/htype/hlen, bad magic cookie, truncated options, missing or malformed option 53)
yields ``None`` and increments ``stats.malformed``; :meth:`DhcpServer.handle` never raises.
Well-formed messages we deliberately do not answer (server-side message types, relayed
messages with giaddr set, REQUESTs for another server) count as ``stats.ignored``.  Option
overload (option 52) is honoured when parsing; repeated options are concatenated
(RFC 3396) and long options are split on output the same way.
"""

from __future__ import annotations

import heapq
import ipaddress
import struct
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network

from netferry.hostd.config import DEFAULT_GUEST_MAC, DEFAULT_SUBNET
from netferry.hostd.corelog import core_logger
from netferry.hostd.stack.ethernet import mac_to_str, parse_mac

__all__ = [
    "DEFAULT_STATIC_MAC",
    "DhcpConfig",
    "DhcpReply",
    "DhcpServer",
    "DhcpStats",
    "Lease",
    "LeaseGranted",
    "LeaseReleased",
    "encode_domain_search",
    "normalize_mac",
    "parse_static_lease",
]

log = core_logger("hostd.services.dhcp")

DEFAULT_STATIC_MAC = DEFAULT_GUEST_MAC  # .2's MAC, as gvproxy's

MAGIC_COOKIE = b"\x63\x82\x53\x63"
BOOTP_FIXED_LEN = 236  # op .. file, without the magic cookie
MIN_REPLY_LEN = 300  # pad replies to the classic BOOTP minimum; some clients insist
BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHERNET = 1
BROADCAST_FLAG = 0x8000
BROADCAST_IP = IPv4Address("255.255.255.255")
ZERO_IP = IPv4Address("0.0.0.0")
BROADCAST_MAC = b"\xff" * 6

# Message types (option 53).
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)

# Option codes.
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_DOMAIN_NAME = 15
OPT_MTU = 26
OPT_BROADCAST = 28
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAM_REQUEST = 55
OPT_MESSAGE = 56
OPT_RENEWAL_T1 = 58
OPT_REBINDING_T2 = 59
OPT_DOMAIN_SEARCH = 119
OPT_END = 255


# --------------------------------------------------------------------------- helpers


def normalize_mac(mac: str | bytes) -> str:
    """Return ``mac`` (6 raw bytes, or text that `ethernet.parse_mac` takes) as lower-case
    ``aa:bb:cc:dd:ee:ff``; :class:`ValueError` naming the input otherwise."""
    if isinstance(mac, bytes | bytearray):
        if len(mac) != 6:
            raise ValueError(f"MAC address must be 6 bytes, got {len(mac)}")
        return mac_to_str(mac)
    return mac_to_str(parse_mac(mac.strip()))


def parse_static_lease(spec: str) -> tuple[str, IPv4Address]:
    """Parse a ``--static-lease MAC=IP`` value into ``(normalised_mac, ip)``.

    Raises :class:`ValueError` naming exactly what is wrong.  Subnet membership is
    checked later, by :class:`DhcpConfig`.
    """
    if "=" not in spec:
        raise ValueError(f"invalid static lease {spec!r}: expected MAC=IP")
    mac_text, _, ip_text = spec.partition("=")
    mac_text, ip_text = mac_text.strip(), ip_text.strip()
    if not mac_text:
        raise ValueError(f"invalid static lease {spec!r}: missing MAC before '='")
    if not ip_text:
        raise ValueError(f"invalid static lease {spec!r}: missing IP after '='")
    try:
        mac = normalize_mac(mac_text)
    except ValueError as exc:
        raise ValueError(f"invalid static lease {spec!r}: {exc}") from None
    try:
        ip = ipaddress.ip_address(ip_text)
    except ValueError:
        raise ValueError(
            f"invalid static lease {spec!r}: {ip_text!r} is not an IP address"
        ) from None
    if not isinstance(ip, IPv4Address):
        raise ValueError(f"invalid static lease {spec!r}: {ip_text!r} is not an IPv4 address")
    return mac, ip


def _validate_domain(name: str) -> list[bytes]:
    """Split a domain name into wire labels, validating RFC 1035 limits."""
    stripped = name.strip().rstrip(".")
    if not stripped:
        raise ValueError(f"invalid domain name {name!r}: empty")
    labels: list[bytes] = []
    for label in stripped.split("."):
        try:
            labels.append(label.encode("ascii") if label.isascii() else label.encode("idna"))
        except UnicodeError as exc:
            raise ValueError(f"invalid domain name {name!r}: label {label!r}: {exc}") from None
    for label in labels:
        if not 1 <= len(label) <= 63:
            raise ValueError(f"invalid domain name {name!r}: label length must be 1..63")
    if sum(len(label) + 1 for label in labels) + 1 > 255:
        raise ValueError(f"invalid domain name {name!r}: longer than 255 octets")
    return labels


def encode_domain_search(names: Iterable[str], compress: bool = True) -> bytes:
    """Encode a domain search list as RFC 3397 option-119 data (RFC 1035 names).

    With ``compress`` a suffix already written is replaced by a pointer; offsets are
    relative to the start of the (possibly later split) option data, as RFC 3397 requires.
    """
    out = bytearray()
    seen: dict[tuple[bytes, ...], int] = {}
    for name in names:
        labels = [label.lower() for label in _validate_domain(name)]
        for i in range(len(labels)):
            suffix = tuple(labels[i:])
            if compress and suffix in seen:
                out += struct.pack("!H", 0xC000 | seen[suffix])
                break
            if len(out) < 0x4000:
                seen.setdefault(suffix, len(out))
            out.append(len(labels[i]))
            out += labels[i]
        else:
            out.append(0)
    return bytes(out)


def _to_ipv4(value: object, what: str) -> IPv4Address:
    try:
        ip = ipaddress.ip_address(value)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not an IP address") from None
    if not isinstance(ip, IPv4Address):
        raise ValueError(f"{what}: {value!r} is not an IPv4 address")
    return ip


# --------------------------------------------------------------------------- config


@dataclass
class DhcpConfig:
    """Server configuration.  Fields left as ``None`` are derived in ``__post_init__``.

    After construction every field holds a concrete, validated value: ``server_ip``,
    ``dns_servers``, ``static_leases`` (normalised MAC keys), ``reserved`` (always
    including the server and static addresses) and ``pool`` (inclusive ``(first, last)``;
    ``first > last`` means an empty pool, possible only for tiny subnets by default).
    """

    subnet: IPv4Network = field(default_factory=lambda: IPv4Network(DEFAULT_SUBNET))
    server_ip: IPv4Address | None = None  # default: network + 1
    dns_servers: list[IPv4Address] | None = None  # default: [server_ip]
    mtu: int = 1500
    lease_time: int = 3600
    domain_search: list[str] = field(default_factory=list)
    domain_name: str | None = None
    static_leases: dict[str, IPv4Address] | None = None  # default: {5a:94:..:ee: net+2}
    reserved: set[IPv4Address] | None = None  # default: {server_ip, broadcast-1}
    pool: tuple[IPv4Address, IPv4Address] | None = None  # default: net+3 .. broadcast-2
    offer_timeout: float = 60.0
    decline_hold: float = 600.0
    event_queue_size: int = 1024
    history_size: int = 4096
    # Addresses (offers and leases) one switch port may hold at once; 0: no limit. Static
    # leases do not count. Keeps a guest faking many clients from taking the whole pool.
    max_leases_per_port: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.subnet, IPv4Network):
            self.subnet = IPv4Network(self.subnet)
        net = self.subnet
        if net.prefixlen > 30:
            raise ValueError(f"subnet {net} is too small: need at least a /30")
        first_host = net.network_address + 1
        last_host = net.broadcast_address - 1

        self.server_ip = (
            first_host if self.server_ip is None else _to_ipv4(self.server_ip, "server_ip")
        )
        if not first_host <= self.server_ip <= last_host:
            raise ValueError(f"server_ip {self.server_ip} is not a host address of {net}")

        if self.dns_servers is None:
            self.dns_servers = [self.server_ip]
        self.dns_servers = [_to_ipv4(d, "dns_servers") for d in self.dns_servers]

        if not 68 <= self.mtu <= 65535:
            raise ValueError(f"mtu {self.mtu} out of range 68..65535")
        if not 1 <= self.lease_time <= 0xFFFFFFFE:
            raise ValueError(f"lease_time {self.lease_time} out of range 1..4294967294")
        for name in self.domain_search:
            _validate_domain(name)
        if self.domain_name is not None:
            _validate_domain(self.domain_name)

        if self.static_leases is None:
            self.static_leases = {DEFAULT_STATIC_MAC: net.network_address + 2}
        statics: dict[str, IPv4Address] = {}
        owners: dict[IPv4Address, str] = {}
        for mac, ip in self.static_leases.items():
            norm = normalize_mac(mac)
            addr = _to_ipv4(ip, f"static lease for {norm}")
            if not first_host <= addr <= last_host:
                raise ValueError(f"static lease {norm}={addr} is not a host address of {net}")
            if addr == self.server_ip:
                raise ValueError(f"static lease {norm}={addr} collides with server_ip")
            if norm in statics:
                raise ValueError(f"duplicate static lease for {norm}")
            if addr in owners:
                raise ValueError(f"static address {addr} given to both {owners[addr]} and {norm}")
            statics[norm] = addr
            owners[addr] = norm
        self.static_leases = statics

        if self.reserved is None:
            self.reserved = {self.server_ip, last_host}
        self.reserved = {_to_ipv4(r, "reserved") for r in self.reserved}
        self.reserved |= {self.server_ip, *statics.values()}

        if self.pool is None:
            self.pool = (net.network_address + 3, net.broadcast_address - 2)
        else:
            lo = _to_ipv4(self.pool[0], "pool start")
            hi = _to_ipv4(self.pool[1], "pool end")
            if lo > hi:
                raise ValueError(f"pool start {lo} is after pool end {hi}")
            if not (first_host <= lo and hi <= last_host):
                raise ValueError(f"pool {lo}-{hi} is not within the host addresses of {net}")
            self.pool = (lo, hi)
        if self.offer_timeout <= 0 or self.decline_hold < 0:
            raise ValueError("offer_timeout must be > 0 and decline_hold >= 0")

    def in_pool(self, ip: IPv4Address) -> bool:
        """True if ``ip`` is in the dynamic range and not reserved."""
        assert self.pool is not None and self.reserved is not None
        return self.pool[0] <= ip <= self.pool[1] and ip not in self.reserved


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class DhcpReply:
    """A BOOTP reply and where to send it (UDP 67 -> 68)."""

    payload: bytes
    dst_ip: IPv4Address
    dst_mac: bytes


@dataclass(frozen=True)
class Lease:
    mac: str
    ip: IPv4Address
    expires: float
    hostname: str | None
    static: bool


@dataclass(frozen=True)
class LeaseGranted:
    mac: str
    ip: IPv4Address
    hostname: str | None
    static: bool = False
    expires: float = 0.0
    renewed: bool = False  # True when an existing binding was extended


@dataclass(frozen=True)
class LeaseReleased:
    mac: str
    ip: IPv4Address
    hostname: str | None
    reason: str = "released"  # "released" | "declined" | "expired"


@dataclass
class DhcpStats:
    discovers: int = 0
    offers: int = 0
    requests: int = 0
    acks: int = 0
    naks: int = 0
    releases: int = 0
    informs: int = 0
    declines: int = 0
    malformed: int = 0
    ignored: int = 0
    pool_exhausted: int = 0  # DISCOVERs left unanswered because no address was free
    expired: int = 0  # bindings reclaimed at lease expiry
    chaddr_mismatch: int = 0  # chaddr differed from the Ethernet source (still served)
    port_limit_dropped: int = 0  # unanswered: the client's port holds max_leases_per_port

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# --------------------------------------------------------------------------- internals


class _Malformed(Exception):
    pass


@dataclass
class _Request:
    op: int
    xid: int
    flags: int
    ciaddr: IPv4Address
    giaddr: IPv4Address
    chaddr_raw: bytes  # full 16-byte field, echoed back
    mac: bytes
    options: dict[int, bytes]

    @property
    def msg_type(self) -> int:
        return self.options[OPT_MESSAGE_TYPE][0]

    def ip_option(self, code: int) -> IPv4Address | None:
        value = self.options.get(code)
        if value is None or len(value) != 4:
            return None
        return IPv4Address(value)

    @property
    def hostname(self) -> str | None:
        raw = self.options.get(OPT_HOSTNAME)
        if not raw:
            return None
        text = raw.split(b"\x00", 1)[0].decode("utf-8", "replace")
        text = "".join(c for c in text if c.isprintable()).strip()
        return text[:255] or None


@dataclass
class _Binding:
    ip: IPv4Address
    expires: float
    hostname: str | None
    static: bool


def _parse_options(data: bytes, out: dict[int, bytes], *, need_end: bool) -> None:
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == OPT_END:
            return
        if code == OPT_PAD:
            i += 1
            continue
        if i + 1 >= n:
            raise _Malformed(f"option {code} truncated before its length")
        length = data[i + 1]
        end = i + 2 + length
        if end > n:
            raise _Malformed(f"option {code} length {length} runs past the packet")
        out[code] = out.get(code, b"") + data[i + 2 : end]  # RFC 3396 concatenation
        i = end
    if need_end:
        raise _Malformed("overloaded field without an end option")


def _parse_request(payload: bytes) -> _Request:
    if len(payload) < BOOTP_FIXED_LEN + 4:
        raise _Malformed(f"short packet ({len(payload)} bytes)")
    op, htype, hlen, _hops, xid, _secs, flags = struct.unpack_from("!BBBBIHH", payload, 0)
    if op != BOOTREQUEST:
        raise _Malformed(f"op {op} is not BOOTREQUEST")
    if htype != HTYPE_ETHERNET or hlen != 6:
        raise _Malformed(f"htype/hlen {htype}/{hlen} is not Ethernet")
    if payload[BOOTP_FIXED_LEN : BOOTP_FIXED_LEN + 4] != MAGIC_COOKIE:
        raise _Malformed("bad magic cookie")
    ciaddr = IPv4Address(payload[12:16])
    giaddr = IPv4Address(payload[24:28])
    chaddr_raw = payload[28:44]
    options: dict[int, bytes] = {}
    _parse_options(payload[BOOTP_FIXED_LEN + 4 :], options, need_end=False)
    overload = options.pop(OPT_OVERLOAD, b"")
    if overload:
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            raise _Malformed("bad option overload value")
        if overload[0] & 1:
            _parse_options(payload[108:236], options, need_end=True)  # file
        if overload[0] & 2:
            _parse_options(payload[44:108], options, need_end=True)  # sname
    mtype = options.get(OPT_MESSAGE_TYPE)
    if mtype is None:
        raise _Malformed("missing message type (option 53)")
    if len(mtype) != 1:
        raise _Malformed("message type option has wrong length")
    return _Request(
        op=op,
        xid=xid,
        flags=flags,
        ciaddr=ciaddr,
        giaddr=giaddr,
        chaddr_raw=chaddr_raw,
        mac=chaddr_raw[:6],
        options=options,
    )


def _encode_option(code: int, value: bytes) -> bytes:
    if not value:
        return bytes((code, 0))
    out = bytearray()
    for i in range(0, len(value), 255):  # RFC 3396 split of long options
        chunk = value[i : i + 255]
        out += bytes((code, len(chunk))) + chunk
    return bytes(out)


# --------------------------------------------------------------------------- server


class DhcpServer:
    """Sans-IO DHCPv4 server; see the module docstring for the theory of operation."""

    def __init__(self, config: DhcpConfig) -> None:
        self.config = config
        assert config.pool is not None and config.static_leases is not None
        self._static: dict[str, IPv4Address] = dict(config.static_leases)
        self._static_ips: set[IPv4Address] = set(self._static.values())
        self._pool_lo = int(config.pool[0])
        self._pool_hi = int(config.pool[1])
        self._bindings: dict[str, _Binding] = {}
        self._offers: dict[str, tuple[IPv4Address, float]] = {}
        self._ip_owner: dict[IPv4Address, str] = {}  # ip -> mac (bindings and offers)
        self._declined: dict[IPv4Address, float] = {}
        self._history: OrderedDict[str, IPv4Address] = OrderedDict()
        self._events: deque[LeaseGranted | LeaseReleased] = deque(
            maxlen=max(1, config.event_queue_size)
        )
        self.stats = DhcpStats()
        self._static_options = self._build_static_options()
        # Which switch port each MAC holding an offer or a lease asked from, and how many
        # such MACs each port has (for `max_leases_per_port`).
        self._mac_port: dict[str, int] = {}
        self._port_holds: dict[int, int] = {}
        self._port: int | None = None  # the port of the request being handled
        self._limit_logged = -1.0
        # Deadlines of offers, bindings and quarantines: (when, seq, kind, key), checked
        # against the live state when reached, so expiry is O(expired), not O(everything).
        self._deadlines: list[tuple[float, int, str, object]] = []
        self._deadline_seq = 0

    # ---------------------------------------------------------------- public API

    def handle(
        self, payload: bytes, src_mac: bytes, now: float, port: int | None = None
    ) -> DhcpReply | None:
        """Process one client datagram; return the reply to send, if any.  Never raises.
        `port`: the switch port it came in on (None: unknown, no per-port limit)."""
        self._port = port
        try:
            req = _parse_request(bytes(payload))
        except _Malformed as exc:
            self.stats.malformed += 1
            log.debug("dhcp.malformed", mac=_fmt_mac(src_mac), error=str(exc))
            return None
        except Exception:  # pragma: no cover - defensive: parsing must never raise
            self.stats.malformed += 1
            log.exception("dhcp.parse_error")
            return None
        try:
            return self._dispatch(req, src_mac, now)
        except Exception:  # pragma: no cover - defensive: a bug must not kill the stack
            self.stats.malformed += 1
            log.exception("dhcp.internal_error")
            return None

    def leases(self, now: float) -> list[Lease]:
        """Active (unexpired) bindings, static ones included once granted, sorted by IP."""
        self.expire(now)
        return sorted(
            (
                Lease(mac=mac, ip=b.ip, expires=b.expires, hostname=b.hostname, static=b.static)
                for mac, b in self._bindings.items()
            ),
            key=lambda lease: lease.ip,
        )

    def lease_items(self, now: float) -> list[tuple[str, _Binding]]:
        """(mac, binding) of every active binding, unsorted: one C-speed copy, so that a
        caller with many can build its answer in slices between other work."""
        self.expire(now)
        return list(self._bindings.items())

    def restore_lease(
        self, mac: str, ip: IPv4Address, expires: float, hostname: str | None, now: float
    ) -> bool:
        """Bind a dynamic lease remembered from an earlier run (the state file); False when
        it has expired, is not in the pool, or the address or MAC is already taken."""
        mac = normalize_mac(mac)
        if expires <= now or mac in self._static or mac in self._bindings:
            return False
        if not self._is_free(ip, mac):
            return False
        self._bindings[mac] = _Binding(ip=ip, expires=expires, hostname=hostname, static=False)
        self._deadline(expires, "binding", mac)
        self._ip_owner[ip] = mac
        self._remember(mac, ip)
        return True

    def next_event(self) -> LeaseGranted | LeaseReleased | None:
        """Pop the oldest pending lease event, or ``None``."""
        return self._events.popleft() if self._events else None

    def expire(self, now: float) -> None:
        """Reclaim expired offers, bindings and DECLINE quarantines (from a deadline heap:
        the cost is the number expired, not the number held)."""
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            when, _, kind, key = heapq.heappop(heap)
            if kind == "offer":
                offer = self._offers.get(key)  # type: ignore[arg-type]
                if offer is not None and offer[1] == when:
                    self._drop_offer(key)  # type: ignore[arg-type]
            elif kind == "binding":
                binding = self._bindings.get(key)  # type: ignore[arg-type]
                if binding is not None and binding.expires == when:
                    self._unbind(key, "expired")  # type: ignore[arg-type]
                    self.stats.expired += 1
            elif self._declined.get(key) == when:  # type: ignore[call-overload]
                del self._declined[key]  # type: ignore[arg-type]
        live = len(self._offers) + len(self._bindings) + len(self._declined)
        if len(heap) > 2 * live + 64:  # renewals leave stale entries: drop them now and then
            self._deadlines = heap = [e for e in heap if self._deadline_live(e)]
            heapq.heapify(heap)

    def _deadline_live(self, entry: tuple[float, int, str, object]) -> bool:
        when, _, kind, key = entry
        if kind == "offer":
            offer = self._offers.get(key)  # type: ignore[arg-type]
            return offer is not None and offer[1] == when
        if kind == "binding":
            binding = self._bindings.get(key)  # type: ignore[arg-type]
            return binding is not None and binding.expires == when
        return self._declined.get(key) == when  # type: ignore[call-overload]

    def _deadline(self, when: float, kind: str, key: object) -> None:
        self._deadline_seq += 1
        heapq.heappush(self._deadlines, (when, self._deadline_seq, kind, key))

    def free_addresses(self, now: float) -> int:
        """Number of pool addresses that could be offered right now."""
        self.expire(now)
        return sum(
            1
            for n in range(self._pool_lo, self._pool_hi + 1)
            if self._is_free(IPv4Address(n), None)
        )

    # ---------------------------------------------------------------- dispatch

    def _dispatch(self, req: _Request, src_mac: bytes, now: float) -> DhcpReply | None:
        if bytes(src_mac) != req.mac:
            self.stats.chaddr_mismatch += 1
        mtype = req.msg_type
        if mtype not in (DISCOVER, REQUEST, DECLINE, RELEASE, INFORM) or req.giaddr != ZERO_IP:
            self.stats.ignored += 1  # server-side types or relayed traffic
            return None
        self.expire(now)
        mac = normalize_mac(req.mac)
        if mtype == DISCOVER:
            self.stats.discovers += 1
            return self._on_discover(req, mac, now)
        if mtype == REQUEST:
            self.stats.requests += 1
            return self._on_request(req, mac, now)
        if mtype == DECLINE:
            self.stats.declines += 1
            self._on_decline(req, mac, now)
            return None
        if mtype == RELEASE:
            self.stats.releases += 1
            self._on_release(req, mac)
            return None
        self.stats.informs += 1
        return self._on_inform(req)

    def _on_discover(self, req: _Request, mac: str, now: float) -> DhcpReply | None:
        if self._over_port_limit(mac, now):
            return None
        ip = self._choose_address(mac, req.ip_option(OPT_REQUESTED_IP))
        if ip is None:
            self.stats.pool_exhausted += 1
            log.warning("dhcp.pool_exhausted", mac=mac)
            return None
        if mac not in self._bindings:
            self._drop_offer(mac)
            self._offers[mac] = (ip, now + self.config.offer_timeout)
            self._deadline(now + self.config.offer_timeout, "offer", mac)
            if ip not in self._static_ips:
                self._ip_owner[ip] = mac
            self._hold(mac)
        self.stats.offers += 1
        return self._reply(req, OFFER, yiaddr=ip)

    def _on_request(self, req: _Request, mac: str, now: float) -> DhcpReply | None:
        server_id = req.ip_option(OPT_SERVER_ID)
        requested = req.ip_option(OPT_REQUESTED_IP)
        if OPT_SERVER_ID in req.options:
            # SELECTING
            if server_id != self.config.server_ip:
                self._drop_offer(mac)
                self.stats.ignored += 1
                return None
            ip = requested if requested is not None else req.ciaddr
            if ip == ZERO_IP or not self._acceptable(mac, ip):
                return self._nak(req, "requested address not available")
            return self._ack_binding(req, mac, ip, now)
        if req.ciaddr == ZERO_IP:
            # INIT-REBOOT
            if requested is None:
                self.stats.ignored += 1
                return None
            if requested not in self.config.subnet:
                return self._nak(req, "wrong network")
            if not self._acceptable(mac, requested):
                return self._nak(req, "requested address not available")
            return self._ack_binding(req, mac, requested, now)
        # RENEWING / REBINDING
        if not self._acceptable(mac, req.ciaddr):
            return self._nak(req, "lease not found")
        return self._ack_binding(req, mac, req.ciaddr, now)

    def _on_decline(self, req: _Request, mac: str, now: float) -> None:
        ip = req.ip_option(OPT_REQUESTED_IP)
        if ip is None:
            return
        binding = self._bindings.get(mac)
        offer = self._offers.get(mac)
        holds = (binding is not None and binding.ip == ip) or (offer is not None and offer[0] == ip)
        if not holds:
            log.info("dhcp.decline_ignored", mac=mac, ip=str(ip), reason="not its address")
            return
        log.warning("dhcp.declined", mac=mac, ip=str(ip), reason="address in use?")
        if binding is not None and binding.ip == ip:
            self._unbind(mac, "declined")
        self._drop_offer(mac)
        if self._history.get(mac) == ip:
            del self._history[mac]
        if ip not in self._static_ips:
            self._declined[ip] = now + self.config.decline_hold
            self._deadline(now + self.config.decline_hold, "declined", ip)

    def _on_release(self, req: _Request, mac: str) -> None:
        binding = self._bindings.get(mac)
        if binding is None or binding.ip != req.ciaddr:
            return
        self._unbind(mac, "released")

    def _on_inform(self, req: _Request) -> DhcpReply:
        self.stats.acks += 1
        return self._reply(req, ACK, yiaddr=ZERO_IP, lease=False)

    # ---------------------------------------------------------------- state

    def _is_free(self, ip: IPv4Address, mac: str | None) -> bool:
        """Dynamic address usable by ``mac`` (``None`` = by anybody)."""
        if not self.config.in_pool(ip) or ip in self._declined:
            return False
        owner = self._ip_owner.get(ip)
        return owner is None or owner == mac

    def _acceptable(self, mac: str, ip: IPv4Address) -> bool:
        if mac in self._static:
            return ip == self._static[mac]
        binding = self._bindings.get(mac)
        if binding is not None:
            return ip == binding.ip
        return self._is_free(ip, mac)

    def _choose_address(self, mac: str, requested: IPv4Address | None) -> IPv4Address | None:
        if mac in self._static:
            return self._static[mac]
        binding = self._bindings.get(mac)
        if binding is not None:
            return binding.ip
        offer = self._offers.get(mac)
        if offer is not None and self._is_free(offer[0], mac):
            return offer[0]
        previous = self._history.get(mac)
        if previous is not None and self._is_free(previous, mac):
            return previous
        if requested is not None and self._is_free(requested, mac):
            return requested
        for n in range(self._pool_lo, self._pool_hi + 1):
            ip = IPv4Address(n)
            if self._is_free(ip, mac):
                return ip
        return None

    def _ack_binding(
        self, req: _Request, mac: str, ip: IPv4Address, now: float
    ) -> DhcpReply | None:
        if self._over_port_limit(mac, now):
            return None
        expires = now + self.config.lease_time
        static = mac in self._static
        old = self._bindings.get(mac)
        hostname = req.hostname or (old.hostname if old is not None else None)
        self._drop_offer(mac)
        self._bindings[mac] = _Binding(ip=ip, expires=expires, hostname=hostname, static=static)
        self._deadline(expires, "binding", mac)
        if not static:
            self._ip_owner[ip] = mac
        self._remember(mac, ip)
        self._hold(mac)
        self._events.append(
            LeaseGranted(
                mac=mac,
                ip=ip,
                hostname=hostname,
                static=static,
                expires=expires,
                renewed=old is not None and old.ip == ip,
            )
        )
        self.stats.acks += 1
        return self._reply(req, ACK, yiaddr=ip)

    def _unbind(self, mac: str, reason: str) -> None:
        binding = self._bindings.pop(mac)
        if self._ip_owner.get(binding.ip) == mac:
            del self._ip_owner[binding.ip]
        self._remember(mac, binding.ip)
        self._let_go(mac)
        self._events.append(
            LeaseReleased(mac=mac, ip=binding.ip, hostname=binding.hostname, reason=reason)
        )

    def _drop_offer(self, mac: str) -> None:
        offer = self._offers.pop(mac, None)
        if offer is None:
            return
        ip = offer[0]
        binding = self._bindings.get(mac)
        if self._ip_owner.get(ip) == mac and (binding is None or binding.ip != ip):
            del self._ip_owner[ip]
        self._let_go(mac)

    # ---------------------------------------------------------------- per-port limit

    def _over_port_limit(self, mac: str, now: float) -> bool:
        """True (counted, logged now and then) when `mac` would be a new holder on a port
        that already holds `max_leases_per_port` offers and leases."""
        limit = self.config.max_leases_per_port
        port = self._port
        if not limit or port is None or mac in self._static:
            return False
        if self._mac_port.get(mac) == port or self._port_holds.get(port, 0) < limit:
            return False
        self.stats.port_limit_dropped += 1
        if now - self._limit_logged >= 5.0:
            self._limit_logged = now
            log.warning(
                "dhcp: port %s holds %d addresses (the limit): %s not served (%d refused)",
                port,
                limit,
                mac,
                self.stats.port_limit_dropped,
            )
        return True

    def _hold(self, mac: str) -> None:
        """`mac` holds an offer or a lease: count it against the port it asked from."""
        port = self._port
        if port is None or mac in self._static:
            return
        old = self._mac_port.get(mac)
        if old == port:
            return
        if old is not None:
            self._port_holds[old] -= 1
        self._mac_port[mac] = port
        self._port_holds[port] = self._port_holds.get(port, 0) + 1

    def _let_go(self, mac: str) -> None:
        """`mac` may have stopped holding anything: uncount it."""
        if mac in self._bindings or mac in self._offers:
            return
        port = self._mac_port.pop(mac, None)
        if port is not None:
            self._port_holds[port] -= 1
            if not self._port_holds[port]:
                del self._port_holds[port]

    def _remember(self, mac: str, ip: IPv4Address) -> None:
        self._history[mac] = ip
        self._history.move_to_end(mac)
        while len(self._history) > self.config.history_size:
            self._history.popitem(last=False)

    # ---------------------------------------------------------------- encoding

    def _build_static_options(self) -> dict[int, bytes]:
        cfg = self.config
        assert cfg.server_ip is not None and cfg.dns_servers is not None
        opts: dict[int, bytes] = {
            OPT_SUBNET_MASK: cfg.subnet.netmask.packed,
            OPT_ROUTER: cfg.server_ip.packed,
            OPT_BROADCAST: cfg.subnet.broadcast_address.packed,
            OPT_MTU: struct.pack("!H", cfg.mtu),
        }
        if cfg.dns_servers:
            opts[OPT_DNS] = b"".join(d.packed for d in cfg.dns_servers)
        if cfg.domain_name:
            opts[OPT_DOMAIN_NAME] = b".".join(_validate_domain(cfg.domain_name))
        if cfg.domain_search:
            opts[OPT_DOMAIN_SEARCH] = encode_domain_search(cfg.domain_search)
        return opts

    def _nak(self, req: _Request, message: str) -> DhcpReply:
        self.stats.naks += 1
        return self._reply(req, NAK, yiaddr=ZERO_IP, message=message)

    def _reply(
        self,
        req: _Request,
        mtype: int,
        *,
        yiaddr: IPv4Address,
        lease: bool = True,
        message: str | None = None,
    ) -> DhcpReply:
        cfg = self.config
        assert cfg.server_ip is not None
        ciaddr = req.ciaddr if mtype == ACK else ZERO_IP  # RFC 2131 table 3
        header = struct.pack(
            "!BBBBIHH4s4s4s4s16s64s128s",
            BOOTREPLY,
            HTYPE_ETHERNET,
            6,
            0,
            req.xid,
            0,
            req.flags & BROADCAST_FLAG,
            ciaddr.packed,
            yiaddr.packed,
            ZERO_IP.packed,
            req.giaddr.packed,
            req.chaddr_raw,
            b"",
            b"",
        )
        opts = bytearray(_encode_option(OPT_MESSAGE_TYPE, bytes((mtype,))))
        opts += _encode_option(OPT_SERVER_ID, cfg.server_ip.packed)
        if mtype == NAK:
            if message:
                opts += _encode_option(OPT_MESSAGE, message.encode())
        else:
            if lease:
                lt = cfg.lease_time
                opts += _encode_option(OPT_LEASE_TIME, struct.pack("!I", lt))
                opts += _encode_option(OPT_RENEWAL_T1, struct.pack("!I", lt // 2))
                opts += _encode_option(OPT_REBINDING_T2, struct.pack("!I", lt * 7 // 8))
            for code in self._option_order(req):
                opts += _encode_option(code, self._static_options[code])
        opts.append(OPT_END)
        payload = header + MAGIC_COOKIE + bytes(opts)
        if len(payload) < MIN_REPLY_LEN:
            payload += bytes(MIN_REPLY_LEN - len(payload))

        # RFC 2131 4.1 (no relays: giaddr is always zero here).
        if mtype == NAK:
            dst_ip = BROADCAST_IP
        elif req.ciaddr != ZERO_IP:
            dst_ip = req.ciaddr
        elif req.flags & BROADCAST_FLAG or yiaddr == ZERO_IP:
            dst_ip = BROADCAST_IP
        else:
            dst_ip = yiaddr
        dst_mac = BROADCAST_MAC if dst_ip == BROADCAST_IP else req.mac
        return DhcpReply(payload=payload, dst_ip=dst_ip, dst_mac=dst_mac)

    def _option_order(self, req: _Request) -> list[int]:
        """Configuration options, those in the parameter request list first, in its order."""
        available = self._static_options
        prl = req.options.get(OPT_PARAM_REQUEST, b"")
        order = [c for c in dict.fromkeys(prl) if c in available]
        order += [c for c in available if c not in order]
        return order


def _fmt_mac(mac: bytes) -> str:
    try:
        return normalize_mac(bytes(mac))
    except ValueError:
        return repr(mac)
