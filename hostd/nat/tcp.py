"""TCP NAT: each guest connection is spliced to a real host socket.

A guest SYN arrives as a `TcpDial` event. The host connection is dialled first, right there
in the flush: a non-blocking connect() of the target's family (IPv4 or IPv6; a connection's
addresses are 4 or 16 bytes) that to loopback usually completes inside the call, so the
SYN-ACK leaves in the same batch. Otherwise the socket waits for writability with
`connect_timeout`: success completes the guest's handshake (`Network.tcp_accept`),
ECONNREFUSED answers the SYN with RST, a timeout or an unreachable network (a host without an
IPv6 route: ENETUNREACH, EHOSTUNREACH, EADDRNOTAVAIL at once) answers with ICMP host/net
unreachable (ICMPv6 for a v6 guest) so the guest's connect() fails at once. Dials never
wait on each other (gvisor-tap-vsock #676: ten black-holed dials blocked all outbound TCP);
their number is bounded in the transport layer (`hostd/stack/transport.py`) by evicting the oldest.

Data moves through `HostSide`, which drives the raw socket with loop readers and writers
(no asyncio transport or task per connection: a transport costs more than the dial itself):
- host → guest: a read takes at most what the connection's send buffer has room for, so
  nothing is held here; with no room the reader pauses until `SendSpaceAvailable`.
- guest → host: `DataReceived` reads the connection into the socket; what the socket does
  not take waits for writability, and meanwhile the connection is not read, so the window
  we advertise shrinks and the guest slows down.
- A host EOF becomes a FIN after all data (`conn.close`); a guest FIN becomes
  shutdown(SHUT_WR) after all data; a reset on either side resets the other (a host RST is
  seen as ECONNRESET; a guest RST closes the host socket with SO_LINGER 0, which sends RST).
- `Closed` frees everything; nothing outlives its connection.

Every host socket is drawn from the descriptor budget (`hostd/nat/budget.py`, the guest's
share of it): a dial over the budget is refused at once with RST and counted
(`budget_refused`), and a socket() that fails anyway answers ICMP host unreachable; neither
raises into the flush.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
from collections.abc import Callable

import structlog

from netferry.hostd.nat import host_errors
from netferry.hostd.nat.budget import BudgetExceeded, DescriptorBudget
from netferry.hostd.stack import icmp, tcp
from netferry.hostd.stack.network import Network, TcpConnEvent, TcpDial

log = structlog.get_logger("hostd.nat.tcp")

_LINGER_RESET = struct.pack("ii", 1, 0)
HOST_SOCKET_BUFFER = 4 << 20
RECV_MAX = 256 << 10  # per read: large enough for throughput, below malloc's mmap threshold
READ_MAX = 1 << 20  # guest bytes taken from the connection per socket send
_RESET_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT)
UNREACHABLE_CODES = (icmp.NET_UNREACHABLE, icmp.HOST_UNREACHABLE, icmp.ADMIN_PROHIBITED)


def endpoint_text(ip: bytes, port: int) -> str:
    """ "192.168.127.2:80" or "[fd00::2]:80" for a 4- or 16-byte address."""
    addr = ipaddress.ip_address(ip)
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def host_socket(budget: DescriptorBudget, family: int, guest: bytes) -> socket.socket:
    """A dial's socket, counted against `guest`'s share of the descriptor budget."""
    sock = budget.open(family, socket.SOCK_STREAM, guest=guest, what="tcp connection")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, HOST_SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, HOST_SOCKET_BUFFER)
    return sock


class HostSide:
    """The host socket of one spliced connection."""

    # Per-forward counters (port forwards share this class), or None for outbound NAT.
    counters: dict[str, int] | None = None

    def __init__(self, nat: TcpNat, conn: tcp.TcpConnection | None) -> None:
        self.nat = nat
        self.loop = nat.loop
        self.conn = conn  # type: ignore[assignment]
        self.sock: socket.socket | None = None
        self.fd = -1
        self.unsent: memoryview | None = None  # guest bytes the socket has not taken yet
        self.host_eof = False  # the host peer finished sending (or the socket is gone)
        self.guest_eof = False  # the guest finished sending
        self.shut_wr = False
        self.reading = False
        self.writing = False
        self.closing = False  # close once `unsent` is written
        self.closed = False

    def attach(self, sock: socket.socket) -> None:
        """Start splicing the connected socket `sock`."""
        self.sock = sock
        self.fd = sock.fileno()
        self._resume_reading()

    # host socket → guest -----------------------------------------------------------------

    def _resume_reading(self) -> None:
        if not self.reading and not self.host_eof and not self.closed and not self.closing:
            self.loop.add_reader(self.fd, self._readable)
            self.reading = True

    def _pause_reading(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False

    def _readable(self) -> None:
        conn = self.conn
        space = conn.send_space()
        if space <= 0:
            # Full: wait for the guest's ACKs (SendSpaceAvailable), or the connection is
            # closing and `Closed` will clean up.
            self._pause_reading()
            conn.notify_send_space()
            return
        try:
            data = self.sock.recv(RECV_MAX if space > RECV_MAX else space)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._host_error(e)
            return
        if not data:
            self.host_eof = True
            self._pause_reading()
            conn.close()  # FIN after everything queued
            self._maybe_finish()
            self.nat.touch(conn)
            return
        conn.send(data)
        n = len(data)
        self.nat.stats["bytes_to_guest"] += n
        if self.counters is not None:
            self.counters["bytes_to_guest"] += n
        self.nat.touch(conn)

    # guest → host socket -----------------------------------------------------------------

    def pump_to_host(self) -> None:
        """Guest bytes → host socket, as far as the socket takes them."""
        conn = self.conn
        if self.closed or self.sock is None:
            conn.read()  # nowhere to deliver: keep the window open so the guest can finish
            return
        if self.unsent is not None:
            return  # `_writable` continues
        send = self.sock.send
        while conn.readable():
            data = conn.read(READ_MAX)
            try:
                n = send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                self._host_error(e)
                return
            self._count_to_host(n)
            if n < len(data):
                self.unsent = memoryview(data)[n:]
                self.loop.add_writer(self.fd, self._writable)
                self.writing = True
                return
        if self.guest_eof and not self.shut_wr:
            self.shut_wr = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._maybe_finish()

    def _count_to_host(self, n: int) -> None:
        self.nat.stats["bytes_to_host"] += n
        if self.counters is not None:
            self.counters["bytes_from_guest"] += n

    def _writable(self) -> None:
        data = self.unsent
        if data is None or self.sock is None:
            return
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._host_error(e)
            return
        self._count_to_host(n)
        if n < len(data):
            self.unsent = data[n:]
            return
        self.unsent = None
        self.loop.remove_writer(self.fd)
        self.writing = False
        if self.closing:
            self._close_socket()
            return
        self.pump_to_host()
        self.nat.touch(self.conn)  # what pump read opened the window

    # the end ----------------------------------------------------------------------------

    def _host_error(self, e: OSError) -> None:
        """A read or write failed: a reset (or a dead peer) resets the guest's side too."""
        if e.errno in _RESET_ERRNOS:
            self.nat.stats["host_resets"] += 1
            self.conn.abort()
        else:
            self.host_eof = True
            self.conn.close()
        self.unsent = None
        self._close_socket()
        self.nat.touch(self.conn)

    def _maybe_finish(self) -> None:
        """Both directions are done: free the socket now, not after the guest's TIME_WAIT."""
        if self.host_eof and self.shut_wr and self.unsent is None:
            self._close_socket()

    def _close_socket(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.host_eof = True
        if self.sock is not None:
            self._pause_reading()
            if self.writing:
                self.loop.remove_writer(self.fd)
                self.writing = False
            self.sock.close()

    def pump_to_guest(self) -> None:
        """The connection has room again (SendSpaceAvailable): read the socket again."""
        if not self.closed and self.sock is not None:
            self._resume_reading()

    def reset_host(self) -> None:
        """The guest reset: reset the host peer too (SO_LINGER 0 → RST on close)."""
        if self.closed or self.sock is None:
            return
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
        self.unsent = None
        self._close_socket()

    def close_host(self) -> None:
        """Close after what the guest sent has been written (the FIN follows it)."""
        if self.closed:
            return
        if self.unsent is not None:
            self.closing = True
            self._pause_reading()
            return
        self._close_socket()

    def finished(self) -> None:
        """The connection is gone (its `Closed` event): subclasses release what they hold."""

    def on_event(self, event: tcp.TcpEvent) -> None:
        """An event of the spliced connection (`tcp.TcpApplication`)."""
        nat, conn = self.nat, self.conn
        if isinstance(event, tcp.DataReceived):
            self.pump_to_host()
        elif isinstance(event, tcp.SendSpaceAvailable):
            self.pump_to_guest()
        elif isinstance(event, tcp.PeerClosed):
            self.guest_eof = True
            self.pump_to_host()
        elif isinstance(event, tcp.ConnectionReset | tcp.ConnectionFailed):
            nat._cancel_dial(conn)
            if getattr(event, "reason", "") == "reset":
                nat.stats["guest_resets"] += 1
            self.reset_host()
        elif isinstance(event, tcp.Closed):
            nat.stats["closed"] += 1
            nat._cancel_dial(conn)
            nat.hosts.pop(conn, None)
            if conn.readable():
                self.pump_to_host()
            self.close_host()
            self.finished()
        nat.network.tcp_touch(conn)


class TcpNat:
    def __init__(
        self,
        network: Network,
        flush: Callable[[], None],
        *,
        connect_timeout: float,
        services: dict[str, Callable[[tcp.TcpConnection], tcp.TcpApplication]] | None = None,
        on_error: Callable[..., None] | None = None,
        budget: DescriptorBudget | None = None,
    ) -> None:
        self.network = network
        # Host sockets of dials, NAT connections and forwarded clients are counted here.
        self.budget = budget if budget is not None else DescriptorBudget(1 << 20)
        self.flush = flush
        self.connect_timeout = connect_timeout
        # The gateway's own TCP services (DNS on 53, the forwarder API on 80): name → a
        # factory of the application that serves one connection.
        self.services = services if services is not None else {}
        self.on_error = on_error
        self.loop = asyncio.get_running_loop()
        # Dials still in progress: their socket and timeout.
        self.dials: dict[tcp.TcpConnection, tuple[socket.socket, asyncio.TimerHandle]] = {}
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
            "socket_errors": 0,
            "budget_refused": 0,
        }
        self._socket_error_logged = float("-inf")

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
        conn = ev.conn
        if ev.service is not None:
            factory = self.services.get(ev.service)
            if factory is None:
                self.network.tcp_refuse(conn, self.loop.time())
                return
            self.network.tcp_accept(conn, self.loop.time())
            conn.app = factory(conn)
            return
        self.stats["dials"] += 1
        family = socket.AF_INET6 if ":" in ev.target_ip else socket.AF_INET
        try:
            sock = host_socket(self.budget, family, conn.key[0])  # type: ignore[attr-defined]
        except BudgetExceeded:
            # Out of descriptors for guests: refuse at once (RST), as a full host would.
            self.stats["budget_refused"] += 1
            self._report(ev, "budget")
            self.network.tcp_refuse(conn, self.loop.time())
            return
        except OSError as e:  # EMFILE and friends: this dial fails, the switch carries on
            self.stats["socket_errors"] += 1
            now = self.loop.time()
            if now >= self._socket_error_logged + 5.0:  # a warning, not one per SYN
                self._socket_error_logged = now
                log.warning(
                    "nat.tcp.socket_failed", error=str(e), total=self.stats["socket_errors"]
                )
            self._failed(ev, None, e)
            return
        err = sock.connect_ex((ev.target_ip, ev.target_port))
        if err in (0, errno.EISCONN):
            self._connected(ev, sock)
            return
        if err != errno.EINPROGRESS:
            self._failed(ev, sock, OSError(err, errno.errorcode.get(err, str(err))))
            return
        # To loopback the handshake has usually finished inside connect(): a peer name
        # means connected; a pending error means it failed; neither means wait.
        try:
            sock.getpeername()
        except OSError:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._failed(ev, sock, OSError(err, errno.errorcode.get(err, str(err))))
                return
        else:
            self._connected(ev, sock)
            return
        fd = sock.fileno()
        timer = self.loop.call_later(self.connect_timeout, self._dial_timeout, ev, sock)
        self.dials[conn] = (sock, timer)
        self.loop.add_writer(fd, self._dial_writable, ev, sock)

    def _dial_writable(self, ev: TcpDial, sock: socket.socket) -> None:
        self._dial_done(ev.conn)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._failed(ev, sock, OSError(err, errno.errorcode.get(err, str(err))))
        else:
            self._connected(ev, sock)
        self.flush()

    def _dial_timeout(self, ev: TcpDial, sock: socket.socket) -> None:
        self._dial_done(ev.conn)
        self._failed(ev, sock, TimeoutError())
        self.flush()

    def _dial_done(self, conn: tcp.TcpConnection) -> None:
        """Forget a pending dial: stop watching its socket and cancel its timer."""
        pending = self.dials.pop(conn, None)
        if pending is not None:
            sock, timer = pending
            timer.cancel()
            self.loop.remove_writer(sock.fileno())

    def _cancel_dial(self, conn: tcp.TcpConnection) -> None:
        pending = self.dials.get(conn)
        if pending is not None:
            self._dial_done(conn)
            pending[0].close()

    def _failed(self, ev: TcpDial, sock: socket.socket | None, e: OSError) -> None:
        if sock is not None:
            sock.close()
        now = self.loop.time()
        if isinstance(e, ConnectionRefusedError) or e.errno == errno.ECONNREFUSED:
            self.stats["refused"] += 1
            self._report(ev, "refused")
            self.network.tcp_refuse(ev.conn, now)
        elif isinstance(e, TimeoutError) or e.errno == errno.ETIMEDOUT:
            self.stats["timed_out"] += 1
            self._report(ev, "timeout")
            self.network.tcp_refuse(ev.conn, now, unreachable=icmp.HOST_UNREACHABLE)
        else:
            # No route (ENETUNREACH, EHOSTUNREACH; EADDRNOTAVAIL: no source address of the
            # family), a firewall's reject, ...: ICMP unreachable, so the guest's connect()
            # fails at once (happy eyeballs moves on to the other family without waiting).
            self.stats["unreachable"] += 1
            self._report(ev, "unreachable")
            mapped = host_errors.ERRNO_TO_ICMP.get(e.errno or 0)
            code = mapped[1] if mapped is not None else icmp.HOST_UNREACHABLE
            if code not in UNREACHABLE_CODES:
                code = icmp.HOST_UNREACHABLE
            self.network.tcp_refuse(ev.conn, now, unreachable=code)

    def _connected(self, ev: TcpDial, sock: socket.socket) -> None:
        conn = ev.conn
        if conn.state is not tcp.TcpState.LISTEN:  # evicted or reset while dialling
            sock.close()
            return
        host = HostSide(self, conn)
        host.attach(sock)
        conn.app = host
        self.hosts[conn] = host
        self.stats["opened"] += 1
        self.network.tcp_accept(conn, self.loop.time())

    def _report(self, ev: TcpDial, reason: str) -> None:
        if self.on_error is not None:
            guest_ip, guest_port, dst_ip, dst_port = ev.conn.key
            self.on_error(
                protocol="tcp",
                source=endpoint_text(guest_ip, guest_port),
                destination=endpoint_text(dst_ip, dst_port),
                reason=reason,
            )

    def connection_event(self, ev: TcpConnEvent) -> None:
        """Every connection event goes to the connection's application (a `HostSide`, a
        gateway service such as DNS over TCP, a port forward or a tunnel); before it has
        one (a dial in progress) only the dial is cleaned up."""
        conn, event = ev.conn, ev.event
        app = conn.app
        if app is not None:
            app.on_event(event)
            if isinstance(event, tcp.Closed):
                conn.app = None
            return
        if isinstance(event, tcp.ConnectionReset | tcp.ConnectionFailed | tcp.Closed):
            self._cancel_dial(conn)
        if isinstance(event, tcp.Closed):
            self.stats["closed"] += 1
        self.network.tcp_touch(conn)

    def close(self) -> None:
        for conn in list(self.dials):
            self._cancel_dial(conn)
        for host in list(self.hosts.values()):
            host._close_socket()
        self.hosts.clear()
