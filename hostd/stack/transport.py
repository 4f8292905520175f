"""The transport layer: the gateway's TCP connections and UDP flows, above any network layer.

Theory of operation. `Transport` owns the layer-4 state the gateway keeps per guest
conversation: TCP connections by 4-tuple (`tcp_conns`), the ones still waiting for a host
dial (`tcp_pending`), UDP NAT flows and port-forward sessions, the set of connections
touched since the last output (`_dirty`) and a heap of their timer deadlines. It sits on
the L3 | L4 seam as gVisor's transport demuxer does: the network layer below
(`hostd/stack/network.py`, IPv4 and IPv6) validates frames and packets, applies its address rules
and then hands over

* `tcp_segment(pkt, seg, now)`: a checksummed, parsed segment with no live connection or one
  that opens or re-opens a connection (SYNs, TIME_WAIT reuse, resets for strays);
* `udp_datagram(pkt, sport, dport, payload)`: a datagram that is not for a gateway
  service (DHCP, DNS), for a port-forward session, an open flow, or a new NAT flow.

Segments of an open connection never come here per packet: the network layer looks the
4-tuple up in `tcp_conns` itself and calls `receive_segment` (then `mark`), so the hot
path costs one dict lookup. A packet (`pkt`) is whatever the network layer parsed; all this
module reads of it is `src`, `dst`, `ttl` and `quote` (what an ICMP error about it
quotes), so IPv4's and IPv6's packet classes come in alike. Addresses are `bytes` of 4 or
16: the family is their length, and connections to IPv6 guests get `tcp_options6` (the MSS
of the larger header) and `GSO_MAX6`.

What it asks of the layer below is the `NetworkLayer` protocol: send a datagram, send
an "unreachable" answer quoting a packet, say where a new flow may go (`route_tcp_syn`,
`nat_target`), whether the port a guest address sits on takes offload, and emit a
connection's segments. Its codes for "unreachable" are ICMPv4's (`hostd/stack/icmp.py`),
which the network layer maps to ICMPv6's for an IPv6 guest.

Bounds. Connections in SYN_RECEIVED (dialling, or a gateway service handshaking) and
established NAT connections are capped globally (`max_half_open`, `max_connections`) and
per switch port (`per_port_share` of each cap, so one guest cannot evict or starve
another's dials). At a cap a new SYN is refused at once (RST) and counted; a pending
dial over `max_pending` gives way oldest-first so dials to a black hole cannot stop
connections to live destinations.

It does no I/O and reads no clock; events for the NAT go to the shared `events` deque.
"""

from __future__ import annotations

import heapq
import struct
from collections import Counter, deque
from dataclasses import dataclass
from typing import Protocol

from netferry.hostd.stack import icmp, tcp

TcpKey = tuple[bytes, int, bytes, int]  # guest ip, guest port, destination ip, port
GSO_MAX = 65535 - 20 - 60  # the largest TCP segment that still fits an IPv4 total length
GSO_MAX6 = 65535 - 60  # the same in an IPv6 payload length (the fixed header is not in it)


class Packet(Protocol):
    """What the transport reads of a network-layer packet."""

    src: bytes
    dst: bytes
    ttl: int

    @property
    def quote(self) -> bytes: ...


@dataclass(slots=True)
class TcpRoute:
    """Where a new guest connection goes: a gateway `service` (nothing to dial) or a host
    `target`; `refused` when it must not be made, `answered` when the network layer
    already told the guest why (ICMP), so no RST follows."""

    target: str = ""
    service: str | None = None
    refused: bool = False
    answered: bool = False


class NetworkLayer(Protocol):
    """What the transport needs from the layer below (one object for IPv4 and IPv6)."""

    def send_ip(self, src: bytes, dst: bytes, proto: int, payload: bytes) -> None: ...

    def send_unreachable(self, src: bytes, dst: bytes, code: int, quote: bytes) -> None: ...

    def route_tcp_syn(self, pkt: Packet, sport: int, dport: int) -> TcpRoute: ...

    def nat_target(self, pkt: Packet, proto: str, sport: int, dport: int) -> str | None: ...

    def port_of(self, ip: bytes) -> int | None: ...

    def offload_port(self, ip: bytes) -> bool: ...

    def send_tcp(self, conn: tcp.TcpConnection, segments: list[bytes]) -> None: ...


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


class UdpSession(Protocol):
    """A UDP port forward's session: takes the guest's replies to it."""

    def reply(self, payload: bytes | memoryview) -> None: ...


@dataclass(slots=True)
class UdpSessionDatagram:
    """A guest datagram to a 4-tuple registered by a UDP port forward (a reply)."""

    session: UdpSession
    payload: bytes | memoryview


_PORTS = struct.Struct("!HH")


def udp_flow_key(guest_ip: bytes, guest_port: int, dst_ip: bytes, dst_port: int) -> bytes:
    """A flow's key in `Transport.udp_flows`: the bytes of its datagrams' source and
    destination addresses and ports, as they sit in an IPv4 header followed by UDP (so the
    IPv4 receive path slices it out of the frame); the same construction for IPv6."""
    return guest_ip + dst_ip + _PORTS.pack(guest_port, dst_port)


class Transport:
    def __init__(
        self,
        l3: NetworkLayer,
        stats: Counter[str],
        events: deque,
        *,
        tcp_options: dict,
        max_pending: int,
        tcp_options6: dict | None = None,
        max_half_open: int = 4096,
        max_connections: int = 65536,
        per_port_share: float = 0.5,
    ) -> None:
        self.l3 = l3
        self.stats = stats
        self.events = events
        self.tcp_options = tcp_options
        # Connections to IPv6 guests (their MSS is smaller by the larger header).
        self.tcp_options6 = tcp_options if tcp_options6 is None else tcp_options6
        self.tcp_conns: dict[TcpKey, tcp.TcpConnection] = {}
        self.tcp_pending: dict[TcpKey, tcp.TcpConnection] = {}  # dialling, insertion ordered
        self.max_pending = max_pending
        self.max_half_open = max_half_open
        self.max_connections = max_connections
        self.per_port_share = per_port_share
        # Connections in SYN_RECEIVED (pending dial or service handshake) and established
        # NAT connections, as sets (by switch port too) so the caps are O(1) to check.
        self._half_open: dict[tcp.TcpConnection, int | None] = {}
        self._established: dict[tcp.TcpConnection, int | None] = {}
        self._half_open_by_port: Counter[int | None] = Counter()
        self._pending_by_port: Counter[int | None] = Counter()
        self._established_by_port: Counter[int | None] = Counter()
        # UDP port-forward sessions: (guest ip, guest port, our ip, our port) → session.
        self.udp_sessions: dict[TcpKey, UdpSession] = {}
        # UDP NAT flows the NAT has opened, by `udp_flow_key`: their datagrams skip the event
        # objects and land in `udp_flow_datagrams` as (flow, payload), in arrival order.
        self.udp_flows: dict[bytes, object] = {}
        self.udp_flow_datagrams: list[tuple[object, bytes]] = []
        self.dirty: dict[tcp.TcpConnection, None] = {}
        self._timers: list[tuple[float, int, tcp.TcpConnection]] = []
        self._timer_seq = 0

    # ---- the application side --------------------------------------------------------

    def touch(self, conn: tcp.TcpConnection) -> None:
        """The application side used `conn` (send/read/close/abort): output it at the flush."""
        self.dirty[conn] = None

    def accept(self, conn: tcp.TcpConnection, now: float) -> None:
        """The host dial for `conn` succeeded: complete the guest's handshake."""
        self._unpend(conn)
        if conn.state is tcp.TcpState.LISTEN:
            conn.accept(now)
            self.dirty[conn] = None

    def refuse(self, conn: tcp.TcpConnection, now: float, unreachable: int | None = None) -> None:
        """The host dial failed: RST (refused), or an ICMP unreachable of code `unreachable`
        (timeout, no route), which fails the guest's connect() at once with EHOSTUNREACH."""
        key = conn.key
        self._unpend(conn)
        if conn.state is not tcp.TcpState.LISTEN:
            return
        self.stats["tcp_refused"] += 1
        if unreachable is None:
            conn.refuse(now)
            self.dirty[conn] = None
        else:
            self.l3.send_unreachable(key[2], key[0], unreachable, conn.syn_quote)
            conn.abort()
        self.forget(conn)

    def connect(
        self, guest_ip: bytes, guest_port: int, src_ip: bytes, src_port: int, now: float
    ) -> tcp.TcpConnection | None:
        """Active open toward a guest (port forwarding): None when the 4-tuple is taken."""
        key = (guest_ip, guest_port, src_ip, src_port)
        if key in self.tcp_conns:
            return None
        conn = tcp.TcpConnection(
            src_ip, src_port, guest_ip, guest_port, now=now, **self._options_to(guest_ip)
        )
        conn.key = key
        conn.connect(now)
        self.tcp_conns[key] = conn
        self.dirty[conn] = None
        self.stats["tcp_connects_out"] += 1
        return conn

    def forget(self, conn: tcp.TcpConnection) -> None:
        key = conn.key
        if self.tcp_conns.get(key) is conn:
            del self.tcp_conns[key]
        self._unpend(conn)
        self._leave_caps(conn)

    def _options_to(self, guest_ip: bytes) -> dict:
        v6 = len(guest_ip) == 16
        options = self.tcp_options6 if v6 else self.tcp_options
        if self.l3.offload_port(guest_ip):
            return dict(options, partial_checksum=True, gso_max=GSO_MAX6 if v6 else GSO_MAX)
        return options

    # ---- caps --------------------------------------------------------------------------

    def _leave_caps(self, conn: tcp.TcpConnection) -> None:
        port = self._half_open.pop(conn, 0)
        if port != 0:
            self._half_open_by_port[port] -= 1
        port = self._established.pop(conn, 0)
        if port != 0:
            self._established_by_port[port] -= 1

    def _established_now(self, conn: tcp.TcpConnection) -> None:
        """`conn` left SYN_RECEIVED: it now counts against the established cap (NAT and
        gateway-service connections alike; a port forward's are outside both caps)."""
        port = self._half_open.pop(conn, 0)
        if port == 0:
            return
        self._half_open_by_port[port] -= 1
        self._established[conn] = port
        self._established_by_port[port] += 1

    def _over_cap(self, port: int | None) -> str | None:
        """The counter naming the cap a new connection from `port` would break, if any."""
        share = self.per_port_share
        if len(self._half_open) >= self.max_half_open:
            return "tcp_half_open_refused"
        if self._half_open_by_port[port] >= max(1, int(self.max_half_open * share)):
            return "tcp_half_open_port_refused"
        if len(self._established) >= self.max_connections:
            return "tcp_connections_refused"
        if self._established_by_port[port] >= max(1, int(self.max_connections * share)):
            return "tcp_connections_port_refused"
        return None

    # ---- from the network layer -------------------------------------------------------

    def tcp_segment(self, pkt: Packet, seg: tcp.TcpSegment, now: float) -> None:
        """A guest segment the network layer could not give to an open connection itself."""
        stats = self.stats
        key = (pkt.src, seg.src_port, pkt.dst, seg.dst_port)
        conn = self.tcp_conns.get(key)
        is_syn = seg.flags & (tcp.SYN | tcp.ACK | tcp.RST) == tcp.SYN
        if conn is not None:
            if is_syn and conn.accepts_new_syn(seg):
                # A new connection reusing a 4-tuple we hold in TIME_WAIT, accepted as Linux
                # does (gvproxy drops these SYNs).
                stats["tcp_time_wait_reused"] += 1
                conn.abort()
                self.forget(conn)
                self.dirty[conn] = None
            elif conn.state is tcp.TcpState.LISTEN and is_syn:
                return  # a retransmitted SYN while the host dial is still pending
            else:
                conn.receive_segment(seg, now)
                self.dirty[conn] = None
                return
        if not is_syn:
            stats["tcp_no_connection"] += 1
            self._reset(pkt, seg)
            return
        route = self.l3.route_tcp_syn(pkt, seg.src_port, seg.dst_port)
        if route.refused:
            if not route.answered:
                self._reset(pkt, seg)
            return
        port = self.l3.port_of(pkt.src)
        over = self._over_cap(port)
        if over is not None:
            stats[over] += 1
            self._reset(pkt, seg)
            return
        if route.service is None and len(self.tcp_pending) >= self.max_pending:
            # Bounded, but never blocking: a pending dial gives way, so a pile of dials to a
            # black hole cannot stop connections to live destinations; it is the oldest of
            # the port with the most dials, so one guest's pile evicts its own dials only.
            oldest = self._eviction_victim(port)
            stats["tcp_pending_evicted"] += 1
            self.refuse(oldest, now, unreachable=icmp.HOST_UNREACHABLE)
            self.events.append(TcpConnEvent(oldest, tcp.ConnectionFailed("evicted")))
        conn = tcp.TcpConnection.from_syn(
            pkt.dst, seg.dst_port, pkt.src, seg.src_port, seg, now=now, **self._options_to(pkt.src)
        )
        conn.key = key
        conn.syn_quote = pkt.quote
        self.tcp_conns[key] = conn
        self._half_open[conn] = port
        self._half_open_by_port[port] += 1
        stats["tcp_syns"] += 1
        if route.service is None:
            self._pend(conn, port)
        self.events.append(TcpDial(conn, route.target, seg.dst_port, route.service))

    def _eviction_victim(self, port: int | None) -> tcp.TcpConnection:
        """The oldest pending dial of the port holding the most (`port`, the newcomer's,
        counts one more: on a tie it evicts its own)."""
        counts = self._pending_by_port
        heaviest = max(counts, key=counts.__getitem__)
        if counts[port] + 1 >= counts[heaviest]:
            heaviest = port
        for conn in self.tcp_pending.values():
            if self._half_open.get(conn, 0) == heaviest:
                return conn
        return next(iter(self.tcp_pending.values()))

    def _pend(self, conn: tcp.TcpConnection, port: int | None) -> None:
        self.tcp_pending[conn.key] = conn
        self._pending_by_port[port] += 1

    def _unpend(self, conn: tcp.TcpConnection) -> None:
        if self.tcp_pending.get(conn.key) is conn:
            del self.tcp_pending[conn.key]
            port = self._half_open.get(conn, 0)
            self._pending_by_port[port] -= 1
            if not self._pending_by_port[port]:
                del self._pending_by_port[port]

    def _reset(self, pkt: Packet, seg: tcp.TcpSegment) -> None:
        reply = tcp.build_reset_reply(pkt.dst, pkt.src, seg)
        if reply is not None:
            self.l3.send_ip(pkt.dst, pkt.src, tcp.PROTO_TCP, reply)

    def udp_datagram(self, pkt: Packet, sport: int, dport: int, payload: bytes | memoryview):
        """A guest datagram that no gateway service takes: a port forward's reply, a
        datagram of an open NAT flow (kept in order with the flows' others) or a new flow."""
        if self.udp_sessions:
            session = self.udp_sessions.get((pkt.src, sport, pkt.dst, dport))
            if session is not None:
                self.events.append(UdpSessionDatagram(session, payload))
                return
        flow = self.udp_flows.get(udp_flow_key(pkt.src, sport, pkt.dst, dport))
        # A datagram of an open flow was decided with its first: only TTL is checked again.
        target = self.l3.nat_target(pkt, "" if flow is not None else "udp", sport, dport)
        if target is None:
            return
        if flow is not None:
            self.udp_flow_datagrams.append((flow, bytes(payload)))
            return
        self.events.append(
            UdpOutbound(pkt.src, sport, pkt.dst, dport, target, bytes(payload), pkt.quote)
        )

    def take_udp_flow_datagrams(self) -> list[tuple[object, bytes]]:
        out, self.udp_flow_datagrams = self.udp_flow_datagrams, []
        return out

    # ---- timers and output ------------------------------------------------------------

    def get_timer(self) -> float | None:
        timers = self._timers
        while timers and timers[0][2].get_timer() != timers[0][0]:
            heapq.heappop(timers)  # stale: the connection's deadline moved since
        return timers[0][0] if timers else None

    def handle_timer(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, _, conn = heapq.heappop(timers)
            if conn.get_timer() == deadline:
                conn.handle_timer(now)
                self.dirty[conn] = None

    def pull_events(self) -> None:
        """Move the events of connections touched since the last output into `events`; they
        stay marked for output. The NAT can then act (write to the host, dial) before this
        batch's frames are written, and a reply can still ride on them."""
        for conn in self.dirty:
            self._take_events(conn)

    def _take_events(self, conn: tcp.TcpConnection) -> None:
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, tcp.Closed):
                self.forget(conn)
            elif isinstance(ev, tcp.Connected):
                self._established_now(conn)
            self.events.append(TcpConnEvent(conn, ev))

    def output(self, now: float) -> None:
        """Segments of every touched connection to the network layer, with the offload of
        the port each leaves by now (a guest's MAC can move between ports)."""
        dirty, self.dirty = self.dirty, {}
        l3 = self.l3
        for conn in dirty:
            offload = l3.offload_port(conn.remote_ip)
            if offload != conn.offload:
                gso = (GSO_MAX6 if len(conn.remote_ip) == 16 else GSO_MAX) if offload else 0
                conn.set_offload(offload, gso)
            segments = conn.segments_to_send(now)
            if segments:
                l3.send_tcp(conn, segments)
            self._take_events(conn)
            deadline = conn.get_timer()
            if deadline is not None:
                self._timer_seq += 1
                heapq.heappush(self._timers, (deadline, self._timer_seq, conn))
