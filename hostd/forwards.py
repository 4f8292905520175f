"""Port forwards: host listeners whose connections and datagrams go into the guest network.

- TCP: each accepted client becomes an active open through the stack (`Network.tcp_connect`)
  to the guest address, spliced by the same `HostSide` the outbound NAT uses. The remote is
  an IPv4 or an IPv6 guest address, or `[MAC]:PORT`: the IPv6 address of the guest with that
  MAC (`Network.guest_ip6_for_mac`: its DHCPv6 lease, else what NDP learned), looked up per
  client. Listener and guest families are independent (`[::1]:8080` → a v4 guest works).
  The guest sees the client's own address when it is a non-loopback address of the guest's
  family, outside the virtual subnet (slirp4netns and pasta keep it; gvproxy and Rancher
  Desktop hide it), else the host: .254, or the v6 host-loopback address `::254`.
- UNIX: a host socket path forwarded to a guest TCP port, from .254. The path is created
  only where nothing exists; it is removed on unexpose only if it is still the socket we made
  (an API must not become a way to delete files: gvproxy's could).
- UDP: one host socket; per client address a session with its own source 4-tuple in the
  stack, so the guest's replies find their way back. Sessions live in a flow table
  (`hostd/nat/flows.py`: at most `udp_max_flows` per forward, least recently used evicted,
  idle ones reaped), as NAT flows do.

A forwarded TCP or unix client's socket counts against the descriptor budget
(`hostd/nat/budget.py`); over it, the client is reset at once and the refusal counted.

Duplicates are refused before any socket is touched, naming the forward that holds the
address, and the reservation is made before the first `await`, so of two concurrent Expose
calls for one port exactly one wins.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import random
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import structlog

from netferry.address import (
    AddressError,
    HostPort,
    is_mac_host,
    parse_host_port,
    parse_remote,
    parse_unix_path,
)
from netferry.hostd.errors import ControlError
from netferry.hostd.nat.budget import BudgetExceeded
from netferry.hostd.nat.flows import FlowTable
from netferry.hostd.nat.tcp import HostSide
from netferry.hostd.stack import tcp

if TYPE_CHECKING:
    import asyncio as _asyncio

    from netferry.hostd.config import NetworkConfig
    from netferry.hostd.nat.tcp import TcpNat
    from netferry.hostd.stack.network import Network


class SwitchSide(Protocol):
    """What forwards need of the switch (and nothing more, so the switch may own them
    without the two modules importing each other)."""

    config: NetworkConfig
    network: Network
    loop: _asyncio.AbstractEventLoop
    tcp_nat: TcpNat

    def flush(self) -> None: ...
    def emit_event(self, kind: str, **fields: object) -> None: ...


log = structlog.get_logger("hostd.forwards")

PROTOCOLS = ("tcp", "udp", "unix")
ACCEPT_RETRY_DELAY = 1.0


ForwardError = ControlError  # the name front ends used before the control core had one


@dataclass
class Forward:
    protocol: str
    local: str  # canonical text: "127.0.0.1:8080", ":8080", "[::1]:8080", "/path"
    remote: HostPort
    created: float = field(default_factory=time.time)
    counters: dict[str, int] = field(
        default_factory=lambda: {
            "active": 0,
            "total": 0,
            "bytes_to_guest": 0,
            "bytes_from_guest": 0,
            "refused": 0,  # clients reset: the descriptor budget was spent
        }
    )
    listener: object = None  # StreamListener or DatagramTransport
    runtime: object = None  # UdpForwarder
    socket_inode: tuple[int, int] | None = None  # (dev, ino) of a unix socket we created
    connections: set[ForwardSide] = field(default_factory=set)

    @property
    def key(self) -> tuple[str, str]:
        return (self.protocol, self.local)

    def describe(self) -> str:
        return f"{self.protocol} {self.local} → {self.remote}"


def canonical_local(protocol: str, local: str) -> tuple[str, HostPort | None]:
    if protocol == "unix":
        return parse_unix_path(local, "local"), None
    hp = parse_host_port(local, "local")
    return str(hp), hp


def _overlaps(a: HostPort, b: HostPort) -> bool:
    return a.port == b.port and (not a.host or not b.host or a.host == b.host)


class ForwardSide(HostSide):
    """A forwarded client: its connection into the guest is opened when it is accepted."""

    def __init__(self, forwards: Forwards, fwd: Forward) -> None:
        super().__init__(forwards.switch.tcp_nat, None)
        self.forwards = forwards
        self.fwd = fwd
        self.counters = fwd.counters

    def start(self, sock: socket.socket, peer: object) -> None:
        conn = self.forwards.open_to_guest(self.fwd.remote, peer=peer)
        if conn is None:  # no free 4-tuple, or no guest has the remote's MAC (yet)
            self.fwd.counters["refused"] += 1
            sock.close()
            return
        self.conn = conn
        conn.app = self
        self.nat.hosts[conn] = self
        self.fwd.connections.add(self)
        self.fwd.counters["active"] += 1
        self.fwd.counters["total"] += 1
        self.attach(sock)
        self.nat.touch(conn)

    def finished(self) -> None:
        if self in self.fwd.connections:
            self.fwd.connections.discard(self)
            self.fwd.counters["active"] -= 1


class StreamListener:
    """Listening sockets of one TCP or unix forward: every accepted client is a
    `ForwardSide`, without an asyncio transport in between."""

    ACCEPT_BATCH = 64

    def __init__(self, forwards: Forwards, fwd: Forward, socks: list[socket.socket]) -> None:
        self.forwards = forwards
        self.fwd = fwd
        self.socks = socks
        self.loop = forwards.switch.loop
        self.budget = forwards.switch.tcp_nat.budget
        for sock in socks:
            sock.setblocking(False)
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(self.ACCEPT_BATCH):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: the listener stays readable, so stop
                    # watching it for a second instead of spinning (asyncio's servers do
                    # the same); the client waits in the backlog meanwhile.
                    log.warning("forward.accept_paused", forward=self.fwd.describe(), error=str(e))
                    self.loop.remove_reader(listener.fileno())
                    self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume, listener)
                return
            try:
                sock = self.budget.adopt(sock, what=f"{self.fwd.protocol} forward")
            except BudgetExceeded:
                self.fwd.counters["refused"] += 1  # reset and closed by the budget
                continue
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ForwardSide(self.forwards, self.fwd).start(sock, peer)
        self.forwards.switch.flush()

    def _resume(self, listener: socket.socket) -> None:
        if listener in self.socks and listener.fileno() >= 0:
            self.loop.add_reader(listener.fileno(), self._accept, listener)

    def close(self) -> None:
        for sock in self.socks:
            if sock.fileno() >= 0:
                self.loop.remove_reader(sock.fileno())
                sock.close()
        self.socks = []


def tcp_listen_sockets(host: str, port: int, backlog: int = 1024) -> list[socket.socket]:
    """Bound, listening TCP sockets as asyncio's create_server makes them: every address
    `host` resolves to (no host: IPv4 and IPv6 wildcards, the IPv6 one v6-only)."""
    infos = socket.getaddrinfo(
        host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    socks: list[socket.socket] = []
    seen: set[tuple] = set()
    try:
        for family, type_, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


@dataclass(eq=False)
class UdpSession:
    forwarder: UdpForwarder
    client: tuple
    key: tuple[bytes, int, bytes, int]  # guest ip, guest port, our ip, our port
    last_active: float

    def reply(self, payload: bytes) -> None:
        self.last_active = self.forwarder.loop.time()
        self.forwarder.fwd.counters["bytes_from_guest"] += len(payload)
        if self.forwarder.transport is not None:
            self.forwarder.transport.sendto(payload, self.client)


class UdpForwarder(asyncio.DatagramProtocol):
    def __init__(self, forwards: Forwards, fwd: Forward) -> None:
        self.forwards = forwards
        self.fwd = fwd
        self.loop = forwards.switch.loop
        self.transport: asyncio.DatagramTransport | None = None
        config = forwards.switch.config
        self.sessions: FlowTable[tuple, UdpSession] = FlowTable(
            "forward.udp",
            max_flows=config.udp_max_flows,
            idle_timeout=config.udp_idle_timeout,
            close=self._session_closed,
        )
        self.sessions.start_sweeping(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        network = self.forwards.switch.network
        session = self.sessions.get(addr)
        now = self.loop.time()
        if session is None:
            guest_ip = self.forwards.guest_address(self.fwd.remote)
            if guest_ip is None:  # no guest has the remote's MAC (yet): dropped
                self.fwd.counters["refused"] += 1
                return
            self.sessions.make_room()
            src_ip, src_port = self.forwards.source_for(
                addr, self.fwd.remote, "udp", guest=guest_ip
            )
            key = (guest_ip, self.fwd.remote.port, src_ip, src_port)
            session = UdpSession(self, addr, key, now)
            self.sessions.add(addr, session)
            network.udp_sessions[key] = session
            self.fwd.counters["active"] += 1
            self.fwd.counters["total"] += 1
        else:
            self.sessions.touch(addr, session, now)
        self.fwd.counters["bytes_to_guest"] += len(data)
        guest_ip, gport, src_ip, src_port = session.key
        network.send_udp(src_ip, src_port, guest_ip, gport, data)
        self.forwards.switch.flush()

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for one client; its session times out

    def _session_closed(self, session: UdpSession) -> None:
        self.forwards.switch.network.udp_sessions.pop(session.key, None)
        self.fwd.counters["active"] -= 1

    def close(self) -> None:
        self.sessions.close()
        if self.transport is not None:
            self.transport.close()


class Forwards:
    def __init__(self, switch: SwitchSide) -> None:
        self.switch = switch
        self.table: dict[tuple[str, str], Forward] = {}

    def list(self) -> list[Forward]:
        return [self.table[k] for k in sorted(self.table)]

    def guest_address(self, remote: HostPort) -> bytes | None:
        """The packed guest address of `remote` (4 or 16 bytes); for `[MAC]:PORT` the IPv6
        address of the guest with that MAC now, None when none is known."""
        if is_mac_host(remote.host):
            network = self.switch.network
            if not getattr(network, "ipv6_enabled", False):
                return None
            return network.guest_ip6_for_mac(bytes.fromhex(remote.host.replace(":", "")))
        return ipaddress.ip_address(remote.host).packed

    def open_to_guest(
        self, remote: HostPort, *, peer: object = None, via: bytes | None = None
    ) -> tcp.TcpConnection | None:
        """The one active open into the guest network (TCP forwards, HTTP and gRPC tunnels):
        picks the source (`source_for`) and sends the SYN; None when no 4-tuple is free or
        no guest has the remote's MAC."""
        guest = self.guest_address(remote)
        if guest is None:
            return None
        src_ip, src_port = self.source_for(peer, remote, "tcp", via=via, guest=guest)
        return self.switch.network.tcp_connect(
            guest, remote.port, src_ip, src_port, self.switch.loop.time()
        )

    def source_for(
        self,
        peer: object,
        remote: HostPort,
        proto: str,
        via: bytes | None = None,
        guest: bytes | None = None,
    ) -> tuple[bytes, int]:
        """The source address the guest sees for a client at `peer`: the client's own
        address and port when it is of the guest's family and neither loopback, link-local
        nor inside the virtual subnet, else `via` (default: the host address, .254 or the v6
        host-loopback address) with a port free for this guest endpoint."""
        network = self.switch.network
        if guest is None:
            guest = self.guest_address(remote)
        v6 = guest is not None and len(guest) == 16
        if v6:
            subnet = self.switch.config.subnet6
            host: bytes = network.host_ip6
        else:
            subnet = network.subnet
            host = network.host_ip
        fallback: bytes = via if via is not None and len(via) == len(host) else host
        if via is not None and len(via) != len(host):
            # A tunnel from the gateway (control.py passes the v4 one) to a v6 guest.
            fallback = network.gateway_ip6 if v6 else network.gateway_ip
        ip = fallback
        port = 0
        if isinstance(peer, tuple) and len(peer) >= 2:
            try:
                addr = ipaddress.ip_address(peer[0].split("%", 1)[0])
            except (ValueError, AttributeError):
                addr = None
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            if addr is not None:
                port = int(peer[1])
                if (
                    addr.version == (6 if v6 else 4)
                    and not addr.is_loopback
                    and not addr.is_unspecified
                    and not addr.is_link_local
                    and not addr.is_multicast
                    and addr not in subnet
                ):
                    ip = addr.packed
        table = network.tcp_conns if proto == "tcp" else network.udp_sessions
        while not port or (guest, remote.port, ip, port) in table:
            if ip != fallback:
                ip = fallback  # the client's own 4-tuple is taken: fall back to the host
                continue
            port = random.randint(32768, 60999)
        return ip, port

    def check_guest_address(self, remote: HostPort, field: str = "remote") -> None:
        """ControlError unless `remote` may be a guest: in the subnet (or the v6 prefix),
        not the gateway, a virtual address, the network or the broadcast address; a MAC
        remote needs IPv6 on."""
        net = self.switch.network
        v6_on = bool(getattr(net, "ipv6_enabled", False))
        if is_mac_host(remote.host):
            if not v6_on:
                raise ControlError(
                    "invalid_argument", f"{field}: a guest named by MAC needs IPv6 (it is off)"
                )
            return
        ip = ipaddress.ip_address(remote.host)
        if ip.version == 6:
            if not v6_on:
                raise ControlError("invalid_argument", f"{field}: {ip}: IPv6 is off")
            config = self.switch.config
            if ip not in config.subnet6:
                raise ControlError("invalid_argument", f"{field}: {ip} is not in {config.subnet6}")
            if ip in config.virtual_addresses6 or ip == config.subnet6.network_address:
                raise ControlError("invalid_argument", f"{field}: {ip} is not a guest address")
            return
        if ip not in net.subnet:
            raise ControlError("invalid_argument", f"{field}: {ip} is not in {net.subnet}")
        if ip.packed in net.virtual_ips or ip in (
            net.subnet.network_address,
            net.subnet.broadcast_address,
        ):
            raise ControlError("invalid_argument", f"{field}: {ip} is not a guest address")

    @staticmethod
    def _local(protocol: str, local: str) -> tuple[str, str, HostPort | None]:
        """(protocol, canonical local text, host:port) or ForwardError INVALID_ARGUMENT."""
        protocol = protocol.lower()
        if protocol not in PROTOCOLS:
            raise ControlError(
                "invalid_argument", f"protocol: {protocol!r} is not tcp, udp or unix"
            )
        try:
            return (protocol, *canonical_local(protocol, local))
        except AddressError as e:
            raise ControlError("invalid_argument", str(e)) from None

    async def expose(self, protocol: str, local: str, remote: str) -> Forward:
        protocol, local_text, local_hp = self._local(protocol, local)
        try:
            remote_hp = parse_remote(remote)
        except AddressError as e:
            raise ControlError("invalid_argument", str(e)) from None
        self.check_guest_address(remote_hp)
        key = (protocol, local_text)
        for other in self.table.values():
            if other.key == key or (
                other.protocol == protocol
                and local_hp is not None
                and _overlaps(local_hp, parse_host_port(other.local, "local"))
            ):
                raise ControlError(
                    "already_exists",
                    f"{protocol} {local_text} is held by the forward {other.describe()}",
                )
        fwd = Forward(protocol, local_text, remote_hp)
        self.table[key] = fwd  # reserved before the first await: concurrent calls see it
        try:
            await self._start(fwd, local_hp)
        except BaseException:
            self.table.pop(key, None)
            raise
        log.info("forward.added", forward=fwd.describe())
        self.switch.emit_event("forward_added", forward=fwd)
        return fwd

    async def _start(self, fwd: Forward, local_hp: HostPort | None) -> None:
        loop = self.switch.loop
        try:
            if fwd.protocol == "tcp":
                assert local_hp is not None
                fwd.listener = StreamListener(
                    self, fwd, tcp_listen_sockets(local_hp.host, local_hp.port)
                )
            elif fwd.protocol == "unix":
                sock = self._unix_listener(fwd.local)
                st = os.stat(fwd.local)
                fwd.socket_inode = (st.st_dev, st.st_ino)
                fwd.listener = StreamListener(self, fwd, [sock])
            else:
                assert local_hp is not None
                family = socket.AF_INET6 if ":" in local_hp.host else socket.AF_INET
                if not local_hp.host:
                    family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_DGRAM)
                try:
                    if family == socket.AF_INET6 and not local_hp.host:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                    sock.bind(
                        (
                            local_hp.host or ("::" if family == socket.AF_INET6 else ""),
                            local_hp.port,
                        )
                    )
                except OSError:
                    sock.close()
                    raise
                fwd.runtime = UdpForwarder(self, fwd)
                fwd.listener, _ = await loop.create_datagram_endpoint(
                    lambda: fwd.runtime,
                    sock=sock,  # type: ignore[arg-type,return-value]
                )
        except OSError as e:
            if isinstance(fwd.runtime, UdpForwarder):
                fwd.runtime.close()
            if e.errno == errno.EADDRINUSE:
                raise ControlError(
                    "already_exists", f"{fwd.protocol} {fwd.local} is in use by another process"
                ) from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise ControlError(
                    "invalid_argument", f"local: {fwd.local} is not an address of this host"
                ) from None
            if e.errno == errno.EACCES:
                raise ControlError(
                    "permission_denied", f"local: binding {fwd.local} is not permitted"
                ) from None
            raise ControlError("unavailable", f"local: {fwd.local}: {e.strerror or e}") from None

    @staticmethod
    def _unix_listener(path: str) -> socket.socket:
        parent = os.path.dirname(path) or "/"
        if not os.path.isdir(parent):
            raise ControlError("invalid_argument", f"local: directory {parent} does not exist")
        if os.path.lexists(path):
            kind = "a socket" if stat.S_ISSOCK(os.lstat(path).st_mode) else "a file"
            raise ControlError(
                "already_exists", f"local: {path} already exists ({kind}); it is never replaced"
            )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(1024)
        except OSError as e:
            sock.close()
            raise ControlError(
                "unavailable", f"local: cannot listen on {path}: {e.strerror}"
            ) from None
        sock.setblocking(False)
        return sock

    def find(self, protocol: str, local: str) -> Forward | None:
        """The forward on `local` (any spelling of it), or None; ControlError when `local`
        or `protocol` is malformed."""
        protocol, local_text, _ = self._local(protocol, local)
        return self.table.get((protocol, local_text))

    async def unexpose(self, protocol: str, local: str) -> Forward:
        protocol, local_text, _ = self._local(protocol, local)
        fwd = self.table.pop((protocol, local_text), None)
        if fwd is None:
            raise ControlError("not_found", f"no {protocol} forward on {local_text}")
        await self._stop(fwd)
        log.info("forward.removed", forward=fwd.describe())
        self.switch.emit_event("forward_removed", forward=fwd)
        return fwd

    async def _stop(self, fwd: Forward) -> None:
        listener = fwd.listener
        if isinstance(fwd.runtime, UdpForwarder):
            fwd.runtime.close()
        elif isinstance(listener, StreamListener):
            listener.close()
            # Open connections end cleanly: FIN to both sides after what is in flight.
            for side in list(fwd.connections):
                if side.conn is not None and side.conn.state is not tcp.TcpState.CLOSED:
                    side.conn.close()
                    self.switch.tcp_nat.touch(side.conn)
                side.close_host()
        if fwd.protocol == "unix" and fwd.socket_inode is not None:
            try:
                st = os.lstat(fwd.local)
                if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == fwd.socket_inode:
                    os.unlink(fwd.local)
            except FileNotFoundError:
                pass

    async def close(self) -> None:
        for fwd in list(self.table.values()):
            await self._stop(fwd)
        self.table.clear()
