"""TCP NAT: each guest connection is spliced to a real host socket.

A guest SYN arrives as a `TcpDial` event. The host connection is dialled first, each dial
its own task with `connect_timeout`: success completes the guest's handshake
(`Network.tcp_accept`), ECONNREFUSED answers the SYN with RST, a timeout or an unreachable
network answers with ICMP host/net unreachable so the guest's connect() fails at once.
Dials never wait on each other (gvisor-tap-vsock #676: ten black-holed dials blocked all
outbound TCP); their number is bounded in `Network` by evicting the oldest.

Data moves through `HostSide`, an asyncio protocol per connection:
- host → guest: `data_received` offers bytes to `conn.send`; what the connection's send
  buffer cannot take is kept and the host transport paused, until `SendSpaceAvailable`.
- guest → host: `DataReceived` reads the connection into the transport; when the transport
  is over its high-water mark we stop reading, so the window we advertise shrinks and the
  guest slows down, until `resume_writing`.
- A host EOF becomes a FIN after all data (`conn.close`); a guest FIN becomes
  `write_eof` (shutdown(SHUT_WR)); a reset on either side resets the other (a host RST is
  seen as ECONNRESET; a guest RST closes the host socket with SO_LINGER 0, which sends RST).
- `Closed` frees everything; nothing outlives its connection.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
from collections.abc import Callable

import structlog

from hostd.stack import icmp, tcp
from hostd.stack.network import Network, TcpConnEvent, TcpDial

log = structlog.get_logger("hostd.nat.tcp")

_LINGER_RESET = struct.pack("ii", 1, 0)
HOST_SOCKET_BUFFER = 4 << 20


class HostSide(asyncio.Protocol):
    """The host socket of one spliced connection."""

    # Per-forward counters (port forwards share this class), or None for outbound NAT.
    counters: dict[str, int] | None = None

    def __init__(self, nat: TcpNat, conn: tcp.TcpConnection) -> None:
        self.nat = nat
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.pending = bytearray()  # host bytes the connection could not take yet
        self.host_eof = False
        self.guest_eof = False
        self.write_paused = False
        self.closed = False

    # asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if self.pending:
            self.pending += data
        else:
            try:
                n = conn.send(data)
            except tcp.TcpStateError:
                return
            if n < len(data):
                self.pending += memoryview(data)[n:]
        if self.pending and self.transport is not None:
            self.transport.pause_reading()
        self.nat.stats["bytes_to_guest"] += len(data)
        if self.counters is not None:
            self.counters["bytes_to_guest"] += len(data)
        self.nat.touch(conn)

    def eof_received(self) -> bool:
        self.host_eof = True
        if not self.pending:
            self.conn.close()
            self.nat.touch(self.conn)
        # Keep our write side open while the guest may still send (half-close); once the
        # guest has finished too, let asyncio close the socket.
        return not self.guest_eof

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        conn = self.conn
        if isinstance(exc, ConnectionResetError) or (
            isinstance(exc, OSError) and exc.errno == errno.ECONNRESET
        ):
            self.nat.stats["host_resets"] += 1
            self.pending.clear()
            conn.abort()
        else:
            self.host_eof = True
            if not self.pending:  # held bytes still go to the guest, then the FIN
                conn.close()
        self.nat.touch(conn)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.pump_to_host()
        self.nat.touch(self.conn)

    # connection events -----------------------------------------------------------------

    def pump_to_host(self) -> None:
        """Guest bytes → host socket, as far as the transport will take them."""
        t = self.transport
        conn = self.conn
        if t is None or self.closed:
            conn.read()  # nowhere to deliver: keep the window open so the guest can finish
            return
        while not self.write_paused and conn.readable():
            data = conn.read(1 << 20)
            t.write(data)
            self.nat.stats["bytes_to_host"] += len(data)
            if self.counters is not None:
                self.counters["bytes_from_guest"] += len(data)
        if self.guest_eof and not conn.readable() and not t.is_closing():
            if self.host_eof and not self.pending:
                t.close()  # both directions are done: free the socket now, not after TIME_WAIT
            elif t.can_write_eof():
                t.write_eof()

    def pump_to_guest(self) -> None:
        """Bytes held back → the connection's send buffer, then resume the host socket."""
        conn = self.conn
        if self.pending:
            try:
                n = conn.send(self.pending)
            except tcp.TcpStateError:
                self.pending.clear()
                return
            del self.pending[:n]
        if not self.pending:
            if self.host_eof:
                conn.close()
                if self.guest_eof:
                    self.close_host()
            elif self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def reset_host(self) -> None:
        """The guest reset: reset the host peer too (SO_LINGER 0 → RST on close)."""
        t = self.transport
        if t is None or self.closed:
            return
        sock = t.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        t.abort()

    def close_host(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def finished(self) -> None:
        """The connection is gone (its `Closed` event): subclasses release what they hold."""


class TcpNat:
    def __init__(
        self,
        network: Network,
        flush: Callable[[], None],
        *,
        connect_timeout: float,
        dns_handler: Callable[[tcp.TcpConnection], object] | None = None,
        on_error: Callable[..., None] | None = None,
    ) -> None:
        self.network = network
        self.flush = flush
        self.connect_timeout = connect_timeout
        self.dns_handler = dns_handler
        self.on_error = on_error
        self.loop = asyncio.get_running_loop()
        self.dials: dict[tcp.TcpConnection, asyncio.Task[None]] = {}
        self.hosts: dict[tcp.TcpConnection, HostSide] = {}
        self.stats = {
            "dials": 0,
            "opened": 0,
            "refused": 0,
            "timed_out": 0,
            "unreachable": 0,
            "host_resets": 0,
            "guest_resets": 0,
            "closed": 0,
            "bytes_to_guest": 0,
            "bytes_to_host": 0,
        }

    @property
    def active(self) -> int:
        return len(self.hosts)

    def touch(self, conn: tcp.TcpConnection) -> None:
        """Mark `conn` for output and flush now: a reply should not wait a loop iteration
        (request-response latency); inside a flush this only marks it."""
        self.network.tcp_touch(conn)
        self.flush()

    # events from the network -------------------------------------------------------------

    def dial(self, ev: TcpDial) -> None:
        if ev.service == "dns":
            self.network.tcp_accept(ev.conn, self.loop.time())
            if self.dns_handler is not None:
                ev.conn.app = self.dns_handler(ev.conn)  # type: ignore[attr-defined]
            return
        self.stats["dials"] += 1
        task = self.loop.create_task(self._dial(ev))
        self.dials[ev.conn] = task
        task.add_done_callback(lambda _t, c=ev.conn: self.dials.pop(c, None))

    def _report(self, ev: TcpDial, reason: str) -> None:
        if self.on_error is not None:
            guest_ip, guest_port, dst_ip, dst_port = ev.conn.key  # type: ignore[attr-defined]
            self.on_error(
                protocol="tcp",
                source=f"{ipaddress.IPv4Address(guest_ip)}:{guest_port}",
                destination=f"{ipaddress.IPv4Address(dst_ip)}:{dst_port}",
                reason=reason,
            )

    async def _dial(self, ev: TcpDial) -> None:
        conn = ev.conn
        family = socket.AF_INET6 if ":" in ev.target_ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, HOST_SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, HOST_SOCKET_BUFFER)
            async with asyncio.timeout(self.connect_timeout):
                await self.loop.sock_connect(sock, (ev.target_ip, ev.target_port))
        except ConnectionRefusedError:
            sock.close()
            self.stats["refused"] += 1
            self._report(ev, "refused")
            self.network.tcp_refuse(conn, self.loop.time())
            self.flush()
            return
        except TimeoutError:
            sock.close()
            self.stats["timed_out"] += 1
            self._report(ev, "timeout")
            self.network.tcp_refuse(conn, self.loop.time(), unreachable=icmp.HOST_UNREACHABLE)
            self.flush()
            return
        except OSError as e:
            sock.close()
            self.stats["unreachable"] += 1
            self._report(ev, "unreachable")
            code = icmp.NET_UNREACHABLE if e.errno == errno.ENETUNREACH else icmp.HOST_UNREACHABLE
            self.network.tcp_refuse(conn, self.loop.time(), unreachable=code)
            self.flush()
            return
        except asyncio.CancelledError:
            sock.close()
            raise
        if conn.state is not tcp.TcpState.LISTEN:  # evicted or reset while dialling
            sock.close()
            return
        host = HostSide(self, conn)
        try:
            await self.loop.connect_accepted_socket(lambda: host, sock)
        except OSError:
            sock.close()
            self.network.tcp_refuse(conn, self.loop.time())
            self.flush()
            return
        conn.app = host  # type: ignore[attr-defined]
        self.hosts[conn] = host
        self.stats["opened"] += 1
        self.network.tcp_accept(conn, self.loop.time())
        self.flush()

    def connection_event(self, ev: TcpConnEvent) -> None:
        conn, event = ev.conn, ev.event
        app = getattr(conn, "app", None)
        if app is not None and not isinstance(app, HostSide):
            app.on_event(event)  # a local service (DNS over TCP) or a port forward
            return
        host = app
        if isinstance(event, tcp.DataReceived):
            if host is not None:
                host.pump_to_host()
        elif isinstance(event, tcp.SendSpaceAvailable):
            if host is not None:
                host.pump_to_guest()
        elif isinstance(event, tcp.PeerClosed):
            if host is not None:
                host.guest_eof = True
                host.pump_to_host()
        elif isinstance(event, tcp.ConnectionReset | tcp.ConnectionFailed):
            task = self.dials.pop(conn, None)
            if task is not None:
                task.cancel()
            if host is not None:
                if getattr(event, "reason", "") == "reset":
                    self.stats["guest_resets"] += 1
                host.reset_host()
        elif isinstance(event, tcp.Closed):
            self.stats["closed"] += 1
            task = self.dials.pop(conn, None)
            if task is not None:
                task.cancel()
            if host is not None:
                self.hosts.pop(conn, None)
                if conn.readable():
                    host.pump_to_host()
                host.close_host()
                host.finished()
            conn.app = None  # type: ignore[attr-defined]
        self.network.tcp_touch(conn)

    def close(self) -> None:
        for task in list(self.dials.values()):
            task.cancel()
        for host in list(self.hosts.values()):
            host.close_host()
        self.hosts.clear()
