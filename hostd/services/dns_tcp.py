"""DNS over TCP on the gateway's port 53 (RFC 7766): 2-byte length-prefixed messages.

A guest TCP connection to .1:53 is served here instead of being spliced to a host socket.
Queries are answered by the same `DnsResolver` as UDP, forwarded over TCP when they are not
ours, and answered in order. The session ends with the guest's FIN after the last answer.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

from hostd.services.dns import DnsForwarder, DnsResolver, ForwardQuery
from hostd.stack import tcp

_LEN = struct.Struct("!H")
MAX_PENDING_QUERIES = 64


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
