"""The asyncio host switch: links in, the sans-IO `Network` in the middle, NAT sockets out.

Every link read hands a batch of frames to `link_frames`, which feeds the network and then
`flush`es once: frames per port go out in one write per link, NAT events are dispatched, and
the network's timer is re-armed. NAT sockets call `flush` after they inject their replies,
so work is always batched per wake-up, never per packet.

The switch owns the descriptor budget (`hostd/nat/budget.py`) that every guest socket of
the NAT and the forwards is drawn from. A NAT handler that raises anyway costs its event,
counted as an internal error, never the flush or the link whose frames caused it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import time
from collections import Counter
from collections.abc import Callable

import structlog

from netferry.hostd.capture import PcapWriter
from netferry.hostd.config import NetworkConfig
from netferry.hostd.forwards import Forwards
from netferry.hostd.links import Endpoint, Link, open_endpoint
from netferry.hostd.nat.budget import DescriptorBudget, default_max_connections, nofile_limit
from netferry.hostd.nat.dns import DnsForwarder, DnsTcpSession
from netferry.hostd.nat.icmp import IcmpNat, ping_sockets_allowed
from netferry.hostd.nat.tcp import TcpNat
from netferry.hostd.nat.udp import UdpNat
from netferry.hostd.policy import host_addresses
from netferry.hostd.stack.network import (
    DNS_PORT,
    VNET_LEN,
    DnsQueryOutbound,
    FlowDenied,
    IcmpEchoOutbound,
    LeaseEvent,
    Network,
    TcpConnEvent,
    TcpDial,
    UdpOutbound,
    UdpSessionDatagram,
)
from netferry.uri import LinkUri

log = structlog.get_logger("hostd.switch")


class HostSwitch:
    def __init__(self, config: NetworkConfig, *, pcap_path: str | None = None) -> None:
        self.config = config
        self.network = Network(config)
        self.links: dict[int, Link] = {}
        # Counters of links that have closed: frames in/out, bytes in/out (totals stay monotonic).
        self.closed_link_totals = [0, 0, 0, 0]
        # ... and their errors by kind and frames dropped on output, summed the same way.
        self.closed_link_errors: Counter[str] = Counter()
        self.closed_link_dropped_out = 0
        self._flushing = False
        self._internal_error_logged = float("-inf")
        self.endpoints: list[Endpoint] = []
        self.pcap = PcapWriter.open(pcap_path) if pcap_path else None
        if self.pcap is not None:
            self.network.originated = []
        self.loop = asyncio.get_running_loop()
        # Guest sockets draw from a budget below the descriptor limit; the rest is the
        # reserve that links, the API and DNS always have (hostd/nat/budget.py).
        self.nofile_limit = nofile_limit()
        max_connections = config.max_connections
        if max_connections is None:
            max_connections = default_max_connections(self.nofile_limit)
        self.budget = DescriptorBudget(
            max_connections, config.max_connections_per_guest, self.network.guest_owner
        )
        reserve = self.nofile_limit - max_connections
        self.udp_nat = UdpNat(
            self.network,
            self.flush,
            idle_timeout=config.udp_idle_timeout,
            max_flows=config.udp_max_flows,
            budget=self.budget,
            guest_share=config.flow_guest_share,
        )
        self.icmp_nat = IcmpNat(
            self.network,
            self.flush,
            idle_timeout=config.icmp_idle_timeout,
            max_flows=config.icmp_max_flows,
            budget=self.budget,
            guest_share=config.flow_guest_share,
        )
        self.dns_forwarder = (
            # At most two sockets per query in flight: a quarter of the reserve.
            DnsForwarder(config.dns_upstreams, max_inflight=max(16, min(512, reserve // 8)))
            if config.dns_upstreams
            else None
        )
        self.dns_upstreams = list(self.dns_forwarder.upstreams) if self.dns_forwarder else []
        self.tcp_nat = TcpNat(
            self.network,
            self.flush,
            connect_timeout=config.tcp_connect_timeout,
            services={
                "dns": lambda conn: DnsTcpSession(
                    conn, self.network.dns, self.dns_forwarder, self.tcp_nat.touch
                )
            },
            on_error=lambda **fields: self._event("connection_error", **fields),
            budget=self.budget,
        )
        self._dns_tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._housekeeping = self.loop.create_task(self._housekeep())
        self.event_listeners: list[Callable[[str, dict], None]] = []
        # Live captures: each gets every frame (in and out) through `capture_listeners`.
        self.capture_listeners: list[Callable[[list[bytes]], None]] = []
        self.forwards = Forwards(self)
        allowed, value = ping_sockets_allowed()
        if not allowed and self.icmp_nat.raw is None:
            log.warning(
                "icmp.ping_sockets_not_permitted",
                ping_group_range=value,
                fix="sysctl -w net.ipv4.ping_group_range='0 2147483647'",
                effect="only echo to the gateway is answered",
            )

    async def listen(self, uri: LinkUri) -> None:
        self.endpoints.append(await open_endpoint(uri, self))
        log.info("link.listening", uri=str(uri))

    # ---- LinkSink -------------------------------------------------------------------

    def link_opened(self, link: Link) -> None:
        link.port = self.network.add_port(vnet=link.vnet)
        self.links[link.port] = link
        log.info("link.up", link=link.name, port=link.port)
        self._event("link_up", link=link.name, port=link.port)

    def link_vnet(self, link: Link) -> None:
        """The link negotiated virtio-net headers: its port's frames carry them from now on."""
        if self.links.get(link.port) is link:
            self.network.set_port_vnet(link.port)
        self._event("link_offload", link=link.name, port=link.port, offload="vnet")

    def link_frames(self, link: Link, frames: list[bytes]) -> None:
        if self.pcap is not None or self.capture_listeners:
            # Captures get plain Ethernet: a virtio-net link's header is not part of the frame.
            plain = [f[VNET_LEN:] for f in frames] if link.vnet else frames
            if self.pcap is not None:
                self.pcap.write(plain)
            for listener in self.capture_listeners:
                listener(plain)
        try:
            self.network.receive_frames(link.port, frames, self.loop.time())
        except Exception:
            # The core must not raise on guest input; if a bug makes it, the batch is lost
            # but the switch and the link go on (logged with the trace, at most every 10 s).
            self.network.stats["internal_errors"] += 1
            now = self.loop.time()
            if now >= self._internal_error_logged + 10.0:
                self._internal_error_logged = now
                log.exception("switch.internal_error", total=self.network.stats["internal_errors"])
        self.flush()

    def link_closed(self, link: Link, reason: str | None) -> None:
        if self.links.pop(link.port, None) is None:
            return
        self.network.remove_port(link.port)
        c = link.counters
        for i, v in enumerate((c.frames_in, c.frames_out, c.bytes_in, c.bytes_out)):
            self.closed_link_totals[i] += v
        self.closed_link_errors.update(c.errors)
        self.closed_link_dropped_out += c.dropped_out
        log.info("link.down", link=link.name, port=link.port, reason=reason)
        self._event("link_down", link=link.name, port=link.port, reason=reason or "closed")

    # ---- the batch boundary ---------------------------------------------------------

    def flush(self) -> None:
        if self._flushing:
            return  # a socket callback inside a flush: the loop below picks its work up
        self._flushing = True
        try:
            self._flush()
        finally:
            self._flushing = False

    def _flush(self) -> None:
        network = self.network
        now = self.loop.time()
        # Events can produce output (a NAT reply, a TCP read opening the window) and output
        # can produce events (TCP): go round a few times, then yield to the loop.
        events = network.events
        for _ in range(8):
            # Act on events first (host writes, dials), then write this batch's frames.
            network.pull_tcp_events()
            if network.udp_flow_datagrams:
                self.udp_nat.send_flow_datagrams(network.take_udp_flow_datagrams())  # type: ignore[arg-type]
            while events:
                self._dispatch(events.popleft())
            frames_by_port = network.frames_to_send(now)
            if network.originated:
                if self.pcap is not None:
                    self.pcap.write(network.originated)
                for listener in self.capture_listeners:
                    listener(network.originated)
                network.originated.clear()
            for port, frames in frames_by_port.items():
                link = self.links.get(port)
                if link is not None:
                    link.send_frames(frames)
            if not events:
                break
        else:
            self.loop.call_soon(self.flush)
        self._arm_timer()

    def _dispatch(self, ev: object) -> None:
        try:
            self._dispatch_event(ev)
        except Exception:
            # A NAT handler must not raise (socket failures are handled where sockets are
            # made); if a bug makes one, this event is lost, never the link or the flush.
            self.network.stats["internal_errors"] += 1
            now = self.loop.time()
            if now >= self._internal_error_logged + 10.0:
                self._internal_error_logged = now
                log.exception("switch.dispatch_error", dispatched=type(ev).__name__)

    def _dispatch_event(self, ev: object) -> None:
        if isinstance(ev, TcpConnEvent):
            self.tcp_nat.connection_event(ev)
        elif isinstance(ev, UdpSessionDatagram):
            ev.session.reply(ev.payload)
        elif isinstance(ev, UdpOutbound):
            self.udp_nat.send(ev)
        elif isinstance(ev, TcpDial):
            self.tcp_nat.dial(ev)
        elif isinstance(ev, IcmpEchoOutbound):
            self.icmp_nat.send(ev)
        elif isinstance(ev, DnsQueryOutbound):
            self._forward_dns(ev)
        elif isinstance(ev, FlowDenied):
            v = ev.verdict
            self._event(
                "flow_denied",
                protocol=v.protocol,
                source=v.source,
                destination=v.destination,
                rule=v.rule,
            )
        elif isinstance(ev, LeaseEvent):
            if ev.released:
                log.info("dhcp.lease_released", mac=ev.mac, ip=ev.ip)
                self._event("lease_released", mac=ev.mac, ip=ev.ip)
                return
            log.info("dhcp.lease", mac=ev.mac, ip=ev.ip, hostname=ev.hostname)
            self._event("lease_granted", mac=ev.mac, ip=ev.ip, hostname=ev.hostname or "")

    def _arm_timer(self) -> None:
        when = self.network.get_timer()
        if when is None:
            return  # an armed timer finds nothing due and is not re-armed
        armed = self._timer_at
        # A timer armed a little early fires, finds nothing and re-arms: cheaper than moving
        # it on every flush as ACKs push retransmission deadlines on. One armed far too early
        # (a delayed ACK that rode on a reply) is moved: a wake-up is dearer than a re-arm.
        if armed is not None and armed <= when < armed + 0.005:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.network.handle_timer(self.loop.time())
        self.flush()

    def apply_policy(self) -> None:
        """Re-decide what the policy decides once rather than per flow: the DNS upstreams
        that queries may be forwarded to (a rule changed at run time calls this again)."""
        policy = self.network.policy
        policy.host_addresses = host_addresses()  # interfaces may have changed since start
        if self.dns_forwarder is None:
            return
        allowed = []
        for host, port in self.dns_upstreams:
            try:
                packed = ipaddress.ip_address(host).packed
            except ValueError:
                allowed.append((host, port))  # not an address: nothing to decide on
                continue
            rule = policy.decide("udp", packed, port)
            if rule is None or rule.action == "allow":
                allowed.append((host, port))
            else:
                log.warning("dns.upstream_denied", upstream=f"{host}:{port}", rule=str(rule))
        self.dns_forwarder.upstreams = allowed
        self.dns_forwarder._preferred = 0

    def _forward_dns(self, ev: DnsQueryOutbound) -> None:
        server = ev.server_ip or self.network.dns_ip  # the address the guest asked (v4 or v6)
        if self.dns_forwarder is not None and not self.dns_forwarder.upstreams:
            self.network.stats["policy_dns_refused"] += 1
        if self.dns_forwarder is None:
            reply = self.network.dns.servfail(ev.query)
            self.network.send_udp(server, DNS_PORT, ev.guest_ip, ev.guest_port, reply)
            return

        async def run() -> None:
            assert self.dns_forwarder is not None
            answer = await self.dns_forwarder.forward(ev.query)
            self.network.send_udp(server, DNS_PORT, ev.guest_ip, ev.guest_port, answer)
            self.flush()

        task = self.loop.create_task(run())
        self._dns_tasks.add(task)
        task.add_done_callback(self._dns_tasks.discard)

    async def _housekeep(self) -> None:
        """Periodic work with no precise deadline: pcap flushing."""
        while True:
            await asyncio.sleep(1.0)
            if self.pcap is not None:
                self.pcap.flush()

    def _event(self, kind: str, **fields: object) -> None:
        for listener in self.event_listeners:
            listener(kind, dict(fields, time=time.time()))

    emit_event = _event

    def add_capture(self, listener: Callable[[list[bytes]], None]) -> None:
        self.capture_listeners.append(listener)
        if self.network.originated is None:
            self.network.originated = []

    def remove_capture(self, listener: Callable[[list[bytes]], None]) -> None:
        self.capture_listeners.remove(listener)
        if not self.capture_listeners and self.pcap is None:
            self.network.originated = None

    # ---- stats and shutdown -----------------------------------------------------------

    def stats(self) -> dict[str, object]:
        return {
            "network": dict(self.network.stats),
            "reassembly": dict(self.network.reassembler.stats),
            "dhcp": self.network.dhcp.stats.as_dict(),
            "dhcp6": (self.network.dhcp6.stats.as_dict() if self.network.dhcp6 is not None else {}),
            "reassembly6": (
                dict(self.network.reassembler6.stats)
                if self.network.reassembler6 is not None
                else {}
            ),
            "dns": dataclasses.asdict(self.network.dns.stats),
            "dns_forwarder": (
                dataclasses.asdict(self.dns_forwarder.stats) if self.dns_forwarder else {}
            ),
            "udp_nat": dict(self.udp_nat.stats, active=self.udp_nat.active),
            "icmp_nat": dict(self.icmp_nat.stats, active=len(self.icmp_nat.flows)),
            "tcp_nat": dict(
                self.tcp_nat.stats,
                active=self.tcp_nat.active,
                pending=len(self.network.tcp_pending),
                connections=len(self.network.tcp_conns),
            ),
            "links": {
                link.name: dict(vars(link.counters), offload="vnet" if link.vnet else "none")
                for link in self.links.values()
            },
            "descriptors": dict(self.budget.as_dict(), nofile_limit=self.nofile_limit),
        }

    async def close(self) -> None:
        await self.forwards.close()
        self._housekeeping.cancel()
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._dns_tasks):
            task.cancel()
        for ep in self.endpoints:
            ep.close()
        for link in list(self.links.values()):
            link.close(None)
        self.tcp_nat.close()
        self.udp_nat.close()
        self.icmp_nat.close()
        if self.dns_forwarder is not None:
            await self.dns_forwarder.close()
        if self.pcap is not None:
            self.pcap.close()
