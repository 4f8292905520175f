"""ICMP and ICMPv6 echo NAT through unprivileged ping sockets (SOCK_DGRAM, IPPROTO_ICMP or
IPPROTO_ICMPV6), or a raw socket when those are not permitted but hostd has CAP_NET_RAW (root).
A flow's addresses are 4 or 16 bytes (the guest's packet's family); its target is a host
address of the same family.

Ping sockets: one per (guest, destination, guest echo id), connected to the real target.
The kernel rewrites the echo id to the socket's "port" and matches replies to it, so
concurrent pings never cross; the reply's id is restored to the guest's before it goes
back. Ping sockets of both families need the caller's group inside
`net.ipv4.ping_group_range`. Errors about the echo (unreachable, hop limit exceeded, packet
too big) are read from the socket's error queue and told to the guest as ICMP/ICMPv6 errors
quoting its echo request (`hostd/nat/host_errors.py`); a host without a route to the target
(connect() or send() failing with ENETUNREACH and the like) is told at once as "destination
unreachable", so the guest's ping fails with an error instead of timing out.

Raw sockets (libslirp's fallback): one per family for every flow, opened at start. Each
flow gets its own echo id on the host side; a reply is matched by (source address, id) and
goes back with the guest's id, and an error by the echo it quotes (destination, id). A raw
socket sees every ICMP message to the host (the ICMPv6 one is filtered to echo replies and
errors), so anything that is not about an echo of ours is ignored.

With neither, hostd says so once, with the command that fixes it, and drops echo requests
(the gateway's own echo still answers).

Flows live in the NAT's flow table (`hostd/nat/flows.py`: bounded, LRU eviction, idle
sweep); a ping socket is drawn from the descriptor budget (`hostd/nat/budget.py`), and an
echo that gets none (over the budget, or socket() failing) is dropped and counted.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from netferry.hostd.nat import host_errors
from netferry.hostd.nat.budget import BudgetExceeded, DescriptorBudget
from netferry.hostd.nat.flows import FlowTable
from netferry.hostd.stack import icmp, ipv4
from netferry.hostd.stack.network import IcmpEchoOutbound, Network

log = structlog.get_logger("hostd.nat.icmp")

ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129
ICMP6_ERRORS = (1, 2, 3, 4)  # destination unreachable, packet too big, time exceeded, parameter
ICMP6_FILTER = 1  # setsockopt(IPPROTO_ICMPV6, ICMP6_FILTER): a bitmap of types to block
IPV6_HEADER = struct.Struct("!IHBB16s16s")
QUOTED_PAYLOAD = 64  # bytes of the guest's echo payload an error quotes (RFC 4884 is more)

FlowKey = tuple[bytes, bytes, int]


def ping_sockets_allowed() -> tuple[bool, str]:
    """Whether this process may open ping sockets, and the sysctl value that decides it."""
    try:
        with open("/proc/sys/net/ipv4/ping_group_range") as f:
            text = f.read().strip()
        lo, hi = (int(x) for x in text.split())
    except (OSError, ValueError):
        return True, "unknown"
    groups = {os.getegid(), *os.getgroups()}
    return any(lo <= g <= hi for g in groups), text


@dataclass(slots=True)
class EchoFlow:
    key: FlowKey
    sock: socket.socket | None  # None: the flow goes through the shared raw socket
    last_active: float
    target: bytes = b""  # raw socket: the destination (packed, 4 or 16 bytes)
    host_ident: int = 0  # raw socket: the echo id used on the host side
    quote: bytes = b""  # the guest's last echo request as an ICMP error quotes it


def echo_quote(ev: IcmpEchoOutbound) -> bytes:
    """The guest's echo request as an ICMP error about it quotes it: its IP header (rebuilt
    from the event: the guest matches an error by addresses, protocol and echo id) and the
    start of the message."""
    quote = getattr(ev, "quote", b"")  # the network layer's own, if it gives one
    if quote:
        return bytes(quote)
    payload = ev.payload[:QUOTED_PAYLOAD]
    if len(ev.guest_ip) == 16:
        message = icmp.HEADER.pack(ICMP6_ECHO_REQUEST, 0, 0, ev.ident, ev.seq) + payload
        length = icmp.HEADER.size + len(ev.payload)
        header = IPV6_HEADER.pack(0x60000000, length, 58, 64, ev.guest_ip, ev.dst_ip)
        return header + message
    message = icmp.HEADER.pack(icmp.ECHO_REQUEST, 0, 0, ev.ident, ev.seq) + payload
    length = icmp.HEADER.size + len(ev.payload)
    return ipv4.build_header(ev.guest_ip, ev.dst_ip, ipv4.PROTO_ICMP, length) + message


def open_raw_icmp(family: int = socket.AF_INET) -> socket.socket | None:
    """A raw ICMP (or ICMPv6) socket when ping sockets are not permitted and we may open one."""
    if ping_sockets_allowed()[0]:
        return None
    proto = socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP
    try:
        sock = socket.socket(family, socket.SOCK_RAW, proto)
    except OSError:
        return None  # no CAP_NET_RAW (or no IPv6): the warning at the first echo says so
    if family == socket.AF_INET6:
        # Only echo replies and errors: the host's own neighbour discovery is none of ours.
        words = [0xFFFFFFFF] * 8
        for type_ in (ICMP6_ECHO_REPLY, *ICMP6_ERRORS):
            words[type_ >> 5] &= ~(1 << (type_ & 31))
        try:
            sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("=8I", *words))
        except OSError:
            pass  # unfiltered: what is not ours is ignored anyway
    sock.setblocking(False)
    return sock


class IcmpNat:
    def __init__(
        self,
        network: Network,
        flush: Callable[[], None],
        *,
        idle_timeout: float,
        max_flows: int,
        budget: DescriptorBudget | None = None,
        guest_share: float = 1.0,
    ) -> None:
        self.network = network
        self.flush = flush
        self.budget = budget if budget is not None else DescriptorBudget(1 << 20)
        self.flows: FlowTable[FlowKey, EchoFlow] = FlowTable(
            "nat.icmp",
            max_flows=max_flows,
            idle_timeout=idle_timeout,
            close=self._close,
            # One guest's share of the table (its port, as the budget's): it evicts its own.
            owner=lambda key: self.budget.owner_of(key[0]),
            share=guest_share,
        )
        self.loop = asyncio.get_running_loop()
        self._stats = {
            "echo_out": 0,
            "echo_in": 0,
            "denied": 0,
            "errors": 0,
            "budget_refused": 0,
            "icmp_errors": 0,  # errors about a guest's echo told to the guest
        }
        self._warned = False
        self.raw = open_raw_icmp()
        self.raw6 = open_raw_icmp(socket.AF_INET6) if self.raw is not None else None
        self.raw_flows: dict[tuple[bytes, int], EchoFlow] = {}
        self._next_ident = int.from_bytes(os.urandom(2), "big")
        if self.raw is not None:
            self.loop.add_reader(self.raw.fileno(), self._raw_readable, self.raw)
            log.info("nat.icmp.raw_socket", reason="ping sockets not permitted; CAP_NET_RAW")
        if self.raw6 is not None:
            self.loop.add_reader(self.raw6.fileno(), self._raw_readable, self.raw6)
        self.flows.start_sweeping(self.loop)

    @property
    def stats(self) -> dict[str, int]:
        table = self.flows.stats
        return dict(self._stats, flows_reaped=table["reaped"], flows_evicted=table["evicted"])

    def send(self, ev: IcmpEchoOutbound) -> None:
        key = (ev.guest_ip, ev.dst_ip, ev.ident)
        flow = self.flows.get(key)
        now = self.loop.time()
        if flow is None:
            flow = self._open(key, ev, now)
            if flow is None:
                return
        else:
            self.flows.touch(key, flow, now)
        flow.quote = echo_quote(ev)
        v6 = len(ev.guest_ip) == 16
        try:
            if flow.sock is None:
                raw = self.raw6 if v6 else self.raw
                assert raw is not None
                # A raw socket sends what we give it: our id (and the ICMP checksum; the
                # kernel computes the ICMPv6 one, which covers the addresses).
                if v6:
                    message = icmp.HEADER.pack(
                        ICMP6_ECHO_REQUEST, 0, 0, flow.host_ident, ev.seq
                    ) + bytes(ev.payload)
                else:
                    message = icmp.build_icmp(
                        icmp.ECHO_REQUEST, 0, flow.host_ident, ev.seq, ev.payload
                    )
                raw.sendto(message, (ev.target_ip, 0))
            else:
                # The kernel fills in the id (the socket's port) and the checksum.
                type_ = ICMP6_ECHO_REQUEST if v6 else icmp.ECHO_REQUEST
                message = icmp.HEADER.pack(type_, 0, 0, 0, ev.seq) + bytes(ev.payload)
                flow.sock.send(message)
        except OSError as e:
            self._stats["errors"] += 1
            log.debug("nat.icmp.send_failed", target=ev.target_ip, error=str(e))
            if flow.sock is not None:
                self._host_errors(flow, e.errno)  # an earlier echo's error, or no route
            else:
                self._tell(flow, None, e.errno)
            return
        self._stats["echo_out"] += 1

    def _open(self, key: FlowKey, ev: IcmpEchoOutbound, now: float) -> EchoFlow | None:
        self.flows.make_room(key)
        target_ip = ev.target_ip
        v6 = ipaddress.ip_address(target_ip).version == 6
        raw = self.raw6 if v6 else self.raw
        if raw is not None:
            target = ipaddress.ip_address(target_ip).packed
            while True:
                self._next_ident = (self._next_ident + 1) & 0xFFFF
                if (target, self._next_ident) not in self.raw_flows:
                    break
            flow = EchoFlow(key, None, now, target, self._next_ident)
            self.flows.add(key, flow)
            self.raw_flows[(target, flow.host_ident)] = flow
            return flow
        try:
            sock = self.budget.open(
                socket.AF_INET6 if v6 else socket.AF_INET,
                socket.SOCK_DGRAM,
                socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP,
                guest=key[0],
                what="icmp echo flow",
            )
        except BudgetExceeded:
            self._stats["budget_refused"] += 1
            return None
        except PermissionError:
            self._stats["denied"] += 1
            if not self._warned:
                self._warned = True
                _, value = ping_sockets_allowed()
                log.warning(
                    "nat.icmp.ping_sockets_denied",
                    ping_group_range=value,
                    gid=os.getegid(),
                    fix="sysctl -w net.ipv4.ping_group_range='0 2147483647'",
                    effect="echo requests to addresses other than the gateway are dropped",
                )
            return None
        except OSError as e:  # EMFILE and friends: this echo is lost, the switch carries on
            self._stats["errors"] += 1
            self.budget.socket_failed(e, "icmp echo flow")
            if e.errno == errno.EAFNOSUPPORT:  # no IPv6 on this host: as unreachable as it gets
                self._tell_quote(ev.dst_ip, ev.guest_ip, echo_quote(ev), e.errno)
            return None
        try:
            host_errors.enable_recverr(sock)
            sock.connect((target_ip, 0))
        except OSError as e:
            # No route to the target: the guest's ping hears "unreachable" at once.
            sock.close()
            self._stats["errors"] += 1
            log.debug("nat.icmp.connect_failed", target=target_ip, error=str(e))
            self._tell_quote(ev.dst_ip, ev.guest_ip, echo_quote(ev), e.errno)
            return None
        flow = EchoFlow(key, sock, now)
        self.flows.add(key, flow)
        self.loop.add_reader(sock.fileno(), self._readable, flow)
        return flow

    def _readable(self, flow: EchoFlow) -> None:
        guest_ip, dst_ip, ident = flow.key
        assert flow.sock is not None
        reply_type = ICMP6_ECHO_REPLY if len(guest_ip) == 16 else icmp.ECHO_REPLY
        got = 0
        while True:
            try:
                data = flow.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                if not got:  # woken by a queued error (EPOLLERR) with nothing to read
                    self._host_errors(flow, None)
                break
            except OSError as e:  # a queued error's errno: its details are queued
                self._host_errors(flow, e.errno)
                break
            got += 1
            if len(data) < icmp.HEADER.size:
                continue
            type_, _code, _csum, _id, seq = icmp.HEADER.unpack_from(data)
            if type_ != reply_type:
                continue
            self.network.send_icmp_echo_reply(
                dst_ip, guest_ip, ident, seq, data[icmp.HEADER.size :]
            )
            self._stats["echo_in"] += 1
        flow.last_active = self.loop.time()
        self.flush()

    def _host_errors(self, flow: EchoFlow, err: int | None) -> None:
        """Tell the guest what the flow's ping socket heard (its error queue), or, when
        nothing is queued, what `err` (a failed send or recv) means."""
        assert flow.sock is not None
        told = False
        for error in host_errors.drain(flow.sock):
            told |= self._tell(flow, error, None)
        if not told and err is not None:
            self._tell(flow, None, err)

    def _tell(self, flow: EchoFlow, error: host_errors.HostError | None, err: int | None) -> bool:
        guest_ip, dst_ip, _ = flow.key
        if error is not None:
            told = host_errors.relay(self.network, dst_ip, guest_ip, flow.quote, error)
        else:
            told = host_errors.relay_errno(self.network, dst_ip, guest_ip, flow.quote, err)
        self._stats["icmp_errors"] += told
        return told

    def _tell_quote(self, src: bytes, guest: bytes, quote: bytes, err: int | None) -> None:
        told = host_errors.relay_errno(self.network, src, guest, quote, err)
        self._stats["icmp_errors"] += told

    def _raw_readable(self, raw: socket.socket) -> None:
        v6 = raw.family == socket.AF_INET6
        got = False
        for _ in range(256):  # bounded: other ICMP traffic of the host must not starve us
            try:
                data, addr = raw.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._stats["errors"] += 1
                break
            if v6:  # the ICMPv6 message alone; its source in `addr`
                off, reply_type, errors = 0, ICMP6_ECHO_REPLY, ICMP6_ERRORS
                source = ipaddress.IPv6Address(addr[0].split("%", 1)[0]).packed
            else:  # the IPv4 header first
                off = (data[0] & 0x0F) * 4 if data else 0
                reply_type = icmp.ECHO_REPLY
                errors = (icmp.DEST_UNREACHABLE, icmp.TIME_EXCEEDED)
                source = data[12:16]
            if len(data) < off + icmp.HEADER.size:
                continue
            type_, code, _csum, ident, seq = icmp.HEADER.unpack_from(data, off)
            if type_ in errors:
                got |= self._raw_error(data, off, v6, type_, code)
                continue
            if type_ != reply_type:
                continue
            flow = self.raw_flows.get((source, ident))
            if flow is None:
                continue  # another program's ping
            guest_ip, dst_ip, guest_ident = flow.key
            self.network.send_icmp_echo_reply(
                dst_ip, guest_ip, guest_ident, seq, data[off + icmp.HEADER.size :]
            )
            self._stats["echo_in"] += 1
            flow.last_active = self.loop.time()
            got = True
        if got:
            self.flush()

    def _raw_error(self, data: bytes, off: int, v6: bool, type_: int, code: int) -> bool:
        """An ICMP error a raw socket saw: told to the guest if it quotes an echo of ours."""
        inner = off + icmp.HEADER.size  # the quoted packet
        if v6:
            if len(data) < inner + IPV6_HEADER.size + icmp.HEADER.size or data[inner + 6] != 58:
                return False
            target = data[inner + 24 : inner + 40]
            quoted = inner + IPV6_HEADER.size
            origin = host_errors.SO_EE_ORIGIN_ICMP6
        else:
            ihl = (data[inner] & 0x0F) * 4 if len(data) > inner else 0
            if ihl < 20 or len(data) < inner + ihl + icmp.HEADER.size or data[inner + 9] != 1:
                return False
            target = data[inner + 16 : inner + 20]
            quoted = inner + ihl
            origin = host_errors.SO_EE_ORIGIN_ICMP
        q_type, _, _, q_ident, _ = icmp.HEADER.unpack_from(data, quoted)
        if q_type != (ICMP6_ECHO_REQUEST if v6 else icmp.ECHO_REQUEST):
            return False
        flow = self.raw_flows.get((target, q_ident))
        if flow is None:
            return False
        info = struct.unpack_from("!I", data, off + 4)[0]
        if not v6:
            info &= 0xFFFF  # fragmentation needed: the next-hop MTU is the low half
        error = host_errors.HostError(0, origin, type_, code, info)
        return self._tell(flow, error, None)

    def _close(self, flow: EchoFlow) -> None:
        if flow.sock is None:
            self.raw_flows.pop((flow.target, flow.host_ident), None)
            return
        try:
            self.loop.remove_reader(flow.sock.fileno())
        except (ValueError, OSError):
            pass
        flow.sock.close()

    def close(self) -> None:
        self.flows.close()
        for raw in (self.raw, self.raw6):
            if raw is not None:
                self.loop.remove_reader(raw.fileno())
                raw.close()
        self.raw = self.raw6 = None
