"""UDP NAT: each guest flow gets its own connected host socket.

A flow is (guest ip, guest port, destination ip, destination port). Its host socket is
connected to the real target, of the target's family (IPv4 or IPv6: a flow's addresses are
4 or 16 bytes, as the guest's packet had them), so the kernel only accepts replies from that
target (endpoint-dependent filtering, as gvproxy and slirp4netns do) and reports ICMP errors
for it. Those are read with their details from the socket's error queue and told to the
guest as the same ICMP/ICMPv6 error (`hostd/nat/host_errors.py`): port unreachable, so a
guest `send` to a closed port fails with ECONNREFUSED as it would on a real network; host and
net unreachable, packet too big (with its MTU), hop limit exceeded. A host without a route
to the target (connect() or send() failing with ENETUNREACH, EHOSTUNREACH, EADDRNOTAVAIL)
is told at once as ICMP unreachable, never a silent drop.

Bounded by the NAT's flow table (`hostd/nat/flows.py`): flows idle longer than
`idle_timeout` are reaped by a periodic sweep, and at `max_flows` the least recently used
flow is evicted before a new one is opened. Each flow's socket is drawn from the descriptor
budget (`hostd/nat/budget.py`): over it the new flow's datagram is answered with ICMP
administratively prohibited (a hard error: the guest's socket fails with EHOSTUNREACH at
once), when socket() itself fails with ICMP host unreachable; both are counted, and the
failure never leaves `send` (it runs inside the switch's flush, on a link's receive path).
Reads drain each socket until it would block; replies go back through `Network.send_udp`.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from netferry.hostd.nat import host_errors
from netferry.hostd.nat.budget import BudgetExceeded, DescriptorBudget
from netferry.hostd.nat.flows import FlowTable
from netferry.hostd.stack import icmp
from netferry.hostd.stack.network import Network, UdpOutbound, udp_flow_key

log = structlog.get_logger("hostd.nat.udp")

FlowKey = tuple[bytes, int, bytes, int]


READ_BATCH = 64
RECV_SIZE = 65535


@dataclass(slots=True)
class UdpFlow:
    key: FlowKey
    sock: socket.socket
    last_active: float
    quote: bytes  # a guest datagram's IP header + 8 bytes, for ICMP errors
    frame_key: bytes = b""  # its key in Network.udp_flows
    stats: dict[str, int] = field(default_factory=lambda: {"out": 0, "in": 0})


class UdpNat:
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
        self.flows: FlowTable[FlowKey, UdpFlow] = FlowTable(
            "nat.udp",
            max_flows=max_flows,
            idle_timeout=idle_timeout,
            close=self._close,
            # One guest's share of the table (its port, as the budget's): it evicts its own.
            owner=lambda key: self.budget.owner_of(key[0]),
            share=guest_share,
        )
        self.loop = asyncio.get_running_loop()
        self._stats = {
            "datagrams_out": 0,
            "datagrams_in": 0,
            "send_errors": 0,
            "refused": 0,
            "icmp_errors": 0,  # errors of host sockets told to the guest (refused included)
            "budget_refused": 0,
            "socket_errors": 0,
        }
        self.flows.start_sweeping(self.loop)

    @property
    def stats(self) -> dict[str, int]:
        table = self.flows.stats
        return dict(
            self._stats,
            flows_opened=table["opened"],
            flows_reaped=table["reaped"],
            flows_evicted=table["evicted"],
        )

    @property
    def active(self) -> int:
        return len(self.flows)

    def send(self, ev: UdpOutbound) -> None:
        key = (ev.guest_ip, ev.guest_port, ev.dst_ip, ev.dst_port)
        now = self.loop.time()
        flow = self.flows.get(key)
        if flow is None:
            opened = self._open(key, ev.target_ip, ev.dst_port, now)
            if isinstance(opened, int):
                self.network.send_icmp_error(
                    ev.dst_ip, ev.guest_ip, icmp.DEST_UNREACHABLE, opened, ev.quote
                )
                return
            flow = opened
        else:
            self.flows.touch(key, flow, now)
        flow.quote = ev.quote
        self._send(flow, ev.payload)

    def send_flow_datagrams(self, items: list[tuple[UdpFlow, bytes]]) -> None:
        """Datagrams of open flows that `Network` recognised on its flow path: sent in
        order; the bookkeeping (idle clock, LRU order, counters) once per run of one flow."""
        now = self.loop.time()
        touch = self.flows.touch
        flow: UdpFlow | None = None
        sent = 0
        for item_flow, payload in items:
            if item_flow is not flow:
                if flow is not None:
                    self._sent(flow, sent)
                flow, sent = item_flow, 0
                if flow.sock.fileno() >= 0:
                    touch(flow.key, flow, now)
            try:
                flow.sock.send(payload)
            except OSError as e:
                self._send_failed(flow, e)
            else:
                sent += 1
        if flow is not None:
            self._sent(flow, sent)

    def _sent(self, flow: UdpFlow, n: int) -> None:
        flow.stats["out"] += n
        self._stats["datagrams_out"] += n

    def _send(self, flow: UdpFlow, payload: bytes) -> None:
        try:
            flow.sock.send(payload)
        except OSError as e:
            self._send_failed(flow, e)
            return
        self._sent(flow, 1)

    def _send_failed(self, flow: UdpFlow, e: OSError) -> None:
        if isinstance(e, BlockingIOError | InterruptedError):
            self._stats["send_errors"] += 1  # full socket buffer: a lost datagram, as on a wire
            return
        if not isinstance(e, ConnectionRefusedError):
            self._stats["send_errors"] += 1
        # An earlier datagram's ICMP error (its details are queued), or no route at all.
        self._host_errors(flow, e.errno)

    def _open(self, key: FlowKey, target_ip: str, port: int, now: float) -> UdpFlow | int:
        """A connected socket for a new flow, or the ICMP unreachable code to answer with
        (counted): administratively prohibited over the descriptor budget (a hard error
        for the guest's socket), host unreachable when socket() or connect() fail."""
        self.flows.make_room(key)  # an evicted flow's descriptor is free before we open
        family = socket.AF_INET6 if ipaddress.ip_address(target_ip).version == 6 else socket.AF_INET
        try:
            sock = self.budget.open(family, socket.SOCK_DGRAM, guest=key[0], what="udp flow")
        except BudgetExceeded:
            self._stats["budget_refused"] += 1
            return icmp.ADMIN_PROHIBITED
        except OSError as e:  # EMFILE and friends: this flow fails, the switch carries on
            self._stats["socket_errors"] += 1
            self.budget.socket_failed(e, "udp flow")
            return icmp.HOST_UNREACHABLE
        try:
            host_errors.enable_recverr(sock)
            sock.connect((target_ip, port))
        except OSError as e:
            # No route (a host without IPv6, say): the guest hears at once, as from a router.
            sock.close()
            self._stats["send_errors"] += 1
            log.debug("nat.udp.connect_failed", target=target_ip, port=port, error=str(e))
            mapped = host_errors.ERRNO_TO_ICMP.get(e.errno or 0)
            if mapped is not None and mapped[0] == icmp.DEST_UNREACHABLE:
                return mapped[1]
            return icmp.HOST_UNREACHABLE
        flow = UdpFlow(key, sock, now, b"", udp_flow_key(*key))
        self.flows.add(key, flow)
        self.network.udp_flows[flow.frame_key] = flow
        self.loop.add_reader(sock.fileno(), self._readable, flow)
        return flow

    def _readable(self, flow: UdpFlow) -> None:
        guest_ip, guest_port, dst_ip, dst_port = flow.key
        send_udp = self.network.send_udp
        got = 0
        for _ in range(READ_BATCH):
            try:
                data = flow.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                if not got:  # woken by a queued error (EPOLLERR) with nothing to read
                    self._host_errors(flow, None)
                break
            except OSError as e:  # a queued ICMP error's errno: its details are queued
                self._host_errors(flow, e.errno)
                break
            send_udp(dst_ip, dst_port, guest_ip, guest_port, data)
            got += 1
        if got:
            flow.last_active = self.loop.time()
            flow.stats["in"] += got
            self._stats["datagrams_in"] += got
        self.flush()

    def _host_errors(self, flow: UdpFlow, err: int | None) -> None:
        """Tell the guest what the flow's socket heard (its error queue), or, when nothing
        is queued, what `err` (a failed send or recv) means; counted."""
        guest_ip, _, dst_ip, _ = flow.key
        told = 0
        for error in host_errors.drain(flow.sock):
            if host_errors.relay(self.network, dst_ip, guest_ip, flow.quote, error):
                told += 1
                self._stats["refused"] += error.errno == errno.ECONNREFUSED
        if not told and err is not None:
            if host_errors.relay_errno(self.network, dst_ip, guest_ip, flow.quote, err):
                told = 1
                self._stats["refused"] += err == errno.ECONNREFUSED
        self._stats["icmp_errors"] += told

    def _close(self, flow: UdpFlow) -> None:
        self.network.udp_flows.pop(flow.frame_key, None)
        try:
            self.loop.remove_reader(flow.sock.fileno())
        except (ValueError, OSError):
            pass
        flow.sock.close()

    def reap(self, now: float) -> int:
        """Close flows idle past the timeout; returns how many."""
        return self.flows.reap(now)

    def close(self) -> None:
        self.flows.close()
