"""Outbound policy: which host destinations a guest's new flows may reach.

A rule is `CIDR[:PORT[-PORT]][/tcp|udp|icmp]` or, in place of the CIDR, the group `host`
(every IPv4 and IPv6 address of the host's own interfaces, loopback included, and so the
targets of .254 and of the IPv6 host-loopback address). An IPv6 CIDR stands bare when it has
no ports (`2001:db8::/32`, `::/0/udp`) and in brackets when it has (`[::1]:22/tcp`).
Rules are tried in order and the first that matches decides; nothing matching means allow.
Both families share one rule list: a v4 CIDR matches only IPv4 destinations and a v6 one
only IPv6 ones, except `0.0.0.0/0` (the usual "everything else"), which matches every
destination of both, so a policy written before IPv6 existed (`... --deny 0.0.0.0/0`) still
denies what it did not allow; `::/0` is IPv6 only.
Rules added through the API are tried before the ones given as flags (so an operator can
open or close something at run time without restarting), and only they are written to the
state file: flags stay the source of truth for themselves.

The check runs on the slow path only (a TCP SYN, a datagram that opens a UDP NAT flow, an
echo request, a DNS query forwarded upstream), never per packet of an open flow; rules
changed at run time therefore apply to new flows. This module is pure data: the network
core asks `check` and answers a refusal itself (RST, ICMP administratively prohibited).
"""

from __future__ import annotations

import ipaddress
import itertools
from collections import Counter, deque
from dataclasses import dataclass, field

PROTOCOLS = ("tcp", "udp", "icmp")
HOST_GROUP = "host"
RECENT_FLOWS = 256  # the connections view: this many recent verdicts are kept
MAX_RULES = 1024
_LOOPBACK_V6 = ipaddress.IPv6Address("::1").packed
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    action: str  # "allow" | "deny"
    network: IPNetwork | None  # None: the host group
    ports: tuple[int, int] | None
    protocol: str | None
    static: bool = False  # from a flag (not changeable through the API, not persisted)

    @property
    def target(self) -> str:
        net = self.network
        if net is None:
            where = HOST_GROUP
        else:
            where = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        if self.ports is not None:
            lo, hi = self.ports
            if net is not None and net.version == 6:
                where = f"[{where}]"  # the port's colon must not read as the address's
            where += f":{lo}" if lo == hi else f":{lo}-{hi}"
        if self.protocol:
            where += "/" + self.protocol
        return where

    def __str__(self) -> str:
        return f"{self.action} {self.target}"


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:80] + "...")


def parse_rule(action: str, text: str, static: bool = False) -> Rule:
    """`CIDR[:PORT[-PORT]][/tcp|udp|icmp]` (or `host` for the CIDR) → Rule; PolicyError
    naming what is wrong."""
    if action not in ("allow", "deny"):
        raise PolicyError(f"action: {action!r} is not allow or deny")
    spec = text.strip()
    if not spec:
        raise PolicyError("rule: is empty")
    protocol = None
    head, slash, tail = spec.rpartition("/")
    if slash and tail.lower() in PROTOCOLS:
        protocol, spec = tail.lower(), head
    ports = None
    port_text = None
    if spec.startswith("["):  # [IPv6 address or CIDR]:PORT[-PORT]
        inner, bracket, rest = spec[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise PolicyError(
                f"rule {_short(text)}: expected [IPv6 CIDR]:PORT[-PORT] after the '['"
            )
        spec, port_text = inner, (rest[1:] if rest else None)
        if ":" not in spec:
            raise PolicyError(f"rule {_short(text)}: brackets are for IPv6 addresses only")
    elif spec.count(":") == 1:  # IPv4 CIDR or host, then :PORT; a bare IPv6 CIDR has 2+
        spec, _, port_text = spec.rpartition(":")
    if port_text is not None:
        lo_text, dash, hi_text = port_text.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if dash else lo
        except ValueError:
            raise PolicyError(f"rule {_short(text)}: port {port_text!r} is not N or N-M") from None
        if not (1 <= lo <= hi <= 65535):
            raise PolicyError(f"rule {_short(text)}: ports must be 1..65535, low before high")
        if protocol == "icmp":
            raise PolicyError(f"rule {_short(text)}: icmp has no ports")
        ports = (lo, hi)
    network: IPNetwork | None = None
    if spec.lower() != HOST_GROUP:
        try:
            network = ipaddress.ip_network(spec, strict=False)
        except ValueError:
            raise PolicyError(
                f"rule {_short(text)}: {_short(spec)} is not an IPv4/IPv6 CIDR or 'host' "
                "(expected CIDR[:PORT[-PORT]][/tcp|udp|icmp], [IPv6 CIDR]:PORT for IPv6 "
                "with ports)"
            ) from None
    return Rule(action, network, ports, protocol, static)


@dataclass(frozen=True)
class FlowVerdict:
    time: float
    protocol: str
    source: str  # guest ip:port
    destination: str  # host-side ip:port (after .254's translation)
    allowed: bool
    rule: str  # the rule that decided, "" for the default


@dataclass
class Policy:
    static_rules: list[Rule] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)  # added at run time: tried first
    host_addresses: frozenset[bytes] = frozenset()
    recent: deque[FlowVerdict] = field(default_factory=lambda: deque(maxlen=RECENT_FLOWS))
    counters: Counter[str] = field(default_factory=Counter)

    @property
    def active(self) -> bool:
        return bool(self.rules or self.static_rules)

    def all_rules(self) -> list[Rule]:
        return self.rules + self.static_rules

    def add(self, rule: Rule, index: int | None = None) -> int:
        """Insert a run-time rule at `index` (None: last of the run-time rules)."""
        if len(self.rules) >= MAX_RULES:
            raise PolicyError(f"rules: at most {MAX_RULES} run-time rules")
        if index is None or index >= len(self.rules):
            self.rules.append(rule)
            return len(self.rules) - 1
        if index < 0:
            raise PolicyError("index: must not be negative")
        self.rules.insert(index, rule)
        return index

    def remove(self, index: int) -> Rule:
        if not 0 <= index < len(self.rules):
            raise PolicyError(
                f"index: {index} is not a run-time rule (0..{len(self.rules) - 1}); "
                "rules given as flags cannot be removed at run time"
            )
        return self.rules.pop(index)

    def _matches(self, rule: Rule, proto: str, dst: bytes, port: int) -> bool:
        if rule.protocol is not None and rule.protocol != proto:
            return False
        ports = rule.ports
        if ports is not None and (proto == "icmp" or not ports[0] <= port <= ports[1]):
            return False
        if rule.network is None:
            if len(dst) == 4:
                return dst[0] == 127 or dst in self.host_addresses
            return dst == _LOOPBACK_V6 or dst in self.host_addresses
        net = rule.network
        if len(dst) != len(net.network_address.packed):
            # 0.0.0.0/0 is "everything", of both families (see the module docstring); any
            # other IPv4 rule never matches an IPv6 destination, nor the reverse.
            return net.version == 4 and net.prefixlen == 0
        addr = int.from_bytes(dst, "big")
        return addr & int(net.netmask) == int(net.network_address)

    def decide(self, proto: str, dst: bytes, port: int) -> Rule | None:
        """The first rule matching the flow, or None (default: allow)."""
        for rule in self.rules:
            if self._matches(rule, proto, dst, port):
                return rule
        for rule in self.static_rules:
            if self._matches(rule, proto, dst, port):
                return rule
        return None

    def check(
        self, proto: str, src: bytes, sport: int, dst: bytes, port: int, now: float
    ) -> FlowVerdict:
        """Decide a new flow, count it and remember it in the connections view (`now`: the
        caller's clock, which the control core turns into wall-clock time)."""
        rule = self.decide(proto, dst, port)
        allowed = rule is None or rule.action == "allow"
        self.counters["allowed" if allowed else "denied"] += 1
        if not allowed:
            self.counters[f"denied_{proto}"] += 1
        verdict = FlowVerdict(
            now,
            proto,
            _endpoint(src, sport) if proto != "icmp" else str(ipaddress.ip_address(src)),
            _endpoint(dst, port) if proto != "icmp" else str(ipaddress.ip_address(dst)),
            allowed,
            str(rule) if rule is not None else "",
        )
        self.recent.append(verdict)
        return verdict


def _endpoint(addr: bytes, port: int) -> str:
    """`1.2.3.4:80`, `[2001:db8::1]:80`."""
    ip = ipaddress.ip_address(addr)
    return f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"


def host_addresses(
    fib_trie: str = "/proc/net/fib_trie", if_inet6: str = "/proc/net/if_inet6"
) -> frozenset[bytes]:
    """Every IPv4 and IPv6 address of this host's interfaces, loopback included: IPv4 from
    the kernel's routing table of local addresses, IPv6 from its list of interface addresses
    (any scope: a global, ULA or link-local address of the host is the host all the same)."""
    found = {ipaddress.IPv4Address("127.0.0.1").packed, _LOOPBACK_V6}
    try:
        with open(fib_trie) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for prev, line in itertools.pairwise(lines):
        if line.strip() == "/32 host LOCAL":
            text = prev.strip().split()[-1]
            try:
                found.add(ipaddress.IPv4Address(text).packed)
            except ValueError:
                continue
    try:
        with open(if_inet6) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        # "20010db8000000000000000000000001 02 40 00 80 eth0": the address, 32 hex digits
        fields = line.split()
        if fields and len(fields[0]) == 32:
            try:
                found.add(bytes.fromhex(fields[0]))
            except ValueError:
                continue
    return frozenset(found)
