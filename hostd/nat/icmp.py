"""ICMP echo NAT through unprivileged ping sockets (SOCK_DGRAM, IPPROTO_ICMP), or a raw
ICMP socket when those are not permitted but hostd has CAP_NET_RAW (root).

Ping sockets: one per (guest, destination, guest echo id), connected to the real target.
The kernel rewrites the echo id to the socket's "port" and matches replies to it, so
concurrent pings never cross; the reply's id is restored to the guest's before it goes
back. Ping sockets need the caller's group inside `net.ipv4.ping_group_range`.

Raw socket (libslirp's fallback): one socket for every flow, opened at start. Each flow gets
its own echo id on the host side; a reply is matched by (source address, id) and goes back
with the guest's id. The raw socket sees every ICMP message to the host, so anything that
is not an echo reply of ours is ignored.

With neither, hostd says so once, with the command that fixes it, and drops echo requests
(the gateway's own echo still answers).

Flows live in the NAT's flow table (`hostd/nat/flows.py`: bounded, LRU eviction, idle
sweep); a ping socket is drawn from the descriptor budget (`hostd/nat/budget.py`), and an
echo that gets none (over the budget, or socket() failing) is dropped and counted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from netferry.hostd.nat.budget import BudgetExceeded, DescriptorBudget
from netferry.hostd.nat.flows import FlowTable
from netferry.hostd.stack import icmp
from netferry.hostd.stack.network import IcmpEchoOutbound, Network

log = structlog.get_logger("hostd.nat.icmp")

FlowKey = tuple[bytes, bytes, int]


def _guest_of(key: FlowKey) -> bytes:
    return key[0]  # the guest's address


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
    target: bytes = b""  # raw socket: the destination (packed IPv4)
    host_ident: int = 0  # raw socket: the echo id used on the host side


def open_raw_icmp() -> socket.socket | None:
    """A raw ICMP socket when ping sockets are not permitted and we may open one."""
    if ping_sockets_allowed()[0]:
        return None
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except OSError:
        return None  # no CAP_NET_RAW: the warning at the first echo says what to do
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
            owner=_guest_of,  # one guest's share of the table: it evicts its own flows
            share=guest_share,
        )
        self.loop = asyncio.get_running_loop()
        self._stats = {"echo_out": 0, "echo_in": 0, "denied": 0, "errors": 0, "budget_refused": 0}
        self._warned = False
        self.raw = open_raw_icmp()
        self.raw_flows: dict[tuple[bytes, int], EchoFlow] = {}
        self._next_ident = int.from_bytes(os.urandom(2), "big")
        if self.raw is not None:
            self.loop.add_reader(self.raw.fileno(), self._raw_readable)
            log.info("nat.icmp.raw_socket", reason="ping sockets not permitted; CAP_NET_RAW")
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
            flow = self._open(key, ev.target_ip, now)
            if flow is None:
                return
        else:
            self.flows.touch(key, flow, now)
        try:
            if flow.sock is None:
                assert self.raw is not None
                # A raw socket sends what we give it: our id and the checksum.
                message = icmp.build_icmp(icmp.ECHO_REQUEST, 0, flow.host_ident, ev.seq, ev.payload)
                self.raw.sendto(message, (ev.target_ip, 0))
            else:
                # The kernel fills in the id (the socket's port) and the checksum.
                message = icmp.HEADER.pack(icmp.ECHO_REQUEST, 0, 0, 0, ev.seq) + ev.payload
                flow.sock.send(message)
        except OSError as e:
            self._stats["errors"] += 1
            log.debug("nat.icmp.send_failed", target=ev.target_ip, error=str(e))
            return
        self._stats["echo_out"] += 1

    def _open(self, key: FlowKey, target_ip: str, now: float) -> EchoFlow | None:
        self.flows.make_room(key)
        v6 = ipaddress.ip_address(target_ip).version == 6
        if self.raw is not None and not v6:
            target = ipaddress.IPv4Address(target_ip).packed
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
            return None
        try:
            sock.connect((target_ip, 0))
        except OSError as e:
            sock.close()
            self._stats["errors"] += 1
            log.debug("nat.icmp.connect_failed", target=target_ip, error=str(e))
            return None
        flow = EchoFlow(key, sock, now)
        self.flows.add(key, flow)
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
                self._stats["errors"] += 1
                break
            if len(data) < icmp.HEADER.size:
                continue
            type_, _code, _csum, _id, seq = icmp.HEADER.unpack_from(data)
            if type_ != icmp.ECHO_REPLY:
                continue
            self.network.send_icmp_echo_reply(
                dst_ip, guest_ip, ident, seq, data[icmp.HEADER.size :]
            )
            self._stats["echo_in"] += 1
        flow.last_active = self.loop.time()
        self.flush()

    def _raw_readable(self) -> None:
        assert self.raw is not None
        got = False
        for _ in range(256):  # bounded: other ICMP traffic of the host must not starve us
            try:
                data = self.raw.recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._stats["errors"] += 1
                break
            ihl = (data[0] & 0x0F) * 4 if data else 0
            if len(data) < ihl + icmp.HEADER.size or data[ihl] != icmp.ECHO_REPLY:
                continue
            _type, _code, _csum, ident, seq = icmp.HEADER.unpack_from(data, ihl)
            flow = self.raw_flows.get((data[12:16], ident))
            if flow is None:
                continue  # another program's ping
            guest_ip, dst_ip, guest_ident = flow.key
            self.network.send_icmp_echo_reply(
                dst_ip, guest_ip, guest_ident, seq, data[ihl + icmp.HEADER.size :]
            )
            self._stats["echo_in"] += 1
            flow.last_active = self.loop.time()
            got = True
        if got:
            self.flush()

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
        if self.raw is not None:
            self.loop.remove_reader(self.raw.fileno())
            self.raw.close()
            self.raw = None
