"""Packet links: one bare Ethernet frame per packet, no length prefix.

- `unixpacket://` (SOCK_SEQPACKET, UML's bess transport): a listener; each accepted
  connection is a link.
- `unixgram://` (SOCK_DGRAM, vfkit and libkrun): one bound socket; the peer is learned from
  the first datagram's source address (it must have bound one). A first datagram that is
  exactly `VFKT` is vfkit's old handshake and is consumed, not switched.

Reads drain the socket until it would block, so one wake-up delivers a batch. Writes that
would block are queued (bounded) and flushed when the socket is writable; ENOBUFS, which
macOS returns for full datagram sockets, is treated the same way.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections import deque

import structlog

from netferry.hostd.links.base import Link, LinkSink
from netferry.hostd.links.stream import bind_unix_socket, remove_socket_file
from netferry.uri import LinkUri

log = structlog.get_logger("hostd.links")

READ_BATCH = 256
VFKIT_MAGIC = b"VFKT"


class PacketLink(Link):
    kind = "packet"

    def __init__(
        self,
        sink: LinkSink,
        name: str,
        sock: socket.socket,
        max_frame: int,
        peer: str | None = None,
        learn_peer: bool = False,
        socket_path: str | None = None,
    ) -> None:
        super().__init__(sink, name)
        self.sock = sock
        self.max_frame = max_frame
        self.peer = peer
        self.learn_peer = learn_peer
        self.socket_path = socket_path  # removed on close when we created it
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._writer = False
        # Times the socket was full and frames waited for writability (the peer's receive
        # queue, bounded by our SO_SNDBUF, was the limit); logged when the link closes.
        self.write_deferred = 0
        self._loop = asyncio.get_running_loop()
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        frames: list[bytes] = []
        bufsize = self.max_frame + 1
        for _ in range(READ_BATCH):
            try:
                if self.learn_peer:
                    data, addr = self.sock.recvfrom(bufsize)
                else:
                    data, addr = self.sock.recv(bufsize), None
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.close(f"read_error: {e}")
                return
            if not data:
                if self.learn_peer:
                    continue
                self.close(None)  # seqpacket EOF
                return
            if len(data) > self.max_frame:
                log.warning("link.oversized_frame", link=self.name, size=len(data))
                self.close(f"framing_error: frame over {self.max_frame} bytes")
                return
            if self.learn_peer:
                if not addr:
                    self.counters.errors["unbound_peer"] = (
                        self.counters.errors.get("unbound_peer", 0) + 1
                    )
                    continue
                if self.peer is None:
                    self.peer = addr
                    log.info("link.peer_learned", link=self.name, peer=addr)
                    if data == VFKIT_MAGIC:
                        continue
                elif addr != self.peer:
                    self.counters.errors["foreign_peer"] = (
                        self.counters.errors.get("foreign_peer", 0) + 1
                    )
                    continue
            frames.append(data)
        if frames:
            self._delivered(frames)

    def send_frames(self, frames: list[bytes]) -> None:
        if self.closed or (self.learn_peer and self.peer is None):
            return
        c = self.counters
        for frame in frames:
            if self._queue:
                self._enqueue(frame)
                continue
            try:
                self._send(frame)
            except (BlockingIOError, InterruptedError):
                self._enqueue(frame)
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self._enqueue(frame)
                else:
                    self.close(f"write_error: {e}")
                    return
            else:
                c.frames_out += 1
                c.bytes_out += len(frame)

    def _send(self, frame: bytes) -> None:
        if self.learn_peer:
            self.sock.sendto(frame, self.peer)
        else:
            self.sock.send(frame)

    def _enqueue(self, frame: bytes) -> None:
        if self._queued_bytes + len(frame) > self.max_backlog:
            self.counters.dropped_out += 1
            return
        self._queue.append(frame)
        self._queued_bytes += len(frame)
        if not self._writer:
            self._writer = True
            self.write_deferred += 1
            self._loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        while self._queue:
            frame = self._queue[0]
            try:
                self._send(frame)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    return
                self.close(f"write_error: {e}")
                return
            self._queue.popleft()
            self._queued_bytes -= len(frame)
            self.counters.frames_out += 1
            self.counters.bytes_out += len(frame)
        self._loop.remove_writer(self.sock.fileno())
        self._writer = False

    def _close_transport(self) -> None:
        if self.write_deferred:
            log.info("link.write_deferred", link=self.name, times=self.write_deferred)
        fd = self.sock.fileno()
        if fd >= 0:
            self._loop.remove_reader(fd)
            if self._writer:
                self._loop.remove_writer(fd)
        self.sock.close()
        remove_socket_file(self.socket_path)


class TapLink(Link):
    """A tap device fd handed to hostd: one frame per read and per write, no framing.

    `netferry run` opens the guest's tap inside its namespace and passes the fd out, so
    frames go kernel → hostd → kernel with no vm-switch and no stream in between. With
    `?offload=vnet` the tap was opened with IFF_VNET_HDR and every frame carries the
    virtio-net header, as on an offload stream link."""

    kind = "tap"

    def __init__(self, sink: LinkSink, name: str, fd: int, max_frame: int) -> None:
        super().__init__(sink, name)
        self.fd = fd
        self.max_frame = max_frame
        self._loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        frames: list[bytes] = []
        size = self.max_frame
        read = os.read
        for _ in range(READ_BATCH):
            try:
                frames.append(read(self.fd, size))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.close(f"read_error: {e}")
                return
        if frames:
            self._delivered(frames)

    def send_frames(self, frames: list[bytes]) -> None:
        if self.closed:
            return
        c = self.counters
        write = os.write
        for frame in frames:
            try:
                write(self.fd, frame)
            except (BlockingIOError, InterruptedError):
                c.dropped_out += 1  # the guest's queue is full: a NIC would drop it too
                continue
            except OSError as e:
                self.close(f"write_error: {e}")
                return
            c.frames_out += 1
            c.bytes_out += len(frame)

    def _close_transport(self) -> None:
        self._loop.remove_reader(self.fd)
        os.close(self.fd)


class SeqpacketListener:
    """unixpacket:// — accepts SOCK_SEQPACKET connections, each one a link."""

    def __init__(self, uri: LinkUri, sink: LinkSink) -> None:
        self.uri = uri
        self.sink = sink
        self.sock: socket.socket | None = None
        self._count = 0

    async def start(self) -> None:
        self.sock = bind_unix_socket(self.uri.path, socket.SOCK_SEQPACKET)
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self.sock is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("link.accept_error", listener=str(self.uri), error=str(e))
                return
            self._count += 1
            link = PacketLink(self.sink, f"{self.uri}#{self._count}", conn, self.uri.max_frame)
            link.vnet = self.uri.vnet  # ?offload=vnet: each packet is a header + a frame
            self.sink.link_opened(link)

    def close(self) -> None:
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            remove_socket_file(self.uri.path)


def unixgram_link(sink: LinkSink, uri: LinkUri) -> PacketLink:
    """unixgram:// — one bound datagram socket, one peer (learned)."""
    sock = bind_unix_socket(uri.path, socket.SOCK_DGRAM)
    # gvproxy's sizes for vfkit: a burst of full frames must not be dropped by the kernel.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    link = PacketLink(sink, str(uri), sock, uri.max_frame, learn_peer=True, socket_path=uri.path)
    link.vnet = uri.vnet  # ?offload=vnet: each datagram is a header + a frame
    sink.link_opened(link)
    return link
