"""Outbound policy: which host destinations a guest's new flows may reach.

A rule is `CIDR[:PORT[-PORT]][/tcp|udp|icmp]` or, in place of the CIDR, the group `host`
(every address of the host's own interfaces, loopback included, and so .254's target).
Rules are tried in order and the first that matches decides; nothing matching means allow.
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


class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    action: str  # "allow" | "deny"
    network: ipaddress.IPv4Network | None  # None: the host group
    ports: tuple[int, int] | None
    protocol: str | None
    static: bool = False  # from a flag (not changeable through the API, not persisted)

    @property
    def target(self) -> str:
        net = self.network
        if net is None:
            where = HOST_GROUP
        else:
            where = str(net.network_address) if net.prefixlen == 32 else str(net)
        if self.ports is not None:
            lo, hi = self.ports
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
    if ":" in spec:
        spec, _, port_text = spec.rpartition(":")
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
    network = None
    if spec.lower() != HOST_GROUP:
        try:
            network = ipaddress.IPv4Network(spec, strict=False)
        except ValueError:
            raise PolicyError(
                f"rule {_short(text)}: {_short(spec)} is not an IPv4 CIDR or 'host' "
                "(expected CIDR[:PORT[-PORT]][/tcp|udp|icmp])"
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
            return dst in self.host_addresses or dst[0] == 127 or dst == _LOOPBACK_V6
        net = rule.network
        if len(dst) != len(net.network_address.packed):
            return False  # an IPv4 rule never matches an IPv6 destination, nor the reverse
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
        s = ipaddress.ip_address(src)
        d = ipaddress.ip_address(dst)
        verdict = FlowVerdict(
            now,
            proto,
            f"{s}:{sport}" if proto != "icmp" else str(s),
            f"{d}:{port}" if proto != "icmp" else str(d),
            allowed,
            str(rule) if rule is not None else "",
        )
        self.recent.append(verdict)
        return verdict


def host_addresses() -> frozenset[bytes]:
    """Every IPv4 address of this host's interfaces (read from the kernel's routing table of
    local addresses), loopback included."""
    found = {ipaddress.IPv4Address("127.0.0.1").packed}
    try:
        with open("/proc/net/fib_trie") as f:
            lines = f.read().splitlines()
    except OSError:
        return frozenset(found)
    for prev, line in itertools.pairwise(lines):
        if line.strip() == "/32 host LOCAL":
            text = prev.strip().split()[-1]
            try:
                found.add(ipaddress.IPv4Address(text).packed)
            except ValueError:
                continue
    return frozenset(found)
