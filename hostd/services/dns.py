"""DNS service of the virtual gateway: local authoritative zones + an upstream forwarder.

Theory of operation
-------------------
The guest sends its DNS queries to the gateway (``192.168.127.1:53``). hostd's userspace
stack terminates that traffic and hands the raw DNS message (the UDP payload, or one
length-delimited TCP message) to :class:`DnsResolver`. The module is split in two halves:

* :class:`DnsResolver` is *sans-IO*. ``handle_query(data)`` decides synchronously what to do
  with one query and returns either

  - ``bytes``: a complete response to send back to the guest (a local answer, NXDOMAIN,
    NODATA, FORMERR, NOTIMP ...), or ``b""`` meaning "drop silently" (garbage shorter than a
    DNS header, or a message that is itself a response -- answering those would allow
    reflection loops), or
  - :class:`ForwardQuery`: the name is not in any local zone; the caller forwards
    ``ForwardQuery.data`` (the query bytes, untouched) with the edge's ``DnsForwarder``
    (:mod:`hostd.nat.dns`) and sends back whatever bytes the forwarder returns.

  Local data lives in :class:`DnsZones`: a set of zones for which the gateway is
  *authoritative*. Defaults (:func:`default_zones`) are ``containers.internal.`` and
  ``docker.internal.``, each holding ``gateway`` (the gateway IP) and ``host`` (the host IP),
  with AAAA records (the gateway's and the host loopback's IPv6 addresses) when IPv6 is on.
  A name inside one of our zones is never forwarded: unknown names get NXDOMAIN, known names
  asked for a type they don't have get NOERROR/NODATA (both with a synthetic SOA in the
  authority section whose TTL and MINIMUM are 0, so guests do not cache negative answers
  while records are being changed at run time through the API). The zone apex answers SOA
  queries with that SOA and everything else with NODATA. Matching is case-insensitive; the
  answer echoes the question's spelling. CNAMEs are chased while the target stays inside our
  zones (with loop detection -> SERVFAIL); a CNAME pointing outside our zones is returned
  alone and the guest's resolver chases the target itself (a stub resolver will re-query).
  Local responses carry AA and RA, the record's TTL, and honour the UDP size limit (512
  bytes, or the guest's EDNS0 payload size capped at 1232): an oversized UDP answer is sent
  with TC set and no records so that the guest retries over TCP.

* The asyncio half -- the forwarder that relays queries to the upstream resolvers, and the
  DNS-over-TCP session on the gateway's port 53 -- lives at the edge, in
  :mod:`hostd.nat.dns`. This module does no I/O: it imports neither asyncio nor threading
  and opens no socket (the gRPC API changes the zones on the loop that resolves).

:func:`upstreams_from_resolv_conf` and :func:`parse_upstream` build the upstream list
(``--dns-upstream``), :func:`parse_record_spec` parses ``--dns-record`` flags.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from dnslib import AAAA, CNAME, EDNS0, QTYPE, RR, SOA, A, DNSHeader, DNSLabel, DNSRecord

__all__ = [
    "DEFAULT_ZONE_NAMES",
    "DnsRecord",
    "DnsResolver",
    "DnsStats",
    "DnsZones",
    "ForwardQuery",
    "LocalAnswer",
    "default_zones",
    "error_response",
    "normalize_name",
    "parse_record_spec",
    "parse_upstream",
    "servfail_response",
    "upstreams_from_resolv_conf",
]

RecordType = Literal["A", "AAAA", "CNAME"]
RECORD_TYPES: tuple[str, ...] = ("A", "AAAA", "CNAME")
DEFAULT_ZONE_NAMES: tuple[str, ...] = ("containers.internal.", "docker.internal.")

MAX_TTL = 2**31 - 1
MAX_CNAME_CHAIN = 16
UDP_LIMIT_PLAIN = 512  # RFC 1035 limit for queries without EDNS0
UDP_LIMIT_EDNS = 1232  # DNS flag day 2020 recommendation; caps what we send over UDP

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4

_FLAG_QR = 0x8000
_FLAG_TC = 0x0200
_FLAG_RD = 0x0100
_FLAG_RA = 0x0080
_FLAG_CD = 0x0010
_OPCODE_MASK = 0x7800

_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


# --------------------------------------------------------------------------- names & records


def normalize_name(name: str | DNSLabel) -> str:
    """Lower-case *name* and make it fully qualified (exactly one trailing dot)."""
    text = str(name).strip().lower()
    return text.rstrip(".") + "."


def _name_error(name: str) -> str | None:
    """Return why *name* (already normalised) is not a valid host/zone name, or None."""
    if name == ".":
        return "must not be empty or the root"
    if len(name) > 254:  # 253 characters + trailing dot (255 bytes on the wire)
        return "is longer than 253 characters"
    for label in name[:-1].split("."):
        if not label:
            return "contains an empty label"
        if len(label) > 63:
            return f"label {label!r} is longer than 63 characters"
        if not _LABEL_RE.match(label):
            return f"label {label!r} has invalid characters (allowed: letters, digits, '-', '_')"
    return None


def _in_zone(name: str, zone: str) -> bool:
    return name == zone or name.endswith("." + zone)


@dataclass(frozen=True)
class DnsRecord:
    """One local resource record. ``name`` is normalised to a lower-case FQDN; for CNAME
    records the ``value`` (target) is normalised the same way. Validation happens in
    :meth:`DnsZones.add_records` (or :meth:`validate`)."""

    name: str
    rtype: RecordType
    value: str
    ttl: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.name, str):
            object.__setattr__(self, "name", normalize_name(self.name))
        if isinstance(self.rtype, str):
            object.__setattr__(self, "rtype", self.rtype.strip().upper())
        if isinstance(self.value, str):
            value = self.value.strip()
            if self.rtype == "CNAME":
                value = normalize_name(value)
            object.__setattr__(self, "value", value)

    def validate(self) -> None:
        """Raise ValueError naming the offending field if the record is not valid."""
        if not isinstance(self.name, str):
            raise ValueError(f"name: expected a string, got {type(self.name).__name__}")
        why = _name_error(self.name)
        if why:
            raise ValueError(f"name {self.name!r} {why}")
        if self.rtype not in RECORD_TYPES:
            raise ValueError(
                f"rtype {self.rtype!r} is not supported (expected one of {', '.join(RECORD_TYPES)})"
            )
        if isinstance(self.ttl, bool) or not isinstance(self.ttl, int):
            raise ValueError(f"ttl: expected an integer, got {self.ttl!r}")
        if not 0 <= self.ttl <= MAX_TTL:
            raise ValueError(f"ttl {self.ttl} is out of range 0..{MAX_TTL}")
        if not isinstance(self.value, str):
            raise ValueError(f"value: expected a string, got {type(self.value).__name__}")
        if self.rtype == "A":
            try:
                ipaddress.IPv4Address(self.value)
            except ValueError:
                raise ValueError(
                    f"value {self.value!r} is not a valid IPv4 address for A record {self.name}"
                ) from None
        elif self.rtype == "AAAA":
            try:
                ipaddress.IPv6Address(self.value)
            except ValueError:
                raise ValueError(
                    f"value {self.value!r} is not a valid IPv6 address for AAAA record {self.name}"
                ) from None
        else:
            why = _name_error(self.value)
            if why:
                raise ValueError(f"value (CNAME target) {self.value!r} {why}")
            if self.value == self.name:
                raise ValueError(f"value (CNAME target) {self.value!r} points to itself")

    def to_rr(self, owner: str | DNSLabel | None = None) -> RR:
        """dnslib RR for this record; *owner* overrides the owner name (to keep query case)."""
        rname = owner if owner is not None else self.name
        if self.rtype == "A":
            rdata = A(self.value)
        elif self.rtype == "AAAA":
            rdata = AAAA(self.value)
        else:
            rdata = CNAME(self.value)
        return RR(rname, getattr(QTYPE, self.rtype), ttl=self.ttl, rdata=rdata)


@dataclass
class LocalAnswer:
    """Result of :meth:`DnsZones.lookup` for a name inside one of our zones.

    ``answers`` is the answer section (CNAME chain first). ``soa_zone`` names the zone whose
    SOA goes into the authority section (negative answers) and ``soa_in_answer`` says the
    SOA itself is the answer (SOA query at a zone apex)."""

    rcode: int
    answers: list[DnsRecord]
    zone: str
    soa_zone: str | None = None
    soa_in_answer: bool = False


def _qtype_name(qtype: int | str) -> str:
    if isinstance(qtype, str):
        return qtype.strip().upper()
    return str(QTYPE.get(qtype, f"TYPE{qtype}"))


class DnsZones:
    """Local authoritative data, changed by the API between the stack's lookups (both run
    on hostd's one event loop, so no lock). Default zones come from :func:`default_zones`:
    ``containers.internal.`` and ``docker.internal.``, each with ``gateway`` -> gateway IP
    and ``host`` -> host IP."""

    def __init__(self) -> None:
        self._zones: dict[str, list[DnsRecord]] = {}
        # gvproxy's zone extras: records whose name is a regular expression (searched in the
        # name relative to the zone) and a catch-all address; both answer only names that
        # have no record of their own.
        self._patterns: dict[str, list[tuple[str, re.Pattern[str], str]]] = {}
        self._defaults: dict[str, str] = {}
        self.serial = 1  # bumped on every change; used as SOA serial

    # -- mutation -----------------------------------------------------------------------

    def add_zone(self, zone: str) -> str:
        """Create an (empty) zone if missing; returns the normalised zone name."""
        name = self._check_zone(zone)
        if name not in self._zones:
            self._zones[name] = []
            self.serial += 1
        return name

    def remove_zone(self, zone: str) -> bool:
        name = normalize_name(zone)
        removed = self._zones.pop(name, None) is not None
        self._patterns.pop(name, None)
        self._defaults.pop(name, None)
        if removed:
            self.serial += 1
        return removed

    def add_records(self, zone: str, records: list[DnsRecord]) -> None:
        """Add *records* to *zone* (created if missing). All-or-nothing: every record is
        validated first (ValueError naming the field). Re-adding an existing name/type/value
        updates its TTL. A name holding a CNAME can hold nothing else."""
        zname = self._check_zone(zone)
        for rec in records:
            if not isinstance(rec, DnsRecord):
                raise ValueError(f"records: expected DnsRecord, got {type(rec).__name__}")
            rec.validate()
            if not _in_zone(rec.name, zname):
                raise ValueError(f"name {rec.name!r} is not inside zone {zname!r}")
            if rec.rtype == "CNAME" and rec.name == zname:
                raise ValueError(f"rtype CNAME is not allowed at the zone apex {zname!r}")
        for rec in records:
            owner = self._zone_for(rec.name)
            if owner is not None and owner != zname and _in_zone(owner, zname):
                raise ValueError(f"name {rec.name!r} belongs to the more specific zone {owner!r}")
        # One pass, O(zone + records): a bulk add must not hold the loop (20,000 records
        # took 10.8 s when each record re-filtered the whole zone). Insertion order is
        # kept; a re-added record moves to the end with its new TTL.
        merged = {(r.name, r.rtype, r.value): r for r in self._zones.get(zname, [])}
        kinds: dict[str, Counter[str]] = {}
        for r in merged.values():
            kinds.setdefault(r.name, Counter())[r.rtype] += 1
        for rec in records:
            key = (rec.name, rec.rtype, rec.value)
            have = kinds.setdefault(rec.name, Counter())
            if merged.pop(key, None) is not None:
                have[rec.rtype] -= 1
            present = {t for t, n in have.items() if n > 0}
            if rec.rtype == "CNAME" and present:
                raise ValueError(
                    f"rtype CNAME: name {rec.name!r} already has other records "
                    f"({', '.join(sorted(present))})"
                )
            if rec.rtype != "CNAME" and "CNAME" in present:
                raise ValueError(f"rtype {rec.rtype}: name {rec.name!r} already has a CNAME")
            merged[key] = rec
            have[rec.rtype] += 1
        self._zones[zname] = list(merged.values())
        self.serial += 1

    def remove_records(self, zone: str, names: list[str]) -> int:
        """Remove every record owned by any of *names* in *zone*; returns how many records
        were removed (0 for an unknown zone). The zone itself stays (still authoritative)."""
        zname = normalize_name(zone)
        wanted = {normalize_name(n) for n in names}
        records = self._zones.get(zname)
        if records is None:
            return 0
        kept = [r for r in records if r.name not in wanted]
        removed = len(records) - len(kept)
        if removed:
            self._zones[zname] = kept
            self.serial += 1
        return removed

    def add_pattern(self, zone: str, pattern: str, address: str) -> None:
        """A record for every name of `zone` (relative to it) that `pattern` matches."""
        zname = self._check_zone(zone)
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"regexp {pattern!r}: {e}") from None
        _check_address(address)
        self._zones.setdefault(zname, [])
        patterns = self._patterns.setdefault(zname, [])
        if all((p, a) != (pattern, address) for p, _, a in patterns):
            patterns.append((pattern, compiled, address))
        self.serial += 1

    def remove_pattern(self, zone: str, pattern: str) -> int:
        zname = normalize_name(zone)
        patterns = self._patterns.get(zname, [])
        kept = [p for p in patterns if p[0] != pattern]
        self._patterns[zname] = kept
        if len(kept) != len(patterns):
            self.serial += 1
        return len(patterns) - len(kept)

    def set_default(self, zone: str, address: str | None) -> None:
        """The address every other name in `zone` resolves to (None: NXDOMAIN again)."""
        zname = self._check_zone(zone)
        if address:
            _check_address(address)
        self._zones.setdefault(zname, [])
        if address:
            self._defaults[zname] = address
        else:
            self._defaults.pop(zname, None)
        self.serial += 1

    def extras(self, zone: str) -> tuple[list[tuple[str, str]], str | None]:
        """(pattern, address) pairs and the catch-all address of `zone`."""
        zname = normalize_name(zone)
        patterns = [(p, a) for p, _, a in self._patterns.get(zname, [])]
        return patterns, self._defaults.get(zname)

    # -- queries ------------------------------------------------------------------------

    def zones(self) -> list[tuple[str, list[DnsRecord]]]:
        return [(z, list(recs)) for z, recs in sorted(self._zones.items())]

    def zone_for(self, name: str) -> str | None:
        """The most specific of our zones containing *name*, or None."""
        return self._zone_for(normalize_name(name))

    def lookup(self, qname: str | DNSLabel, qtype: int | str) -> LocalAnswer | None:
        """Resolve *qname*/*qtype* (class IN) from local data; None = not ours, forward."""
        name = normalize_name(qname)
        tname = _qtype_name(qtype)
        zone = self._zone_for(name)
        if zone is None:
            return None
        answers: list[DnsRecord] = []
        seen: set[str] = set()
        current, cur_zone = name, zone
        while True:
            recs = [r for r in self._zones[cur_zone] if r.name == current]
            if tname == "ANY" and recs:
                return LocalAnswer(RCODE_NOERROR, answers + recs, zone)
            matching = [r for r in recs if r.rtype == tname]
            if matching:
                return LocalAnswer(RCODE_NOERROR, answers + matching, zone)
            cname = next((r for r in recs if r.rtype == "CNAME"), None)
            if cname is not None:
                answers.append(cname)
                seen.add(current)
                if cname.value in seen or len(seen) > MAX_CNAME_CHAIN:
                    return LocalAnswer(RCODE_SERVFAIL, [], zone)
                target_zone = self._zone_for(cname.value)
                if target_zone is None:  # leaves our authority: the client chases it
                    return LocalAnswer(RCODE_NOERROR, answers, zone)
                current, cur_zone = cname.value, target_zone
                continue
            if current == cur_zone and tname == "SOA":
                return LocalAnswer(RCODE_NOERROR, answers, zone, cur_zone, soa_in_answer=True)
            if not recs and current != cur_zone:
                extra = self._extra(current, cur_zone)
                if extra is not None:
                    if tname in (extra.rtype, "ANY"):
                        return LocalAnswer(RCODE_NOERROR, [*answers, extra], zone)
                    return LocalAnswer(RCODE_NOERROR, answers, zone, soa_zone=cur_zone)
            exists = (
                bool(recs)
                or current == cur_zone
                or any(r.name.endswith("." + current) for r in self._zones[cur_zone])
            )
            rcode = RCODE_NOERROR if exists else RCODE_NXDOMAIN
            return LocalAnswer(rcode, answers, zone, soa_zone=cur_zone)

    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def _check_zone(zone: str) -> str:
        if not isinstance(zone, str):
            raise ValueError(f"zone: expected a string, got {type(zone).__name__}")
        name = normalize_name(zone)
        why = _name_error(name)
        if why:
            raise ValueError(f"zone {zone!r} {why}")
        return name

    def _extra(self, name: str, zone: str) -> DnsRecord | None:
        relative = name[: -len(zone) - 1]
        for _, compiled, address in self._patterns.get(zone, ()):
            if compiled.search(relative):
                return DnsRecord(name, "AAAA" if ":" in address else "A", address)
        default = self._defaults.get(zone)
        if default is not None:
            return DnsRecord(name, "AAAA" if ":" in default else "A", default)
        return None

    def _zone_for(self, name: str) -> str | None:
        best: str | None = None
        for zone in self._zones:
            if _in_zone(name, zone) and (best is None or len(zone) > len(best)):
                best = zone
        return best


def _check_address(address: str) -> None:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"address {address!r} is not an IPv4 or IPv6 address") from None


def default_zones(
    gateway: str, host: str, *, gateway6: str | None = None, host6: str | None = None
) -> DnsZones:
    """containers.internal. and docker.internal., each with gateway and host A records, and
    AAAA records beside them when IPv6 is served (`gateway6`, `host6` given)."""
    zones = DnsZones()
    for zone in DEFAULT_ZONE_NAMES:
        records = [DnsRecord(f"gateway.{zone}", "A", gateway), DnsRecord(f"host.{zone}", "A", host)]
        if gateway6 is not None:
            records.append(DnsRecord(f"gateway.{zone}", "AAAA", gateway6))
        if host6 is not None:
            records.append(DnsRecord(f"host.{zone}", "AAAA", host6))
        zones.add_records(zone, records)
    return zones


def parse_record_spec(
    spec: str, zones: DnsZones | Iterable[str] | None = None
) -> tuple[str, DnsRecord]:
    """Parse a ``--dns-record`` flag: ``NAME=TYPE:VALUE[@TTL]``.

    Examples: ``db.containers.internal=A:192.168.127.2``, ``v6.docker.internal=AAAA:fd00::2@60``,
    ``x.example.test=CNAME:db.containers.internal``. The zone is the longest existing zone
    (from *zones*, default: the default zone names) that is a suffix of NAME, else NAME's
    parent domain. Returns ``(zone, record)``; ValueError with a precise message otherwise."""
    where = f"invalid DNS record {spec!r}"
    if not isinstance(spec, str) or "=" not in spec:
        raise ValueError(f"{where}: expected NAME=TYPE:VALUE[@TTL]")
    name, _, rest = spec.strip().partition("=")
    if not name.strip():
        raise ValueError(f"{where}: NAME is empty (expected NAME=TYPE:VALUE[@TTL])")
    if ":" not in rest:
        raise ValueError(f"{where}: expected TYPE:VALUE after '=' (e.g. A:192.168.127.2)")
    rtype, _, value = rest.partition(":")
    rtype = rtype.strip().upper()
    if not rtype:
        raise ValueError(f"{where}: TYPE is empty (expected one of {', '.join(RECORD_TYPES)})")
    if rtype not in RECORD_TYPES:
        raise ValueError(
            f"{where}: TYPE {rtype!r} is not supported (expected one of {', '.join(RECORD_TYPES)})"
        )
    ttl = 0
    if "@" in value:
        value, _, ttl_text = value.rpartition("@")
        try:
            ttl = int(ttl_text.strip(), 10)
        except ValueError:
            raise ValueError(f"{where}: TTL {ttl_text!r} is not an integer") from None
    if not value.strip():
        raise ValueError(f"{where}: VALUE is empty")
    record = DnsRecord(name, rtype, value, ttl)  # type: ignore[arg-type]
    try:
        record.validate()
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None

    if zones is None:
        known: list[str] = list(DEFAULT_ZONE_NAMES)
    elif isinstance(zones, DnsZones):
        known = [z for z, _ in zones.zones()]
    else:
        known = [normalize_name(z) for z in zones]
    candidates = [z for z in known if _in_zone(record.name, z)]
    if candidates:
        return max(candidates, key=len), record
    parent = record.name.partition(".")[2]
    if not parent or parent == ".":
        raise ValueError(
            f"{where}: NAME {record.name!r} is a single label and not inside a known zone "
            f"({', '.join(known) or 'none'}); use a fully qualified name"
        )
    return parent, record


# --------------------------------------------------------------------------- wire helpers


def _question_bytes(msg: bytes) -> bytes | None:
    """Lower-cased wire bytes of the single question of *msg* (name + type + class), or None
    when there is not exactly one uncompressed, well-formed question."""
    if len(msg) < 12 or struct.unpack_from("!H", msg, 4)[0] != 1:
        return None
    pos = 12
    while True:
        if pos >= len(msg):
            return None
        length = msg[pos]
        if length & 0xC0:
            return None
        pos += 1 + length
        if length == 0:
            break
    if pos + 4 > len(msg):
        return None
    return msg[12 : pos + 4].lower()


def error_response(query: bytes, rcode: int, *, copy_question: bool = True) -> bytes:
    """A header-level error response (FORMERR/SERVFAIL/NOTIMP...) for *query*: same id,
    opcode, RD and CD, QR+RA set, the question copied when it is well formed. Returns b""
    when *query* has no complete 12-byte header."""
    query = bytes(query)
    if len(query) < 12:
        return b""
    qid, qflags = struct.unpack_from("!HH", query, 0)
    flags = _FLAG_QR | _FLAG_RA | (qflags & (_OPCODE_MASK | _FLAG_RD | _FLAG_CD)) | (rcode & 0xF)
    question = _question_bytes(query) if copy_question else None
    if question is not None:
        question = query[12 : 12 + len(question)]  # original case
        return struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 0) + question
    return struct.pack("!HHHHHH", qid, flags, 0, 0, 0, 0)


def servfail_response(query: bytes) -> bytes:
    """SERVFAIL for *query* (same id, question copied)."""
    return error_response(query, RCODE_SERVFAIL)


def _soa_rr(zone: str, serial: int) -> RR:
    soa = SOA(f"ns.{zone}", f"hostmaster.{zone}", (serial & 0xFFFFFFFF, 3600, 600, 86400, 0))
    return RR(zone, QTYPE.SOA, ttl=0, rdata=soa)


# --------------------------------------------------------------------------- resolver


@dataclass
class ForwardQuery:
    """The query is not for one of our zones: forward ``data`` unchanged upstream."""

    data: bytes
    qid: int
    qname: str = ""
    qtype: str = ""
    tcp: bool = False


@dataclass
class DnsStats:
    """Counters. ``queries`` counts every message of >= 12 bytes handed to handle_query;
    ``local_answers`` the NOERROR responses built locally (incl. NODATA); ``nxdomain``,
    ``formerr``, ``notimp`` the respective locally built errors; ``servfail`` the local
    SERVFAILs (CNAME loops + :meth:`DnsResolver.servfail` calls); ``dropped`` the messages
    dropped without reply; ``truncated`` local UDP answers sent with TC."""

    queries: int = 0
    local_answers: int = 0
    nxdomain: int = 0
    forwarded: int = 0
    servfail: int = 0
    formerr: int = 0
    notimp: int = 0
    dropped: int = 0
    truncated: int = 0


class DnsResolver:
    """Sans-IO gateway DNS logic; see the module docstring."""

    def __init__(self, zones: DnsZones) -> None:
        self.zones = zones
        self.stats = DnsStats()

    def handle_query(self, data: bytes, *, tcp: bool = False) -> bytes | ForwardQuery:
        """Decide what to do with one query message (without any transport framing).
        *tcp* says the guest asked over TCP (no 512-byte/EDNS size limit on the answer)."""
        data = bytes(data)
        if len(data) < 12:
            self.stats.dropped += 1
            return b""
        self.stats.queries += 1
        qflags = struct.unpack_from("!H", data, 2)[0]
        if qflags & _FLAG_QR:  # a response, not a query: never answer (reflection loops)
            self.stats.dropped += 1
            return b""
        if (qflags & _OPCODE_MASK) >> 11 != 0:  # only standard QUERY
            self.stats.notimp += 1
            return error_response(data, RCODE_NOTIMP)
        try:
            query = DNSRecord.parse(data)
        except Exception:  # dnslib raises DNSError, but also struct/Unicode errors on junk
            self.stats.formerr += 1
            return error_response(data, RCODE_FORMERR, copy_question=False)
        opts = [rr for rr in query.ar if rr.rtype == QTYPE.OPT]
        if len(query.questions) != 1 or len(opts) > 1:
            self.stats.formerr += 1
            return error_response(data, RCODE_FORMERR)
        question = query.q
        answer: LocalAnswer | None = None
        if question.qclass in (1, 255):  # IN / ANY
            answer = self.zones.lookup(question.qname, question.qtype)
        if answer is None:
            self.stats.forwarded += 1
            return ForwardQuery(
                data=data,
                qid=query.header.id,
                qname=str(question.qname),
                qtype=_qtype_name(question.qtype),
                tcp=tcp,
            )
        return self._build_response(query, answer, opts[0] if opts else None, tcp)

    def servfail(self, query: bytes) -> bytes:
        """SERVFAIL response for *query* (same id, question copied); b"" if < 12 bytes."""
        self.stats.servfail += 1
        return servfail_response(query)

    def _build_response(
        self, query: DNSRecord, answer: LocalAnswer, opt: RR | None, tcp: bool
    ) -> bytes:
        header = DNSHeader(
            id=query.header.id,
            qr=1,
            aa=1,
            ra=1,
            rd=query.header.rd,
            cd=query.header.cd,
            rcode=answer.rcode,
        )
        reply = DNSRecord(header, q=query.q)
        qname = query.q.qname
        wanted = normalize_name(qname)
        for rec in answer.answers:
            reply.add_answer(rec.to_rr(qname if rec.name == wanted else None))
        if answer.soa_zone is not None:
            soa = _soa_rr(answer.soa_zone, self.zones.serial)
            if answer.soa_in_answer:
                soa.rname = qname
                reply.add_answer(soa)
            else:
                reply.add_auth(soa)
        if opt is not None:
            reply.add_ar(EDNS0(udp_len=UDP_LIMIT_EDNS))
        wire = bytes(reply.pack())
        limit = (
            UDP_LIMIT_PLAIN
            if opt is None
            else max(UDP_LIMIT_PLAIN, min(opt.rclass, UDP_LIMIT_EDNS))
        )
        if not tcp and len(wire) > limit:
            reply.rr, reply.auth = [], []
            reply.header.tc = 1
            wire = bytes(reply.pack())
            self.stats.truncated += 1
        if answer.rcode == RCODE_NXDOMAIN:
            self.stats.nxdomain += 1
        elif answer.rcode == RCODE_SERVFAIL:
            self.stats.servfail += 1
        else:
            self.stats.local_answers += 1
        return wire


# --------------------------------------------------------------------------- configuration


def parse_upstream(spec: str) -> tuple[str, int]:
    """``"127.0.0.1"``, ``"127.0.0.1:5353"``, ``"::1"``, ``"[::1]"``, ``"[::1]:53"`` ->
    (host, port); IP literals only (default port 53). ValueError otherwise."""
    where = f"invalid DNS upstream {spec!r}"
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{where}: expected IP, IP:PORT or [IPv6]:PORT")
    text = spec.strip()
    port_text: str | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{where}: missing ']' after IPv6 address")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{where}: expected ':PORT' after ']'")
            port_text = rest[1:]
        version = 6
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        version = 4
    elif ":" in text:
        host, version = text, 6  # bare IPv6 without port
    else:
        host, version = text, 4
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{where}: {host!r} is not an IP address") from None
    if addr.version != version:
        raise ValueError(f"{where}: IPv6 addresses with a port must be written [ADDR]:PORT")
    port = 53
    if port_text is not None:
        if not port_text.isdigit():
            raise ValueError(f"{where}: port {port_text!r} is not a number")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError(f"{where}: port {port} is out of range 1..65535")
    return str(host), port


def upstreams_from_resolv_conf(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """``nameserver`` entries of a resolv.conf (IPv4 and IPv6, incl. ``%scope``), port 53,
    in file order without duplicates. Invalid entries are skipped; a missing/unreadable
    file gives []."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.readlines()
    except OSError:
        return []
    result: list[tuple[str, int]] = []
    for line in lines:
        line = re.split(r"[#;]", line, maxsplit=1)[0]
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        host = words[1]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            continue
        if (host, 53) not in result:
            result.append((host, 53))
    return result
