"""The control core: every operation hostd's front ends offer, written once.

Forwards, DNS zones and records, leases, the switch table, counters and tunnels into the
guest network live here; the gRPC service (`api/server.py`), gvproxy's HTTP API
(`api/http.py`) and the slirp4netns API socket are translators that parse their own wire,
call one method here and render the result or the `ControlError` in their own dialect. A
forward made through one front end is therefore visible through all of them. So are the
outbound policy's run-time rules and the connections view, and every change a user makes
is announced to `change_listeners` (the state file, hostd/state.py) from here, whichever
front end asked.

It runs on the switch's event loop (no locks, no threads) and owns no sockets beyond what
`Forwards` and the tunnels it opens hold.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from netferry.address import AddressError, HostPort, parse_remote
from netferry.hostd.errors import ControlError
from netferry.hostd.forwards import Forward, Forwards
from netferry.hostd.nat.tcp import HostSide
from netferry.hostd.policy import FlowVerdict, PolicyError, Rule, parse_rule
from netferry.hostd.services.dhcp import Lease
from netferry.hostd.services.dns import DnsRecord, _name_error, normalize_name
from netferry.hostd.stack import tcp

if TYPE_CHECKING:
    from netferry.hostd.switch import HostSwitch

LIST_CHUNK = 2048  # entries an API listing builds per turn of the loop

# Counter names that count malformed input (the rest of the drops are policy or limits).
MALFORMED_PREFIXES = (
    "malformed_",
    "ipv4_bad",
    "ipv4_truncated",
    "ipv4_reserved",
    "udp_bad",
    "udp_truncated",
    "icmp_bad",
    "icmp_truncated",
    "tcp_bad",
    "tcp_malformed",
    # IPv6 (hostd/stack/ipv6.py, icmpv6.py, ndp.py name their malformed input so)
    "ipv6_bad",
    "ipv6_truncated",
    "icmpv6_bad",
    "icmpv6_truncated",
    "ndp_bad",
    "ndp_truncated",
)
RECORD_TYPES = ("A", "AAAA", "CNAME")


@dataclass
class ProtocolCounters:
    packets_from_guests: int = 0
    bytes_from_guests: int = 0
    packets_to_guests: int = 0
    bytes_to_guests: int = 0


@dataclass
class LinkSnapshot:
    name: str
    port: int
    frames_in: int
    frames_out: int
    bytes_in: int
    bytes_out: int
    dropped_out: int
    errors: dict[str, int]


@dataclass
class StatsSnapshot:
    """Every counter of the switch at one moment, already summed the way users read them."""

    time: float
    frames_in: int
    frames_out: int
    bytes_in: int
    bytes_out: int
    protocols: dict[str, ProtocolCounters]  # tcp, udp, icmp, arp
    drops: dict[str, int]  # by reason, malformed input included
    malformed: int
    dropped: int  # drops that are not malformed input
    tcp_connections: int
    tcp_pending_dials: int
    udp_flows: int
    icmp_flows: int
    forwards: int
    links: list[LinkSnapshot]
    counters: dict[str, int] = field(default_factory=dict)  # every raw counter, "group.name"


@dataclass
class DnsRecordSpec:
    """A record as a front end received it: the name may be relative to the zone."""

    name: str
    rtype: str
    value: str
    ttl: int = 0


class TunnelSession:
    """The guest side of a tunnel whose far end is not a socket (the gRPC Tunnel): the
    connection's events arrive on `events`, `send` waits for window space."""

    def __init__(self, conn: tcp.TcpConnection, touch) -> None:  # type: ignore[no-untyped-def]
        self.conn = conn
        self.touch = touch
        self.events: asyncio.Queue[object] = asyncio.Queue()
        self.space = asyncio.Event()
        self.detached = False

    def on_event(self, event: tcp.TcpEvent) -> None:
        if self.detached:
            return  # the caller is gone; the connection finishes its close (TIME_WAIT) alone
        if isinstance(event, tcp.SendSpaceAvailable):
            self.space.set()
        self.events.put_nowait(event)

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.conn.send(view)
            view = view[n:]
            self.touch(self.conn)
            if view:
                self.space.clear()
                await self.space.wait()


class Control:
    def __init__(self, switch: HostSwitch) -> None:
        self.switch = switch
        self.forwards: Forwards = switch.forwards
        # Forwards given as flags (--port-forward): not written to the state file.
        self.static_forwards: set[tuple[str, str]] = set()
        # Called after every change a user made (the state file listens here); leases
        # granted by DHCP arrive as switch events and are passed on the same way.
        self.change_listeners: list[Callable[[], None]] = []
        switch.event_listeners.append(self._switch_event)

    def _changed(self) -> None:
        for listener in self.change_listeners:
            listener()

    def _switch_event(self, kind: str, fields: dict) -> None:
        if kind in ("lease_granted", "lease_released"):
            self._changed()

    # ---- forwards -------------------------------------------------------------------

    async def expose(self, protocol: str, local: str, remote: str, static: bool = False) -> Forward:
        if not local:
            raise ControlError("invalid_argument", "local: is empty")
        if not remote:
            raise ControlError("invalid_argument", "remote: is empty")
        fwd = await self.forwards.expose(protocol or "tcp", local, remote)
        if static:
            self.static_forwards.add(fwd.key)
        else:
            self._changed()
        return fwd

    async def unexpose(self, protocol: str, local: str) -> Forward:
        if not local:
            raise ControlError("invalid_argument", "local: is empty")
        fwd = await self.forwards.unexpose(protocol or "tcp", local)
        self.static_forwards.discard(fwd.key)
        self._changed()
        return fwd

    def list_forwards(self) -> list[Forward]:
        return self.forwards.list()

    # ---- leases and the switch table ------------------------------------------------

    def leases(self) -> list[Lease]:
        """Active leases, DHCP's then DHCPv6's (its `ip` an IPv6Address, its `mac` empty
        when the client's is not known), expiry in wall-clock seconds."""
        now = self.switch.loop.time()
        offset = time.time() - now
        out = [
            Lease(lease.mac, lease.ip, lease.expires + offset, lease.hostname, lease.static)
            for lease in self.switch.network.dhcp.leases(now)
        ]
        return out + self._leases6(now, offset)

    def _leases6(self, now: float, offset: float) -> list[Lease]:
        dhcp6 = getattr(self.switch.network, "dhcp6", None)  # None: IPv6 is off
        if dhcp6 is None:
            return []
        return [
            Lease(lease.mac, lease.ip, lease.expires + offset, lease.hostname, lease.static)
            for lease in dhcp6.leases(now)  # sorted by address
        ]

    async def leases_async(self, chunk: int = LIST_CHUNK) -> list[Lease]:
        """`leases()` for the API: built `chunk` at a time with a turn of the loop between,
        so listing 20,000 leases never holds the data plane for long. O(n) plus a sort.
        DHCPv6's (at most its --max-leases, already sorted) follow the IPv4 ones."""
        now = self.switch.loop.time()
        offset = time.time() - now
        items = self.switch.network.dhcp.lease_items(now)
        out: list[Lease] = []
        for start in range(0, len(items), chunk):
            out.extend(
                Lease(mac, b.ip, b.expires + offset, b.hostname, b.static)
                for mac, b in items[start : start + chunk]
            )
            if start + chunk < len(items):
                await asyncio.sleep(0)
        out.sort(key=lambda lease: lease.ip)
        if getattr(self.switch.network, "dhcp6", None) is not None:
            await asyncio.sleep(0)
            out += self._leases6(self.switch.loop.time(), offset)
        return out

    def switch_table(self) -> dict[str, int]:
        """MAC → switch port, as learned."""
        cam = self.switch.network.cam
        return {
            ":".join(f"{b:02x}" for b in mac): port
            for port in sorted(self.switch.network.ports)
            for mac in cam.macs(port)
        }

    # ---- DNS ------------------------------------------------------------------------

    def dns_zones(self) -> list[tuple[str, list[DnsRecord]]]:
        return self.switch.network.zones.zones()

    @staticmethod
    def _zone_name(zone: str, field_name: str = "zone") -> str:
        if not zone.strip():
            raise ControlError("invalid_argument", f"{field_name}: is empty")
        zname = normalize_name(zone.strip())
        if why := _name_error(zname):
            raise ControlError("invalid_argument", f"{field_name}: {zone!r} {why}")
        return zname

    @staticmethod
    def _owner(zname: str, name: str) -> str:
        """A record name as given (absolute inside the zone, or relative to it) → FQDN."""
        fqdn = normalize_name(name.strip())
        if fqdn == zname or fqdn.endswith("." + zname):
            return fqdn
        return normalize_name(name.strip().rstrip(".") + "." + zname)

    def add_dns_records(self, zone: str, specs: list[DnsRecordSpec]) -> str:
        """Add records to `zone` (created when missing), all or nothing; returns the zone."""
        zname = self._zone_name(zone)
        if not specs:
            raise ControlError("invalid_argument", "records: is empty")
        records = []
        for i, spec in enumerate(specs):
            if spec.rtype not in RECORD_TYPES:
                raise ControlError(
                    "invalid_argument", f"records[{i}].type: must be A, AAAA or CNAME"
                )
            if not spec.name.strip():
                raise ControlError("invalid_argument", f"records[{i}].name: is empty")
            record = DnsRecord(self._owner(zname, spec.name), spec.rtype, spec.value, spec.ttl)  # type: ignore[arg-type]
            try:
                record.validate()
            except ValueError as e:
                raise ControlError("invalid_argument", f"records[{i}]: {e}") from None
            records.append(record)
        zones = self.switch.network.zones
        created = zname not in [z for z, _ in zones.zones()]
        try:
            zones.add_records(zname, records)
        except ValueError as e:
            if created:
                zones.remove_zone(zname)
            raise ControlError("invalid_argument", str(e)) from None
        self._changed()
        return zname

    def add_dns_zone(self, zone: str) -> str:
        zname = self._zone_name(zone)
        try:
            name = self.switch.network.zones.add_zone(zname)
        except ValueError as e:
            raise ControlError("invalid_argument", f"zone: {e}") from None
        self._changed()
        return name

    def remove_dns_records(self, zone: str, names: list[str]) -> int:
        zname = self._zone_name(zone)
        if not names:
            raise ControlError("invalid_argument", "names: is empty")
        zones = self.switch.network.zones
        if zname not in [z for z, _ in zones.zones()]:
            raise ControlError("not_found", f"zone {zname} does not exist")
        owners = []
        for i, name in enumerate(names):
            if not name.strip():
                raise ControlError("invalid_argument", f"names[{i}]: is empty")
            owner = self._owner(zname, name)
            if why := _name_error(owner):
                raise ControlError("invalid_argument", f"names[{i}]: {name!r} {why}")
            owners.append(owner)
        removed = zones.remove_records(zname, owners)
        if not removed:
            raise ControlError("not_found", f"none of {', '.join(owners)} has records in {zname}")
        self._changed()
        return removed

    def remove_dns_record(self, zone: str, name: str, value: str) -> None:
        """Remove the one record of `name` with `value` (an address or a CNAME target)."""
        zname = self._zone_name(zone)
        zones = self.switch.network.zones
        records = dict(zones.zones()).get(zname)
        if records is None:
            raise ControlError("not_found", f"zone {zname} does not exist")
        owner = self._owner(zname, name)
        keep = [r for r in records if r.name == owner and r.value != value]
        if len(keep) == len([r for r in records if r.name == owner]):
            raise ControlError("not_found", f"{owner} has no record {value} in {zname}")
        zones.remove_records(zname, [owner])
        if keep:
            zones.add_records(zname, keep)
        self._changed()

    def add_dns_pattern(self, zone: str, pattern: str, address: str) -> None:
        """gvproxy's regexp record: names of `zone` that `pattern` matches → `address`."""
        zname = self._zone_name(zone)
        try:
            self.switch.network.zones.add_pattern(zname, pattern, address)
        except ValueError as e:
            raise ControlError("invalid_argument", str(e)) from None
        self._changed()

    def remove_dns_pattern(self, zone: str, pattern: str) -> None:
        zname = self._zone_name(zone)
        if not self.switch.network.zones.remove_pattern(zname, pattern):
            raise ControlError("not_found", f"zone {zname} has no regexp record {pattern!r}")
        self._changed()

    def set_dns_default(self, zone: str, address: str | None) -> None:
        """gvproxy's DefaultIP: every other name of `zone` → `address` (None: NXDOMAIN)."""
        zname = self._zone_name(zone)
        try:
            self.switch.network.zones.set_default(zname, address)
        except ValueError as e:
            raise ControlError("invalid_argument", str(e)) from None
        self._changed()

    def dns_extras(self, zone: str) -> tuple[list[tuple[str, str]], str | None]:
        return self.switch.network.zones.extras(zone)

    def remove_dns_zone(self, zone: str) -> None:
        zname = self._zone_name(zone)
        if not self.switch.network.zones.remove_zone(zname):
            raise ControlError("not_found", f"zone {zname} does not exist")
        self._changed()

    # ---- outbound policy ----------------------------------------------------------------

    def policy_rules(self) -> list[Rule]:
        """Every rule in the order they are tried: run-time rules, then the flags'."""
        return self.switch.network.policy.all_rules()

    def add_policy_rule(self, action: str, rule: str, index: int | None = None) -> tuple[int, Rule]:
        policy = self.switch.network.policy
        try:
            parsed = parse_rule(action, rule)
            at = policy.add(parsed, index)
        except PolicyError as e:
            raise ControlError("invalid_argument", str(e)) from None
        self.switch.apply_policy()
        self._changed()
        return at, parsed

    def remove_policy_rule(self, index: int) -> Rule:
        try:
            rule = self.switch.network.policy.remove(index)
        except PolicyError as e:
            raise ControlError("not_found", str(e)) from None
        self.switch.apply_policy()
        self._changed()
        return rule

    def recent_flows(self) -> list[FlowVerdict]:
        """The connections view: recent new flows with their verdicts, oldest first, their
        times in wall-clock seconds."""
        offset = time.time() - self.switch.loop.time()
        return [replace(v, time=v.time + offset) for v in self.switch.network.policy.recent]

    def policy_counters(self) -> dict[str, int]:
        return dict(self.switch.network.policy.counters)

    # ---- counters ---------------------------------------------------------------------

    def stats(self) -> StatsSnapshot:
        sw = self.switch
        raw = sw.stats()
        net: dict[str, int] = raw["network"]  # type: ignore[assignment]
        links = list(sw.links.values())
        closed = sw.closed_link_totals
        protocols = {}
        for name in ("tcp", "udp", "icmp", "arp"):
            pc = ProtocolCounters(
                packets_from_guests=net.get(f"{name}_packets_in", 0),
                bytes_from_guests=net.get(f"{name}_bytes_in", 0),
            )
            if name == "arp":
                pc.packets_to_guests = net.get("arp_replies_out", 0) + net.get(
                    "arp_requests_out", 0
                )
                pc.bytes_to_guests = 28 * pc.packets_to_guests
            else:
                pc.packets_to_guests = net.get(f"{name}_packets_out", 0)
                pc.bytes_to_guests = net.get(f"{name}_bytes_out", 0)
            protocols[name] = pc
        drops = {
            key: value
            for key, value in net.items()
            if key.startswith(MALFORMED_PREFIXES)
            or key.endswith("_dropped")
            or key.endswith("_refused")
        }
        # dhcp: port_limit_dropped (port security); the IPv6 groups exist when IPv6 is on
        for group in ("reassembly", "dhcp", "reassembly6", "dhcp6", "ndp"):
            for key, value in raw.get(group, {}).items():  # type: ignore[union-attr]
                if key.endswith("_dropped"):
                    drops[group + "_" + key] = value
        malformed = sum(v for k, v in drops.items() if k.startswith(MALFORMED_PREFIXES))
        counters = {
            f"{group}.{key}": value
            for group, values in raw.items()
            if isinstance(values, dict) and group != "links"
            for key, value in values.items()
            if isinstance(value, int) and value >= 0
        }
        # Links' errors outlive the links: closed links' are summed in, as frames and bytes are.
        link_errors = Counter(sw.closed_link_errors)
        for link in links:
            link_errors.update(link.counters.errors)
        for kind, value in link_errors.items():
            counters[f"links.errors.{kind}"] = value
        counters["links.dropped_out"] = sw.closed_link_dropped_out + sum(
            link.counters.dropped_out for link in links
        )
        counters["links.offload_vnet"] = sum(1 for link in links if link.vnet)
        return StatsSnapshot(
            time=time.time(),
            frames_in=sum(link.counters.frames_in for link in links) + closed[0],
            frames_out=sum(link.counters.frames_out for link in links) + closed[1],
            bytes_in=sum(link.counters.bytes_in for link in links) + closed[2],
            bytes_out=sum(link.counters.bytes_out for link in links) + closed[3],
            protocols=protocols,
            drops=drops,
            malformed=malformed,
            dropped=sum(drops.values()) - malformed,
            tcp_connections=len(sw.network.tcp_conns),
            tcp_pending_dials=len(sw.network.tcp_pending),
            udp_flows=sw.udp_nat.active + len(sw.network.udp_sessions),
            icmp_flows=len(sw.icmp_nat.flows),
            forwards=len(self.forwards.table),
            links=[
                LinkSnapshot(
                    link.name,
                    link.port,
                    link.counters.frames_in,
                    link.counters.frames_out,
                    link.counters.bytes_in,
                    link.counters.bytes_out,
                    link.counters.dropped_out,
                    dict(link.counters.errors),
                )
                for link in links
            ],
            counters=counters,
        )

    # ---- tunnels into the guest network --------------------------------------------------

    def tunnel_destination(self, address: str, field_name: str = "open.address") -> HostPort:
        """`address` parsed and checked to be a guest's address:port."""
        try:
            dest = parse_remote(address, field_name)
        except AddressError as e:
            raise ControlError("invalid_argument", str(e)) from None
        # Only a guest: the gateway's own ports and .254 are not tunnel destinations.
        self.forwards.check_guest_address(dest, field_name)
        return dest

    def _open(self, dest: HostPort) -> tcp.TcpConnection:
        network = self.switch.network
        conn = self.forwards.open_to_guest(dest, via=network.gateway_ip)
        if conn is None:
            raise ControlError("unavailable", f"no free source port toward {dest}")
        return conn

    def open_tunnel(self, dest: HostPort) -> TunnelSession:
        """A connection from the gateway to `dest`, driven by the caller (gRPC Tunnel)."""
        conn = self._open(dest)
        session = TunnelSession(conn, self.switch.tcp_nat.touch)
        conn.app = session
        self.switch.tcp_nat.touch(conn)
        return session

    def splice_tunnel(self, dest: HostPort, sock: socket.socket, first: bytes = b"") -> None:
        """A connection from the gateway to `dest`, spliced to the host socket `sock` by
        the same `HostSide` the NAT and the forwards use (gvproxy's /tunnel)."""
        conn = self._open(dest)
        side = HostSide(self.switch.tcp_nat, conn)
        conn.app = side
        self.switch.tcp_nat.hosts[conn] = side
        if first:
            conn.send(first)  # bytes the client sent before its tunnel was answered
        sock.setblocking(False)
        side.attach(sock)
        self.switch.tcp_nat.touch(conn)
