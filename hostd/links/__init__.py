"""Links: how frames reach the switch. `open_endpoint` turns a link URI into a listener (or a
single link) that announces each connected link to the sink."""

from __future__ import annotations

import socket
from typing import Protocol

from netferry.hostd.links.base import Link, LinkSink
from netferry.hostd.links.packet import PacketLink, SeqpacketListener, TapLink, unixgram_link
from netferry.hostd.links.stream import StreamListener, connect_stdio, connect_stream_fd
from netferry.uri import LinkUri

__all__ = ["Endpoint", "Link", "LinkSink", "open_endpoint"]


class Endpoint(Protocol):
    def close(self) -> None: ...


class _Single:
    """An endpoint that is one link (fd://, stdio://, unixgram://)."""

    def __init__(self, link: Link) -> None:
        self.link = link

    def close(self) -> None:
        self.link.close(None)


async def open_endpoint(uri: LinkUri, sink: LinkSink) -> Endpoint:
    if uri.scheme in ("unix", "tcp", "vsock"):
        listener = StreamListener(uri, sink)
        await listener.start()
        return listener
    if uri.scheme == "unixpacket":
        seq = SeqpacketListener(uri, sink)
        await seq.start()
        return seq
    if uri.scheme == "unixgram":
        return _Single(unixgram_link(sink, uri))
    if uri.scheme == "stdio":
        return _Single(await connect_stdio(sink, uri))
    if uri.scheme == "tapfd":
        tap = TapLink(sink, str(uri), uri.fd, uri.max_frame)
        tap.vnet = uri.vnet
        sink.link_opened(tap)
        return _Single(tap)
    if uri.scheme == "fd":
        sock = socket.socket(fileno=uri.fd)
        if sock.type == socket.SOCK_STREAM:
            return _Single(await connect_stream_fd(sink, uri, sock))
        link = PacketLink(sink, str(uri), sock, uri.max_frame, learn_peer=False)
        link.vnet = uri.vnet
        sink.link_opened(link)
        return _Single(link)
    raise ValueError(f"{uri}: unsupported link scheme")
