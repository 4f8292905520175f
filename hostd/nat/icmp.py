"""ICMP echo NAT through unprivileged ping sockets (SOCK_DGRAM, IPPROTO_ICMP).

One ping socket per (guest, destination, guest echo id), connected to the real target.
The kernel rewrites the echo id to the socket's "port" and matches replies to it, so
concurrent pings never cross; the reply's id is restored to the guest's before it goes
back. Ping sockets need the caller's group inside `net.ipv4.ping_group_range`; when it is
not, hostd says so once, with the command that fixes it, and drops echo requests (the
gateway's own echo still answers).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from hostd.stack import icmp
from hostd.stack.network import IcmpEchoOutbound, Network

log = structlog.get_logger("hostd.nat.icmp")

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
    sock: socket.socket
    last_active: float


class IcmpNat:
    def __init__(
        self,
        network: Network,
        flush: Callable[[], None],
        *,
        idle_timeout: float,
        max_flows: int,
    ) -> None:
        self.network = network
        self.flush = flush
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        self.flows: OrderedDict[FlowKey, EchoFlow] = OrderedDict()
        self.loop = asyncio.get_running_loop()
        self.stats = {"echo_out": 0, "echo_in": 0, "denied": 0, "errors": 0, "flows_reaped": 0}
        self._warned = False
        self._sweeper = self.loop.create_task(self._sweep_forever())

    def send(self, ev: IcmpEchoOutbound) -> None:
        key = (ev.guest_ip, ev.dst_ip, ev.ident)
        flow = self.flows.get(key)
        now = self.loop.time()
        if flow is None:
            flow = self._open(key, ev.target_ip, now)
            if flow is None:
                return
        else:
            self.flows.move_to_end(key)
        flow.last_active = now
        # The kernel fills in the id (the socket's port) and the checksum.
        message = icmp.HEADER.pack(icmp.ECHO_REQUEST, 0, 0, 0, ev.seq) + ev.payload
        try:
            flow.sock.send(message)
        except OSError as e:
            self.stats["errors"] += 1
            log.debug("nat.icmp.send_failed", target=ev.target_ip, error=str(e))
            return
        self.stats["echo_out"] += 1

    def _open(self, key: FlowKey, target_ip: str, now: float) -> EchoFlow | None:
        while len(self.flows) >= self.max_flows:
            _, old = self.flows.popitem(last=False)
            self._close(old)
        v6 = ipaddress.ip_address(target_ip).version == 6
        try:
            sock = socket.socket(
                socket.AF_INET6 if v6 else socket.AF_INET,
                socket.SOCK_DGRAM,
                socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP,
            )
        except PermissionError:
            self.stats["denied"] += 1
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
        try:
            sock.setblocking(False)
            sock.connect((target_ip, 0))
        except OSError as e:
            sock.close()
            self.stats["errors"] += 1
            log.debug("nat.icmp.connect_failed", target=target_ip, error=str(e))
            return None
        flow = EchoFlow(key, sock, now)
        self.flows[key] = flow
        self.loop.add_reader(sock.fileno(), self._readable, flow)
        return flow

    def _readable(self, flow: EchoFlow) -> None:
        guest_ip, dst_ip, ident = flow.key
        while True:
            try:
                data = flow.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.stats["errors"] += 1
                break
            if len(data) < icmp.HEADER.size:
                continue
            type_, _code, _csum, _id, seq = icmp.HEADER.unpack_from(data)
            if type_ != icmp.ECHO_REPLY:
                continue
            self.network.send_icmp_echo_reply(
                dst_ip, guest_ip, ident, seq, data[icmp.HEADER.size :]
            )
            self.stats["echo_in"] += 1
        flow.last_active = self.loop.time()
        self.flush()

    def _close(self, flow: EchoFlow) -> None:
        try:
            self.loop.remove_reader(flow.sock.fileno())
        except (ValueError, OSError):
            pass
        flow.sock.close()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, min(5.0, self.idle_timeout / 4)))
            now = self.loop.time()
            idle = [k for k, f in self.flows.items() if now - f.last_active >= self.idle_timeout]
            for k in idle:
                self._close(self.flows.pop(k))
            self.stats["flows_reaped"] += len(idle)

    def close(self) -> None:
        self._sweeper.cancel()
        for flow in self.flows.values():
            self._close(flow)
        self.flows.clear()
