"""Stream links: unix, tcp, vsock, inherited fds and stdio, with a length prefix per frame.

Reads go through `StreamDeframer`, so one `data_received` can deliver dozens of frames in
one batch. A framing error (zero length, oversized) closes this link only, with the reason
logged and counted; the switch and other links carry on. Writes are one `writelines` per
batch: a socket link writes with `sendmsg` (header and frame pieces gathered, no joining
copy, at most IOV_MAX pieces a call) on its own dup of the socket, queueing what the socket
does not take (asyncio's transport joins every batch and memmoves its buffer on each partial
send, which a profile of host→guest showed as half of hostd's time). Listeners accept any
number of connections, each a new switch port.

Offload negotiation (`netferry.linkcaps`): a link without `?offload=vnet` answers a
capability OFFER that arrives as the peer's first frame (only netferry's vm-switch sends
one) with an ACCEPT; if virtio-net headers were agreed, the switch port turns to vnet right
after the ACCEPT is written, and the peer's frames up to its COMMIT (plain) are given an
empty virtio-net header here (`?offload=none` answers "plain"). Peers that never offer
(QEMU, passt, gvforwarder) see nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections import deque
from collections.abc import Callable

import structlog

from netferry import linkcaps
from netferry.framing import FramingError, StreamDeframer, get_framing
from netferry.hostd.links.base import Link, LinkSink
from netferry.streams import send_queued
from netferry.unixsock import clear_stale_socket
from netferry.uri import VMADDR_CID_ANY, LinkUri

log = structlog.get_logger("hostd.links")
VNET_NONE = bytes(10)  # a virtio-net header that asks for nothing

# gvforwarder (gvisor-tap-vsock's guest) opens its link with an HTTP request it never reads
# an answer to, then sends frames with a 2-byte little-endian length.
CONNECT_REQUEST_LINE = b"POST /connect HTTP/1.1\r\n"
CONNECT_FRAMING = "len16le"
CONNECT_MAX_HEADER = 8192


class GatherWriter:
    """Writes lists of buffers to a non-blocking stream socket with sendmsg; what the socket
    does not take waits in a queue and goes when it is writable. It uses its own dup of the
    socket's fd so the transport keeps the reader registration on the original."""

    def __init__(self, fd: int, on_error: Callable[[OSError], None]) -> None:
        self.sock = socket.socket(fileno=os.dup(fd))
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.queue: deque[bytes | memoryview] = deque()
        self.size = 0  # bytes queued
        self._waiting = False
        self._on_error = on_error

    def write(self, pieces: list[bytes]) -> None:
        self.queue.extend(pieces)
        self.size += sum(map(len, pieces))
        if not self._waiting:
            self._send()

    def _send(self) -> None:
        q = self.queue
        try:
            self.size -= send_queued(self.sock, q)
        except OSError as e:
            self.close()
            self._on_error(e)
            return
        if q and not self._waiting:
            self._waiting = True
            self.loop.add_writer(self.sock.fileno(), self._send)
        elif not q and self._waiting:
            self._waiting = False
            self.loop.remove_writer(self.sock.fileno())

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        if self._waiting:
            self._waiting = False
            self.loop.remove_writer(self.sock.fileno())
        self.queue.clear()
        self.size = 0
        self.sock.close()


READ_SIZE = 1 << 18


class StreamLink(Link, asyncio.BufferedProtocol):
    """A socket transport reads into one buffer per link (`get_buffer`), parsed in place;
    a pipe transport (stdio) calls `data_received` with a new bytes object per read."""

    kind = "stream"

    def __init__(self, sink: LinkSink, name: str, framing: str, max_frame: int) -> None:
        Link.__init__(self, sink, name)
        self.framing = get_framing(framing)
        self.deframer = StreamDeframer(self.framing, max_frame)
        self.transport: asyncio.WriteTransport | None = None
        self.writer: GatherWriter | None = None  # socket links: sendmsg instead of transport
        self._rbuf: memoryview | None = None  # socket links read into this
        # Accepted connections look at their first bytes for gvforwarder's `POST /connect`
        # (None: decided, frames only).
        self._preface: bytearray | None = None
        # True until the peer's first frame is seen: it may be a capability OFFER.
        self.negotiate = False
        self._plain_until_commit = False  # vnet agreed, the peer's COMMIT not yet seen
        self.offload = ""  # the ?offload= value; "vnet" once negotiated

    def expect_connect_preface(self) -> None:
        self._preface = bytearray()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:
            self.transport = transport  # type: ignore[assignment]
            sock = transport.get_extra_info("socket")
            if sock is not None:
                self.writer = GatherWriter(sock.fileno(), self._write_failed)
            self.sink.link_opened(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._rbuf is None:
            self._rbuf = memoryview(bytearray(READ_SIZE))
        return self._rbuf

    def buffer_updated(self, nbytes: int) -> None:
        assert self._rbuf is not None
        self.data_received(self._rbuf[:nbytes])  # frames and leftovers are copied out

    def data_received(self, data: bytes | memoryview) -> None:
        if self._preface is not None:
            rest = self._take_preface(data)
            if not rest:
                return
            data = rest
        try:
            frames = self.deframer.feed(data)
        except FramingError as e:
            log.warning("link.framing_error", link=self.name, reason=str(e))
            self.close(f"framing_error: {e}")
            return
        if frames:
            if self.negotiate:
                self.negotiate = False
                frames = self._negotiate(frames)
            if self._plain_until_commit:
                frames = self._until_commit(frames)
            if frames:
                self._delivered(frames)

    def _negotiate(self, frames: list[bytes]) -> list[bytes]:
        """Answer a capability OFFER that is the peer's first frame; other frames pass."""
        offer = linkcaps.decode(frames[0])
        if offer is None or offer.kind != linkcaps.OFFER:
            return frames
        own_max = min(self.deframer.max_frame, self.framing.max_length)
        own_flags = 0 if self.offload == "none" else linkcaps.F_VNET  # ?offload=none: plain
        accept = linkcaps.answer(offer, own_flags, own_max)
        mac = bytes(frames[0][6:12])
        reply = linkcaps.encode(accept.kind, mac, accept.flags, accept.max_frame)
        self._write(self.framing.encode_many([reply]))
        if accept.vnet:
            self.vnet = True
            self.offload = "vnet"
            self._plain_until_commit = True
            self.sink.link_vnet(self)  # every frame from here on gets a virtio-net header
        log.info("link.offload", link=self.name, offered=offer.describe(),
                 agreed=accept.describe())  # fmt: skip
        return frames[1:]

    def _until_commit(self, frames: list[bytes]) -> list[bytes]:
        """Before the peer's COMMIT its frames are plain: give them an empty vnet header."""
        out = []
        for i, frame in enumerate(frames):
            caps = linkcaps.decode(frame)
            if caps is not None and caps.kind == linkcaps.COMMIT:
                self._plain_until_commit = False
                return out + frames[i + 1 :]
            out.append(VNET_NONE + frame)
        return out

    def _take_preface(self, data: bytes | memoryview) -> bytes | None:
        """Bytes that are frames, once the first bytes are known not to be (or to have
        finished) a `POST /connect` request; None while undecided."""
        buf = self._preface
        assert buf is not None
        buf += data
        line = CONNECT_REQUEST_LINE
        if not buf.startswith(line[: len(buf)]):
            self._preface = None  # frames from the first byte (QEMU, vm-switch, passt)
            return bytes(buf)
        if len(buf) < len(line):
            return None
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > CONNECT_MAX_HEADER:
                log.warning("link.connect_header_too_long", link=self.name, size=len(buf))
                self.close("framing_error: POST /connect header over 8 KiB")
            return None
        self._preface = None
        self.framing = get_framing(CONNECT_FRAMING)
        self.deframer = StreamDeframer(self.framing, self.deframer.max_frame)
        log.info("link.connect_preface", link=self.name, framing=CONNECT_FRAMING)
        return bytes(buf[end + 4 :])

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.writer is not None:
            self.writer.close()
        if not self.closed:
            self.closed = True
            self.sink.link_closed(self, f"connection_lost: {exc}" if exc else None)

    def _write_failed(self, exc: OSError) -> None:
        self.close(f"write_error: {exc}")

    def _write(self, pieces: list[bytes]) -> None:
        t = self.transport
        if t is None or self.closed or t.is_closing():
            return
        if self.writer is not None:
            self.writer.write(pieces)
        else:
            t.writelines(pieces)

    # Link
    def send_frames(self, frames: list[bytes]) -> None:
        t = self.transport
        if t is None or self.closed or t.is_closing():
            return
        queued = self.writer.size if self.writer is not None else t.get_write_buffer_size()
        if queued > self.max_backlog:
            self.counters.dropped_out += len(frames)
            return
        c = self.counters
        c.frames_out += len(frames)
        c.bytes_out += sum(map(len, frames))
        self._write(self.framing.encode_many(frames))

    def _close_transport(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.transport is not None:
            self.transport.close()


LinkFactory = Callable[[str], Link]


class StreamListener:
    """Accepts stream connections on a unix/tcp/vsock address; each one is a new link."""

    def __init__(self, uri: LinkUri, sink: LinkSink) -> None:
        self.uri = uri
        self.sink = sink
        self.server: asyncio.base_events.Server | None = None
        self._created_path: str | None = None
        self._count = 0

    def _protocol(self) -> StreamLink:
        self._count += 1
        link = StreamLink(
            self.sink, f"{self.uri}#{self._count}", self.uri.framing, self.uri.max_frame
        )
        link.vnet = self.uri.vnet
        link.negotiate = self.uri.offload != "vnet"
        link.offload = self.uri.offload
        link.expect_connect_preface()
        return link

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        uri = self.uri
        if uri.scheme == "unix":
            sock = bind_unix_socket(uri.path, socket.SOCK_STREAM)
            self._created_path = uri.path
            self.server = await loop.create_unix_server(self._protocol, sock=sock)
        elif uri.scheme == "tcp":
            self.server = await loop.create_server(self._protocol, uri.host, uri.port)
        elif uri.scheme == "vsock":
            sock = vsock_listen_socket(uri.cid, uri.port)
            self.server = await loop.create_server(self._protocol, sock=sock)
        else:
            raise ValueError(f"{uri}: not a listening stream scheme")

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        remove_socket_file(self._created_path)


def vsock_listen_socket(cid: int | None, port: int) -> socket.socket:
    """An AF_VSOCK listening socket (the host side of a VM's virtio-vsock)."""
    if not hasattr(socket, "AF_VSOCK"):
        raise OSError("AF_VSOCK is not available on this platform")
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.bind((VMADDR_CID_ANY if cid is None else cid, port))
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def bind_unix_socket(path: str, type_: int) -> socket.socket:
    """Bind a unix socket at `path`, replacing only a stale socket file there.

    A live socket (someone listens) is an error; a file that is not a socket is never
    touched (an API or a flag must not become a way to delete files)."""
    clear_stale_socket(path, type_)
    sock = socket.socket(socket.AF_UNIX, type_)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        if type_ != socket.SOCK_DGRAM:
            sock.listen(16)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def remove_socket_file(path: str | None) -> None:
    if not path:
        return
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


async def connect_stream_fd(sink: LinkSink, uri: LinkUri, sock: socket.socket) -> StreamLink:
    """Wrap an already-connected stream socket (fd://N, or a dialled socket) as a link."""
    loop = asyncio.get_running_loop()
    link = StreamLink(sink, str(uri), uri.framing, uri.max_frame)
    link.vnet = uri.vnet
    link.negotiate = uri.offload != "vnet"
    link.offload = uri.offload
    sock.setblocking(False)
    await loop.connect_accepted_socket(lambda: link, sock)
    return link


async def connect_stdio(sink: LinkSink, uri: LinkUri) -> StreamLink:
    """stdin/stdout as one stream link (gvproxy's -listen-stdio)."""
    import sys

    st_in, st_out = os.fstat(0), os.fstat(1)
    if stat.S_ISSOCK(st_in.st_mode) and os.path.samestat(st_in, st_out):
        # One socket on both (a socket pair, an inetd-style connection): a socket link,
        # because asyncio's write-pipe transport takes any readable byte on a socket for
        # the peer closing, and the link would drop at the first frame.
        return await connect_stream_fd(sink, uri, socket.socket(fileno=os.dup(0)))
    loop = asyncio.get_running_loop()
    link = StreamLink(sink, "stdio://", uri.framing, uri.max_frame)
    link.vnet = uri.vnet  # set before the read side announces the link
    # The write side first: connection_made of the read side announces the link.
    link.transport, _ = await loop.connect_write_pipe(asyncio.Protocol, sys.stdout.buffer)  # type: ignore[assignment]
    transport = link.transport
    link.transport = None
    await loop.connect_read_pipe(lambda: link, sys.stdin.buffer)
    link.transport = transport  # writes go to stdout
    return link
