"""Who may drive hostd: the owner on unix sockets, a token holder on TCP.

- A unix API socket is created 0600 and, because file modes can be loosened or a directory
  shared, every connection's peer is also checked with SO_PEERCRED: only hostd's own uid
  (and root) get through.
- An API on TCP cannot tell users apart, so it needs a token (`--api-token-file`); gRPC
  clients send it as `authorization: Bearer TOKEN` metadata, HTTP clients as the
  `Authorization: Bearer TOKEN` header. Without it every call is refused (UNAUTHENTICATED /
  401); hostd refuses to start an API on TCP with no token at all.

grpc.aio tells a handler nothing about a unix peer's credentials (`context.peer()` is just
"unix:PATH", the auth context is empty on an insecure port), so for gRPC the public socket is
served by `UnixPeerGate`: it accepts, reads SO_PEERCRED, and splices the connection to the
real gRPC server on a socket in a private 0700 directory, or, for anyone else, to a second
server that answers every call PERMISSION_DENIED naming the uid (a clear gRPC status rather
than a dropped connection).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import socket
import struct

import grpc
import structlog

from netferry.hostd.links.stream import bind_unix_socket, remove_socket_file

log = structlog.get_logger("hostd.api.auth")

_UCRED = struct.Struct("3i")  # pid, uid, gid


def peer_uid(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(raw)[1]


def owner_may_connect(uid: int) -> bool:
    """hostd's own user, and root (who could read our memory anyway)."""
    return uid == os.geteuid() or uid == 0


def refusal(uid: int) -> str:
    return f"peer uid {uid} is not hostd's uid {os.geteuid()}: the API is only for its owner"


def owner_only_message() -> str:
    return f"this API is only for hostd's owner (uid {os.geteuid()}) and root"


def bearer_ok(value: str | bytes | None, token: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, given = value.strip().partition(" ")
    expected = token.encode()
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)


# ---- gRPC: token on TCP ----------------------------------------------------------------------


def _abort_handler(
    handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails the call with `code`."""

    async def unary(request, context):  # type: ignore[no-untyped-def]
        await context.abort(code, message)

    async def stream(request, context):  # type: ignore[no-untyped-def]
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler is None or (not handler.request_streaming and not handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(unary)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream)
    return grpc.stream_unary_rpc_method_handler(unary)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Every call on a TCP API must carry `authorization: Bearer TOKEN`."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        metadata = dict(handler_call_details.invocation_metadata or ())
        if bearer_ok(metadata.get("authorization"), self.token):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _abort_handler(
            handler,
            grpc.StatusCode.UNAUTHENTICATED,
            "this API needs a token: send 'authorization: Bearer TOKEN' "
            "(netferry --token-file FILE or NETFERRY_API_TOKEN)",
        )


class RefusingInterceptor(grpc.aio.ServerInterceptor):
    """The server a refused unix peer is spliced to: PERMISSION_DENIED for any method."""

    def __init__(self, message: str) -> None:
        self.message = message

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        return _abort_handler(None, grpc.StatusCode.PERMISSION_DENIED, self.message)


# ---- unix sockets: SO_PEERCRED in front of grpc ----------------------------------------------


class _Pipe(asyncio.Protocol):
    """One direction pair of a splice, with flow control both ways."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Pipe | None = None
        self.pending: list[bytes] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is None or other.transport is None:
            self.pending.append(data)
            return
        other.transport.write(data)

    def eof_received(self) -> bool:
        other = self.other
        if other is not None and other.transport is not None and other.transport.can_write_eof():
            other.transport.write_eof()
        else:
            self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def attach(self, other: _Pipe) -> None:
        self.other = other
        if other.transport is not None:
            for data in self.pending:
                other.transport.write(data)
            self.pending.clear()
            if self.eof and other.transport.can_write_eof():
                other.transport.write_eof()


class UnixPeerGate:
    """The public unix socket of a gRPC API: owners are spliced to `allowed`, others to
    `refused` (both private socket paths)."""

    def __init__(self, path: str, allowed: str, refused: str) -> None:
        self.path = path
        self.allowed = allowed
        self.refused = refused
        self.server: asyncio.base_events.Server | None = None
        self.refusals = 0
        self.pipes: set[_Pipe] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock = bind_unix_socket(self.path, socket.SOCK_STREAM)  # 0600
        sock.listen(128)
        self.server = await loop.create_unix_server(self._accepted, sock=sock)

    def _accepted(self) -> _Pipe:
        client = _Pipe()

        def made(transport: asyncio.BaseTransport) -> None:
            _Pipe.connection_made(client, transport)
            sock = transport.get_extra_info("socket")
            try:
                uid = peer_uid(sock)
            except OSError:
                uid = -1
            target = self.allowed
            if not owner_may_connect(uid):
                self.refusals += 1
                log.warning("api.peer_refused", uid=uid, socket=self.path)
                target = self.refused
            client.transport.pause_reading()  # type: ignore[union-attr]
            asyncio.get_running_loop().create_task(self._connect(client, target))

        def lost(exc: Exception | None) -> None:
            self.pipes.discard(client)
            _Pipe.connection_lost(client, exc)

        client.connection_made = made  # type: ignore[method-assign]
        client.connection_lost = lost  # type: ignore[method-assign]
        self.pipes.add(client)
        return client

    async def _connect(self, client: _Pipe, target: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_unix_connection(_Pipe, target)
        except OSError as e:
            log.warning("api.gate_failed", error=str(e))
            if client.transport is not None:
                client.transport.close()
            return
        if client.transport is None:
            if upstream.transport is not None:
                upstream.transport.close()
            return
        client.attach(upstream)
        upstream.attach(client)
        client.transport.resume_reading()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for pipe in list(self.pipes):
            if pipe.transport is not None:
                pipe.transport.close()
        remove_socket_file(self.path)
