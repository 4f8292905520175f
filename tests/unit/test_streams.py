"""clients/python/netferry/streams.py: the byte pump of guestd's and hostd's bridges,
over real unix socket pairs."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

from netferry.streams import CHUNK, pump, splice


async def stream_pair() -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], socket.socket]:
    ours, theirs = socket.socketpair()
    return await asyncio.open_unix_connection(sock=ours), theirs


def test_pump_copies_everything_then_half_closes() -> None:
    blob = os.urandom(3 << 20)  # larger than any socket buffer: backpressure is exercised

    async def main() -> tuple[bytes, int]:
        (src_r, src_w), src_peer = await stream_pair()
        (_dst_r, dst_w), dst_peer = await stream_pair()
        loop = asyncio.get_running_loop()
        src_peer.setblocking(False)
        dst_peer.setblocking(False)

        async def feed() -> None:
            await loop.sock_sendall(src_peer, blob)
            src_peer.shutdown(socket.SHUT_WR)

        async def drain() -> bytes:
            got = bytearray()
            while chunk := await loop.sock_recv(dst_peer, 1 << 16):
                got += chunk
            return bytes(got)

        copied, _, received = await asyncio.gather(pump(src_r, dst_w), feed(), drain())
        for s in (src_w, dst_w):
            s.close()
        src_peer.close()
        dst_peer.close()
        return received, copied

    received, copied = asyncio.run(main())
    assert copied == len(blob)
    assert hashlib.sha256(received).digest() == hashlib.sha256(blob).digest()  # EOF came too


def test_splice_carries_both_directions_and_closes_both() -> None:
    async def main() -> tuple[bytes, bytes]:
        (a_r, a_w), a_peer = await stream_pair()
        (b_r, b_w), b_peer = await stream_pair()
        loop = asyncio.get_running_loop()
        for s in (a_peer, b_peer):
            s.setblocking(False)
        task = asyncio.ensure_future(splice(a_r, a_w, b_r, b_w))
        await loop.sock_sendall(a_peer, b"from a")
        await loop.sock_sendall(b_peer, b"from b")
        a_peer.shutdown(socket.SHUT_WR)
        b_peer.shutdown(socket.SHUT_WR)

        async def read_all(s: socket.socket) -> bytes:
            got = bytearray()
            while chunk := await loop.sock_recv(s, 100):
                got += chunk
            return bytes(got)

        at_b, at_a = await asyncio.gather(read_all(b_peer), read_all(a_peer))
        await task
        assert a_w.is_closing() and b_w.is_closing()
        a_peer.close()
        b_peer.close()
        return at_b, at_a

    assert asyncio.run(main()) == (b"from a", b"from b")


def test_a_reset_ends_a_direction_quietly() -> None:
    async def main() -> int:
        (src_r, src_w), src_peer = await stream_pair()
        (_dst_r, dst_w), dst_peer = await stream_pair()
        dst_peer.close()  # the writer's peer is gone: writes fail with EPIPE
        src_peer.sendall(b"x" * (2 * CHUNK))  # fits the socket buffer: no reader needed
        src_peer.shutdown(socket.SHUT_WR)
        copied = await pump(src_r, dst_w)  # returns instead of raising
        src_w.close()
        dst_w.close()
        src_peer.close()
        return copied

    # the first failed write stops the pump: it does not read on into nowhere
    assert asyncio.run(main()) <= CHUNK
