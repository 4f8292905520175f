"""The virtual network: switch ports, the gateway's IPv4 stack, and the events for the NAT.

Theory of operation. `Network` owns the CAM table, the neighbour table, fragment
reassembly and the gateway's protocol handlers. The asyncio side (hostd/switch.py) feeds it
batches of frames per link with `receive_frames(port, frames, now)` and then drains
`frames_to_send()` (frames per port) and `events` (work for the NAT: datagrams and echo
requests to relay to host sockets, DNS queries to forward). Replies from host sockets come
back through `send_udp`, `send_icmp_echo_reply` and `send_icmp_error`.

Frames between guests are switched at layer 2 and never parsed beyond Ethernet. Frames to
the gateway MAC (and broadcasts) are parsed: ARP is answered for the gateway and virtual
addresses; IPv4 is validated, reassembled, and dispatched by protocol and destination:
the gateway itself (DHCP, DNS, echo), .254 (host loopback, or refused), other subnet
addresses (dropped: guests reach each other directly), anything else (NAT).

It must never raise on guest input: every malformed frame ends as a named counter.
It does no I/O and reads no clock: `now` comes in with every call.
"""

from __future__ import annotations

import heapq
import ipaddress
import struct
from collections import Counter, deque
from dataclasses import dataclass

from hostd.config import NetworkConfig
from hostd.policy import FlowVerdict, Policy
from hostd.services.dhcp import DhcpConfig, DhcpServer, LeaseGranted
from hostd.services.dns import DnsResolver, DnsZones, ForwardQuery, default_zones
from hostd.stack import arp, ethernet, icmp, ipv4, tcp, udp
from hostd.stack import checksum as checksum_mod
from hostd.stack.ethernet import BROADCAST, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6
from hostd.stack.port_security import PortSecurity

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
# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
VNET_HDR = struct.Struct("<BBHHHH")
VNET_LEN = VNET_HDR.size
VNET_NONE = bytes(VNET_LEN)
VNET_F_NEEDS_CSUM = 1
VNET_GSO_NONE = 0
VNET_GSO_TCPV4 = 1
TCP_FRAME_HEADERS = 14 + 20  # Ethernet + IPv4 without options: where TCP starts in our frames


@dataclass(slots=True)
class UdpOutbound:
    """A guest datagram for the NAT to send from a host socket to `target`."""

    guest_ip: bytes
    guest_port: int
    dst_ip: bytes  # as the guest addressed it (e.g. .254)
    dst_port: int
    target_ip: str  # where the host socket really sends (e.g. 127.0.0.1)
    payload: bytes
    quote: bytes  # IP header + 8 bytes, for an ICMP error back to the guest


@dataclass(slots=True)
class IcmpEchoOutbound:
    guest_ip: bytes
    dst_ip: bytes
    target_ip: str
    ident: int
    seq: int
    payload: bytes


@dataclass(slots=True)
class DnsQueryOutbound:
    """A query the local zones do not answer: forward it upstream, reply from the gateway."""

    guest_ip: bytes
    guest_port: int
    query: bytes


@dataclass(slots=True)
class LeaseEvent:
    mac: str
    ip: str
    hostname: str | None
    released: bool = False  # released, declined or expired (else granted or renewed)


@dataclass(slots=True)
class FlowDenied:
    """A new flow the outbound policy refused (already answered with RST or ICMP)."""

    verdict: FlowVerdict


@dataclass(slots=True)
class TcpDial:
    """A guest SYN for a new connection: dial `target` on the host, then `tcp_accept` or
    `tcp_refuse`. `service` is "dns" for the gateway's own DNS over TCP (nothing to dial)."""

    conn: tcp.TcpConnection
    target_ip: str
    target_port: int
    service: str | None = None


@dataclass(slots=True)
class TcpConnEvent:
    """An event of one guest TCP connection (data readable, peer closed, reset, closed...)."""

    conn: tcp.TcpConnection
    event: tcp.TcpEvent


@dataclass(slots=True)
class UdpSessionDatagram:
    """A guest datagram to a 4-tuple registered by a UDP port forward (a reply)."""

    session: object
    payload: bytes


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
TcpKey = tuple[bytes, int, bytes, int]  # guest ip, guest port, destination ip, port


_PORTS = struct.Struct("!HH")
_ADDRS_PORTS = struct.Struct("!4s4sHH")  # IPv4 source, destination, then layer-4 ports


def udp_flow_key(guest_ip: bytes, guest_port: int, dst_ip: bytes, dst_port: int) -> bytes:
    """A flow's key in `Network.udp_flows`: the bytes of its datagrams' source and
    destination addresses and ports, as they sit in the frame."""
    return guest_ip + dst_ip + _PORTS.pack(guest_port, dst_port)


def ip_bytes(addr: ipaddress.IPv4Address | str) -> bytes:
    return ipaddress.IPv4Address(addr).packed


def ip_str(raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw))


class Network:
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
        # port security (16.1): the CAM table's and the binding table's counters are ours.
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
                max_leases_per_port=config.port_max_leases,  # port security (16.1)
            )
        )
        self.zones = zones or default_zones(str(config.gateway_ip), str(config.host_ip))
        self.dns = DnsResolver(self.zones)
        self.events: deque[Event] = deque()
        self._outbox: dict[int, list[bytes]] = {}
        self._ports: set[int] = set()
        self._vnet_ports: set[int] = set()
        self._trusted = False  # the frames being handled come from an offload port
        self._in_port = 0
        self._next_port = 1
        self._now = 0.0
        self._ident = 0
        self._pending_arp: dict[bytes, list[bytes]] = {}
        # When set, frames the gateway originates are also appended here (pcap, capture API).
        self.originated: list[bytes] | None = None
        self.tcp_conns: dict[TcpKey, tcp.TcpConnection] = {}
        self.tcp_pending: dict[TcpKey, tcp.TcpConnection] = {}  # dialling, insertion ordered
        self.tcp_max_pending = config.tcp_max_pending
        self.tcp_options = {
            "mss": config.mtu - 40,
            "recv_buffer": config.tcp_buffer,
            "send_buffer": config.tcp_buffer,
            "time_wait": config.tcp_time_wait,
            "ack_delay": config.tcp_ack_delay,
        }
        # UDP port-forward sessions: (guest ip, guest port, our ip, our port) → session.
        self.udp_sessions: dict[TcpKey, object] = {}
        # UDP NAT flows the NAT has opened, by `udp_flow_key`: their datagrams skip the event
        # objects and land in `udp_flow_datagrams` as (flow, payload), see `_flow_path`.
        self.udp_flows: dict[bytes, object] = {}
        self.udp_flow_datagrams: list[tuple[object, bytes]] = []
        self._tcp_dirty: dict[tcp.TcpConnection, None] = {}
        self._tcp_timers: list[tuple[float, int, tcp.TcpConnection]] = []
        self._tcp_timer_seq = 0

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
        self.port_security.forget_port(port)  # port security (16.1)
        self.neighbours.forget_macs(macs)
        self._outbox.pop(port, None)

    @property
    def ports(self) -> set[int]:
        return set(self._ports)

    # ---- output ------------------------------------------------------------------------

    def frames_to_send(self, now: float | None = None) -> dict[int, list[bytes]]:
        if self._tcp_dirty:
            self._tcp_output(self._now if now is None else now)
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
        self.send_ip(src, dst, ipv4.PROTO_UDP, udp.build_udp(src, dst, sport, dport, payload))

    def send_icmp_echo_reply(
        self, src: bytes, dst: bytes, ident: int, seq: int, payload: bytes
    ) -> None:
        self.stats["icmp_echo_replies"] += 1
        self.send_ip(src, dst, ipv4.PROTO_ICMP, icmp.build_echo_reply(ident, seq, payload))

    def send_icmp_error(
        self, src: bytes, dst: bytes, type_: int, code: int, quote: bytes, mtu: int = 0
    ) -> None:
        """An ICMP error to guest `dst` about the packet quoted in `quote`."""
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
        timers = self._tcp_timers
        while timers and timers[0][2].get_timer() != timers[0][0]:
            heapq.heappop(timers)  # stale: the connection's deadline moved since
        if timers and (best is None or timers[0][0] < best):
            best = timers[0][0]
        return best

    def handle_timer(self, now: float) -> None:
        self._now = now
        self.reassembler.expire(now)
        timers = self._tcp_timers
        while timers and timers[0][0] <= now:
            deadline, _, conn = heapq.heappop(timers)
            if conn.get_timer() == deadline:
                conn.handle_timer(now)
                self._tcp_dirty[conn] = None

    # ---- TCP ---------------------------------------------------------------------------

    def _tcp_options_for(self, port: int | None) -> dict:
        if port is not None and port in self._vnet_ports:
            # Offload: 64 KiB segments with only the pseudo header summed; the guest kernel
            # sees GRO super-packets. The largest that still fits an IPv4 total length:
            return dict(self.tcp_options, partial_checksum=True, gso_max=65535 - 20 - 60)
        return self.tcp_options

    def tcp_touch(self, conn: tcp.TcpConnection) -> None:
        """The application side used `conn` (send/read/close/abort): output it at the flush."""
        self._tcp_dirty[conn] = None

    def tcp_accept(self, conn: tcp.TcpConnection, now: float) -> None:
        """The host dial for `conn` succeeded: complete the guest's handshake."""
        self.tcp_pending.pop(conn.key, None)  # type: ignore[attr-defined]
        if conn.state is tcp.TcpState.LISTEN:
            conn.accept(now)
            self._tcp_dirty[conn] = None

    def tcp_refuse(self, conn: tcp.TcpConnection, now: float, unreachable: int | None = None):
        """The host dial failed: RST (refused), or an ICMP unreachable of code `unreachable`
        (timeout, no route), which fails the guest's connect() at once with EHOSTUNREACH."""
        key = conn.key  # type: ignore[attr-defined]
        self.tcp_pending.pop(key, None)
        if conn.state is not tcp.TcpState.LISTEN:
            return
        self.stats["tcp_refused"] += 1
        if unreachable is None:
            conn.refuse(now)
            self._tcp_dirty[conn] = None
        else:
            syn = conn.syn_quote  # type: ignore[attr-defined]
            self.send_icmp_error(key[2], key[0], icmp.DEST_UNREACHABLE, unreachable, syn)
            conn.abort()
        self._tcp_forget(conn)

    def _tcp_forget(self, conn: tcp.TcpConnection) -> None:
        key = conn.key  # type: ignore[attr-defined]
        if self.tcp_conns.get(key) is conn:
            del self.tcp_conns[key]
        self.tcp_pending.pop(key, None)

    def pull_tcp_events(self) -> None:
        """Move the events of connections touched since the last output into `events`; they
        stay marked for output. The NAT can then act (write to the host, dial) before this
        batch's frames are written, and a reply can still ride on them."""
        for conn in self._tcp_dirty:
            self._tcp_take_events(conn)

    def _tcp_take_events(self, conn: tcp.TcpConnection) -> None:
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, tcp.Closed):
                self._tcp_forget(conn)
            self.events.append(TcpConnEvent(conn, ev))

    def _tcp_output(self, now: float) -> None:
        dirty, self._tcp_dirty = self._tcp_dirty, {}
        for conn in dirty:
            segments = conn.segments_to_send(now)
            if segments:
                self._tcp_emit(conn, segments)
            self._tcp_take_events(conn)
            deadline = conn.get_timer()
            if deadline is not None:
                self._tcp_timer_seq += 1
                heapq.heappush(self._tcp_timers, (deadline, self._tcp_timer_seq, conn))

    def _tcp_emit(self, conn: tcp.TcpConnection, segments: list[bytes]) -> None:
        key = conn.key  # type: ignore[attr-defined]
        src, dst = key[2], key[0]
        stats = self.stats
        stats["tcp_segments_out"] += len(segments)
        stats["tcp_packets_out"] += len(segments)
        stats["tcp_bytes_out"] += sum(map(len, segments)) + 20 * len(segments)
        mac = self.neighbours.lookup(dst)
        port = self.cam.lookup(mac) if mac is not None else None
        if port is None or port not in self._vnet_ports:
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

    def tcp_connect(
        self, guest_ip: bytes, guest_port: int, src_ip: bytes, src_port: int, now: float
    ) -> tcp.TcpConnection | None:
        """Active open toward a guest (port forwarding): None when the 4-tuple is taken."""
        key = (guest_ip, guest_port, src_ip, src_port)
        if key in self.tcp_conns:
            return None
        mac = self.neighbours.lookup(guest_ip)
        port = self.cam.lookup(mac) if mac is not None else None
        conn = tcp.TcpConnection(
            src_ip, src_port, guest_ip, guest_port, now=now, **self._tcp_options_for(port)
        )
        conn.key = key  # type: ignore[attr-defined]
        conn.app = None  # type: ignore[attr-defined]
        conn.connect(now)
        self.tcp_conns[key] = conn
        self._tcp_dirty[conn] = None
        self.stats["tcp_connects_out"] += 1
        return conn

    # ---- input -------------------------------------------------------------------------

    def receive_frames(self, port: int, frames: list[bytes], now: float) -> None:
        self._now = now
        self._in_port = port
        if port in self._vnet_ports:
            # Our own vm-switch: the guest kernel's checksums may be left to us (offload) and
            # it is the only writer of this stream, so layer-4 checksums are not re-verified.
            if self.udp_flows or self.tcp_conns:
                frames = self._flow_path(frames, VNET_LEN, now)
            self._trusted = True
            try:
                for frame in frames:
                    self._receive_vnet(port, frame, now)
            finally:
                self._trusted = False
            return
        if self.udp_flows or self.tcp_conns:
            frames = self._flow_path(frames, 0, now)
        for frame in frames:
            self.receive_frame(port, frame, now)

    def take_udp_flow_datagrams(self) -> list[tuple[object, bytes]]:
        out, self.udp_flow_datagrams = self.udp_flow_datagrams, []
        return out

    def _flow_path(self, frames: list[bytes], off: int, now: float) -> list[bytes]:
        """Segments of open TCP connections and datagrams of open UDP NAT flows, found by a
        few byte compares and one dict lookup, skip the generic layers: a TCP segment goes
        to its connection, a datagram to `udp_flow_datagrams` (no event object). The first
        frame that is not for them, and every frame after it in the batch, are returned for
        the full path (so nothing overtakes anything). Only the plainest form qualifies: to
        the gateway MAC, IPv4 without options or fragmentation, lengths consistent, no SYN,
        for UDP a TTL above 1 and no GSO, and on a plain port valid header and layer-4
        checksums. A connection or flow exists only after its first packet passed every
        check of the full path, so what that path checks once (a source in the subnet, a
        destination that may be reached) holds for these as well."""
        udp_flows = self.udp_flows
        tcp_conns = self.tcp_conns
        udp_out = self.udp_flow_datagrams
        gateway_mac = self.gateway_mac
        addrs = _ADDRS_PORTS.unpack_from
        listen = tcp.TcpState.LISTEN
        parse = tcp.TcpSegment.parse
        rest: list[bytes] = []
        n_udp = udp_bytes = n_tcp = tcp_bytes = 0
        ip = off + 14
        for frame in frames:
            if rest:
                # Once one frame needs the full path, the rest of the batch follows it, so
                # frames keep their order (the flow path's work happens before the full
                # path's, and a flow's datagrams go out before the full path's events).
                rest.append(frame)
                continue
            if not (
                len(frame) >= ip + 28
                and frame[ip] == 0x45
                and frame[off : off + 6] == gateway_mac
                and frame[ip - 2 : ip] == b"\x08\x00"
                and not (frame[ip + 6] & 0x3F or frame[ip + 7])
            ):
                rest.append(frame)
                continue
            proto = frame[ip + 9]
            total = (frame[ip + 2] << 8) | frame[ip + 3]
            if proto == 6:
                src, dst, sport, dport = addrs(frame, ip + 12)
                conn = tcp_conns.get((src, sport, dst, dport))
                if (
                    conn is None
                    or conn.state is listen
                    or total < 40
                    or ip + total > len(frame)
                    or frame[ip + 33] & 0x02  # SYN: new connections, TIME_WAIT reuse
                    or (not off and not self._plain_valid(frame, total, 6))
                ):
                    rest.append(frame)
                    continue
                try:
                    seg = parse(memoryview(frame)[ip + 20 : ip + total])
                except tcp.TcpParseError:
                    rest.append(frame)  # counted there
                    continue
                if not self.port_security.admit_source(  # port security (16.1)
                    self._in_port, frame[off + 6 : off + 12], src, now
                ):
                    self.stats["frames_in"] += 1  # dropped, counted by port security
                    continue
                conn.receive_segment(seg, now)
                self._tcp_dirty[conn] = None
                n_tcp += 1
                tcp_bytes += total
            elif proto == 17 and frame[ip + 8] > 1 and (not off or not frame[1]):
                flow = udp_flows.get(frame[ip + 12 : ip + 24])
                if (
                    flow is None
                    or total != ((frame[ip + 24] << 8) | frame[ip + 25]) + 20
                    or ip + total > len(frame)
                    or (not off and not self._plain_valid(frame, total, 17))
                ):
                    rest.append(frame)
                    continue
                if not self.port_security.admit_source(  # port security (16.1)
                    self._in_port, frame[off + 6 : off + 12], frame[ip + 12 : ip + 16], now
                ):
                    self.stats["frames_in"] += 1  # dropped, counted by port security
                    continue
                udp_out.append((flow, frame[ip + 28 : ip + total]))
                n_udp += 1
                udp_bytes += total
            else:
                rest.append(frame)
        if n_udp or n_tcp:
            stats = self.stats
            stats["frames_in"] += n_udp + n_tcp
            stats["ipv4_in"] += n_udp + n_tcp
            if n_udp:
                stats["udp_packets_in"] += n_udp
                stats["udp_bytes_in"] += udp_bytes
                stats["udp_in"] += n_udp
            if n_tcp:
                stats["tcp_packets_in"] += n_tcp
                stats["tcp_bytes_in"] += tcp_bytes
                stats["tcp_segments_in"] += n_tcp
        return rest

    @staticmethod
    def _plain_valid(frame: bytes, total: int, proto: int) -> bool:
        """Header and layer-4 checksums of a plain frame (IPv4 at 14, no options)."""
        if checksum_mod.ones_sum(frame[14:34]) != 0xFFFF:
            return False
        if proto == 17 and frame[40] == 0 and frame[41] == 0:
            return True  # no UDP checksum
        return checksum_mod.verify_transport_v4(
            frame[26:30], frame[30:34], proto, frame[34 : 14 + total]
        )

    def _receive_vnet(self, port: int, frame: bytes, now: float) -> None:
        if len(frame) < VNET_LEN + ethernet.HEADER_LEN:
            self.stats["frames_in"] += 1
            self.stats["malformed_vnet"] += 1
            return
        flags, gso_type, _hl, _gs, csum_start, csum_offset = VNET_HDR.unpack_from(frame)
        self._vnet_in = (frame, flags, gso_type, csum_start, csum_offset)
        self.receive_frame(port, memoryview(frame)[VNET_LEN:], now)

    def _switch_out(self, out: int, frame: bytes | memoryview) -> None:
        """Forward a guest's frame to port `out`, converting between plain and virtio-net
        formats: a plain port cannot take a GSO super-frame (dropped, counted), and gets a
        partial checksum completed in software."""
        if not self._trusted:
            if out in self._vnet_ports:
                self._emit_raw(out, VNET_NONE + bytes(frame))
            else:
                self._emit_raw(out, frame)  # type: ignore[arg-type]
            return
        raw, flags, gso_type, csum_start, csum_offset = self._vnet_in
        if out in self._vnet_ports:
            self._emit_raw(out, raw)
            return
        if gso_type != VNET_GSO_NONE:
            self.stats["gso_frame_not_switchable"] += 1
            return
        data = bytearray(frame)
        if flags & VNET_F_NEEDS_CSUM:
            pos = csum_start + csum_offset
            if pos + 2 <= len(data):
                value = checksum_mod.checksum(data[csum_start:])  # the field holds the seed
                data[pos : pos + 2] = (value or 0xFFFF).to_bytes(2, "big")
        self._emit_raw(out, bytes(data))

    def receive_frame(self, port: int, frame: bytes | memoryview, now: float) -> None:
        stats = self.stats
        stats["frames_in"] += 1
        if len(frame) < ethernet.HEADER_LEN:
            stats["malformed_ethernet"] += 1
            return
        dst, src, ethertype = ethernet.HEADER.unpack_from(frame)
        if src[0] & 1 or src == ethernet.ZERO_MAC:
            stats["malformed_ethernet"] += 1
            return
        if not self.port_security.admit(port, src, ethertype, frame, now):  # port security (16.1)
            return
        self._in_port = port  # port security (16.1): DHCP leases are bound to their port
        if dst == self.gateway_mac:
            self._to_gateway(port, src, ethertype, frame, now)
            return
        if dst[0] & 1:
            for p in self._ports:
                if p != port:
                    self._switch_out(p, frame)
            stats["flooded"] += 1
            self._to_gateway(port, src, ethertype, frame, now)
            return
        out = self.cam.lookup(dst)
        if out is None or out == port:
            stats["unknown_unicast_dropped"] += 1
            return
        self._switch_out(out, frame)
        stats["switched"] += 1

    def _to_gateway(
        self, port: int, src_mac: bytes, ethertype: int, frame: bytes | memoryview, now: float
    ) -> None:
        body = memoryview(frame)[ethernet.HEADER_LEN :]  # no copy: parsers slice views
        if ethertype == ETHERTYPE_IPV4:
            self._ipv4(src_mac, body, now)
        elif ethertype == ETHERTYPE_ARP:
            self._arp(src_mac, body)
        elif ethertype == ETHERTYPE_IPV6:
            self.stats["ipv6_dropped"] += 1
        else:
            self.stats["unknown_ethertype_dropped"] += 1

    def _arp(self, src_mac: bytes, body: bytes) -> None:
        try:
            pkt = arp.parse_arp(body)
        except arp.ArpError:
            self.stats["malformed_arp"] += 1
            return
        self.stats["arp_packets_in"] += 1
        self.stats["arp_bytes_in"] += len(body)
        if pkt.sender_mac != src_mac or pkt.sender_ip in self.virtual_ips:
            self.stats["arp_spoof_dropped"] += 1
            return
        if pkt.sender_ip != ANY_V4 and self._in_subnet(pkt.sender_ip):
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

    def _ipv4(self, src_mac: bytes, body: bytes, now: float) -> None:
        try:
            pkt = ipv4.parse_ipv4(body)
        except ipv4.Ipv4Error as e:
            self.stats[str(e)] += 1
            return
        stats = self.stats
        stats["ipv4_in"] += 1
        proto_name = PROTO_NAMES.get(pkt.proto, "other")
        stats[proto_name + "_packets_in"] += 1
        stats[proto_name + "_bytes_in"] += len(body)
        if pkt.src != ANY_V4:
            if (
                not self._in_subnet(pkt.src)
                or pkt.src in self.virtual_ips
                or pkt.src == self.broadcast_ip
                or pkt.src == self.network_ip
            ):
                self.stats["ipv4_bad_source"] += 1  # RFC 1122 3.2.1.3: martian source
                return
            self.neighbours.learn(pkt.src, src_mac)
        if pkt.is_fragment:
            whole = self.reassembler.add(pkt, now)
            if whole is None:
                return
            pkt = whole
        if pkt.proto == ipv4.PROTO_UDP:
            self._udp(pkt, src_mac, now)
        elif pkt.proto == ipv4.PROTO_ICMP:
            self._icmp(pkt)
        elif pkt.proto == ipv4.PROTO_TCP:
            self._tcp(pkt, now)
        else:
            self.stats["ipv4_unknown_protocol"] += 1
            if pkt.dst in self.virtual_ips:
                self.send_icmp_error(
                    self.gateway_ip, pkt.src, icmp.DEST_UNREACHABLE, icmp.PROTO_UNREACHABLE, pkt.raw
                )

    def _nat_target(
        self, pkt: ipv4.Ipv4Packet, proto: str = "", sport: int = 0, dport: int = 0
    ) -> str | None:
        """Where a new flow to `pkt.dst` goes on the host, or None when it must not leave.

        Refusals answer with an ICMP error where the guest expects one (a TCP refusal by
        policy is left to the caller, which answers with RST)."""
        dst = pkt.dst
        if dst == self.host_ip:
            if self.config.host_loopback:
                target = LOOPBACK_V4
            else:
                self.stats["host_loopback_refused"] += 1
                self.send_icmp_error(
                    self.gateway_ip, pkt.src, icmp.DEST_UNREACHABLE, icmp.ADMIN_PROHIBITED, pkt.raw
                )
                return None
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
                return None
            target = dst
        if pkt.ttl <= 1 and dst != self.host_ip:
            self.stats["ttl_exceeded"] += 1
            self.send_icmp_error(self.gateway_ip, pkt.src, icmp.TIME_EXCEEDED, 0, pkt.raw)
            return None
        if proto and self.policy.active:
            verdict = self.policy.check(proto, pkt.src, sport, target, dport, self._now)
            if not verdict.allowed:
                self.stats[f"policy_{proto}_refused"] += 1
                self.events.append(FlowDenied(verdict))
                if proto != "tcp":
                    self.send_icmp_error(
                        self.gateway_ip,
                        pkt.src,
                        icmp.DEST_UNREACHABLE,
                        icmp.ADMIN_PROHIBITED,
                        pkt.raw,
                    )
                return None
        return ip_str(target)

    def _udp(self, pkt: ipv4.Ipv4Packet, src_mac: bytes, now: float) -> None:
        try:
            sport, dport, payload = udp.parse_udp(
                pkt.src, pkt.dst, pkt.payload, verify_checksum=not self._trusted
            )
        except udp.UdpError as e:
            self.stats[str(e)] += 1
            return
        self.stats["udp_in"] += 1
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
                self._dns(pkt.src, sport, bytes(payload))
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
        if self.udp_sessions:
            session = self.udp_sessions.get((pkt.src, sport, dst, dport))
            if session is not None:
                self.events.append(UdpSessionDatagram(session, payload))
                return
        # A datagram of an open flow that missed the flow path was decided with its first.
        decided = udp_flow_key(pkt.src, sport, dst, dport) in self.udp_flows
        target = self._nat_target(pkt, "" if decided else "udp", sport, dport)
        if target is None:
            return
        quote = pkt.header + pkt.payload[:8]
        self.events.append(UdpOutbound(pkt.src, sport, dst, dport, target, payload, quote))

    def _dhcp(self, src_mac: bytes, payload: bytes, now: float) -> None:
        reply = self.dhcp.handle(payload, src_mac, now, self._in_port)  # port security (16.1)
        while (event := self.dhcp.next_event()) is not None:
            if isinstance(event, LeaseGranted):
                self.neighbours.learn(ip_bytes(event.ip), ethernet.parse_mac(event.mac))
                self.port_security.bind(  # port security (16.1)
                    self._in_port, ethernet.parse_mac(event.mac), ip_bytes(event.ip)
                )
                self.events.append(LeaseEvent(event.mac, str(event.ip), event.hostname))
            else:
                self.port_security.unbind(  # port security (16.1)
                    ip_bytes(event.ip), ethernet.parse_mac(event.mac)
                )
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

    def _dns(self, guest_ip: bytes, guest_port: int, query: bytes) -> None:
        result = self.dns.handle_query(query)
        if isinstance(result, ForwardQuery):
            self.events.append(DnsQueryOutbound(guest_ip, guest_port, result.data))
        elif result:
            self.send_udp(self.dns_ip, DNS_PORT, guest_ip, guest_port, result)

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
        target = self._nat_target(pkt, "icmp")
        if target is None:
            return
        self.events.append(
            IcmpEchoOutbound(pkt.src, pkt.dst, target, msg.ident, msg.seq, msg.payload)
        )

    def _tcp(self, pkt: ipv4.Ipv4Packet, now: float) -> None:
        stats = self.stats
        payload = pkt.payload
        if not self._trusted and not tcp.verify_segment_checksum(pkt.src, pkt.dst, payload):
            stats["tcp_bad_checksum"] += 1
            return
        try:
            seg = tcp.TcpSegment.parse(payload)
        except tcp.TcpParseError:
            stats["tcp_malformed"] += 1
            return
        stats["tcp_segments_in"] += 1
        key = (pkt.src, seg.src_port, pkt.dst, seg.dst_port)
        conn = self.tcp_conns.get(key)
        flags = seg.flags
        is_syn = flags & (tcp.SYN | tcp.ACK | tcp.RST) == tcp.SYN
        if conn is not None:
            if is_syn and conn.accepts_new_syn(seg):
                # A new connection reusing a 4-tuple we hold in TIME_WAIT, accepted as Linux
                # does (gvproxy drops these SYNs).
                stats["tcp_time_wait_reused"] += 1
                conn.abort()
                self._tcp_forget(conn)
                self._tcp_dirty[conn] = None
            elif conn.state is tcp.TcpState.LISTEN and is_syn:
                return  # a retransmitted SYN while the host dial is still pending
            else:
                conn.receive_segment(seg, now)
                self._tcp_dirty[conn] = None
                return
        if not is_syn:
            stats["tcp_no_connection"] += 1
            reply = tcp.build_reset_reply(pkt.dst, pkt.src, seg)
            if reply is not None:
                self.send_ip(pkt.dst, pkt.src, ipv4.PROTO_TCP, reply)
            return
        service = None
        if pkt.dst == self.dns_ip and seg.dst_port == DNS_PORT:
            service, target = "dns", ""
        elif pkt.dst == self.gateway_ip and seg.dst_port in self.gateway_tcp_services:
            service, target = self.gateway_tcp_services[seg.dst_port], ""
        elif (pkt.dst == self.gateway_ip or pkt.dst == self.dns_ip) and pkt.dst != self.host_ip:
            # (a gateway that is also the host loopback, as slirp4netns's .2, is NATed)
            stats["tcp_gateway_refused"] += 1
            reply = tcp.build_reset_reply(pkt.dst, pkt.src, seg)
            if reply is not None:
                self.send_ip(pkt.dst, pkt.src, ipv4.PROTO_TCP, reply)
            return
        else:
            dst = pkt.dst
            if dst == LIMITED_BROADCAST or dst == self.broadcast_ip or dst[0] >= 224:
                stats["tcp_broadcast_dropped"] += 1  # RFC 1122 4.2.3.10: discard silently
                return
            refusals = stats["host_loopback_refused"] + stats["ttl_exceeded"]
            target = self._nat_target(pkt, "tcp", seg.src_port, seg.dst_port)
            if target is None:
                # An ICMP error already answered (.254 refused, TTL exceeded): no RST too.
                if stats["host_loopback_refused"] + stats["ttl_exceeded"] == refusals:
                    reply = tcp.build_reset_reply(pkt.dst, pkt.src, seg)
                    if reply is not None:
                        self.send_ip(pkt.dst, pkt.src, ipv4.PROTO_TCP, reply)
                return
        if service is None and len(self.tcp_pending) >= self.tcp_max_pending:
            # Bounded, but never blocking: the oldest pending dial gives way, so a pile of
            # dials to a black hole cannot stop connections to live destinations.
            _, oldest = next(iter(self.tcp_pending.items()))
            stats["tcp_pending_evicted"] += 1
            self.tcp_refuse(oldest, now, unreachable=icmp.HOST_UNREACHABLE)
            self.events.append(TcpConnEvent(oldest, tcp.ConnectionFailed("evicted")))
        conn = tcp.TcpConnection.from_syn(
            pkt.dst,
            seg.dst_port,
            pkt.src,
            seg.src_port,
            seg,
            now=now,
            **self._tcp_options_for(self._in_port),
        )
        conn.key = key  # type: ignore[attr-defined]
        conn.app = None  # type: ignore[attr-defined]
        conn.syn_quote = pkt.header + payload[:8]  # type: ignore[attr-defined]
        self.tcp_conns[key] = conn
        stats["tcp_syns"] += 1
        if service is None:
            self.tcp_pending[key] = conn
        self.events.append(TcpDial(conn, target, seg.dst_port, service))
