"""Sans-IO DHCPv6 server (RFC 8415) for netferry's virtual L2 segment.

Theory of operation
===================

Like the DHCPv4 server (hostd/services/dhcp.py), this one owns no socket and no clock. The
stack hands :meth:`Dhcpv6Server.handle` the UDP payload of every datagram to port 547
(ff02::1:2 or the gateway), the client's IPv6 source address, its Ethernet source MAC (or
``None`` when not known, e.g. behind a plain UDP socket) and the current time; it gets back
``None`` or a :class:`Dhcpv6Reply` to send from port 547 to the client's address and port 546.
:meth:`Dhcpv6Server.handle` never raises: malformed messages count as ``stats.malformed``,
well-formed ones we do not answer (relay messages, server-side types, a Server Identifier that
is not ours, messages RFC 8415 section 16 says to discard) as ``stats.ignored``.

What is served
--------------

* Stateful addresses (IA_NA): SOLICIT → ADVERTISE (or, with Rapid Commit on both sides, a
  REPLY that binds at once), REQUEST → REPLY, RENEW/REBIND → REPLY extending the binding,
  RELEASE and DECLINE → REPLY (a declined address is quarantined for ``decline_hold``),
  CONFIRM → REPLY with Success or NotOnLink. T1/T2 are 0.5 and 0.8 of the preferred lifetime.
* Stateless configuration: INFORMATION-REQUEST (and every other reply) carries the DNS
  servers (option 23) and the domain search list (option 24, uncompressed names).
* The server identifier is a DUID-LL of the gateway's MAC, stable across restarts.

Address plan (defaults for ``fd00:192:168:127::/64``): ``::1`` the gateway (reserved),
``::2`` the static lease of MAC 5a:94:ef:e4:0c:ee, ``::254`` the host (reserved), the pool
``::1000``-``::1fff``. A static lease is keyed by a MAC (matched against the Ethernet source,
then against a MAC inside the client's DUID-LL/DUID-LLT) or by a whole DUID in hex.

State: bindings keyed by (client DUID, IAID); outstanding advertisements hold their address
for ``offer_timeout``; bindings and offers together are at most ``max_leases``; a bounded
history gives a returning client its former address. Everything expires lazily at the start
of each call, from a heap of deadlines: the cost is what expired, not what is held.

Limits, so that one guest inventing DUIDs cannot take the pool or stall the loop: a request
is served at most ``MAX_IA_PER_REQUEST`` IA_NAs (the rest get NoAddrsAvail,
``stats.ia_limit_refused``); with ``max_leases_per_port`` set, a switch port (the stack passes
the one a request came in on) whose clients already hold that many offers and bindings gets
NoAddrsAvail for a further IA (``stats.port_limit_refused``; static leases are exempt).
Refusals are logged at most every few seconds. A new address comes from a cursor that walks
the pool once plus a heap of the addresses handed back below it, so choosing one costs
O(log n) amortised, however full the pool is. Lease events
(:class:`LeaseGranted`, :class:`LeaseReleased`) queue up, bounded, for the stack to drain with
:meth:`Dhcpv6Server.next_event`; :meth:`Dhcpv6Server.leases` lists active leases in the shape
of the DHCPv4 ones (mac, ip, expires, hostname, static) for the lease API.
"""

from __future__ import annotations

import heapq
import ipaddress
import struct
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from ipaddress import IPv6Address, IPv6Network

from netferry.hostd.corelog import core_logger
from netferry.hostd.services.dhcp import DEFAULT_STATIC_MAC, encode_domain_search, normalize_mac

__all__ = [
    "Dhcpv6Config",
    "Dhcpv6Reply",
    "Dhcpv6Server",
    "Dhcpv6Stats",
    "Lease",
    "LeaseGranted",
    "LeaseReleased",
    "dhcpv6_config_for",
    "duid_ll",
]

log = core_logger("hostd.services.dhcpv6")

DEFAULT_PREFIX = IPv6Network("fd00:192:168:127::/64")
SERVER_PORT = 547
CLIENT_PORT = 546
ALL_DHCP_SERVERS = IPv6Address("ff02::1:2")

# Message types
SOLICIT, ADVERTISE, REQUEST, CONFIRM, RENEW, REBIND, REPLY, RELEASE, DECLINE = range(1, 10)
RECONFIGURE, INFORMATION_REQUEST, RELAY_FORW, RELAY_REPL = range(10, 14)

# Options
OPT_CLIENTID = 1
OPT_SERVERID = 2
OPT_IA_NA = 3
OPT_IA_TA = 4
OPT_IAADDR = 5
OPT_ORO = 6
OPT_PREFERENCE = 7
OPT_ELAPSED_TIME = 8
OPT_STATUS_CODE = 13
OPT_RAPID_COMMIT = 14
OPT_DNS_SERVERS = 23
OPT_DOMAIN_LIST = 24
OPT_IA_PD = 25
OPT_INFORMATION_REFRESH_TIME = 32
OPT_CLIENT_FQDN = 39

# Status codes
SUCCESS = 0
UNSPEC_FAIL = 1
NO_ADDRS_AVAIL = 2
NO_BINDING = 3
NOT_ON_LINK = 4

DUID_LLT = 1
DUID_LL = 3
HWTYPE_ETHERNET = 1

_OPT = struct.Struct("!HH")
_IA_NA = struct.Struct("!III")
_IAADDR = struct.Struct("!16sII")
MAX_OPTIONS = 64  # per message (and per IA): more is an attack, not a client
MAX_IA_PER_REQUEST = 8  # IA_NAs served per message: a host asks for one or two
REFUSAL_LOG_INTERVAL = 5.0  # seconds between warnings about refused IAs


def duid_ll(mac: bytes) -> bytes:
    """DUID-LL (RFC 8415 11.4) of an Ethernet MAC."""
    return struct.pack("!HH", DUID_LL, HWTYPE_ETHERNET) + mac


def mac_from_duid(duid: bytes) -> bytes | None:
    """The Ethernet MAC inside a DUID-LL or DUID-LLT, if it holds one."""
    if len(duid) == 10 and duid[:4] == struct.pack("!HH", DUID_LL, HWTYPE_ETHERNET):
        return duid[4:]
    if len(duid) == 14 and duid[:4] == struct.pack("!HH", DUID_LLT, HWTYPE_ETHERNET):
        return duid[8:]
    return None


def _to_ipv6(value: object, what: str) -> IPv6Address:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not an IP address") from None
    if not isinstance(ip, IPv6Address):
        raise ValueError(f"{what}: {value!r} is not an IPv6 address")
    return ip


def _static_key(key: str) -> str:
    """A static lease's key: a normalised MAC, or a DUID as lower-case hex without separators."""
    try:
        return normalize_mac(key)
    except ValueError:
        pass
    text = key.strip().replace(":", "").replace("-", "").lower()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"static lease key {key!r} is neither a MAC nor a DUID in hex") from None
    if not 3 <= len(raw) <= 130:
        raise ValueError(f"static lease key {key!r}: a DUID is 3..130 bytes")
    return "duid:" + raw.hex()


@dataclass
class Dhcpv6Config:
    """Server configuration; ``None`` fields are derived in ``__post_init__``."""

    prefix: IPv6Network = DEFAULT_PREFIX
    server_mac: bytes = bytes.fromhex("5a94efe40cdd")  # the gateway's: the DUID-LL
    dns_servers: list[IPv6Address] | None = None  # default: [prefix::1]
    domain_search: list[str] = field(default_factory=list)
    static_leases: dict[str, IPv6Address] | None = None  # default: {5a:94:..:ee: prefix::2}
    reserved: set[IPv6Address] | None = None  # default: {prefix::1, prefix::254}
    pool: tuple[IPv6Address, IPv6Address] | None = None  # default: prefix::1000..prefix::1fff
    lease_time: int = 3600  # preferred and valid lifetime
    rapid_commit: bool = True
    preference: int = 255  # the only server on the link: clients need not wait for others
    information_refresh_time: int = 86400
    offer_timeout: float = 60.0
    decline_hold: float = 600.0
    max_leases: int = 4096  # bindings and outstanding offers
    history_size: int = 4096
    event_queue_size: int = 1024
    # Addresses (offers and bindings) the clients on one switch port may hold at once; 0: no
    # limit. Static leases are exempt.
    max_leases_per_port: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, IPv6Network):
            self.prefix = IPv6Network(self.prefix)
        net = self.prefix
        if net.prefixlen > 120:
            raise ValueError(f"prefix {net} is too small for DHCPv6: need at least a /120")
        base = net.network_address
        if len(self.server_mac) != 6:
            raise ValueError("server_mac must be 6 bytes")
        if self.dns_servers is None:
            self.dns_servers = [base + 1]
        self.dns_servers = [_to_ipv6(d, "dns_servers") for d in self.dns_servers]
        for name in self.domain_search:
            encode_domain_search([name], compress=False)  # raises ValueError naming it
        if not 1 <= self.lease_time <= 0xFFFFFFFE:
            raise ValueError(f"lease_time {self.lease_time} out of range 1..4294967294")
        if not 0 <= self.preference <= 255:
            raise ValueError(f"preference {self.preference} out of range 0..255")
        if self.max_leases < 1:
            raise ValueError("max_leases must be at least 1")
        if self.max_leases_per_port < 0:
            raise ValueError("max_leases_per_port must be >= 0 (0: no limit)")
        if self.static_leases is None:
            self.static_leases = {DEFAULT_STATIC_MAC: base + 2}
        statics: dict[str, IPv6Address] = {}
        owners: dict[IPv6Address, str] = {}
        for key, ip in self.static_leases.items():
            k = _static_key(key)
            addr = _to_ipv6(ip, f"static lease for {key}")
            if addr not in net or addr == base:
                raise ValueError(f"static lease {key}={addr} is not a host address of {net}")
            if k in statics:
                raise ValueError(f"duplicate static lease for {key}")
            if addr in owners:
                raise ValueError(f"static address {addr} given to both {owners[addr]} and {key}")
            statics[k] = addr
            owners[addr] = key
        self.static_leases = statics
        if self.reserved is None:
            self.reserved = {base + 1, base + 0x254}
        self.reserved = {_to_ipv6(r, "reserved") for r in self.reserved} | {base}
        if self.pool is None:
            self.pool = (base + 0x1000, base + 0x1FFF)
        lo, hi = _to_ipv6(self.pool[0], "pool start"), _to_ipv6(self.pool[1], "pool end")
        if lo > hi:
            raise ValueError(f"pool start {lo} is after pool end {hi}")
        if lo not in net or hi not in net:
            raise ValueError(f"pool {lo}-{hi} is not inside {net}")
        self.pool = (lo, hi)
        if self.offer_timeout <= 0 or self.decline_hold < 0:
            raise ValueError("offer_timeout must be > 0 and decline_hold >= 0")

    @property
    def server_duid(self) -> bytes:
        return duid_ll(self.server_mac)


def dhcpv6_config_for(config) -> Dhcpv6Config:
    """The server's configuration for a `hostd.config.NetworkConfig`'s IPv6 plan."""
    return Dhcpv6Config(
        prefix=config.subnet6,
        server_mac=config.gateway_mac,
        dns_servers=[config.dns6],
        domain_search=list(config.dns_search),
        static_leases=dict(config.static_leases6),
        reserved=set(config.virtual_addresses6),
        pool=config.dhcp6_range,
        lease_time=config.lease_time,
        max_leases_per_port=config.port_max_leases,
    )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Dhcpv6Reply:
    """A message to send from port 547 to `dst_ip`, port `dst_port` (the client's)."""

    payload: bytes
    dst_ip: IPv6Address
    dst_mac: bytes | None
    dst_port: int = CLIENT_PORT


@dataclass(frozen=True)
class Lease:
    mac: str  # "" when the client's MAC is not known
    ip: IPv6Address
    expires: float
    hostname: str | None
    static: bool
    duid: str = ""
    iaid: int = 0


@dataclass(frozen=True)
class LeaseGranted:
    mac: str
    ip: IPv6Address
    hostname: str | None
    static: bool = False
    expires: float = 0.0
    renewed: bool = False


@dataclass(frozen=True)
class LeaseReleased:
    mac: str
    ip: IPv6Address
    hostname: str | None
    reason: str = "released"  # "released" | "declined" | "expired"


@dataclass
class Dhcpv6Stats:
    solicits: int = 0
    advertises: int = 0
    requests: int = 0
    confirms: int = 0
    renews: int = 0
    rebinds: int = 0
    releases: int = 0
    declines: int = 0
    information_requests: int = 0
    replies: int = 0
    rapid_commits: int = 0
    malformed: int = 0
    ignored: int = 0
    no_addrs: int = 0  # IAs left without an address (pool or lease table full, a limit)
    expired: int = 0
    port_limit_refused: int = 0  # IAs refused: their port holds max_leases_per_port
    ia_limit_refused: int = 0  # IAs refused: beyond MAX_IA_PER_REQUEST in one message
    restore_rejected: int = 0  # remembered leases not restored because malformed

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# --------------------------------------------------------------------------- parsing


class _Malformed(Exception):
    pass


def _parse_options(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    i, n = 0, len(data)
    while i < n:
        if i + 4 > n:
            raise _Malformed("truncated option header")
        code, length = _OPT.unpack_from(data, i)
        if i + 4 + length > n:
            raise _Malformed(f"option {code} overruns the message")
        out.append((code, data[i + 4 : i + 4 + length]))
        if len(out) > MAX_OPTIONS:
            raise _Malformed("too many options")
        i += 4 + length
    return out


@dataclass
class _IaNa:
    iaid: int
    addresses: list[IPv6Address]


@dataclass
class _Request:
    msg_type: int
    xid: bytes
    options: list[tuple[int, bytes]]
    client_id: bytes | None = None
    server_id: bytes | None = None
    ia_nas: list[_IaNa] = field(default_factory=list)
    has_other_ia: bool = False
    rapid_commit: bool = False
    hostname: str | None = None


def _parse_request(payload: bytes) -> _Request:
    if len(payload) < 4:
        raise _Malformed("shorter than a DHCPv6 header")
    if payload[0] in (RELAY_FORW, RELAY_REPL):
        return _Request(payload[0], b"", [])  # another layout; we serve no relays (ignored)
    req = _Request(payload[0], payload[1:4], _parse_options(payload[4:]))
    for code, value in req.options:
        if code == OPT_CLIENTID:
            if not 3 <= len(value) <= 130 or req.client_id is not None:
                raise _Malformed("bad or repeated client identifier")
            req.client_id = value
        elif code == OPT_SERVERID:
            if not 3 <= len(value) <= 130 or req.server_id is not None:
                raise _Malformed("bad or repeated server identifier")
            req.server_id = value
        elif code == OPT_IA_NA:
            if len(value) < _IA_NA.size:
                raise _Malformed("IA_NA shorter than 12 bytes")
            iaid = _IA_NA.unpack_from(value)[0]
            addrs = []
            for sub, sval in _parse_options(value[_IA_NA.size :]):
                if sub == OPT_IAADDR:
                    if len(sval) < _IAADDR.size:
                        raise _Malformed("IAADDR shorter than 24 bytes")
                    addrs.append(IPv6Address(sval[:16]))
            if any(ia.iaid == iaid for ia in req.ia_nas):
                raise _Malformed("two IA_NA with one IAID")
            req.ia_nas.append(_IaNa(iaid, addrs))
        elif code in (OPT_IA_TA, OPT_IA_PD):
            req.has_other_ia = True
        elif code == OPT_RAPID_COMMIT:
            req.rapid_commit = True
        elif code == OPT_CLIENT_FQDN and len(value) > 1:
            req.hostname = _decode_fqdn(value[1:])
    return req


def _decode_fqdn(data: bytes) -> str | None:
    labels, i = [], 0
    while i < len(data) and data[i]:
        n = data[i]
        if n > 63 or i + 1 + n > len(data):
            return None
        labels.append(data[i + 1 : i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    return ".".join(labels) or None


def _opt(code: int, value: bytes) -> bytes:
    return _OPT.pack(code, len(value)) + value


def _status(code: int, message: str = "") -> bytes:
    return _opt(OPT_STATUS_CODE, struct.pack("!H", code) + message.encode())


@dataclass
class _Binding:
    ip: IPv6Address
    expires: float
    mac: str
    hostname: str | None
    static: bool


_Key = tuple[bytes, int]  # (client DUID, IAID)


# --------------------------------------------------------------------------- server


class Dhcpv6Server:
    """Sans-IO DHCPv6 server; see the module docstring for the theory of operation."""

    def __init__(self, config: Dhcpv6Config) -> None:
        self.config = config
        assert config.pool is not None and config.static_leases is not None
        assert config.reserved is not None and config.dns_servers is not None
        self._static = dict(config.static_leases)
        self._static_ips = set(self._static.values())
        self._reserved = set(config.reserved)
        self._pool_lo, self._pool_hi = int(config.pool[0]), int(config.pool[1])
        self._bindings: dict[_Key, _Binding] = {}
        self._offers: dict[_Key, tuple[IPv6Address, float]] = {}
        self._owner: dict[IPv6Address, _Key] = {}  # bindings and offers
        self._declined: dict[IPv6Address, float] = {}
        self._history: OrderedDict[_Key, IPv6Address] = OrderedDict()
        self._events: deque[LeaseGranted | LeaseReleased] = deque(
            maxlen=max(1, config.event_queue_size)
        )
        self.stats = Dhcpv6Stats()
        self.server_duid = config.server_duid
        self._config_options = self._build_config_options()
        # New addresses: `_cursor` walks the pool once (everything at or above it was never
        # handed out by it); addresses handed back below it wait in a heap (lowest first,
        # `_freed_set` keeps it free of duplicates; an entry taken meanwhile is dropped).
        self._cursor = self._pool_lo
        self._freed: list[int] = []
        self._freed_set: set[int] = set()
        # Which switch port each IA holding an offer or a binding asked from, and how many
        # such IAs each port has (for `max_leases_per_port`).
        self._key_port: dict[_Key, int] = {}
        self._port_holds: dict[int, int] = {}
        self._port: int | None = None  # the port of the request being handled
        self._refusal_logged = -REFUSAL_LOG_INTERVAL
        # Deadlines of offers, bindings and quarantines: (when, seq, kind, key), checked
        # against the live state when reached, so expiry is O(expired), not O(everything).
        self._deadlines: list[tuple[float, int, str, object]] = []
        self._deadline_seq = 0

    # ---------------------------------------------------------------- public API

    def handle(
        self,
        payload: bytes,
        src_ip: IPv6Address,
        src_mac: bytes | None,
        now: float,
        port: int | None = None,
    ) -> Dhcpv6Reply | None:
        """Process one client message; the reply to send, if any. Never raises.
        `port`: the switch port it came in on (None: unknown, no per-port limit)."""
        self._port = port
        try:
            req = _parse_request(bytes(payload))
        except (_Malformed, ValueError) as exc:
            self.stats.malformed += 1
            log.debug("dhcpv6.malformed", src=str(src_ip), error=str(exc))
            return None
        try:
            body = self._dispatch(req, src_mac, now)
        except Exception:  # pragma: no cover - defensive: a bug must not kill the stack
            self.stats.malformed += 1
            log.exception("dhcpv6.internal_error")
            return None
        if body is None:
            return None
        return Dhcpv6Reply(body, src_ip, src_mac)

    def leases(self, now: float) -> list[Lease]:
        self.expire(now)
        return sorted(
            (
                Lease(b.mac, b.ip, b.expires, b.hostname, b.static, duid.hex(), iaid)
                for (duid, iaid), b in self._bindings.items()
            ),
            key=lambda lease: lease.ip,
        )

    def restore_lease(self, lease: Lease, now: float) -> bool:
        """Bind a dynamic lease remembered from an earlier run (the state file, which keeps
        `duid` and `iaid` too); False when expired, outside the pool, or taken meanwhile.
        A malformed one (MAC, DUID, IAID, address, times) is refused, counted
        (`stats.restore_rejected`) and logged: its events would reach the stack later."""
        try:
            if not isinstance(lease.ip, IPv6Address):
                raise ValueError(f"address {lease.ip!r} is not an IPv6Address")
            mac = normalize_mac(lease.mac) if lease.mac else ""
            if not isinstance(lease.duid, str) or not isinstance(lease.iaid, int):
                raise ValueError("duid must be hex text and iaid an integer")
            key = (bytes.fromhex(lease.duid), lease.iaid)
            if not 3 <= len(key[0]) <= 130 or not 0 <= lease.iaid <= 0xFFFFFFFF:
                raise ValueError("DUID of 3..130 bytes and a 32-bit IAID expected")
            expires = float(lease.expires)
            if expires != expires:  # NaN would never expire
                raise ValueError("expiry is not a number")
            hostname = lease.hostname
            if hostname is not None and not isinstance(hostname, str):
                raise ValueError("hostname is not text")
        except (TypeError, ValueError) as exc:
            self.stats.restore_rejected += 1
            log.warning("dhcpv6.restore_rejected", ip=str(lease.ip), error=str(exc))
            return False
        if expires <= now or key in self._bindings:
            return False
        if not self._in_pool(lease.ip) or not self._is_free(lease.ip, key):
            return False
        if self._static_for(key, mac) is not None or not self._room_for(key):
            return False
        self._bindings[key] = _Binding(lease.ip, expires, mac, hostname, False)
        self._deadline(expires, "binding", key)
        self._owner[lease.ip] = key
        self._history[key] = lease.ip
        return True

    def next_event(self) -> LeaseGranted | LeaseReleased | None:
        return self._events.popleft() if self._events else None

    def expire(self, now: float) -> None:
        """Reclaim expired offers, bindings and DECLINE quarantines (from a deadline heap:
        the cost is the number expired, not the number held)."""
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if not self._deadline_live(entry):
                continue  # renewed, bound, released or re-declined meanwhile
            _, _, kind, what = entry
            if kind == "offer":
                key: _Key = what  # type: ignore[assignment]
                ip = self._offers.pop(key)[0]
                if self._owner.get(ip) == key and key not in self._bindings:
                    self._disown(ip)
                self._let_go(key)
            elif kind == "binding":
                self._unbind(what, "expired")  # type: ignore[arg-type]
                self.stats.expired += 1
            else:
                del self._declined[what]  # type: ignore[arg-type]
                self._hand_back(what)  # type: ignore[arg-type]
        live = len(self._offers) + len(self._bindings) + len(self._declined)
        if len(heap) > 2 * live + 64:  # renewals leave stale entries: drop them now and then
            self._deadlines = heap = [e for e in heap if self._deadline_live(e)]
            heapq.heapify(heap)

    def _deadline_live(self, entry: tuple[float, int, str, object]) -> bool:
        when, _, kind, what = entry
        if kind == "offer":
            offer = self._offers.get(what)  # type: ignore[arg-type]
            return offer is not None and offer[1] == when
        if kind == "binding":
            b = self._bindings.get(what)  # type: ignore[arg-type]
            return b is not None and b.expires == when
        return self._declined.get(what) == when  # type: ignore[call-overload]

    def _deadline(self, when: float, kind: str, what: object) -> None:
        self._deadline_seq += 1
        heapq.heappush(self._deadlines, (when, self._deadline_seq, kind, what))

    # ---------------------------------------------------------------- dispatch

    def _dispatch(self, req: _Request, src_mac: bytes | None, now: float) -> bytes | None:
        t = req.msg_type
        ours = req.server_id == self.server_duid
        # RFC 8415 16: which identifiers each message must (not) carry, else discard
        if t in (SOLICIT, CONFIRM, REBIND):
            valid = req.client_id is not None and req.server_id is None
        elif t in (REQUEST, RENEW, RELEASE, DECLINE):
            valid = req.client_id is not None and ours
        elif t == INFORMATION_REQUEST:
            valid = (req.server_id is None or ours) and not req.ia_nas and not req.has_other_ia
        else:
            valid = False  # server-side types and relay messages
        if not valid:
            self.stats.ignored += 1
            return None
        self.expire(now)
        if t == INFORMATION_REQUEST:
            self.stats.information_requests += 1
            return self._reply(REPLY, req, [_opt(OPT_INFORMATION_REFRESH_TIME, self._irt())])
        assert req.client_id is not None
        mac = self._client_mac(req.client_id, src_mac)
        if t == SOLICIT:
            self.stats.solicits += 1
            return self._on_solicit(req, mac, now)
        if t == REQUEST:
            self.stats.requests += 1
            return self._reply(REPLY, req, self._bind_all(req, mac, now))
        if t == CONFIRM:
            self.stats.confirms += 1
            return self._on_confirm(req)
        if t in (RENEW, REBIND):
            if t == RENEW:
                self.stats.renews += 1
            else:
                self.stats.rebinds += 1
            return self._on_extend(req, mac, now, rebind=t == REBIND)
        if t == RELEASE:
            self.stats.releases += 1
            return self._on_release(req, "released")
        self.stats.declines += 1
        return self._on_release(req, "declined", now)

    def _on_solicit(self, req: _Request, mac: str, now: float) -> bytes:
        duid = req.client_id or b""  # present: _dispatch checked
        if req.rapid_commit and self.config.rapid_commit:
            self.stats.rapid_commits += 1
            extra = self._bind_all(req, mac, now)
            return self._reply(REPLY, req, [*extra, _opt(OPT_RAPID_COMMIT, b"")])
        out = []
        any_addr = False
        for n, ia in enumerate(req.ia_nas):
            key = (duid, ia.iaid)
            ip = self._choose(key, mac, ia.addresses, now) if self._ia_allowed(n, now) else None
            if ip is None:
                self.stats.no_addrs += 1
                out.append(self._ia_status(ia.iaid, NO_ADDRS_AVAIL, "no addresses available"))
                continue
            any_addr = True
            if key not in self._bindings:
                self._offers[key] = (ip, now + self.config.offer_timeout)
                self._deadline(now + self.config.offer_timeout, "offer", key)
                self._owner[ip] = key
                self._hold(key, ip)
            out.append(self._ia(ia.iaid, ip, self.config.lease_time))
        if req.ia_nas and not any_addr:
            out.append(_status(NO_ADDRS_AVAIL, "no addresses available"))
        out.append(_opt(OPT_PREFERENCE, bytes([self.config.preference])))
        return self._reply(ADVERTISE, req, out)

    def _bind_all(self, req: _Request, mac: str, now: float) -> list[bytes]:
        duid = req.client_id or b""  # present: _dispatch checked
        out = []
        for n, ia in enumerate(req.ia_nas):
            key = (duid, ia.iaid)
            ip = self._choose(key, mac, ia.addresses, now) if self._ia_allowed(n, now) else None
            if ip is None:
                self.stats.no_addrs += 1
                out.append(self._ia_status(ia.iaid, NO_ADDRS_AVAIL, "no addresses available"))
                continue
            self._bind(key, ip, mac, req.hostname, now)
            out.append(self._ia(ia.iaid, ip, self.config.lease_time))
        return out

    def _on_confirm(self, req: _Request) -> bytes | None:
        addrs = [a for ia in req.ia_nas for a in ia.addresses]
        if not addrs:
            return None  # RFC 8415 18.3.3: nothing to confirm, no reply
        if all(a in self.config.prefix for a in addrs):
            return self._reply(REPLY, req, [_status(SUCCESS, "on link")])
        return self._reply(REPLY, req, [_status(NOT_ON_LINK, "not on this link")])

    def _on_extend(self, req: _Request, mac: str, now: float, rebind: bool) -> bytes | None:
        duid = req.client_id or b""  # present: _dispatch checked
        out = []
        for ia in req.ia_nas:
            key = (duid, ia.iaid)
            b = self._bindings.get(key)
            if b is None and not rebind:
                out.append(self._ia_status(ia.iaid, NO_BINDING, "no binding for this IA"))
                continue
            if b is None:
                wanted = [a for a in ia.addresses if self._acceptable(key, mac, a)]
                if wanted and not self._may_hold(key, wanted[0], now):
                    self.stats.no_addrs += 1
                    out.append(self._ia_status(ia.iaid, NO_ADDRS_AVAIL, "no addresses available"))
                    continue
                if not wanted:  # not ours to give: tell the client to stop using them
                    out.append(self._ia_zero(ia.iaid, ia.addresses))
                    continue
                ip = wanted[0]
            else:
                ip = b.ip
            self._bind(key, ip, mac, req.hostname, now)
            stale = [a for a in ia.addresses if a != ip]
            out.append(self._ia(ia.iaid, ip, self.config.lease_time, stale))
        return self._reply(REPLY, req, out)

    def _on_release(self, req: _Request, reason: str, now: float = 0.0) -> bytes:
        duid = req.client_id or b""  # present: _dispatch checked
        out = []
        for ia in req.ia_nas:
            key = (duid, ia.iaid)
            b = self._bindings.get(key)
            if b is None or (ia.addresses and b.ip not in ia.addresses):
                out.append(self._ia_status(ia.iaid, NO_BINDING, "no binding for this IA"))
                continue
            self._unbind(key, reason)
            if reason == "declined" and not b.static:
                self._declined[b.ip] = now + self.config.decline_hold
                self._deadline(now + self.config.decline_hold, "declined", b.ip)
                self._history.pop(key, None)
        return self._reply(REPLY, req, [_status(SUCCESS, reason), *out])

    # ---------------------------------------------------------------- addresses

    def _client_mac(self, duid: bytes, src_mac: bytes | None) -> str:
        mac = src_mac if src_mac is not None else mac_from_duid(duid)
        return normalize_mac(mac) if mac is not None and len(mac) == 6 else ""

    def _static_for(self, key: _Key, mac: str) -> IPv6Address | None:
        ip = self._static.get("duid:" + key[0].hex())
        if ip is None and mac:
            ip = self._static.get(mac)
        if ip is None:
            duid_mac = mac_from_duid(key[0])
            if duid_mac is not None:
                ip = self._static.get(normalize_mac(duid_mac))
        if ip is None:
            return None
        owner = self._owner.get(ip)
        # one static address per client: its first IA has it, other IAs use the pool
        return ip if owner is None or owner == key else None

    def _is_free(self, ip: IPv6Address, key: _Key | None) -> bool:
        owner = self._owner.get(ip)
        return (
            (owner is None or owner == key)
            and ip not in self._reserved
            and ip not in self._static_ips
            and ip not in self._declined
        )

    def _in_pool(self, ip: IPv6Address) -> bool:
        return self._pool_lo <= int(ip) <= self._pool_hi

    def _acceptable(self, key: _Key, mac: str, ip: IPv6Address) -> bool:
        static = self._static_for(key, mac)
        if static is not None:
            return ip == static
        return self._in_pool(ip) and self._is_free(ip, key) and self._room_for(key)

    def _room_for(self, key: _Key) -> bool:
        """Whether `key` may hold an address: it does already, or bindings and outstanding
        offers together are below `max_leases`."""
        if key in self._bindings or key in self._offers:
            return True
        return len(self._bindings) + len(self._offers) < self.config.max_leases

    def _choose(
        self, key: _Key, mac: str, hints: list[IPv6Address], now: float
    ) -> IPv6Address | None:
        static = self._static_for(key, mac)
        if static is not None:
            return static
        if key in self._bindings:
            return self._bindings[key].ip
        if key in self._offers:
            return self._offers[key][0]
        if not self._room_for(key) or self._over_port_limit(key, now):
            return None
        old = self._history.get(key)
        if old is not None and self._is_free(old, key) and self._in_pool(old):
            return old
        for hint in hints:
            if self._in_pool(hint) and self._is_free(hint, key):
                return hint
        return self._next_free(key)

    def _next_free(self, key: _Key) -> IPv6Address | None:
        """A free pool address: the lowest handed back below the cursor, else the cursor's.
        Every address is passed by the cursor once and leaves the heap once per hand-back,
        so a full pool costs nothing and a free address O(log n) amortised."""
        while self._freed:
            n = heapq.heappop(self._freed)
            self._freed_set.discard(n)
            ip = IPv6Address(n)
            if self._is_free(ip, key):
                return ip
        while self._cursor <= self._pool_hi:
            ip = IPv6Address(self._cursor)
            self._cursor += 1
            if self._is_free(ip, key):
                return ip
        return None

    def _hand_back(self, ip: IPv6Address) -> None:
        """`ip` may be free again: a candidate for `_next_free` if the cursor passed it."""
        n = int(ip)
        if self._pool_lo <= n < self._cursor and n not in self._freed_set:
            self._freed_set.add(n)
            heapq.heappush(self._freed, n)

    def _disown(self, ip: IPv6Address) -> None:
        del self._owner[ip]
        self._hand_back(ip)

    # ---------------------------------------------------------------- limits

    def _ia_allowed(self, n: int, now: float) -> bool:
        """Whether the `n`-th IA_NA (from 0) of a message is served at all."""
        if n < MAX_IA_PER_REQUEST:
            return True
        self.stats.ia_limit_refused += 1
        self._log_refusal(now, f"more than {MAX_IA_PER_REQUEST} IA_NA in one message")
        return False

    def _may_hold(self, key: _Key, ip: IPv6Address, now: float) -> bool:
        """Whether `key` may bind `ip` it asked for (a REBIND without binding)."""
        return ip in self._static_ips or not self._over_port_limit(key, now)

    def _over_port_limit(self, key: _Key, now: float) -> bool:
        """True (counted, logged now and then) when `key` would be a new holder on a port
        that already holds `max_leases_per_port` offers and bindings."""
        limit = self.config.max_leases_per_port
        port = self._port
        if not limit or port is None:
            return False
        if self._key_port.get(key) == port or self._port_holds.get(port, 0) < limit:
            return False
        self.stats.port_limit_refused += 1
        self._log_refusal(now, f"port {port} holds {limit} addresses (the limit)")
        return True

    def _log_refusal(self, now: float, why: str) -> None:
        if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL:
            self._refusal_logged = now
            log.warning(
                "dhcpv6.refused",
                why=why,
                port_limit_refused=self.stats.port_limit_refused,
                ia_limit_refused=self.stats.ia_limit_refused,
            )

    def _hold(self, key: _Key, ip: IPv6Address) -> None:
        """`key` holds an offer or a binding of `ip`: count it against its request's port."""
        port = self._port
        if port is None or ip in self._static_ips:
            return
        old = self._key_port.get(key)
        if old == port:
            return
        if old is not None:
            self._drop_hold(old)
        self._key_port[key] = port
        self._port_holds[port] = self._port_holds.get(port, 0) + 1

    def _let_go(self, key: _Key) -> None:
        """`key` may have stopped holding anything: uncount it."""
        if key in self._bindings or key in self._offers:
            return
        port = self._key_port.pop(key, None)
        if port is not None:
            self._drop_hold(port)

    def _drop_hold(self, port: int) -> None:
        self._port_holds[port] -= 1
        if not self._port_holds[port]:
            del self._port_holds[port]

    def _bind(self, key: _Key, ip: IPv6Address, mac: str, hostname: str | None, now: float) -> None:
        old = self._bindings.get(key)
        if old is not None and old.ip != ip:
            self._unbind(key, "released")
        offer = self._offers.pop(key, None)
        if offer is not None and offer[0] != ip and self._owner.get(offer[0]) == key:
            self._disown(offer[0])
        expires = now + self.config.lease_time
        static = ip in self._static_ips
        self._bindings[key] = _Binding(ip, expires, mac, hostname, static)
        self._deadline(expires, "binding", key)
        self._owner[ip] = key
        self._hold(key, ip)
        self._history[key] = ip
        self._history.move_to_end(key)
        while len(self._history) > self.config.history_size:
            self._history.popitem(last=False)
        renewed = old is not None and old.ip == ip
        self._events.append(LeaseGranted(mac, ip, hostname, static, expires, renewed))

    def _unbind(self, key: _Key, reason: str) -> None:
        b = self._bindings.pop(key, None)
        if b is None:
            return
        if self._owner.get(b.ip) == key:
            self._disown(b.ip)
        self._let_go(key)
        self._events.append(LeaseReleased(b.mac, b.ip, b.hostname, reason))

    # ---------------------------------------------------------------- building

    def _irt(self) -> bytes:
        return struct.pack("!I", self.config.information_refresh_time)

    def _build_config_options(self) -> list[bytes]:
        out = []
        if self.config.dns_servers:
            out.append(_opt(OPT_DNS_SERVERS, b"".join(a.packed for a in self.config.dns_servers)))
        if self.config.domain_search:
            names = encode_domain_search(self.config.domain_search, compress=False)
            out.append(_opt(OPT_DOMAIN_LIST, names))
        return out

    def _ia(
        self, iaid: int, ip: IPv6Address, lifetime: int, stale: list[IPv6Address] | None = None
    ) -> bytes:
        t1, t2 = lifetime // 2, lifetime * 4 // 5
        addrs = _opt(OPT_IAADDR, _IAADDR.pack(ip.packed, lifetime, lifetime))
        for a in stale or ():
            addrs += _opt(OPT_IAADDR, _IAADDR.pack(a.packed, 0, 0))
        return _opt(OPT_IA_NA, _IA_NA.pack(iaid, t1, t2) + addrs)

    def _ia_zero(self, iaid: int, addrs: list[IPv6Address]) -> bytes:
        body = b"".join(_opt(OPT_IAADDR, _IAADDR.pack(a.packed, 0, 0)) for a in addrs)
        return _opt(OPT_IA_NA, _IA_NA.pack(iaid, 0, 0) + body)

    def _ia_status(self, iaid: int, code: int, message: str) -> bytes:
        return _opt(OPT_IA_NA, _IA_NA.pack(iaid, 0, 0) + _status(code, message))

    def _reply(self, msg_type: int, req: _Request, extra: list[bytes]) -> bytes:
        if msg_type == ADVERTISE:
            self.stats.advertises += 1
        else:
            self.stats.replies += 1
        out = bytearray([msg_type]) + req.xid
        out += _opt(OPT_SERVERID, self.server_duid)
        if req.client_id is not None:
            out += _opt(OPT_CLIENTID, req.client_id)
        for o in extra:
            out += o
        for o in self._config_options:
            out += o
        return bytes(out)
