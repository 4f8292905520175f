"""The virtual network: switch ports, the gateway's IPv4 and IPv6 layers, events for the NAT.

Theory of operation. `Network` is the layer-2 switch and the gateway's network layer: it
owns the ports (plain or virtio-net), the CAM table, the neighbour table, fragment
reassembly and the gateway's own services (ARP, DHCP, DNS, echo). Its IPv6 half lives in
`network6.py` (`Ipv6Layer`, mixed into `Network`: NDP and router advertisements, DHCPv6,
IPv6 reassembly, ICMPv6; see its docstring), so that one object answers for both
families. Above it sits the transport layer (`hostd/stack/transport.py`: TCP connections,
UDP flows, timers, output), reached through an address-family-neutral seam: the transport
sees packets with `src`, `dst`, `ttl` and `quote`, and asks this layer for routes, offload
and emission through the `NetworkLayer` methods below (`send_ip`, `send_unreachable`,
`route_tcp_syn`, `nat_target`, `port_of`, `offload_port`, `send_tcp`). An address is
`bytes` of 4 or 16 everywhere (packets, events, the transport's keys): each of those
methods, and `send_udp`, `send_icmp_echo_reply` and `send_icmp_error` (which always takes
ICMPv4's type and code and maps them for an IPv6 guest), dispatches on the length, once per
call, to this file's IPv4 code or network6.py's IPv6 code.

The asyncio side (hostd/switch.py) feeds batches of frames per link with
`receive_frames(port, frames, now)` and then drains `frames_to_send()` (frames per port),
`events` (work for the NAT: datagrams and echo requests to relay, DNS queries to forward,
dials, connection events) and `take_udp_flow_datagrams()`. Replies from host sockets come
back through `send_udp`, `send_icmp_echo_reply` and `send_icmp_error`. The NAT's per-guest
shares ask `guest_owner` who a guest address belongs to (its switch port).

One receive path. Every frame of a batch goes through one classifier, in order, as passt's
tap handler does: layer 2 once (length, source MAC, CAM learning; unicast between guests is
switched without looking further, except ARP, whose sender is checked on every frame, and
IPv6, whose source and NDP claims are checked on every frame: `_not_ipv4` takes every
frame that is not IPv4 out of the IPv4 path with one comparison, and hands IPv6 to
`network6._ipv6_frame` when IPv6 is on, else counts it as `ipv6_dropped`);
for the gateway (its MAC or a broadcast) layer 3 once from one precompiled struct (version,
header length, lengths, header checksum on plain ports, reserved flag), then the source
rules (`_ipv4_source_allowed`: martian sources, and the neighbour table moved only from the
port its entry lives on), then layer 4 once (checksum on plain ports, parse). A segment of
an open connection then goes straight to it and a datagram of an open UDP flow to
`udp_flow_datagrams`; everything else goes to the slower handlers: ARP, DHCP, DNS, echo,
fragments (reassembled, then dispatched like any packet), and the transport's handlers for
SYNs, strays and new flows. Counters of the common case (frames, IPv4, TCP, UDP packets
and bytes) are summed in locals and added once per batch; every other counter is counted
where its frame is decided. Offload ports (our vm-switch, virtio-net header) leave layer-4
checksums to us: they are not verified there, and a partial checksum is completed when a
frame leaves by a plain port.

Port rules (one place each, where port security hooks in): `_arp_sender_allowed` for every
ARP frame (the sender MAC is the frame's; nobody claims the gateway's or a virtual address,
and such a claim is dropped before any flooding; nobody claims an address whose neighbour
entry lives on another port), `_ipv4_source_allowed` for every IPv4 frame to the gateway;
for IPv6, network6.py's `_ipv6_may_leave` (every frame to another guest: sources, RA guard,
neighbour advertisements for the gateway's or another port's address) and
`_ipv6_source_allowed` (every IPv6 packet to the gateway).

Timers: IPv4 reassembly, the transport's, and (IPv6 on) IPv6 reassembly, router
advertisements and DHCPv6 expiry, whose earliest deadline is cached until IPv6 input or a
timer moves it (`get_timer` runs per flush).

It must never raise on guest input: every malformed frame ends as a named counter.
It does no I/O and reads no clock: `now` comes in with every call.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, deque
from collections.abc import Hashable

from netferry.hostd.config import NetworkConfig
from netferry.hostd.policy import Policy
from netferry.hostd.services.dhcp import DhcpConfig, DhcpServer, LeaseGranted
from netferry.hostd.services.dns import DnsResolver, DnsZones, ForwardQuery, default_zones
from netferry.hostd.stack import arp, ethernet, icmp, icmpv6, ipv4, tcp, udp
from netferry.hostd.stack import checksum as checksum_mod
from netferry.hostd.stack.ethernet import BROADCAST, ETHERTYPE_ARP, ETHERTYPE_IPV4
from netferry.hostd.stack.events import (
    DnsQueryOutbound,
    FlowDenied,
    IcmpEchoOutbound,
    LeaseEvent,
)
from netferry.hostd.stack.network6 import (
    ANSWERED,
    SILENT,
    VNET_F_NEEDS_CSUM,
    VNET_GSO_NONE,
    VNET_GSO_TCPV4,
    VNET_HDR,
    VNET_LEN,
    VNET_NONE,
    Ipv6Layer,
)
from netferry.hostd.stack.port_security import PortSecurity
from netferry.hostd.stack.transport import (
    TcpConnEvent,
    TcpDial,
    TcpKey,
    TcpRoute,
    Transport,
    UdpOutbound,
    UdpSessionDatagram,
    udp_flow_key,
)

__all__ = [
    "DNS_PORT",
    "VNET_HDR",
    "VNET_LEN",
    "VNET_NONE",
    "DnsQueryOutbound",
    "Event",
    "FlowDenied",
    "IcmpEchoOutbound",
    "LeaseEvent",
    "Network",
    "TcpConnEvent",
    "TcpDial",
    "TcpKey",
    "UdpOutbound",
    "UdpSessionDatagram",
    "udp_flow_key",
]

LOOPBACK_V4 = b"\x7f\x00\x00\x01"
LIMITED_BROADCAST = b"\xff\xff\xff\xff"
ANY_V4 = b"\x00\x00\x00\x00"
DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68
DNS_PORT = 53
PENDING_ARP_MAX = 64  # packets held per unresolved guest address
PENDING_ARP_ADDRESSES = 256  # unresolved guest addresses with packets held
PROTO_NAMES = {ipv4.PROTO_TCP: "tcp", ipv4.PROTO_UDP: "udp", ipv4.PROTO_ICMP: "icmp"}

# virtio-net header (legacy, 10 bytes, little-endian as tun uses on x86) on offload links:
# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset (defined in network6.py).
TCP_FRAME_HEADERS = 14 + 20  # Ethernet + IPv4 without options: where TCP starts in our frames

_IPV4 = ipv4.HEADER  # version/IHL, TOS, total, ident, flags/offset, TTL, proto, csum, src, dst
_ETH_IPV4 = b"\x08\x00"
_ETH_ARP = b"\x08\x06"
_ETH_IPV6 = b"\x86\xdd"
_UDP = udp.HEADER  # ports, length, checksum
_ANSWERED = ANSWERED  # a refusal the guest was told about (ICMP error)
_SILENT = SILENT  # a refusal without an answer (TCP answers it with RST)
_SYN = tcp.SYN
_LISTEN = tcp.TcpState.LISTEN


Event = (
    UdpOutbound
    | IcmpEchoOutbound
    | DnsQueryOutbound
    | LeaseEvent
    | FlowDenied
    | TcpDial
    | TcpConnEvent
    | UdpSessionDatagram
)


def ip_bytes(addr: ipaddress.IPv4Address | str) -> bytes:
    return ipaddress.IPv4Address(addr).packed


def ip_str(raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw))


class Network(Ipv6Layer):
    def __init__(self, config: NetworkConfig, zones: DnsZones | None = None) -> None:
        self.config = config
        self.gateway_ip = config.gateway_ip.packed
        self.gateway_mac = config.gateway_mac
        self.host_ip = config.host_ip.packed
        self.dns_ip = config.dns_ip.packed
        # slirp4netns's plan: the gateway is also the host's loopback, so TCP and UDP to it
        # (but DHCP, and DNS when DNS is the gateway) leave for 127.0.0.1; echo is answered.
        self.gateway_is_host = self.gateway_ip == self.host_ip
        self.subnet = config.subnet
        self._net_int = int(config.subnet.network_address)
        self._mask_int = int(config.subnet.netmask)
        self.broadcast_ip = config.subnet.broadcast_address.packed
        self.network_ip = config.subnet.network_address.packed
        self.mtu = config.mtu
        self.virtual_ips = {self.gateway_ip, self.host_ip, self.dns_ip}
        self.policy = Policy()  # outbound rules; hostd fills it from flags and the state file
        # TCP ports the gateway serves itself beside DNS (port → service name for the NAT's
        # factories): the forwarder API on 80.
        self.gateway_tcp_services: dict[int, str] = {}
        self.stats: Counter[str] = Counter()
        # Port security: the CAM table bounds and ages each port's MACs and keeps a live
        # port's MAC from being taken; the binding table ties addresses to their port.
        self.cam = ethernet.CamTable(
            max_per_port=config.port_max_macs,
            max_age=config.mac_age,
            secure=config.port_security,
            stats=self.stats,
        )
        self.port_security = PortSecurity(
            self.cam,
            config.port_security,
            config.port_max_leases or 1 << 30,
            stats=self.stats,
            subnet=(int(config.subnet.network_address), int(config.subnet.netmask)),
        )
        self.neighbours = arp.NeighbourTable()
        self.reassembler = ipv4.Reassembler(config.reassembly_max_bytes, config.reassembly_timeout)
        self.dhcp = DhcpServer(
            DhcpConfig(
                subnet=config.subnet,
                server_ip=config.gateway_ip,
                dns_servers=[config.dns_ip],
                mtu=config.mtu,
                lease_time=config.lease_time,
                domain_search=list(config.dns_search),
                static_leases=dict(config.static_leases),
                reserved=config.virtual_addresses,
                pool=config.dhcp_range,
                max_leases_per_port=config.port_max_leases,
            )
        )
        self.zones = zones or default_zones(
            str(config.gateway_ip),
            str(config.host_ip),
            gateway6=str(config.gateway6) if config.ipv6 else None,
            host6=str(config.host6) if config.ipv6 else None,
        )
        self.dns = DnsResolver(self.zones)
        self.events: deque[Event] = deque()
        self._outbox: dict[int, list[bytes]] = {}
        self._ports: set[int] = set()
        self._vnet_ports: set[int] = set()
        self._next_port = 1
        self._now = 0.0  # the latest batch's time (timers, policy)
        self._ident = 0
        self._pending_arp: dict[bytes, list[bytes]] = {}
        # When set, frames the gateway originates are also appended here (pcap, capture API).
        self.originated: list[bytes] | None = None
        self.transport = Transport(
            self,
            self.stats,
            self.events,
            tcp_options={
                "mss": config.mtu - 40,
                "recv_buffer": config.tcp_buffer,
                "send_buffer": config.tcp_buffer,
                "time_wait": config.tcp_time_wait,
                "ack_delay": config.tcp_ack_delay,
            },
            max_pending=config.tcp_max_pending,
            max_half_open=config.tcp_max_half_open,
            max_connections=config.tcp_max_connections,
            per_port_share=config.tcp_port_share,
        )
        # The transport's tables and application-side calls, under the names the NAT and
        # port forwards use (bound directly: no wrapper call per use).
        t = self.transport
        self.take_udp_flow_datagrams = t.take_udp_flow_datagrams
        self.tcp_touch = t.touch
        self.tcp_accept = t.accept
        self.tcp_refuse = t.refuse
        self.tcp_connect = t.connect
        self.pull_tcp_events = t.pull_events
        self.tcp_conns = self.transport.tcp_conns
        self.tcp_pending = self.transport.tcp_pending
        self.udp_sessions = self.transport.udp_sessions
        self.udp_flows = self.transport.udp_flows
        self._init_ipv6(config)  # network6.py: NDP, DHCPv6, reassembly, when IPv6 is on

    # ---- ports -------------------------------------------------------------------------

    def add_port(self, vnet: bool = False) -> int:
        """A new switch port. `vnet`: its frames carry a virtio-net header (checksum and
        segmentation offload between our own vm-switch and hostd)."""
        port = self._next_port
        self._next_port += 1
        self._ports.add(port)
        if vnet:
            self._vnet_ports.add(port)
        return port

    def set_port_vnet(self, port: int) -> None:
        """`port` negotiated virtio-net headers (netferry.linkcaps): its frames carry one now."""
        if port in self._ports:
            self._vnet_ports.add(port)

    def remove_port(self, port: int) -> None:
        self._ports.discard(port)
        self._vnet_ports.discard(port)
        macs = self.cam.forget_port(port)
        self.port_security.forget_port(port)
        self.neighbours.forget_macs(macs)
        self._forget_port6(macs)
        self._outbox.pop(port, None)

    @property
    def ports(self) -> set[int]:
        return set(self._ports)

    # ---- output ------------------------------------------------------------------------

    def frames_to_send(self, now: float | None = None) -> dict[int, list[bytes]]:
        if self.transport.dirty:
            self.transport.output(self._now if now is None else now)
        out, self._outbox = self._outbox, {}
        return out

    def _emit(self, port: int, frame: bytes) -> None:
        """Queue a plain Ethernet frame for `port` (given a virtio-net header if it wants one)."""
        if port in self._vnet_ports:
            frame = VNET_NONE + frame
        box = self._outbox.get(port)
        if box is None:
            self._outbox[port] = [frame]
        else:
            box.append(frame)

    def _emit_raw(self, port: int, frame: bytes) -> None:
        """Queue a frame already in `port`'s format."""
        box = self._outbox.get(port)
        if box is None:
            self._outbox[port] = [frame]
        else:
            box.append(frame)

    def _emit_from_gateway(self, dst_mac: bytes, ethertype: int, payload: bytes) -> None:
        header = ethernet.HEADER.pack(dst_mac, self.gateway_mac, ethertype)
        if dst_mac[0] & 1:
            frame = header + payload
            if self.originated is not None:
                self.originated.append(frame)
            for p in self._ports:
                self._emit(p, frame)
            self.stats["frames_out"] += 1
            return
        port = self.cam.lookup(dst_mac)
        if port is None:
            self.stats["unknown_unicast_dropped"] += 1
            return
        if port in self._vnet_ports:
            frame = b"".join((VNET_NONE, header, payload))
            if self.originated is not None:
                self.originated.append(frame[VNET_LEN:])
        else:
            frame = header + payload
            if self.originated is not None:
                self.originated.append(frame)
        self._emit_raw(port, frame)
        self.stats["frames_out"] += 1

    def _next_ident(self) -> int:
        self._ident = (self._ident + 1) & 0xFFFF
        return self._ident

    def send_ip(self, src: bytes, dst: bytes, proto: int, payload: bytes, ttl: int = 64) -> None:
        """Send a datagram from the gateway side to guest address `dst`, fragmenting to the MTU."""
        if len(dst) == 16:
            self._send_ip6(src, dst, proto, payload, ttl)
            return
        packets = ipv4.fragment(src, dst, proto, payload, self.mtu, self._next_ident(), ttl)
        name = PROTO_NAMES.get(proto, "other")
        self.stats[name + "_packets_out"] += len(packets)
        self.stats[name + "_bytes_out"] += len(payload) + 20 * len(packets)
        mac = self.neighbours.lookup(dst)
        if mac is None:
            self._queue_for_arp(dst, packets)
            return
        for packet in packets:
            self._emit_from_gateway(mac, ETHERTYPE_IPV4, packet)

    def send_udp(self, src: bytes, sport: int, dst: bytes, dport: int, payload: bytes) -> None:
        self.stats["udp_out"] += 1
        if len(dst) == 16:
            self._send_ip6(src, dst, 17, self._udp6_datagram(src, dst, sport, dport, payload))
            return
        self.send_ip(src, dst, ipv4.PROTO_UDP, udp.build_udp(src, dst, sport, dport, payload))

    def send_icmp_echo_reply(
        self, src: bytes, dst: bytes, ident: int, seq: int, payload: bytes
    ) -> None:
        self.stats["icmp_echo_replies"] += 1
        if len(dst) == 16:
            src = src if len(src) == 16 else self._own_source6(b"", dst)
            reply = icmpv6.build_echo_reply(src, dst, ident, seq, payload)
            self._send_ip6(src, dst, 58, reply)
            return
        self.send_ip(src, dst, ipv4.PROTO_ICMP, icmp.build_echo_reply(ident, seq, payload))

    def send_icmp_error(
        self, src: bytes, dst: bytes, type_: int, code: int, quote: bytes, mtu: int = 0
    ) -> None:
        """An ICMP error to guest `dst` about the packet quoted in `quote`. ICMPv4's type and
        code always: for an IPv6 guest they are mapped to ICMPv6's (network6.py)."""
        if len(dst) == 16:
            self._send_icmp_error6(src, dst, type_, code, quote, mtu)
            return
        self.stats["icmp_errors_out"] += 1
        self.send_ip(src, dst, ipv4.PROTO_ICMP, icmp.build_error(type_, code, quote, mtu))

    def _queue_for_arp(self, dst: bytes, packets: list[bytes]) -> None:
        if not self._in_subnet(dst):
            self.stats["no_route_dropped"] += len(packets)
            return
        if dst not in self._pending_arp and len(self._pending_arp) >= PENDING_ARP_ADDRESSES:
            oldest = next(iter(self._pending_arp))  # bounded in addresses too: oldest goes
            self.stats["arp_queue_dropped"] += len(self._pending_arp.pop(oldest))
        queue = self._pending_arp.setdefault(dst, [])
        room = PENDING_ARP_MAX - len(queue)
        if room < len(packets):
            self.stats["arp_queue_dropped"] += len(packets) - max(room, 0)
        queue.extend(packets[: max(room, 0)])
        self._emit_from_gateway(
            BROADCAST,
            ETHERTYPE_ARP,
            arp.build_arp(arp.OP_REQUEST, self.gateway_mac, self.gateway_ip, b"\0" * 6, dst),
        )
        self.stats["arp_requests_out"] += 1

    def _flush_arp_queue(self, ip: bytes, mac: bytes) -> None:
        for packet in self._pending_arp.pop(ip, ()):
            self._emit_from_gateway(mac, ETHERTYPE_IPV4, packet)

    # ---- timers ------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        best = self.reassembler.next_deadline()
        tcp_next = self.transport.get_timer()
        if tcp_next is not None and (best is None or tcp_next < best):
            best = tcp_next
        if self.ipv6_enabled:
            v6 = self._v6_deadline
            if v6 is None:  # recomputed only after IPv6 input or timers moved it
                v6 = self._v6_deadline = self._ipv6_timer()
            if best is None or v6 < best:
                best = v6
        return best

    def handle_timer(self, now: float) -> None:
        self._now = now
        self.reassembler.expire(now)
        self.transport.handle_timer(now)
        if self.ipv6_enabled:
            self._ipv6_handle_timer(now)

    # ---- the transport's application side, for the NAT and port forwards -------------

    @property
    def tcp_max_pending(self) -> int:
        return self.transport.max_pending

    @tcp_max_pending.setter
    def tcp_max_pending(self, value: int) -> None:
        self.transport.max_pending = value

    @property
    def udp_flow_datagrams(self) -> list[tuple[object, bytes]]:
        return self.transport.udp_flow_datagrams

    # ---- what the transport asks of this layer (transport.NetworkLayer) ---------------

    def send_unreachable(self, src: bytes, dst: bytes, code: int, quote: bytes) -> None:
        self.send_icmp_error(src, dst, icmp.DEST_UNREACHABLE, code, quote)

    def port_of(self, ip: bytes) -> int | None:
        """The switch port guest address `ip` sits on now, if known."""
        mac = self.neighbours.lookup(ip) if len(ip) == 4 else self._ndp_lookup(ip)
        return None if mac is None else self.cam.lookup(mac)

    def guest_owner(self, ip: bytes) -> Hashable:
        """Who guest address `ip` belongs to, for the NAT's per-guest shares: the switch port
        it sits on, so one guest's IPv4 and IPv6 addresses are one guest (guests bridged
        behind one port share it, as the transport's per-port caps do), else the address
        itself. Once per new NAT socket or flow; looks, never refreshes a table's LRU."""
        if len(ip) == 4:
            mac = self.neighbours.lookup(ip)
        else:
            mac = self.ndp.cache.peek(ip) if self.ndp is not None else None
        port = None if mac is None else self.cam.lookup(mac)
        return ip if port is None else port

    def offload_port(self, ip: bytes) -> bool:
        """Whether what goes to guest address `ip` now leaves by an offload port."""
        if not self._vnet_ports:
            return False
        mac = self.neighbours.lookup(ip) if len(ip) == 4 else self._ndp_lookup(ip)
        return mac is not None and self.cam.lookup(mac) in self._vnet_ports

    def route_tcp_syn(self, pkt: ipv4.Ipv4Packet, sport: int, dport: int) -> TcpRoute:
        """Where a guest's new TCP connection goes: a gateway service, the host, or nowhere."""
        dst = pkt.dst
        if len(dst) == 16:
            return self._route_tcp_syn6(pkt, sport, dport)
        if dst == self.dns_ip and dport == DNS_PORT:
            return TcpRoute(service="dns")
        if dst == self.gateway_ip and dport in self.gateway_tcp_services:
            return TcpRoute(service=self.gateway_tcp_services[dport])
        if (dst == self.gateway_ip or dst == self.dns_ip) and dst != self.host_ip:
            # (a gateway that is also the host loopback, as slirp4netns's .2, is NATed)
            self.stats["tcp_gateway_refused"] += 1
            return TcpRoute(refused=True)
        if dst == LIMITED_BROADCAST or dst == self.broadcast_ip or dst[0] >= 224:
            self.stats["tcp_broadcast_dropped"] += 1  # RFC 1122 4.2.3.10: discard silently
            return TcpRoute(refused=True, answered=True)
        target = self._nat_route(pkt, "tcp", sport, dport)
        if isinstance(target, str):
            return TcpRoute(target=target)
        # An ICMP error already answered (.254 refused, TTL exceeded): no RST too.
        return TcpRoute(refused=True, answered=target is _ANSWERED)

    def nat_target(self, pkt: ipv4.Ipv4Packet, proto: str, sport: int, dport: int) -> str | None:
        """Where a new flow to `pkt.dst` goes on the host, or None when it must not leave
        (answered with an ICMP error where the guest expects one). `proto` "" skips the
        outbound policy (a flow already decided)."""
        if len(pkt.dst) == 16:
            target = self._nat_route6(pkt, proto, sport, dport)
            return target if isinstance(target, str) else None
        target = self._nat_route(pkt, proto, sport, dport)
        return target if isinstance(target, str) else None

    def _nat_route(self, pkt: ipv4.Ipv4Packet, proto: str, sport: int, dport: int) -> object:
        """The host target (a str), or `_ANSWERED` (refused with an ICMP error) or
        `_SILENT` (refused without one: TCP answers with RST)."""
        dst = pkt.dst
        if dst == self.host_ip:
            if self.config.host_loopback:
                target = LOOPBACK_V4
            else:
                self.stats["host_loopback_refused"] += 1
                self.send_icmp_error(
                    self.gateway_ip, pkt.src, icmp.DEST_UNREACHABLE, icmp.ADMIN_PROHIBITED, pkt.raw
                )
                return _ANSWERED
        else:
            first = dst[0]
            if (
                self._in_subnet(dst)
                or first == 127
                or first == 0
                or first >= 224
                or dst == LIMITED_BROADCAST
            ):
                self.stats["ipv4_unroutable_dropped"] += 1
                return _SILENT
            target = dst
        if pkt.ttl <= 1 and dst != self.host_ip:
            self.stats["ttl_exceeded"] += 1
            self.send_icmp_error(self.gateway_ip, pkt.src, icmp.TIME_EXCEEDED, 0, pkt.raw)
            return _ANSWERED
        if proto and self.policy.active:
            verdict = self.policy.check(proto, pkt.src, sport, target, dport, self._now)
            if not verdict.allowed:
                self.stats[f"policy_{proto}_refused"] += 1
                self.events.append(FlowDenied(verdict))
                if proto == "tcp":
                    return _SILENT
                self.send_icmp_error(
                    self.gateway_ip, pkt.src, icmp.DEST_UNREACHABLE, icmp.ADMIN_PROHIBITED, pkt.raw
                )
                return _ANSWERED
        return ip_str(target)

    def send_tcp(self, conn: tcp.TcpConnection, segments: list[bytes]) -> None:
        """A connection's segments to its guest, in the format of the port it sits on now."""
        key = conn.key
        src, dst = key[2], key[0]
        if len(dst) == 16:
            self._send_tcp6(conn, segments)
            return
        stats = self.stats
        stats["tcp_segments_out"] += len(segments)
        stats["tcp_packets_out"] += len(segments)
        stats["tcp_bytes_out"] += sum(map(len, segments)) + 20 * len(segments)
        mac = self.neighbours.lookup(dst)
        port = self.cam.lookup(mac) if mac is not None else None
        if port is None or port not in self._vnet_ports or not conn.offload:
            for seg in segments:
                packet = ipv4.build_ipv4(
                    src, dst, ipv4.PROTO_TCP, seg, self._next_ident(), 64, 0, ipv4.FLAG_DF
                )
                if mac is None:
                    self._queue_for_arp(dst, [packet])
                else:
                    self._emit_from_gateway(mac, ETHERTYPE_IPV4, packet)
            return
        # Offload port: one join per segment (virtio-net header, Ethernet, IPv4, TCP, data);
        # segments longer than the MSS go as GSO, every one with a partial checksum.
        eth = ethernet.HEADER.pack(mac, self.gateway_mac, ETHERTYPE_IPV4)
        mss = conn.effective_mss
        originated = self.originated
        pack_vnet = VNET_HDR.pack
        for seg in segments:
            hdr_len = TCP_FRAME_HEADERS + ((seg[12] >> 4) << 2)
            payload_len = len(seg) + TCP_FRAME_HEADERS - hdr_len
            if payload_len > mss:
                vnet = pack_vnet(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, hdr_len, mss, 34, 16)
            else:
                vnet = pack_vnet(VNET_F_NEEDS_CSUM, VNET_GSO_NONE, 0, 0, 34, 16)
            iphdr = ipv4.build_header(
                src, dst, ipv4.PROTO_TCP, len(seg), self._next_ident(), 64, 0, ipv4.FLAG_DF
            )
            frame = b"".join((vnet, eth, iphdr, seg))
            if originated is not None:
                originated.append(frame[VNET_LEN:])
            self._emit_raw(port, frame)
        stats["frames_out"] += len(segments)

    # ---- input: the one receive path -----------------------------------------------

    def receive_frame(self, port: int, frame: bytes | memoryview, now: float) -> None:
        """One frame in `port`'s format (a batch of one)."""
        self.receive_frames(port, [bytes(frame)], now)

    def receive_frames(self, port: int, frames: list[bytes], now: float) -> None:
        """A batch of frames from `port`, handled in order (see the module docstring)."""
        self._now = now
        stats = self.stats
        vnet = port in self._vnet_ports
        off = VNET_LEN if vnet else 0
        ip = off + ethernet.HEADER_LEN  # where IPv4 starts
        trusted = vnet  # our vm-switch leaves layer-4 checksums to us: not re-verified
        gateway_mac = self.gateway_mac
        self.port_security.now = now
        admit_mac = self.port_security.admit_mac
        admitted = None  # the batch's last admitted MAC: same port, same time, same verdict
        secure = self.port_security.enabled
        source_allowed = self.port_security.source_allowed
        neighbour = self.neighbours.lookup
        unpack_ip = _IPV4.unpack_from
        ones_sum = checksum_mod.ones_sum
        n_frames = n_ip = n_tcp = tcp_bytes = n_udp = udp_bytes = 0
        for frame in frames:
            n_frames += 1
            # -- layer 2
            if len(frame) < ip:
                stats["malformed_vnet" if vnet else "malformed_ethernet"] += 1
                continue
            dst_mac = frame[off : off + 6]
            src_mac = frame[off + 6 : off + 12]
            if src_mac[0] & 1 or src_mac == ethernet.ZERO_MAC:
                stats["malformed_ethernet"] += 1
                continue
            if src_mac != admitted:
                if not admit_mac(port, src_mac, now):
                    continue  # a MAC over the port's limit or another port's: counted there
                admitted = src_mac
            ethertype = frame[ip - 2 : ip]
            if ethertype != _ETH_IPV4:
                self._not_ipv4(port, frame, off, ethertype, dst_mac, src_mac, now)
                continue
            if dst_mac != gateway_mac:
                if (
                    secure
                    and len(frame) >= ip + 20
                    and not source_allowed(port, src_mac, frame[ip + 12 : ip + 16])
                ):
                    continue  # another port's address, to another guest or flooded: counted
                if not self._switch(port, frame, dst_mac):
                    continue  # switched to another guest only, or dropped
            # -- layer 3, from one struct; anything unusual to the slow parser
            if len(frame) < ip + 20:
                stats["ipv4_truncated"] += 1
                continue
            ver_ihl, _tos, total, _id, frag, _ttl, proto, _c, src, _dst = unpack_ip(frame, ip)
            if ver_ihl != 0x45 or total < 20 or ip + total > len(frame) or frag & 0x8000:
                self._ipv4_unusual(port, frame, ip, src_mac, now)
                continue
            if not trusted and ones_sum(frame[ip : ip + 20]) != 0xFFFF:
                stats["ipv4_bad_checksum"] += 1
                continue
            n_ip += 1
            if proto == 6:
                n_tcp += 1
                tcp_bytes += total
            elif proto == 17:
                n_udp += 1
                udp_bytes += total
            else:
                self._count_proto(proto, total)
            if src != ANY_V4 and neighbour(src) != src_mac:
                if not self._ipv4_source_allowed(port, src_mac, src):
                    continue
            if frag & 0x3FFF:
                self._fragment(self._packet(frame, ip, 20, total), src_mac, now, trusted)
            else:
                self._l4(frame, ip, 20, total, proto, src_mac, now, trusted, vnet and frame[1])
        stats["frames_in"] += n_frames
        if n_ip:
            stats["ipv4_in"] += n_ip
        if n_tcp:
            stats["tcp_packets_in"] += n_tcp
            stats["tcp_bytes_in"] += tcp_bytes
        if n_udp:
            stats["udp_packets_in"] += n_udp
            stats["udp_bytes_in"] += udp_bytes

    def _not_ipv4(
        self,
        port: int,
        frame: bytes,
        off: int,
        ethertype: bytes,
        dst_mac: bytes,
        src_mac: bytes,
        now: float,
    ) -> None:
        """Every frame of the batch that is not IPv4: ARP, IPv6 (network6.py when it is on),
        or anything else (switched between guests only)."""
        if ethertype == _ETH_ARP:
            self._arp_frame(port, frame, off, dst_mac, src_mac)
            return
        if ethertype == _ETH_IPV6 and self.ipv6_enabled:
            self._ipv6_frame(port, frame, off, dst_mac, src_mac, now)
            return
        if dst_mac != self.gateway_mac and not self._switch(port, frame, dst_mac):
            return  # switched to another guest only, or dropped
        self.stats["ipv6_dropped" if ethertype == _ETH_IPV6 else "unknown_ethertype_dropped"] += 1

    def _ndp_lookup(self, ip: bytes) -> bytes | None:
        return self.ndp.cache.lookup(ip) if self.ndp is not None else None

    def _count_proto(self, proto: int, total: int) -> None:
        name = PROTO_NAMES.get(proto, "other")
        self.stats[name + "_packets_in"] += 1
        self.stats[name + "_bytes_in"] += total

    @staticmethod
    def _packet(frame: bytes, ip: int, hlen: int, total: int) -> ipv4.Ipv4Packet:
        """The packet object the slower handlers take, from a header already validated."""
        _vi, tos, _t, ident, frag, ttl, proto, _c, src, dst = _IPV4.unpack_from(frame, ip)
        return ipv4.Ipv4Packet(
            src,
            dst,
            proto,
            ttl,
            ident,
            frag,
            tos,
            frame[ip : ip + hlen],
            memoryview(frame)[ip + hlen : ip + total],
        )

    def _ipv4_unusual(self, port: int, frame: bytes, ip: int, src_mac: bytes, now: float) -> None:
        """An IPv4 header with options or something wrong: the full parser says which."""
        try:
            pkt = ipv4.parse_ipv4(memoryview(frame)[ip:])
        except ipv4.Ipv4Error as e:
            self.stats[str(e)] += 1
            return
        self.stats["ipv4_in"] += 1
        total = len(pkt.header) + len(pkt.payload)
        self._count_proto(pkt.proto, total)
        if pkt.src != ANY_V4 and self.neighbours.lookup(pkt.src) != src_mac:
            if not self._ipv4_source_allowed(port, src_mac, pkt.src):
                return
        trusted = port in self._vnet_ports
        if pkt.is_fragment:
            self._fragment(pkt, src_mac, now, trusted)
        else:
            hlen = len(pkt.header)
            gso = trusted and frame[1]
            total = hlen + len(pkt.payload)
            self._l4(frame, ip, hlen, total, pkt.proto, src_mac, now, trusted, gso)

    def _fragment(self, pkt: ipv4.Ipv4Packet, src_mac: bytes, now: float, trusted: bool) -> None:
        """A fragment to reassemble; the whole datagram then goes on like any packet."""
        whole = self.reassembler.add(pkt, now)
        if whole is not None:
            raw = whole.header + bytes(whole.payload)
            self._l4(raw, 0, len(whole.header), len(raw), whole.proto, src_mac, now, trusted)

    def _l4(
        self,
        frame: bytes,
        ip: int,
        hlen: int,
        total: int,
        proto: int,
        src_mac: bytes,
        now: float,
        trusted: bool,
        gso: int = 0,
    ) -> None:
        """A whole IPv4 datagram (header at `ip`, validated, from an allowed source), by
        protocol: layer 4 validated once, then an open connection or flow takes it
        directly, or the slower handlers (transport, the gateway's services) do."""
        stats = self.stats
        l4 = ip + hlen
        end = ip + total
        src = frame[ip + 12 : ip + 16]
        dst = frame[ip + 16 : ip + 20]
        if proto == 6:
            if not trusted and not checksum_mod.verify_transport_v4(src, dst, 6, frame[l4:end]):
                stats["tcp_bad_checksum"] += 1
                return
            try:
                seg = tcp.TcpSegment.parse(memoryview(frame)[l4:end])
            except tcp.TcpParseError:
                stats["tcp_malformed"] += 1
                return
            stats["tcp_segments_in"] += 1
            transport = self.transport
            conn = transport.tcp_conns.get((src, seg.src_port, dst, seg.dst_port))
            if conn is not None and not seg.flags & _SYN and conn.state is not _LISTEN:
                conn.receive_segment(seg, now)  # an open connection: straight to it
                transport.dirty[conn] = None
            else:
                transport.tcp_segment(self._packet(frame, ip, hlen, total), seg, now)
            return
        if proto == 17:
            if total - hlen < 8:
                stats["udp_truncated"] += 1
                return
            sport, dport, ulen, ucsum = _UDP.unpack_from(frame, l4)
            if ulen < 8 or ulen > total - hlen:
                stats["udp_bad_length"] += 1
                return
            if (
                ucsum
                and not trusted
                and not checksum_mod.verify(
                    frame[l4 : l4 + ulen], checksum_mod.pseudo_header_sum_v4(src, dst, 17, ulen)
                )
            ):
                stats["udp_bad_checksum"] += 1
                return
            stats["udp_in"] += 1
            flows = self.transport.udp_flows
            # A datagram of an open flow, to go on (TTL above 1; no UDP segmentation
            # offload, which an offload port's header would say): straight to the flow.
            if flows and frame[ip + 8] > 1 and not gso:
                flow = flows.get(frame[ip + 12 : ip + 20] + frame[l4 : l4 + 4])
                if flow is not None:
                    self.transport.udp_flow_datagrams.append((flow, frame[l4 + 8 : l4 + ulen]))
                    return
            self._udp(
                self._packet(frame, ip, hlen, total),
                sport,
                dport,
                memoryview(frame)[l4 + 8 : l4 + ulen],
                src_mac,
                now,
            )
            return
        pkt = self._packet(frame, ip, hlen, total)
        if proto == ipv4.PROTO_ICMP:
            self._icmp(pkt)
            return
        stats["ipv4_unknown_protocol"] += 1
        if pkt.dst in self.virtual_ips:
            self.send_icmp_error(
                self.gateway_ip, pkt.src, icmp.DEST_UNREACHABLE, icmp.PROTO_UNREACHABLE, pkt.raw
            )

    # ---- port rules ---------------------------------------------------------------

    def _valid_source(self, ip: bytes) -> bool:
        """RFC 1122 3.2.1.3: a guest's own address is in the subnet and not one of the
        gateway's, the broadcast or the network address."""
        return (
            self._in_subnet(ip)
            and ip not in self.virtual_ips
            and ip != self.broadcast_ip
            and ip != self.network_ip
        )

    def _neighbour_may_move(self, port: int, ip: bytes, mac: bytes) -> bool:
        """Whether a frame from `port` may (re)bind `ip` to `mac`: not when `ip` belongs to
        another MAC that lives on another port (an address theft; that guest's own frames
        and the port it left, or its MAC's ageing, free it)."""
        old = self.neighbours.lookup(ip)
        if old is None or old == mac:
            return True
        old_port = self.cam.lookup(old)
        return old_port is None or old_port == port

    def _ipv4_source_allowed(self, port: int, src_mac: bytes, src: bytes) -> bool:
        """Every IPv4 frame to the gateway whose source is not yet bound to its MAC passes
        here (port security checks a port's sources here too): martian sources and sources
        that belong to another port's guest are dropped and counted; else the neighbour
        table learns the source."""
        if not self._valid_source(src):
            self.stats["ipv4_bad_source"] += 1  # RFC 1122 3.2.1.3: martian source
            return False
        if not self._address_may_move(port, src, src_mac, "ip"):
            return False
        self.neighbours.learn(src, src_mac)
        return True

    def _arp_sender_allowed(self, port: int, src_mac: bytes, pkt: arp.ArpPacket) -> bool:
        """Every ARP frame from a guest, to whomever it goes, passes here before it is
        flooded, switched or answered (port security checks a port's senders here too)."""
        if pkt.sender_mac != src_mac:
            self.stats["arp_spoof_dropped"] += 1
            return False
        if pkt.sender_ip in self.virtual_ips:
            # A claim to be the gateway (or DNS, .254): never reaches another guest.
            self.stats["arp_spoof_dropped"] += 1
            return self.port_security.refuse("arp_gateway_claim_dropped", pkt.sender_ip)
        if pkt.sender_ip == ANY_V4:
            return True
        return self._address_may_move(port, pkt.sender_ip, src_mac, "arp")

    def _address_may_move(self, port: int, ip: bytes, mac: bytes, kind: str) -> bool:
        """Whether `port` may claim `ip` at `mac` (refusals counted by `kind`). With port
        security the binding table decides (DHCP's leases and first use, kept while a port
        lives); without it the neighbour table does (an address in use by another live
        port's MAC stays there)."""
        theft = "arp_address_theft_dropped" if kind == "arp" else "ipv4_source_conflict_dropped"
        if self.port_security.enabled:
            return self.port_security.claim(port, mac, ip, theft, kind + "_limit_dropped")
        if self._neighbour_may_move(port, ip, mac):
            return True
        return self.port_security.refuse(theft, ip)  # counted and logged as with it on

    # ---- layer 2 --------------------------------------------------------------------

    def _switch(self, port: int, frame: bytes, dst_mac: bytes) -> bool:
        """A frame not to the gateway MAC: to another guest, or flooded. True when the
        gateway takes it as well (a broadcast)."""
        if dst_mac[0] & 1:
            for p in self._ports:
                if p != port:
                    self._switch_out(port, p, frame)
            self.stats["flooded"] += 1
            return True
        out = self.cam.lookup(dst_mac)
        if out is None or out == port:
            self.stats["unknown_unicast_dropped"] += 1
            return False
        self._switch_out(port, out, frame)
        self.stats["switched"] += 1
        return False

    def _switch_out(self, in_port: int, out: int, frame: bytes) -> None:
        """Forward a guest's frame to port `out`, converting between plain and virtio-net
        formats: a plain port cannot take a GSO super-frame (dropped, counted), and gets a
        partial checksum completed in software."""
        if in_port not in self._vnet_ports:
            if out in self._vnet_ports:
                self._emit_raw(out, VNET_NONE + frame)
            else:
                self._emit_raw(out, frame)
            return
        if out in self._vnet_ports:
            self._emit_raw(out, frame)
            return
        flags, gso_type, _hl, _gs, csum_start, csum_offset = VNET_HDR.unpack_from(frame)
        if gso_type != VNET_GSO_NONE:
            self.stats["gso_frame_not_switchable"] += 1
            return
        data = bytearray(frame[VNET_LEN:])
        if flags & VNET_F_NEEDS_CSUM:
            pos = csum_start + csum_offset
            if pos + 2 <= len(data):
                value = checksum_mod.checksum(data[csum_start:])  # the field holds the seed
                data[pos : pos + 2] = (value or 0xFFFF).to_bytes(2, "big")
        self._emit_raw(out, bytes(data))

    def _arp_frame(self, port: int, frame: bytes, off: int, dst_mac: bytes, src_mac: bytes) -> None:
        """Every ARP frame, to the gateway, flooded or to another guest: parsed and its
        sender checked once, before it goes anywhere."""
        at = off + ethernet.HEADER_LEN
        to_gateway = dst_mac == self.gateway_mac or dst_mac[0] & 1
        try:
            pkt = arp.parse_arp(memoryview(frame)[at:])
        except arp.ArpError:
            self.stats["malformed_arp"] += 1
            return
        if to_gateway:
            self.stats["arp_packets_in"] += 1
            self.stats["arp_bytes_in"] += len(frame) - at
        if not self._arp_sender_allowed(port, src_mac, pkt):
            return
        if dst_mac != self.gateway_mac and not self._switch(port, frame, dst_mac):
            return
        self._arp(pkt)

    def _arp(self, pkt: arp.ArpPacket) -> None:
        if pkt.sender_ip != ANY_V4 and self._valid_source(pkt.sender_ip):
            self.neighbours.learn(pkt.sender_ip, pkt.sender_mac)
            if pkt.sender_ip in self._pending_arp:
                self._flush_arp_queue(pkt.sender_ip, pkt.sender_mac)
        if pkt.op == arp.OP_REQUEST and pkt.target_ip in self.virtual_ips:
            self.stats["arp_replies_out"] += 1
            reply = arp.build_arp(
                arp.OP_REPLY, self.gateway_mac, pkt.target_ip, pkt.sender_mac, pkt.sender_ip
            )
            self._emit_from_gateway(pkt.sender_mac, ETHERTYPE_ARP, reply)

    def _in_subnet(self, ip: bytes) -> bool:
        return (int.from_bytes(ip, "big") & self._mask_int) == self._net_int

    # ---- the gateway's services and the NAT's entry points -------------------------

    def _udp(
        self,
        pkt: ipv4.Ipv4Packet,
        sport: int,
        dport: int,
        payload: bytes | memoryview,
        src_mac: bytes,
        now: float,
    ) -> None:
        dst = pkt.dst
        if (
            dst == self.gateway_ip
            or dst == self.dns_ip
            or dst == LIMITED_BROADCAST
            or dst == self.broadcast_ip
        ):
            if dport == DHCP_SERVER_PORT and (dst != self.dns_ip or dst == self.gateway_ip):
                self._dhcp(src_mac, bytes(payload), now)
                return
            if dport == DNS_PORT and dst == self.dns_ip:
                self._dns(pkt.src, sport, bytes(payload), dst)
                return
            if dst == self.host_ip:
                pass  # the gateway is the host's loopback too: NAT below
            elif dst == self.gateway_ip or dst == self.dns_ip:
                self.send_icmp_error(
                    dst, pkt.src, icmp.DEST_UNREACHABLE, icmp.PORT_UNREACHABLE, pkt.raw
                )
                return
            else:
                self.stats["udp_broadcast_dropped"] += 1
                return
        self.transport.udp_datagram(pkt, sport, dport, payload)

    def _dhcp(self, src_mac: bytes, payload: bytes, now: float) -> None:
        # The port the request came in by (the CAM table learnt it from this very frame):
        # leases are counted per port and bound to it.
        port = self.cam.lookup(src_mac)
        reply = self.dhcp.handle(payload, src_mac, now, port)
        while (event := self.dhcp.next_event()) is not None:
            mac, ip = ethernet.parse_mac(event.mac), ip_bytes(event.ip)
            if isinstance(event, LeaseGranted):
                self.neighbours.learn(ip, mac)
                if port is not None:
                    self.port_security.bind(port, mac, ip)
                self.events.append(LeaseEvent(event.mac, str(event.ip), event.hostname))
            else:
                self.port_security.unbind(ip, mac)
                self.events.append(LeaseEvent(event.mac, str(event.ip), event.hostname, True))
        if reply is None:
            return
        dst_ip = reply.dst_ip.packed
        datagram = udp.build_udp(
            self.gateway_ip, dst_ip, DHCP_SERVER_PORT, DHCP_CLIENT_PORT, reply.payload
        )
        packet = ipv4.build_ipv4(
            self.gateway_ip, dst_ip, ipv4.PROTO_UDP, datagram, self._next_ident()
        )
        self._emit_from_gateway(reply.dst_mac, ETHERTYPE_IPV4, packet)

    def _dns(self, guest_ip: bytes, guest_port: int, query: bytes, server_ip: bytes) -> None:
        """A query to the DNS address `server_ip` (IPv4's or `dns6`): answered from the local
        zones, or forwarded upstream (the reply then comes from `server_ip` too)."""
        result = self.dns.handle_query(query)
        if isinstance(result, ForwardQuery):
            self.events.append(DnsQueryOutbound(guest_ip, guest_port, result.data, server_ip))
        elif result:
            self.send_udp(server_ip, DNS_PORT, guest_ip, guest_port, result)

    def _icmp(self, pkt: ipv4.Ipv4Packet) -> None:
        try:
            msg = icmp.parse_icmp(pkt.payload)
        except icmp.IcmpError as e:
            self.stats[str(e)] += 1
            return
        self.stats["icmp_in"] += 1
        if msg.type != icmp.ECHO_REQUEST:
            self.stats["icmp_non_echo_dropped"] += 1
            return
        if pkt.dst == self.gateway_ip or pkt.dst == self.dns_ip:
            self.send_icmp_echo_reply(pkt.dst, pkt.src, msg.ident, msg.seq, msg.payload)
            return
        target = self.nat_target(pkt, "icmp", 0, 0)
        if target is None:
            return
        self.events.append(
            IcmpEchoOutbound(pkt.src, pkt.dst, target, msg.ident, msg.seq, msg.payload)
        )
