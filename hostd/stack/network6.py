"""The gateway's IPv6 layer: the half of `Network` (hostd/stack/network.py) for ethertype 0x86DD.

Theory of operation. `Ipv6Layer` is a part of `Network`, not a layer of its own: it shares
the switch (ports, CAM table, port security, output boxes), the transport and the events,
and adds what IPv6 needs beside IPv4's neighbour table, reassembler and DHCP server: the
NDP responder (`ndp`: neighbour cache, solicitations for the gateway's and virtual
addresses, router advertisements), the IPv6 `reassembler6`, the DHCPv6 server (`dhcp6`),
the ICMPv6 error rate limiter (for errors about guests' packets; a NAT refusal's or a host
failure's answer for one flow is not limited by it), and the queue of packets waiting for
a neighbour solicitation's answer. `_init_ipv6` builds them when `config.ipv6` (and the MTU carries
IPv6's minimum 1280); otherwise every IPv6 frame to the gateway is dropped and counted as
`ipv6_dropped`, as before IPv6 existed here (guests still reach each other over it).

Receive (`_ipv6_frame`, from the one receive path for every IPv6 frame):

* A frame to another guest (unicast or flooded) passes `_ipv6_may_leave` first, the rule
  ARP's sender check is for IPv4: nobody sources the gateway's addresses, router
  advertisements and redirects come only from the gateway (RA guard, with port security:
  without it a port may bridge a network with its own router; the gateway itself always
  ignores guests' advertisements), a first fragment must carry the whole header chain
  (RFC 7112) and NDP is never fragmented (RFC 6980), a neighbour
  advertisement for the gateway's or another port's address is dropped before it is
  switched or flooded, and with port security the source must not be another port's.
* A frame for the gateway (its MAC, or a multicast group it listens to: all nodes, all
  routers, DHCPv6 servers, its solicited-node groups) is parsed once (`ipv6.parse_ipv6`:
  header, extension-header chain with bounds). A parameter problem RFC 8200 asks for is
  answered (`may_send_error`, rate limited); other malformed packets are counted by reason.
  `_ipv6_source_allowed` then applies the martian rules (a source is link-local or in
  `subnet6`, never one of the gateway's) and teaches the neighbour cache, within its bound.
* Fragments go to `reassembler6` (overlaps, budgets and timeouts there); a whole datagram
  goes on like any packet. Layer 4: NDP (133-136) to the responder, MLD counted and
  ignored, echo to the gateway's addresses answered, other echo to the NAT
  (`IcmpEchoOutbound`), DHCPv6 (547) to `dhcp6` with the port it came by (the per-port
  limit; its lease events, bad ones counted and dropped, feed the neighbour cache and port
  security), DNS to `dns6` to the resolver, TCP and UDP to the same transport as IPv4 with
  16-byte addresses.

Send: `_send_ip6` builds the header (hop limit 64), fragments UDP and ICMPv6 above the MTU,
and finds the destination MAC in the neighbour cache; an unknown on-link destination's
packets wait (bounded per address and in addresses: `ndp_pending_packets`,
`ndp_pending_addresses`) while a solicitation asks for it.
`_send_tcp6` does for IPv6 what `send_tcp` does for IPv4, with VIRTIO_NET_HDR_GSO_TCPV6 and
partial checksums on offload ports. Errors the transport and the NAT ask for in ICMPv4's
terms are mapped to ICMPv6 (`_ICMP4_TO_ICMP6`). Timers: reassembly expiry (time exceeded,
code 1, about the first fragment), router advertisements, DHCPv6 lease expiry.

It must never raise on guest input and does no I/O; `now` comes in with every call.
"""

from __future__ import annotations

import ipaddress
import struct
from ipaddress import IPv6Address

from netferry.hostd.services.dhcpv6 import SERVER_PORT, Dhcpv6Server, dhcpv6_config_for
from netferry.hostd.services.dhcpv6 import LeaseGranted as Lease6Granted
from netferry.hostd.stack import checksum as checksum_mod
from netferry.hostd.stack import ethernet, icmp, icmpv6, ipv6, ndp, tcp
from netferry.hostd.stack.ethernet import ETHERTYPE_IPV6
from netferry.hostd.stack.events import FlowDenied, IcmpEchoOutbound, LeaseEvent
from netferry.hostd.stack.transport import TcpRoute

ALL_NODES = ipv6.ALL_NODES
UNSPECIFIED = ipv6.UNSPECIFIED
LOOPBACK_V6 = IPv6Address("::1").packed
ALL_MLDV2_ROUTERS = IPv6Address("ff02::16").packed
NS_RETRY = 1.0  # seconds between solicitations for one address while packets wait
DHCP6_SWEEP = 30.0  # seconds between DHCPv6 expiry sweeps (leases also expire on each call)
MLD_TYPES = frozenset({130, 131, 132, 143})
TCP_FRAME_HEADERS6 = 14 + 40  # Ethernet + IPv6 without extensions: where TCP starts
VNET_GSO_TCPV6 = 4
_UDP = struct.Struct("!HHHH")

# virtio-net header (legacy, 10 bytes, little-endian as tun uses on x86) on offload links:
# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset. (network.py re-exports these.)
VNET_HDR = struct.Struct("<BBHHHH")
VNET_LEN = VNET_HDR.size
VNET_NONE = bytes(VNET_LEN)
VNET_F_NEEDS_CSUM = 1
VNET_GSO_NONE = 0
VNET_GSO_TCPV4 = 1
ANSWERED = object()  # a refusal the guest was told about (ICMP error)
SILENT = object()  # a refusal without an answer (TCP answers it with RST)
_V4MAPPED = bytes(10) + b"\xff\xff"

# ICMPv4 (type, code) the transport and the NAT speak → ICMPv6 (type, code); fragmentation
# needed becomes packet too big (with the MTU), anything unlisted address unreachable.
_ICMP4_TO_ICMP6 = {
    (icmp.DEST_UNREACHABLE, icmp.NET_UNREACHABLE): (icmpv6.DEST_UNREACHABLE, icmpv6.NO_ROUTE),
    (icmp.DEST_UNREACHABLE, icmp.HOST_UNREACHABLE): (
        icmpv6.DEST_UNREACHABLE,
        icmpv6.ADDRESS_UNREACHABLE,
    ),
    (icmp.DEST_UNREACHABLE, icmp.PROTO_UNREACHABLE): (
        icmpv6.PARAM_PROBLEM,
        ipv6.PP_UNRECOGNIZED_NEXT_HEADER,
    ),
    (icmp.DEST_UNREACHABLE, icmp.PORT_UNREACHABLE): (
        icmpv6.DEST_UNREACHABLE,
        icmpv6.PORT_UNREACHABLE,
    ),
    (icmp.DEST_UNREACHABLE, icmp.FRAG_NEEDED): (icmpv6.PACKET_TOO_BIG, 0),
    (icmp.DEST_UNREACHABLE, icmp.ADMIN_PROHIBITED): (
        icmpv6.DEST_UNREACHABLE,
        icmpv6.ADMIN_PROHIBITED,
    ),
    (icmp.DEST_UNREACHABLE, 9): (icmpv6.DEST_UNREACHABLE, icmpv6.ADMIN_PROHIBITED),
    (icmp.DEST_UNREACHABLE, 10): (icmpv6.DEST_UNREACHABLE, icmpv6.ADMIN_PROHIBITED),
    (icmp.TIME_EXCEEDED, 0): (icmpv6.TIME_EXCEEDED, icmpv6.HOP_LIMIT_EXCEEDED),
    (icmp.TIME_EXCEEDED, 1): (icmpv6.TIME_EXCEEDED, icmpv6.REASSEMBLY_TIME_EXCEEDED),
}
_PROTO6_NAMES = {6: "tcp", 17: "udp", 58: "icmpv6"}
# The least of each upper-layer header a first fragment must carry (RFC 7112).
_MIN_UPPER_LEN = {ipv6.NH_TCP: 20, ipv6.NH_UDP: 8, ipv6.NH_ICMPV6: 4}
NDP_FIRST, NDP_LAST = 133, 137  # RS, RA, NS, NA, Redirect: RFC 6980 forbids fragmenting them


def upper_layer(frame: bytes, ip: int, end: int) -> tuple[int, int] | None:
    """(upper-layer protocol, its offset) of the IPv6 packet at `ip`, walking extension
    headers with bounds and without judging options; None for a broken chain. A non-first
    fragment's upper layer is unknown: (NH_FRAGMENT, offset of its data)."""
    found = header_chain(frame, ip, end)
    return None if found is None else found[:2]


def header_chain(frame: bytes, ip: int, end: int) -> tuple[int, int, bool] | None:
    """`upper_layer` and whether the chain crossed a fragment header (a first, atomic or
    non-first fragment)."""
    nh = frame[ip + 6]
    off = ip + ipv6.HEADER_LEN
    fragmented = False
    for _ in range(ipv6.MAX_EXTENSION_HEADERS):
        if nh not in ipv6.EXTENSION_HEADERS:
            return nh, off, fragmented
        if off + 8 > end:
            return None
        if nh == ipv6.NH_FRAGMENT:
            if int.from_bytes(frame[off + 2 : off + 4], "big") & 0xFFF8:
                return ipv6.NH_FRAGMENT, off + 8, True
            nh, off, fragmented = frame[off], off + 8, True
            continue
        nh, off = frame[off], off + (frame[off + 1] + 1) * 8
    return None


class Ipv6Layer:
    """Mixed into `Network`: every method here reads the switch's state through `self`."""

    # ---- setup ---------------------------------------------------------------------------

    def _init_ipv6(self, config) -> None:
        self.ipv6_enabled = bool(config.ipv6) and config.mtu >= ipv6.MIN_MTU
        self._pending_ndp: dict[bytes, list[bytes]] = {}
        self._ns_sent: dict[bytes, float] = {}
        self._ident6 = 0
        self._v6_deadline: float | None = None  # the IPv6 timers' earliest, None: recompute
        if not self.ipv6_enabled:
            if config.ipv6:
                self.stats["ipv6_off_mtu_below_1280"] = 1
            self.gateway_ip6 = self.host_ip6 = self.dns_ip6 = self.gateway_ll6 = None
            self.virtual_ips6: frozenset[bytes] = frozenset()
            self.ndp = None
            self.dhcp6 = None
            self.reassembler6 = None
            return
        self.gateway_ip6 = config.gateway6.packed
        self.host_ip6 = config.host6.packed
        self.dns_ip6 = config.dns6.packed
        self.gateway_ll6 = ipv6.link_local_from_mac(config.gateway_mac)
        self.gateway_is_host6 = self.gateway_ip6 == self.host_ip6
        self.virtual_ips6 = frozenset(a.packed for a in config.virtual_addresses6)
        self._prefix6 = config.subnet6.network_address.packed[:8]
        self._subnet_router6 = config.subnet6.network_address.packed
        # Multicast groups the gateway listens to; other groups (MLD reports, mDNS...) are
        # only flooded between guests.
        self._groups6 = frozenset(
            {ipv6.ALL_NODES, ipv6.ALL_ROUTERS, ipv6.ALL_DHCP_SERVERS}
            | {ipv6.solicited_node(a) for a in self.virtual_ips6}
        )
        # The gateway's NDP: answers for its addresses, the neighbour cache (bounded, LRU),
        # router advertisements (prefix for SLAAC, MTU, RDNSS/DNSSL, M and O for DHCPv6).
        self.ndp = ndp.NdpResponder(
            config.gateway_mac,
            self.virtual_ips6,
            ndp.router_advertisement_for(config, managed=True),
            now=0.0,  # the first advertisement at the first timer
            max_neighbours=config.ndp_max_neighbours,
            ra_interval=config.ra_interval,
        )
        self.ndp.stats = self.stats  # counted with the switch's others
        self.ndp.cache.port_of = self.cam.lookup  # per-port shares; live ports' entries stay
        self.reassembler6 = ipv6.Reassembler(
            config.reassembly_max_bytes, max(config.reassembly_timeout, 1.0)
        )
        self.dhcp6 = Dhcpv6Server(dhcpv6_config_for(config))
        self._dhcp6_sweep = DHCP6_SWEEP
        self.icmp6_limiter = icmpv6.ErrorRateLimiter()
        self.tcp_options6 = dict(self.transport.tcp_options, mss=config.mtu - 60)
        self.transport.tcp_options6 = self.tcp_options6

    # ---- lookups for the NAT and port forwards -------------------------------------------

    def guest_ip6_for_mac(self, mac: bytes) -> bytes | None:
        """The guest's global address in `subnet6`: its DHCPv6 lease first, else one the
        neighbour cache learnt (SLAAC)."""
        if not self.ipv6_enabled:
            return None
        text = ethernet.mac_to_str(mac)
        for lease in self.dhcp6.leases(self._now):
            if lease.mac == text:
                return lease.ip.packed
        for ip in self.ndp.cache.addresses_of(mac):
            if ip[:8] == self._prefix6:
                return ip
        return None

    def _on_link6(self, ip: bytes) -> bool:
        return ip[:8] == self._prefix6 or ipv6.is_link_local(ip)

    # ---- receive -------------------------------------------------------------------------

    def _ipv6_frame(
        self, port: int, frame: bytes, off: int, dst_mac: bytes, src_mac: bytes, now: float
    ) -> None:
        """Every IPv6 frame of the batch (IPv6 on): see the module docstring."""
        stats = self.stats
        ip = off + ethernet.HEADER_LEN
        self._v6_deadline = None  # NDP, fragments or DHCPv6 may move the IPv6 timers
        if dst_mac != self.gateway_mac:
            if not self._ipv6_may_leave(port, frame, ip, src_mac):
                return
            if not self._switch(port, frame, dst_mac):
                return  # to another guest only
            group = frame[ip + 24 : ip + 40]
            if group not in self._groups6:
                # not a group of ours: MLDv2 reports (ff02::16, counted apart), mDNS...
                stats[
                    "mld_ignored" if group == ALL_MLDV2_ROUTERS else "ipv6_multicast_ignored"
                ] += 1
                return
        try:
            pkt = ipv6.parse_ipv6(memoryview(frame)[ip:])
        except ipv6.Ipv6ParamProblem as e:
            stats[e.args[0]] += 1
            self._param_problem(port, frame, ip, src_mac, e)
            return
        except ipv6.Ipv6Error as e:
            stats[e.args[0]] += 1
            return
        stats["ipv6_in"] += 1
        src = pkt.src
        nh = pkt.next_header
        name = _PROTO6_NAMES.get(nh, "other")
        stats[name + "_packets_in"] += 1
        stats[name + "_bytes_in"] += len(pkt.raw)
        if src == UNSPECIFIED:
            if nh != ipv6.NH_ICMPV6:  # only DAD probes and MLD come from ::
                stats["ipv6_bad_source"] += 1
                return
        elif self.ndp.cache.lookup(src) != src_mac:
            if not self._ipv6_source_allowed(port, src_mac, src):
                return
        trusted = port in self._vnet_ports
        if pkt.fragment is not None:
            try:
                whole = self.reassembler6.add(pkt, now)
            except ipv6.Ipv6Error as e:
                stats[e.args[0]] += 1
                return
            if whole is None:
                return
            pkt = whole
            trusted = False  # the pieces' checksums were never offloaded as a whole
        self._l4_6(pkt, src_mac, now, trusted)

    def _ipv6_may_leave(self, port: int, frame: bytes, ip: int, src_mac: bytes) -> bool:
        """Every IPv6 frame to another guest (unicast or flooded) passes here first."""
        stats = self.stats
        if len(frame) < ip + ipv6.HEADER_LEN:
            stats["ipv6_truncated"] += 1
            return False
        src = frame[ip + 8 : ip + 24]
        if src in self.virtual_ips6:
            stats["ipv6_spoof_dropped"] += 1
            return self.port_security.refuse("ipv6_gateway_claim_dropped", src)
        end = min(len(frame), ip + ipv6.HEADER_LEN + int.from_bytes(frame[ip + 4 : ip + 6], "big"))
        found = header_chain(frame, ip, end)
        if found is None:
            stats["ipv6_bad_extension_chain"] += 1
            return False
        upper, at, fragmented = found
        if fragmented and upper != ipv6.NH_FRAGMENT:
            # A first (or atomic) fragment: RFC 7112, its chain reaches the upper-layer
            # header, so the checks below see it (else an RA hides in the second fragment);
            # RFC 6980, NDP is never fragmented.
            if at + _MIN_UPPER_LEN.get(upper, 0) > end:
                stats["ipv6_incomplete_chain_dropped"] += 1
                return False
            if upper == ipv6.NH_ICMPV6 and NDP_FIRST <= frame[at] <= NDP_LAST:
                stats["ndp_fragmented_dropped"] += 1
                return False
        if upper == ipv6.NH_ICMPV6 and at < end:
            kind = frame[at]
            if (
                kind == icmpv6.ROUTER_ADVERTISEMENT or kind == icmpv6.REDIRECT
            ) and self.port_security.enabled:  # off: a port may bridge a real router
                stats["ndp_ra_from_guest_dropped"] += 1  # RA guard: the gateway is the router
                return False
            if kind == icmpv6.NEIGHBOR_ADVERTISEMENT and at + 24 <= end:
                target = frame[at + 8 : at + 24]
                if target in self.virtual_ips6:
                    stats["ndp_spoof_dropped"] += 1
                    return self.port_security.refuse("ndp_gateway_claim_dropped", target)
                if not self._ipv6_address_may_move(port, target, src_mac, True):
                    return False
        if src != UNSPECIFIED and self.port_security.enabled:
            return self._ipv6_address_may_move(port, src, src_mac, False)
        return True

    def _ipv6_source_allowed(self, port: int, src_mac: bytes, src: bytes) -> bool:
        """Every IPv6 packet to the gateway whose source is not yet bound to its MAC: a
        guest's source is link-local or in `subnet6` and not one of the gateway's (nor the
        subnet-router anycast address); else dropped and counted. The neighbour cache then
        learns it (bounded; a waiting queue for it is flushed)."""
        if (
            src in self.virtual_ips6
            or src == self._subnet_router6
            or not (src[:8] == self._prefix6 or ipv6.is_link_local(src))
        ):
            self.stats["ipv6_bad_source"] += 1
            return False
        if not self._ipv6_address_may_move(port, src, src_mac, False):
            return False
        if self.ndp.cache.learn(src, src_mac) and src in self._pending_ndp:
            self._flush_ndp_queue(src, src_mac)
        return True

    def _ipv6_address_may_move(self, port: int, ip: bytes, mac: bytes, ndp_claim: bool) -> bool:
        """Whether `port` may use (or advertise) `ip` at `mac`: not when a DHCPv6 lease bound
        it to another port (port security), nor when the neighbour cache has it at another
        MAC that lives on another port (an address theft)."""
        reason = "ndp_address_theft_dropped" if ndp_claim else "ipv6_source_conflict_dropped"
        if self.port_security.enabled:
            owner = self.port_security.owner(ip)
            if owner is not None and owner[1] != port:
                return self.port_security.refuse(reason, ip)
        old = self.ndp.cache.peek(ip)
        if old is None or old == mac:
            return True
        old_port = self.cam.lookup(old)
        if old_port is None or old_port == port:
            return True
        return self.port_security.refuse(reason, ip)

    def _l4_6(self, pkt: ipv6.Ipv6Packet, src_mac: bytes, now: float, trusted: bool) -> None:
        """A whole IPv6 datagram from an allowed source, by upper-layer protocol."""
        stats = self.stats
        nh = pkt.next_header
        data = pkt.payload
        src, dst = pkt.src, pkt.dst
        if nh == ipv6.NH_TCP:
            if not trusted and not checksum_mod.verify_transport_v6(src, dst, 6, data):
                stats["tcp_bad_checksum"] += 1
                return
            try:
                seg = tcp.TcpSegment.parse(data)
            except tcp.TcpParseError:
                stats["tcp_malformed"] += 1
                return
            stats["tcp_segments_in"] += 1
            if dst[0] == 0xFF:
                stats["tcp_multicast_dropped"] += 1
                return
            transport = self.transport
            conn = transport.tcp_conns.get((src, seg.src_port, dst, seg.dst_port))
            if (
                conn is not None
                and not seg.flags & tcp.SYN
                and conn.state is not tcp.TcpState.LISTEN
            ):
                conn.receive_segment(seg, now)
                transport.dirty[conn] = None
            else:
                transport.tcp_segment(pkt, seg, now)
            return
        if nh == ipv6.NH_UDP:
            n = len(data)
            if n < 8:
                stats["udp_truncated"] += 1
                return
            sport, dport, ulen, ucsum = _UDP.unpack_from(data)
            if ulen < 8 or ulen > n:
                stats["udp_bad_length"] += 1
                return
            if not trusted:
                if not ucsum:
                    stats["udp_zero_checksum"] += 1  # RFC 8200 8.1: not allowed over IPv6
                    return
                if not checksum_mod.verify_transport_v6(src, dst, 17, data[:ulen]):
                    stats["udp_bad_checksum"] += 1
                    return
            stats["udp_in"] += 1
            self._udp6(pkt, sport, dport, data[8:ulen], src_mac, now)
            return
        if nh == ipv6.NH_ICMPV6:
            self._icmp6(pkt, src_mac, now)
            return
        stats["ipv6_no_next_header"] += 1

    def _udp6(
        self, pkt: ipv6.Ipv6Packet, sport: int, dport: int, payload, src_mac: bytes, now: float
    ) -> None:
        dst = pkt.dst
        if dst in self.virtual_ips6 or dst[0] == 0xFF:
            if dport == SERVER_PORT and (
                dst == ipv6.ALL_DHCP_SERVERS or dst == self.gateway_ll6 or dst == self.gateway_ip6
            ):
                self._dhcp6_request(pkt, bytes(payload), src_mac, now)
                return
            if dport == 53 and dst == self.dns_ip6:
                self._dns(pkt.src, sport, bytes(payload), dst)
                return
            if dst == self.host_ip6:
                pass  # to the host's ::1 through the NAT below
            elif dst[0] == 0xFF:
                self.stats["udp_multicast_dropped"] += 1
                return
            else:
                self._icmp6_error_about(
                    pkt, icmpv6.DEST_UNREACHABLE, icmpv6.PORT_UNREACHABLE, src=dst
                )
                return
        self.transport.udp_datagram(pkt, sport, dport, payload)

    def _dhcp6_request(
        self, pkt: ipv6.Ipv6Packet, payload: bytes, src_mac: bytes, now: float
    ) -> None:
        # The port the request came in by (the CAM table learnt it from this very frame):
        # addresses are counted per port and bound to it.
        port = self.cam.lookup(src_mac)
        reply = self.dhcp6.handle(payload, IPv6Address(pkt.src), src_mac, now, port)
        self._drain_dhcp6_events(port)
        if reply is None:
            return
        self.stats["dhcp6_replies_out"] += 1
        dst = reply.dst_ip.packed
        datagram = self._udp6_datagram(
            self.gateway_ll6, dst, SERVER_PORT, reply.dst_port, reply.payload
        )
        packet = ipv6.build_ipv6(self.gateway_ll6, dst, ipv6.NH_UDP, datagram)
        self._emit_from_gateway(reply.dst_mac or src_mac, ETHERTYPE_IPV6, packet)

    def _drain_dhcp6_events(self, port: int | None) -> None:
        while (event := self.dhcp6.next_event()) is not None:
            try:
                ip = event.ip.packed
                mac = ethernet.parse_mac(event.mac) if event.mac else None
            except (AttributeError, TypeError, ValueError):
                # the server validates what it binds; a bad event must still not escape
                # the timer or the datagram path
                self.stats["dhcp6_lease_event_malformed"] += 1
                continue
            if isinstance(event, Lease6Granted):
                if mac is not None:
                    self.ndp.cache.learn(ip, mac)
                    if port is not None:
                        self.port_security.bind(port, mac, ip)
                self.events.append(LeaseEvent(event.mac, str(event.ip), event.hostname))
            else:
                if mac is not None:
                    self.port_security.unbind(ip, mac)
                self.events.append(LeaseEvent(event.mac, str(event.ip), event.hostname, True))

    def _icmp6(self, pkt: ipv6.Ipv6Packet, src_mac: bytes, now: float) -> None:
        stats = self.stats
        data = pkt.payload
        if not data:
            stats["icmpv6_truncated"] += 1
            return
        kind = data[0]
        if icmpv6.ROUTER_SOLICITATION <= kind <= icmpv6.NEIGHBOR_ADVERTISEMENT:
            if pkt.fragment is not None or len(pkt.header) > ipv6.HEADER_LEN:
                stats["ndp_with_extension_dropped"] += 1  # RFC 6980: never fragmented
                return
            if pkt.reassembled:  # its pieces' fragment headers are gone, not the rule
                stats["ndp_fragmented_dropped"] += 1
                return
            if kind == icmpv6.NEIGHBOR_ADVERTISEMENT and len(data) >= 24:
                # An advertisement for another port's address is a theft, as in ARP.
                port = self.cam.lookup(src_mac)
                target = bytes(data[8:24])
                if port is not None and not self._ipv6_address_may_move(
                    port, target, src_mac, True
                ):
                    return
            for reply in self.ndp.handle(src_mac, pkt.src, pkt.dst, pkt.hop_limit, data, now):
                packet = ipv6.build_ipv6(reply.src, reply.dst, 58, reply.message, reply.hop_limit)
                self._emit_from_gateway(reply.dst_mac or src_mac, ETHERTYPE_IPV6, packet)
            if self._pending_ndp:
                for ip in (pkt.src, bytes(data[8:24])):
                    if ip in self._pending_ndp:
                        mac = self.ndp.cache.lookup(ip)
                        if mac is not None:
                            self._flush_ndp_queue(ip, mac)
            return
        if kind in MLD_TYPES:
            stats["mld_ignored"] += 1
            return
        try:
            msg = icmpv6.parse_icmpv6(pkt.src, pkt.dst, data)
        except icmpv6.Icmpv6Error as e:
            stats[e.args[0]] += 1
            return
        stats["icmpv6_in"] += 1
        if msg.type != icmpv6.ECHO_REQUEST:
            stats["icmpv6_non_echo_dropped"] += 1
            return
        dst = pkt.dst
        if dst in self.virtual_ips6 or dst == ALL_NODES:
            if dst == self.host_ip6 and not self.config.host_loopback and not self.gateway_is_host6:
                stats["host_loopback_refused"] += 1
                self._icmp6_error_about(
                    pkt, icmpv6.DEST_UNREACHABLE, icmpv6.ADMIN_PROHIBITED, limited=False
                )
                return
            src = self.gateway_ll6 if dst == ALL_NODES else dst
            self.send_icmp_echo_reply(src, pkt.src, msg.ident, msg.seq, bytes(msg.body))
            return
        if dst[0] == 0xFF:
            stats["icmpv6_multicast_echo_ignored"] += 1
            return
        target = self.nat_target(pkt, "icmp", 0, 0)
        if target is None:
            return
        self.events.append(
            IcmpEchoOutbound(pkt.src, dst, target, msg.ident, msg.seq, bytes(msg.body))
        )

    # ---- errors --------------------------------------------------------------------------

    def _param_problem(
        self, port: int, frame: bytes, ip: int, src_mac: bytes, e: ipv6.Ipv6ParamProblem
    ) -> None:
        """A parameter problem about a packet parse_ipv6 refused: to a valid source only."""
        src = frame[ip + 8 : ip + 24]
        dst = frame[ip + 24 : ip + 40]
        if src == UNSPECIFIED or not self._on_link6(src) or src in self.virtual_ips6:
            return
        end = min(len(frame), ip + ipv6.HEADER_LEN + int.from_bytes(frame[ip + 4 : ip + 6], "big"))
        found = upper_layer(frame, ip, end)
        invoking = None
        if found is not None and found[0] == ipv6.NH_ICMPV6 and found[1] < end:
            invoking = frame[found[1]]
        own = self._own_source6(dst, src)
        self._send_icmp6_error_checked(
            own, src, icmpv6.PARAM_PROBLEM, e.code, frame[ip:end], e.pointer, invoking, dst
        )

    def _own_source6(self, dst: bytes, guest: bytes) -> bytes:
        """The gateway's address an error or reply to `guest` comes from: the address the
        guest used if it is one of ours, else the gateway's of the guest's scope."""
        if dst in self.virtual_ips6:
            return dst
        return self.gateway_ll6 if ipv6.is_link_local(guest) else self.gateway_ip6

    def _icmp6_error_about(
        self,
        pkt: ipv6.Ipv6Packet,
        type_: int,
        code: int,
        param: int = 0,
        src: bytes | None = None,
        limited: bool = True,
    ) -> None:
        invoking = None
        if pkt.next_header == ipv6.NH_ICMPV6 and pkt.payload:
            invoking = pkt.payload[0]
        own = src if src is not None else self._own_source6(pkt.dst, pkt.src)
        self._send_icmp6_error_checked(
            own, pkt.src, type_, code, pkt.quote, param, invoking, pkt.dst, limited
        )

    def _send_icmp6_error_checked(
        self, src, dst, type_, code, quote, param=0, invoking_type=None, invoking_dst=b"",
        limited=True,
    ) -> None:  # fmt: skip
        """RFC 4443 2.4(e) and (f): never about an error or a multicast/unspecified source,
        and rate limited; else built and sent. `limited` False: the answer for one flow the
        NAT refused or the host failed (no route: happy eyeballs needs it at once), one per
        packet of that flow, to its source only; the global limiter, there for errors
        about the guests' own bad packets, must not delay it, nor one guest use it up."""
        invoking_dst = invoking_dst or self.gateway_ip6
        if not icmpv6.may_send_error(dst, invoking_dst, type_, code, invoking_type):
            self.stats["icmpv6_error_suppressed"] += 1
            return
        if limited and not self.icmp6_limiter.allow(self._now):
            self.stats["icmpv6_error_rate_limited"] += 1
            return
        self.stats["icmpv6_errors_out"] += 1
        msg = icmpv6.build_error(src, dst, type_, code, quote, param)
        self._send_ip6(src, dst, ipv6.NH_ICMPV6, msg)

    def send_icmp6_error(
        self,
        src: bytes,
        dst: bytes,
        type_: int,
        code: int,
        quote: bytes,
        param: int = 0,
        limited: bool = False,
    ) -> None:
        """A native ICMPv6 error (`icmpv6` types) to guest `dst` about the packet `quote`.
        The NAT and the transport call it for one flow's host-side failure or refusal: not
        rate limited unless `limited` (the gateway's own errors about guest packets)."""
        if not self.ipv6_enabled:
            return
        if len(src) != 16:
            src = self._own_source6(b"", dst)
        invoking_type = None
        found = upper_layer(quote, 0, len(quote)) if len(quote) >= ipv6.HEADER_LEN else None
        if found is not None and found[0] == ipv6.NH_ICMPV6 and found[1] < len(quote):
            invoking_type = quote[found[1]]
        invoking_dst = bytes(quote[24:40]) if len(quote) >= ipv6.HEADER_LEN else b""
        self._send_icmp6_error_checked(
            src, dst, type_, code, quote, param, invoking_type, invoking_dst, limited
        )

    def _send_icmp_error6(
        self, src: bytes, dst: bytes, type_: int, code: int, quote: bytes, mtu: int
    ) -> None:
        """`send_icmp_error` for an IPv6 guest: ICMPv4's type and code mapped to ICMPv6's."""
        mapped = _ICMP4_TO_ICMP6.get((type_, code))
        if mapped is None:
            mapped = (
                (icmpv6.TIME_EXCEEDED, 0)
                if type_ == icmp.TIME_EXCEEDED
                else (icmpv6.DEST_UNREACHABLE, icmpv6.ADDRESS_UNREACHABLE)
            )
        t6, c6 = mapped
        param = 0
        if t6 == icmpv6.PACKET_TOO_BIG:
            param = max(mtu, ipv6.MIN_MTU)
        elif t6 == icmpv6.PARAM_PROBLEM:
            param = 6  # the next header field of the fixed header
        self.send_icmp6_error(src, dst, t6, c6, quote, param)

    # ---- send ----------------------------------------------------------------------------

    def _next_ident6(self) -> int:
        self._ident6 = (self._ident6 + 1) & 0xFFFFFFFF
        return self._ident6

    @staticmethod
    def _udp6_datagram(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
        length = 8 + len(payload)
        seg = _UDP.pack(sport, dport, length, 0) + payload
        csum = checksum_mod.transport_checksum_v6(src, dst, 17, seg) or 0xFFFF
        return seg[:6] + csum.to_bytes(2, "big") + seg[8:]

    def _send_ip6(
        self, src: bytes, dst: bytes, next_header: int, payload: bytes, hop_limit: int = 64
    ) -> None:
        """A datagram from the gateway side to guest address `dst`, fragmented to the MTU."""
        if not self.ipv6_enabled:
            self.stats["ipv6_off_dropped"] += 1
            return
        if len(src) != 16:
            src = self._own_source6(b"", dst)
        try:
            packets = ipv6.fragment(
                src, dst, next_header, payload, self.mtu, self._next_ident6(), hop_limit
            )
        except ValueError:
            self.stats["ipv6_too_big_dropped"] += 1
            return
        name = _PROTO6_NAMES.get(next_header, "other")
        self.stats[name + "_packets_out"] += len(packets)
        self.stats[name + "_bytes_out"] += sum(map(len, packets))
        self.stats["ipv6_out"] += len(packets)
        if dst[0] == 0xFF:
            mac = ipv6.multicast_mac(dst)
        else:
            mac = self.ndp.cache.lookup(dst)
            if mac is None:
                self._queue_for_ndp(dst, packets)
                return
        for packet in packets:
            self._emit_from_gateway(mac, ETHERTYPE_IPV6, packet)

    def _queue_for_ndp(self, dst: bytes, packets: list[bytes]) -> None:
        """Packets for an on-link address the cache does not know: held (bounded) while a
        neighbour solicitation asks for it (again after `NS_RETRY`)."""
        if not self._on_link6(dst) or dst in self.virtual_ips6:
            self.stats["no_route_dropped"] += len(packets)
            return
        pending = self._pending_ndp
        if dst not in pending and len(pending) >= self.config.ndp_pending_addresses:
            oldest = next(iter(pending))
            self.stats["ndp_queue_dropped"] += len(pending.pop(oldest))
            self._ns_sent.pop(oldest, None)
        queue = pending.setdefault(dst, [])
        room = self.config.ndp_pending_packets - len(queue)
        if room < len(packets):
            self.stats["ndp_queue_dropped"] += len(packets) - max(room, 0)
        queue.extend(packets[: max(room, 0)])
        last = self._ns_sent.get(dst)
        if last is None or self._now - last >= NS_RETRY:
            self._ns_sent[dst] = self._now
            ns = self.ndp.solicit(dst)
            packet = ipv6.build_ipv6(ns.src, ns.dst, 58, ns.message, ns.hop_limit)
            self._emit_from_gateway(ns.dst_mac, ETHERTYPE_IPV6, packet)

    def _flush_ndp_queue(self, ip: bytes, mac: bytes) -> None:
        self._ns_sent.pop(ip, None)
        for packet in self._pending_ndp.pop(ip, ()):
            self._emit_from_gateway(mac, ETHERTYPE_IPV6, packet)

    def _send_tcp6(self, conn: tcp.TcpConnection, segments: list[bytes]) -> None:
        """`send_tcp` for an IPv6 guest: plain frames, or on an offload port GSO (TCPV6)
        super-segments with partial checksums."""
        key = conn.key
        src, dst = key[2], key[0]
        stats = self.stats
        stats["tcp_segments_out"] += len(segments)
        stats["tcp_packets_out"] += len(segments)
        stats["tcp_bytes_out"] += sum(map(len, segments)) + 40 * len(segments)
        mac = self.ndp.cache.lookup(dst)
        port = self.cam.lookup(mac) if mac is not None else None
        build = ipv6.build_header
        if port is None or port not in self._vnet_ports or not conn.offload:
            for seg in segments:
                packet = build(src, dst, 6, len(seg)) + seg
                if mac is None:
                    self._queue_for_ndp(dst, [packet])
                else:
                    self._emit_from_gateway(mac, ETHERTYPE_IPV6, packet)
            return
        eth = ethernet.HEADER.pack(mac, self.gateway_mac, ETHERTYPE_IPV6)
        mss = conn.effective_mss
        originated = self.originated
        pack_vnet = VNET_HDR.pack
        start = TCP_FRAME_HEADERS6
        for seg in segments:
            hdr_len = start + ((seg[12] >> 4) << 2)
            if len(seg) + start - hdr_len > mss:
                vnet = pack_vnet(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV6, hdr_len, mss, start, 16)
            else:
                vnet = pack_vnet(VNET_F_NEEDS_CSUM, VNET_GSO_NONE, 0, 0, start, 16)
            frame = b"".join((vnet, eth, build(src, dst, 6, len(seg)), seg))
            if originated is not None:
                originated.append(frame[VNET_LEN:])
            self._emit_raw(port, frame)
        stats["frames_out"] += len(segments)

    # ---- routes --------------------------------------------------------------------------

    def _route_tcp_syn6(self, pkt: ipv6.Ipv6Packet, sport: int, dport: int):
        dst = pkt.dst
        if dst == self.dns_ip6 and dport == 53:
            return TcpRoute(service="dns")
        if dst == self.gateway_ip6 and dport in self.gateway_tcp_services:
            return TcpRoute(service=self.gateway_tcp_services[dport])
        if dst in self.virtual_ips6 and dst != self.host_ip6:
            self.stats["tcp_gateway_refused"] += 1
            return TcpRoute(refused=True)
        target = self._nat_route6(pkt, "tcp", sport, dport)
        if isinstance(target, str):
            return TcpRoute(target=target)
        return TcpRoute(refused=True, answered=target is ANSWERED)

    def _nat_route6(self, pkt: ipv6.Ipv6Packet, proto: str, sport: int, dport: int) -> object:
        """`_nat_route` for IPv6: the host target (a str), or `ANSWERED`/`SILENT`."""

        dst = pkt.dst
        if dst == self.host_ip6:
            if not self.config.host_loopback:
                self.stats["host_loopback_refused"] += 1
                self._icmp6_error_about(
                    pkt, icmpv6.DEST_UNREACHABLE, icmpv6.ADMIN_PROHIBITED, limited=False
                )
                return ANSWERED
            target = LOOPBACK_V6
        else:
            if (
                dst[:8] == self._prefix6
                or dst[0] == 0xFF
                or ipv6.is_link_local(dst)
                or dst == LOOPBACK_V6
                or dst == UNSPECIFIED
                or dst[:12] == _V4MAPPED
            ):
                self.stats["ipv6_unroutable_dropped"] += 1
                return SILENT
            target = dst
        if pkt.hop_limit <= 1 and dst != self.host_ip6:
            self.stats["ttl_exceeded"] += 1
            self._icmp6_error_about(pkt, icmpv6.TIME_EXCEEDED, icmpv6.HOP_LIMIT_EXCEEDED)
            return ANSWERED
        if proto and self.policy.active:
            verdict = self.policy.check(proto, pkt.src, sport, target, dport, self._now)
            if not verdict.allowed:
                self.stats[f"policy_{proto}_refused"] += 1
                self.events.append(FlowDenied(verdict))
                if proto == "tcp":
                    return SILENT
                self._icmp6_error_about(
                    pkt, icmpv6.DEST_UNREACHABLE, icmpv6.ADMIN_PROHIBITED, limited=False
                )
                return ANSWERED
        return str(ipaddress.IPv6Address(target))

    # ---- timers --------------------------------------------------------------------------

    def _ipv6_timer(self) -> float:
        best = self.ndp.next_deadline()
        for t in (self.reassembler6.next_deadline(), self._dhcp6_sweep):
            if t is not None and t < best:
                best = t
        return best

    def _ipv6_handle_timer(self, now: float) -> None:
        self._v6_deadline = None
        for first in self.reassembler6.expire(now):
            # RFC 8200 4.5: time exceeded (reassembly) about the first fragment, to its source
            if len(first) >= ipv6.HEADER_LEN and self._on_link6(first[8:24]):
                self.send_icmp6_error(
                    self._own_source6(first[24:40], first[8:24]), first[8:24],
                    icmpv6.TIME_EXCEEDED, icmpv6.REASSEMBLY_TIME_EXCEEDED, first, limited=True,
                )  # fmt: skip
        for ra in self.ndp.handle_timer(now):
            packet = ipv6.build_ipv6(ra.src, ra.dst, 58, ra.message, ra.hop_limit)
            self._emit_from_gateway(ra.dst_mac, ETHERTYPE_IPV6, packet)
        if now >= self._dhcp6_sweep:
            self._dhcp6_sweep = now + DHCP6_SWEEP
            self.dhcp6.expire(now)
            self._drain_dhcp6_events(None)

    def _forget_port6(self, macs: list[bytes]) -> None:
        if self.ipv6_enabled:
            self.ndp.cache.forget_macs(macs)
