"""DNS at the edge: the asyncio forwarder to upstream resolvers and DNS over TCP on port 53.

The sans-IO half (zones, :class:`~hostd.services.dns.DnsResolver`) decides what a query
gets; this module does the I/O for what it cannot answer itself.

Theory of operation
-------------------
* :class:`DnsForwarder`: ``forward(query)`` relays the query bytes *unchanged* to the
  upstream resolvers and returns the upstream's answer *unchanged* (byte-identical; the
  guest sees the same id, flags, EDNS options, ...). Per query it opens one ephemeral,
  randomly-ported UDP socket per address family (source port randomisation is our spoofing
  defence, together with id and question checks) and always closes it. It sends to one
  upstream, waits ``attempt_timeout``, then sends to the next one (round robin, starting
  from the upstream that answered last), while still accepting a late answer from any
  upstream already asked. Replies are accepted only when they come from an upstream we
  asked, have QR set, the query's id and (if present) the query's question; anything else
  is ignored. A reply with TC set is retried over TCP (2-byte length prefix) against the
  same upstream, falling back to the truncated reply if TCP fails. Queries the guest sent
  over TCP are forwarded over TCP directly. When nothing usable arrives within ``timeout``
  (default 4 s) the forwarder returns a SERVFAIL built from the query, so a guest always
  gets an answer in well under 5 s. At most ``max_inflight`` queries hold sockets at once
  (the rest wait their turn): the forwarder lives in the descriptor reserve that guest
  connections cannot take (:mod:`hostd.nat.budget`), so it must stay inside it; a socket
  that cannot be opened counts as a failed attempt, never an exception.

* :class:`DnsTcpSession` (RFC 7766): a guest TCP connection to the gateway's port 53 is
  served here instead of being spliced to a host socket. The TCP state machine is the
  stack's (:mod:`hostd.stack.tcp`); this side reads 2-byte length-prefixed messages from
  the connection, answers them with the same resolver as UDP (forwarded over TCP when they
  are not ours), in order, and ends the session with the guest's FIN after the last answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from netferry.hostd.services.dns import (
    DnsResolver,
    ForwardQuery,
    _question_bytes,
    servfail_response,
)
from netferry.hostd.stack import tcp

__all__ = ["DnsForwarder", "DnsTcpSession", "ForwarderStats"]

_FLAG_QR = 0x8000
_FLAG_TC = 0x0200
_LEN = struct.Struct("!H")
MAX_PENDING_QUERIES = 64  # per TCP session: a client that never reads its answers


@dataclass
class ForwarderStats:
    queries: int = 0
    answers: int = 0
    servfail: int = 0  # SERVFAILs we synthesised (no usable upstream answer in time)
    udp_attempts: int = 0
    tcp_attempts: int = 0
    tc_retries: int = 0
    ignored_replies: int = 0  # wrong id / wrong source / not a response / wrong question
    send_errors: int = 0


def _addr_key(host: str, port: int) -> tuple[str, int]:
    return str(ipaddress.ip_address(host.split("%", 1)[0])), port


def _valid_reply(reply: bytes, qid: int, question: bytes | None) -> bool:
    if len(reply) < 12:
        return False
    rid, rflags, qdcount = struct.unpack_from("!HHH", reply, 0)
    if rid != qid or not rflags & _FLAG_QR:
        return False
    if question is not None and qdcount:
        rq = _question_bytes(reply)
        if rq is not None and rq != question:
            return False
    return True


class _UdpExchangeProtocol(asyncio.DatagramProtocol):
    def __init__(self, exchange: _UdpExchange) -> None:
        self.exchange = exchange

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[override]
        self.exchange.received(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors: just wait for the next attempt


class _UdpExchange:
    """One query's ephemeral UDP sockets (one per address family) and its result future."""

    def __init__(self, forwarder: DnsForwarder, query: bytes) -> None:
        self.forwarder = forwarder
        self.query = query
        self.qid = struct.unpack_from("!H", query, 0)[0]
        self.question = _question_bytes(query)
        self.loop = asyncio.get_running_loop()
        self.result: asyncio.Future[tuple[bytes, int] | None] = self.loop.create_future()
        self.transports: dict[int, asyncio.DatagramTransport] = {}
        self.asked: dict[tuple[str, int], int] = {}  # upstream key -> upstream index

    async def send(self, index: int) -> None:
        host, port = self.forwarder.upstreams[index]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        transport = self.transports.get(family)
        if transport is None:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
                transport, _ = await self.loop.create_datagram_endpoint(
                    lambda: _UdpExchangeProtocol(self), sock=sock
                )
            except BaseException:
                sock.close()
                raise
            self.transports[family] = transport
        self.asked[_addr_key(host, port)] = index
        transport.sendto(self.query, (host, port))

    def received(self, data: bytes, addr: tuple) -> None:
        try:
            key = _addr_key(addr[0], addr[1])
        except ValueError:
            key = ("", 0)
        index = self.asked.get(key)
        if index is None or self.result.done() or not _valid_reply(data, self.qid, self.question):
            self.forwarder.stats.ignored_replies += 1
            return
        self.result.set_result((data, index))

    def abort(self) -> None:
        if not self.result.done():
            self.result.set_result(None)

    def close(self) -> None:
        for transport in self.transports.values():
            transport.close()
        self.transports.clear()


class DnsForwarder:
    """Raw asyncio forwarder to upstream resolvers; see the module docstring."""

    def __init__(
        self,
        upstreams: list[tuple[str, int]],
        *,
        timeout: float = 4.0,
        attempt_timeout: float = 1.0,
        tcp_attempt_timeout: float = 2.0,
        max_inflight: int = 512,
    ) -> None:
        self.upstreams: list[tuple[str, int]] = []
        for host, port in upstreams:
            try:
                _addr_key(str(host), int(port))
            except ValueError:
                raise ValueError(f"upstreams: {host!r} is not an IP address") from None
            if not 0 < int(port) < 65536:
                raise ValueError(f"upstreams: port {port!r} is out of range 1..65535")
            self.upstreams.append((str(host), int(port)))
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.tcp_attempt_timeout = tcp_attempt_timeout
        self.stats = ForwarderStats()
        self._preferred = 0
        self._closed = False
        self._inflight = asyncio.Semaphore(max_inflight)
        self._exchanges: set[_UdpExchange] = set()

    async def forward(self, query: bytes, *, tcp: bool = False) -> bytes:
        """Forward *query* (raw message, no TCP length prefix) and return the upstream's
        answer unchanged, or a SERVFAIL built from the query when none arrives within
        ``timeout``. Returns b"" only for a query shorter than a DNS header."""
        query = bytes(query)
        if len(query) < 12:
            return b""
        self.stats.queries += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        answer: bytes | None = None
        if self.upstreams and not self._closed and len(query) <= 0xFFFF:
            try:
                async with asyncio.timeout(self.timeout):
                    async with self._inflight:
                        if tcp:
                            answer = await self._forward_tcp(query, deadline)
                        else:
                            answer = await self._forward_udp(query, deadline)
            except TimeoutError:
                answer = None
        if answer is None:
            self.stats.servfail += 1
            return servfail_response(query)
        self.stats.answers += 1
        return answer

    async def close(self) -> None:
        """Abort in-flight queries (they return SERVFAIL) and refuse new ones."""
        self._closed = True
        for exchange in list(self._exchanges):
            exchange.abort()
            exchange.close()

    async def __aenter__(self) -> DnsForwarder:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- UDP ----------------------------------------------------------------------------

    async def _forward_udp(self, query: bytes, deadline: float) -> bytes | None:
        loop = asyncio.get_running_loop()
        exchange = _UdpExchange(self, query)
        self._exchanges.add(exchange)
        try:
            count = len(self.upstreams)
            start = self._preferred % count
            attempt = 0
            failures_in_row = 0
            result: tuple[bytes, int] | None = None
            while not self._closed:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                index = (start + attempt) % count
                attempt += 1
                self.stats.udp_attempts += 1
                try:
                    await exchange.send(index)
                    failures_in_row = 0
                except OSError:
                    self.stats.send_errors += 1
                    failures_in_row += 1
                    if failures_in_row < count:
                        continue  # try the next upstream at once
                    failures_in_row = 0
                await asyncio.wait({exchange.result}, timeout=min(self.attempt_timeout, remaining))
                if exchange.result.done():
                    result = exchange.result.result()
                    break
        finally:
            exchange.abort()
            exchange.close()
            self._exchanges.discard(exchange)
        if result is None:
            return None
        reply, index = result
        self._preferred = index
        if struct.unpack_from("!H", reply, 2)[0] & _FLAG_TC:
            self.stats.tc_retries += 1
            remaining = deadline - loop.time()
            if remaining > 0:
                full = await self._tcp_exchange(query, self.upstreams[index], remaining)
                if full is not None:
                    return full
        return reply

    # -- TCP ----------------------------------------------------------------------------

    async def _forward_tcp(self, query: bytes, deadline: float) -> bytes | None:
        loop = asyncio.get_running_loop()
        count = len(self.upstreams)
        start = self._preferred % count
        attempt = 0
        while not self._closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            index = (start + attempt) % count
            attempt += 1
            budget = min(self.tcp_attempt_timeout, remaining)
            answer = await self._tcp_exchange(query, self.upstreams[index], budget)
            if answer is not None:
                self._preferred = index
                return answer
            if attempt % count == 0:  # a whole round failed: don't spin on refusals
                await asyncio.sleep(min(0.25, max(0.0, deadline - loop.time())))
        return None

    async def _tcp_exchange(
        self, query: bytes, upstream: tuple[str, int], budget: float
    ) -> bytes | None:
        self.stats.tcp_attempts += 1
        qid = struct.unpack_from("!H", query, 0)[0]
        question = _question_bytes(query)
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(budget):
                reader, writer = await asyncio.open_connection(upstream[0], upstream[1])
                writer.write(struct.pack("!H", len(query)) + query)
                await writer.drain()
                while True:
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    reply = await reader.readexactly(length)
                    if _valid_reply(reply, qid, question):
                        return reply
                    self.stats.ignored_replies += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            return None
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 0.2)


# --------------------------------------------------------------------------- DNS over TCP


class DnsTcpSession:
    def __init__(
        self,
        conn: tcp.TcpConnection,
        resolver: DnsResolver,
        forwarder: DnsForwarder | None,
        touch: Callable[[tcp.TcpConnection], None],
    ) -> None:
        self.conn = conn
        self.resolver = resolver
        self.forwarder = forwarder
        self.touch = touch
        self.buf = bytearray()
        self.answers: asyncio.Queue[asyncio.Future[bytes] | None] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._write_answers())
        self.peer_closed = False

    def on_event(self, event: tcp.TcpEvent) -> None:
        if isinstance(event, tcp.DataReceived):
            self.buf += self.conn.read()
            self._parse()
        elif isinstance(event, tcp.PeerClosed):
            self.buf += self.conn.read()
            self._parse()
            self.answers.put_nowait(None)  # close after the answers queued so far
        elif isinstance(event, tcp.ConnectionReset | tcp.Closed):
            self.task.cancel()

    def _parse(self) -> None:
        buf = self.buf
        while len(buf) >= 2:
            (n,) = _LEN.unpack_from(buf)
            if len(buf) < 2 + n:
                break
            query = bytes(buf[2 : 2 + n])
            del buf[: 2 + n]
            if self.answers.qsize() >= MAX_PENDING_QUERIES:
                self.conn.abort()  # a client that never reads its answers
                self.touch(self.conn)
                return
            self.answers.put_nowait(asyncio.ensure_future(self._answer(query)))

    async def _answer(self, query: bytes) -> bytes:
        result = self.resolver.handle_query(query, tcp=True)
        if isinstance(result, ForwardQuery):
            if self.forwarder is None:
                return self.resolver.servfail(query)
            return await self.forwarder.forward(result.data, tcp=True)
        return result

    async def _write_answers(self) -> None:
        while True:
            item = await self.answers.get()
            if item is None:
                break
            answer = await item
            if not answer:
                continue
            data = _LEN.pack(len(answer)) + answer
            # DNS answers are small; the send buffer (MiBs) takes them whole.
            try:
                sent = self.conn.send(data)
            except tcp.TcpStateError:
                return  # the guest went away
            if sent < len(data):
                self.conn.abort()
                self.touch(self.conn)
                return
            self.touch(self.conn)
        if self.conn.state is not tcp.TcpState.CLOSED:
            self.conn.close()
            self.touch(self.conn)
