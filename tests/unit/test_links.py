"""Links against real sockets on a real asyncio loop (one `asyncio.run` per test).

Every socket lives in a short private directory (sun_path is limited to 108 bytes) that is
removed afterwards. AF_VSOCK is only ever bound as a listener here, never connected.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from netferry import linkcaps
from netferry.hostd.links import open_endpoint
from netferry.hostd.links.base import Link
from netferry.hostd.links.stream import vsock_listen_socket
from netferry.uri import VMADDR_CID_ANY, parse_link_uri

TIMEOUT = 5.0


class Sink:
    """Records what links report, and numbers them as the switch does (one port each)."""

    def __init__(self) -> None:
        self.opened: list[Link] = []
        self.batches: list[tuple[Link, list[bytes]]] = []
        self.closed: list[tuple[Link, str | None]] = []
        self.vnet: list[Link] = []

    def link_opened(self, link: Link) -> None:
        assert link not in self.opened
        self.opened.append(link)
        link.port = len(self.opened)

    def link_frames(self, link: Link, frames: list[bytes]) -> None:
        assert link in self.opened and not link.closed
        self.batches.append((link, list(frames)))

    def link_vnet(self, link: Link) -> None:
        self.vnet.append(link)

    def link_closed(self, link: Link, reason: str | None) -> None:
        assert link not in [lk for lk, _ in self.closed], "closed twice"
        self.closed.append((link, reason))

    def frames_of(self, link: Link) -> list[bytes]:
        return [f for lk, fs in self.batches if lk is link for f in fs]

    def reason(self, link: Link) -> str | None:
        for lk, reason in self.closed:
            if lk is link:
                return reason
        raise AssertionError(f"{link} not closed")

    def is_closed(self, link: Link) -> bool:
        return any(lk is link for lk, _ in self.closed)


async def until(predicate: Callable[[], object], what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="nf-")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def frame(i: int, size: int = 60) -> bytes:
    head = struct.pack("!I", i)
    return (head * (size // 4 + 1))[:size]


def len32(f: bytes) -> bytes:
    return struct.pack("!I", len(f)) + f


def len16(f: bytes) -> bytes:
    return struct.pack("<H", len(f)) + f


async def read_len32(reader: asyncio.StreamReader, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        (length,) = struct.unpack("!I", await reader.readexactly(4))
        out.append(await reader.readexactly(length))
    return out


async def nothing_more(reader: asyncio.StreamReader) -> bool:
    try:
        await asyncio.wait_for(reader.read(1), 0.05)
    except TimeoutError:
        return True
    return False


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, BrokenPipeError):
        pass


def close_all(sink: Sink, endpoint) -> None:
    endpoint.close()
    for link in sink.opened:
        link.close(None)


# ---- the capability exchange (netferry.linkcaps) ---------------------------------------

MAC = bytes.fromhex("5a94efe40cee")


@pytest.mark.parametrize("query", ["", "?offload=none"])
def test_offer_as_first_frame_gets_an_accept_then_frames_until_commit_get_a_vnet_header(
    sockdir, query
):
    """The listener answers an OFFER; plain frames sent before the COMMIT reach the switch
    with an empty virtio-net header, frames after it as they are (with ?offload=none the
    answer says plain and nothing changes)."""
    path = str(sockdir / "s.sock")

    async def main():
        sink = Sink()
        ep = await open_endpoint(parse_link_uri(f"unix://{path}{query}"), sink)
        r, w = await asyncio.open_unix_connection(path)
        await until(lambda: sink.opened, "link")
        link = sink.opened[0]
        offer = linkcaps.encode(linkcaps.OFFER, MAC, linkcaps.F_VNET, 128 * 1024)
        w.write(len32(offer) + len32(frame(1)))
        (answer,) = await read_len32(r, 1)
        caps = linkcaps.decode(answer)
        assert caps is not None and caps.kind == linkcaps.ACCEPT
        assert answer[:12] == MAC + MAC and len(answer) == 60
        if query:
            assert not caps.vnet and not sink.vnet and not link.vnet
            w.write(len32(frame(2)))
            await until(lambda: len(sink.frames_of(link)) == 2, "plain frames")
            assert sink.frames_of(link) == [frame(1), frame(2)]
        else:
            assert caps.vnet and caps.max_frame == 128 * 1024
            assert sink.vnet == [link] and link.vnet
            commit = linkcaps.encode(linkcaps.COMMIT, MAC, caps.flags, caps.max_frame)
            w.write(len32(frame(2)) + len32(commit) + len32(bytes(10) + frame(3)))
            await until(lambda: len(sink.frames_of(link)) == 3, "three frames")
            assert sink.frames_of(link) == [bytes(10) + frame(i) for i in (1, 2, 3)]
        await close_writer(w)
        close_all(sink, ep)

    run(main())


@pytest.mark.parametrize(
    "query", ["?offload=vnet", "?framing=len16le"], ids=["forced", "len16le-too-small"]
)
def test_no_vnet_unless_both_can(sockdir, query):
    """A forced-vnet listener does not negotiate (the offer is just a frame to it); a 2-byte
    length cannot carry 64 KiB super-frames, so such a link answers plain."""
    path = str(sockdir / "s.sock")
    enc = len16 if "len16le" in query else len32

    async def main():
        sink = Sink()
        ep = await open_endpoint(parse_link_uri(f"unix://{path}{query}"), sink)
        r, w = await asyncio.open_unix_connection(path)
        await until(lambda: sink.opened, "link")
        link = sink.opened[0]
        offer = linkcaps.encode(linkcaps.OFFER, MAC, linkcaps.F_VNET, 65535)
        w.write(enc(offer))
        if "len16le" in query:
            (length,) = struct.unpack("<H", await r.readexactly(2))
            caps = linkcaps.decode(await r.readexactly(length))
            assert caps is not None and caps.kind == linkcaps.ACCEPT and not caps.vnet
            assert not sink.vnet
        else:
            await until(lambda: sink.frames_of(link), "the offer, as a frame")
            assert sink.frames_of(link) == [offer] and await nothing_more(r)
        await close_writer(w)
        close_all(sink, ep)

    run(main())


def test_offer_after_the_first_frame_is_just_a_frame(sockdir):
    """Only the peer's first frame can open the exchange: a QEMU guest that happens to send
    such a frame later gets no answer and no change."""
    path = str(sockdir / "s.sock")

    async def main():
        sink = Sink()
        ep = await open_endpoint(parse_link_uri(f"unix://{path}"), sink)
        r, w = await asyncio.open_unix_connection(path)
        await until(lambda: sink.opened, "link")
        link = sink.opened[0]
        offer = linkcaps.encode(linkcaps.OFFER, MAC, linkcaps.F_VNET, 128 * 1024)
        w.write(len32(frame(1)) + len32(offer))
        await until(lambda: len(sink.frames_of(link)) == 2, "two frames")
        assert await nothing_more(r) and not sink.vnet
        await close_writer(w)
        close_all(sink, ep)

    run(main())


def test_linkcaps_decode_rejects_what_is_not_ours():
    offer = linkcaps.encode(linkcaps.OFFER, MAC, linkcaps.F_VNET, 1 << 17)
    assert linkcaps.decode(offer) == linkcaps.Caps(linkcaps.OFFER, linkcaps.F_VNET, 1 << 17)
    assert linkcaps.decode(offer[:20]) is None
    assert linkcaps.decode(offer[:14] + b"x" + offer[15:]) is None  # magic
    assert linkcaps.decode(offer[:12] + b"\x08\x00" + offer[14:]) is None  # ethertype
    assert linkcaps.decode(offer[:28] + b"\x09" + offer[29:]) is None  # version
    small = linkcaps.answer(linkcaps.decode(offer), linkcaps.F_VNET, 65535)
    assert not small.vnet and small.max_frame == 65535


# ---- unix:// and tcp:// stream listeners --------------------------------------------------


def test_unix_listener_two_clients_frames_both_ways(sockdir):
    path = str(sockdir / "s.sock")

    async def main():
        sink = Sink()
        ep = await open_endpoint(parse_link_uri(f"unix://{path}"), sink)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        r1, w1 = await asyncio.open_unix_connection(path)
        await until(lambda: len(sink.opened) == 1, "first link")
        r2, w2 = await asyncio.open_unix_connection(path)
        await until(lambda: len(sink.opened) == 2, "second link")
        l1, l2 = sink.opened
        assert l1 is not l2 and l1.port != l2.port and l1.name != l2.name

        w1.write(len32(frame(1)))
        w2.write(len32(frame(2, 1514)))
        await until(lambda: sink.frames_of(l1) and sink.frames_of(l2), "frames from both")
        assert sink.frames_of(l1) == [frame(1)]
        assert sink.frames_of(l2) == [frame(2, 1514)]

        # A frame split across writes is reassembled.
        data = len32(frame(3, 300))
        w1.write(data[:2])
        await w1.drain()
        await asyncio.sleep(0.01)
        w1.write(data[2:100])
        await w1.drain()
        await asyncio.sleep(0.01)
        w1.write(data[100:])
        await until(lambda: len(sink.frames_of(l1)) == 2, "split frame")
        assert sink.frames_of(l1)[1] == frame(3, 300)

        # Link -> client, each client gets only its own frames.
        l1.send_frames([frame(10), frame(11, 9000)])
        l2.send_frames([frame(20, 64)])
        assert await read_len32(r1, 2) == [frame(10), frame(11, 9000)]
        assert await read_len32(r2, 1) == [frame(20, 64)]
        assert await nothing_more(r1) and await nothing_more(r2)
        assert l1.counters.frames_out == 2 and l1.counters.bytes_out == 60 + 9000
        assert l2.counters.frames_in == 1 and l2.counters.bytes_in == 1514

        # A client that goes away closes its link (no reason), the other stays up.
        await close_writer(w2)
        await until(lambda: sink.is_closed(l2), "link 2 closed")
        assert sink.reason(l2) is None
        assert not l1.closed
        w1.write(len32(frame(4)))
        await until(lambda: len(sink.frames_of(l1)) == 3, "link 1 still up")

        close_all(sink, ep)
        await close_writer(w1)
        assert not os.path.exists(path)

    run(main())


def test_unix_many_frames_in_one_write_delivered_as_one_batch(sockdir):
    path = str(sockdir / "s.sock")

    async def main():
        sink = Sink()
        ep = await open_endpoint(parse_link_uri(f"unix://{path}"), sink)
        _r, w = await asyncio.open_unix_connection(path)
        await until(lambda: sink.opened, "link")
        (link,) = sink.opened
        frames = [frame(i, 60 + i * 13) for i in range(40)]
        w.write(b"".join(len32(f) for f in frames))
        await until(lambda: sink.batches, "batch")
        await asyncio.sleep(0.02)
        assert sink.batches == [(link, frames)]
        assert link.counters.frames_in == 40
        close_all(sink, ep)
        await close_writer(w)

    run(main())


def test_unix_len16le_framing_both_ways(sockdir):
    path = str(sockdir / "s.sock")

    async def main():
        sink = Sink()
        ep = await open_endpoint(parse_link_uri(f"unix://{path}?framing=len16le"), sink)
        r, w = await asyncio.open_unix_connection(path)
        await until(lambda: sink.opened, "link")
        (link,) = sink.opened
        frames = [frame(1), frame(2, 1514), frame(3, 65535)]
        w.write(b"".join(len16(f) for f in frames))
        await until(lambda: len(sink.frames_of(link)) == 3, "frames")
        assert sink.frames_of(link) == frames
        link.send_frames([frame(7, 100), frame(8, 2000)])
        got = []
        for _ in range(2):
            (length,) = struct.unpack("<H", await r.readexactly(2))
            got.append(await r.readexactly(length))
        assert got == [frame(7, 100), frame(8, 2000)]
        close_all(sink, ep)
        await close_writer(w)

    run(main())


GVFORWARDER_PREFACE = (
    b"POST /connect HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\n"
    b"Content-Length: 0\r\n\r\n"
)


@pytest.mark.parametrize("query", ["", "?framing=len16le"])
@pytest.mark.parametrize("chunk", [1, 7, 85, 4096])
def test_connect_preface_switches_a_stream_link_to_len16le(sockdir, query, chunk):
    """gvforwarder's 85-byte POST /connect, however it is split across reads, is skipped
    (nothing answered) and the frames after it are 2-byte LE, whatever the listener's
    framing; the frames in the same write as the preface are not lost."""
    path = str(sockdir / "s.sock")

    async def main():
        sink = Sink()
        ep = await open_endpoint(parse_link_uri(f"unix://{path}{query}"), sink)
        r, w = await asyncio.open_unix_connection(path)
        await until(lambda: sink.opened, "link")
        (link,) = sink.opened
        frames = [frame(1), frame(2, 1514)]
        data = GVFORWARDER_PREFACE + b"".join(len16(f) for f in frames)
        for i in range(0, len(data), chunk):
            w.write(data[i : i + chunk])
            await w.drain()
        await until(lambda: len(sink.frames_of(link)) == 2, "frames after the preface")
        assert sink.frames_of(link) == frames
        assert await nothing_more(r)  # no HTTP answer: gvforwarder reads none
        link.send_frames([frame(9, 300)])
        (length,) = struct.unpack("<H", await r.readexactly(2))
        assert await r.readexactly(length) == frame(9, 300)
        close_all(sink, ep)
        await close_writer(w)

    run(main())


@pytest.mark.parametrize(
    "first",
    [
        b"POST /connect HTTP/1.0\r\n",  # diverges late: frames in the listener's framing
        b"PO",  # a 2-byte prefix only, then frames
    ],
)
def test_bytes_that_are_not_the_preface_stay_frames(sockdir, first):
    path = str(sockdir / "s.sock")

    async def main():
        sink = Sink()
        ep = await open_endpoint(parse_link_uri(f"unix://{path}?framing=len16le"), sink)
        _r, w = await asyncio.open_unix_connection(path)
        await until(lambda: sink.opened, "link")
        (link,) = sink.opened
        # "PO" read as a 2-byte LE length is 20304: a frame of that size follows.
        body = first[2:] + bytes(0x4F50 - len(first) + 2)
        w.write(first[:2] + body)
        await until(lambda: sink.frames_of(link), "the frame")
        assert sink.frames_of(link) == [body] and not link.closed
        close_all(sink, ep)
        await close_writer(w)

    run(main())


def test_connect_preface_without_end_closes_only_that_link(sockdir):
    path = str(sockdir / "s.sock")

    async def main():
        sink = Sink()
        ep = await open_endpoint(parse_link_uri(f"unix://{path}"), sink)
        _r, w = await asyncio.open_unix_connection(path)
        await until(lambda: sink.opened, "link")
        (link,) = sink.opened
        w.write(b"POST /connect HTTP/1.1\r\n" + b"X-Long: " + b"a" * 9000)
        await until(lambda: sink.is_closed(link), "closed")
        assert "POST /connect header" in sink.reason(link)
        close_all(sink, ep)
        await close_writer(w)

    run(main())


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_listener_two_clients_frames_both_ways():
    port = free_tcp_port()

    async def main():
        sink = Sink()
        ep = await open_endpoint(parse_link_uri(f"tcp://127.0.0.1:{port}"), sink)
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        await until(lambda: len(sink.opened) == 1, "first link")
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        await until(lambda: len(sink.opened) == 2, "second link")
        l1, l2 = sink.opened
        frames = [frame(i, 1514) for i in range(30)]
        w1.write(b"".join(len32(f) for f in frames))
        w2.write(len32(frame(99)))
        await until(lambda: len(sink.frames_of(l1)) == 30 and sink.frames_of(l2), "frames")
        assert sink.frames_of(l1) == frames
        assert sink.frames_of(l2) == [frame(99)]
        l2.send_frames([frame(5), frame(6)])
        l1.send_frames([frame(7)])
        assert await read_len32(r2, 2) == [frame(5), frame(6)]
        assert await read_len32(r1, 1) == [frame(7)]
        close_all(sink, ep)
        await close_writer(w1)
        await close_writer(w2)
        # The port is free again once the listener is closed.
        await asyncio.sleep(0)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    run(main())


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (b"\x00\x00\x00\x00", "zero-length"),
        (struct.pack("!I", 2001), "exceeds the maximum of 2000"),
        (struct.pack("!I", 0xFFFFFFFF), "exceeds the maximum of 2000"),
    ],
    ids=["zero_length", "oversized", "huge"],
)
def test_framing_error_closes_only_that_link(sockdir, bad, reason):
    path = str(sockdir / "s.sock")

    async def main():
        sink = Sink()
        ep = await open_endpoint(parse_link_uri(f"unix://{path}?max-frame=2000"), sink)
        r1, w1 = await asyncio.open_unix_connection(path)
        await until(lambda: len(sink.opened) == 1, "first link")
        r2, w2 = await asyncio.open_unix_connection(path)
        await until(lambda: len(sink.opened) == 2, "second link")
        l1, l2 = sink.opened
        w1.write(len32(frame(1, 2000)))  # exactly the maximum is fine
        await until(lambda: sink.frames_of(l1), "max-size frame")
        w1.write(bad)
        await until(lambda: sink.is_closed(l1), "link 1 closed")
        assert reason in sink.reason(l1)
        assert sink.reason(l1).startswith("framing_error")
        assert l1.counters.errors == {"framing_error": 1}
        assert await asyncio.wait_for(r1.read(), TIMEOUT) == b""  # the peer sees EOF
        # The other link carries on, both ways.
        assert not l2.closed
        w2.write(len32(frame(2)))
        await until(lambda: sink.frames_of(l2), "frame on link 2")
        l2.send_frames([frame(3)])
        assert await read_len32(r2, 1) == [frame(3)]
        # And the listener still accepts new links.
        _r3, w3 = await asyncio.open_unix_connection(path)
        await until(lambda: len(sink.opened) == 3, "third link")
        assert [lk for lk, _ in sink.closed] == [l1]
        close_all(sink, ep)
        for w in (w1, w2, w3):
            await close_writer(w)

    run(main())


def test_stream_backlog_bounded_when_peer_does_not_read(sockdir):
    path = str(sockdir / "s.sock")

    async def main():
        sink = Sink()
        ep = await open_endpoint(parse_link_uri(f"unix://{path}"), sink)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        await until(lambda: sink.opened, "link")
        (link,) = sink.opened
        link.max_backlog = 256 * 1024
        big = frame(1, 60000)
        for _ in range(200):  # 12 MB that nobody reads
            link.send_frames([big])
        assert link.counters.dropped_out > 0
        assert link.counters.frames_out + link.counters.dropped_out == 200
        assert link.transport.get_write_buffer_size() <= link.max_backlog + len(big) + 4
        close_all(sink, ep)
        client.close()

    run(main())


# ---- unixpacket:// -----------------------------------------------------------------------


def test_unixpacket_one_frame_per_packet_both_ways(sockdir):
    path = str(sockdir / "p.sock")

    async def main():
        loop = asyncio.get_running_loop()
        sink = Sink()
        ep = await open_endpoint(parse_link_uri(f"unixpacket://{path}?max-frame=4000"), sink)
        clients = []
        for _ in range(2):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            c.setblocking(False)
            await loop.sock_connect(c, path)
            clients.append(c)
            await until(lambda n=len(clients): len(sink.opened) == n, "link")
        (c1, c2), (l1, l2) = clients, sink.opened
        frames = [frame(i, 60 + i) for i in range(10)] + [frame(99, 4000)]
        for f in frames:
            await loop.sock_sendall(c1, f)
        await loop.sock_sendall(c2, frame(50))
        await until(lambda: len(sink.frames_of(l1)) == 11 and sink.frames_of(l2), "frames")
        assert sink.frames_of(l1) == frames  # packet boundaries kept, nothing merged
        assert sink.frames_of(l2) == [frame(50)]

        l1.send_frames([frame(1, 100), frame(2, 3000), frame(3, 61)])
        got = [await loop.sock_recv(c1, 65536) for _ in range(3)]
        assert got == [frame(1, 100), frame(2, 3000), frame(3, 61)]

        # An oversized packet closes that link only.
        await loop.sock_sendall(c2, frame(7, 4001))
        await until(lambda: sink.is_closed(l2), "link 2 closed")
        assert "framing_error" in sink.reason(l2)
        assert not l1.closed
        assert await loop.sock_recv(c2, 100) == b""  # EOF for that client

        # The peer closing is an EOF without a reason.
        c1.close()
        await until(lambda: sink.is_closed(l1), "link 1 closed")
        assert sink.reason(l1) is None

        close_all(sink, ep)
        c2.close()
        assert not os.path.exists(path)

    run(main())


# ---- unixgram:// -------------------------------------------------------------------------


def test_unixgram_learns_peer_consumes_vfkt_frames_both_ways(sockdir):
    path = str(sockdir / "g.sock")
    cpath = str(sockdir / "c.sock")

    async def main():
        loop = asyncio.get_running_loop()
        sink = Sink()
        ep = await open_endpoint(parse_link_uri(f"unixgram://{path}"), sink)
        (link,) = sink.opened  # one link, announced at once
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        # Before a peer is known there is nowhere to send: nothing happens.
        link.send_frames([frame(0)])
        assert link.counters.frames_out == 0

        client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        client.bind(cpath)
        client.setblocking(False)
        client.sendto(b"VFKT", path)
        frames = [frame(i, 60 + 100 * i) for i in range(5)]
        for f in frames:
            client.sendto(f, path)
        await until(lambda: len(sink.frames_of(link)) == 5, "frames")
        assert sink.frames_of(link) == frames  # VFKT consumed, not switched
        assert len(sink.batches) == 1  # one wake-up drained them all: one batch
        assert link.peer == cpath

        link.send_frames([frame(10), frame(11, 9000)])
        got = []
        for _ in range(2):
            data, addr = await loop.sock_recvfrom(client, 65536)
            assert addr == path
            got.append(data)
        assert got == [frame(10), frame(11, 9000)]
        assert link.counters.frames_out == 2

        # Once the peer is known, VFKT is an ordinary (tiny) datagram...
        client.sendto(b"VFKT", path)
        await until(lambda: len(sink.frames_of(link)) == 6, "second VFKT")
        assert sink.frames_of(link)[-1] == b"VFKT"
        # ... and other senders are ignored and counted.
        stranger = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        stranger.bind(str(sockdir / "x.sock"))
        stranger.sendto(frame(66), path)
        anonymous = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        anonymous.sendto(frame(67), path)
        client.sendto(frame(68), path)
        await until(lambda: len(sink.frames_of(link)) == 7, "frame after strangers")
        assert sink.frames_of(link)[-1] == frame(68)
        assert link.counters.errors == {"foreign_peer": 1, "unbound_peer": 1}

        ep.close()
        assert sink.closed == [(link, None)]
        assert not os.path.exists(path)
        for s in (client, stranger, anonymous):
            s.close()

    run(main())


def test_unixgram_first_datagram_is_a_frame_without_handshake(sockdir):
    path = str(sockdir / "g.sock")

    async def main():
        sink = Sink()
        ep = await open_endpoint(parse_link_uri(f"unixgram://{path}?max-frame=1000"), sink)
        (link,) = sink.opened
        client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        client.bind(str(sockdir / "c.sock"))
        client.sendto(frame(1), path)
        await until(lambda: sink.frames_of(link), "frame")
        assert sink.frames_of(link) == [frame(1)]
        client.sendto(frame(2, 1001), path)
        await until(lambda: link.closed, "close on oversized datagram")
        assert "framing_error" in sink.reason(link)
        assert not os.path.exists(path)
        ep.close()  # closing again is harmless
        assert len(sink.closed) == 1
        client.close()

    run(main())


# ---- fd:// -------------------------------------------------------------------------------


def test_fd_stream_socketpair(sockdir):
    async def main():
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sink = Sink()
        ep = await open_endpoint(parse_link_uri(f"fd://{ours.detach()}"), sink)
        (link,) = sink.opened
        theirs.setblocking(False)
        frames = [frame(i, 100 + i) for i in range(8)]
        await loop.sock_sendall(theirs, b"".join(len32(f) for f in frames))
        await until(lambda: len(sink.frames_of(link)) == 8, "frames")
        assert sink.frames_of(link) == frames
        link.send_frames([frame(20), frame(21, 1514)])
        want = len32(frame(20)) + len32(frame(21, 1514))
        buf = b""
        while len(buf) < len(want):
            buf += await loop.sock_recv(theirs, 65536)
        assert buf == want
        theirs.close()
        await until(lambda: sink.is_closed(link), "close on EOF")
        assert sink.reason(link) is None
        ep.close()
        assert len(sink.closed) == 1

    run(main())


def test_fd_datagram_socketpair_is_a_packet_link(sockdir):
    async def main():
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        sink = Sink()
        ep = await open_endpoint(parse_link_uri(f"fd://{ours.detach()}"), sink)
        (link,) = sink.opened
        assert link.kind == "packet"
        theirs.setblocking(False)
        frames = [frame(i, 60 + 7 * i) for i in range(6)]
        for f in frames:
            theirs.send(f)
        await until(lambda: len(sink.frames_of(link)) == 6, "frames")
        assert sink.frames_of(link) == frames  # datagram boundaries kept
        assert len(sink.batches) == 1  # one wake-up drained them all: one batch
        link.send_frames([frame(30), frame(31, 5000)])
        assert await loop.sock_recv(theirs, 65536) == frame(30)
        assert await loop.sock_recv(theirs, 65536) == frame(31, 5000)
        ep.close()
        assert sink.closed == [(link, None)]
        theirs.close()

    run(main())


# ---- the socket path: stale, foreign and live files -------------------------------------

SCHEME_TYPES = {
    "unix": socket.SOCK_STREAM,
    "unixpacket": socket.SOCK_SEQPACKET,
    "unixgram": socket.SOCK_DGRAM,
}


@pytest.mark.parametrize("scheme", sorted(SCHEME_TYPES))
def test_stale_socket_file_replaced(sockdir, scheme):
    path = str(sockdir / "s.sock")
    old = socket.socket(socket.AF_UNIX, SCHEME_TYPES[scheme])
    old.bind(path)
    old.close()  # the file stays behind, nobody listens
    assert stat.S_ISSOCK(os.lstat(path).st_mode)

    async def main():
        loop = asyncio.get_running_loop()
        sink = Sink()
        ep = await open_endpoint(parse_link_uri(f"{scheme}://{path}"), sink)
        c = socket.socket(socket.AF_UNIX, SCHEME_TYPES[scheme])
        c.setblocking(False)
        if scheme == "unixgram":
            c.bind(str(sockdir / "c.sock"))
            c.sendto(frame(1), path)
        else:
            await loop.sock_connect(c, path)
            await loop.sock_sendall(c, len32(frame(1)) if scheme == "unix" else frame(1))
        await until(lambda: sink.opened and sink.frames_of(sink.opened[0]), "a frame")
        assert sink.frames_of(sink.opened[0]) == [frame(1)]
        close_all(sink, ep)
        c.close()
        assert not os.path.exists(path)

    run(main())


@pytest.mark.parametrize("scheme", sorted(SCHEME_TYPES))
@pytest.mark.parametrize("kind", ["regular_file", "directory", "symlink"])
def test_path_that_is_not_a_socket_refused_and_untouched(sockdir, scheme, kind):
    path = sockdir / "s.sock"
    target = sockdir / "precious.txt"
    target.write_bytes(b"precious data")
    if kind == "regular_file":
        path.write_bytes(b"do not delete")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(target)
    before = os.lstat(path)

    async def main():
        sink = Sink()
        with pytest.raises(FileExistsError, match="not a socket"):
            await open_endpoint(parse_link_uri(f"{scheme}://{path}"), sink)
        assert sink.opened == []

    run(main())
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (
        before.st_ino,
        before.st_mode,
        before.st_mtime_ns,
    )
    if kind == "regular_file":
        assert path.read_bytes() == b"do not delete"
    assert target.read_bytes() == b"precious data"


@pytest.mark.parametrize("scheme", sorted(SCHEME_TYPES))
@pytest.mark.parametrize("live_type", ["stream", "seqpacket", "dgram"])
def test_live_socket_path_refused(sockdir, scheme, live_type):
    path = str(sockdir / "s.sock")
    type_ = {
        "stream": socket.SOCK_STREAM,
        "seqpacket": socket.SOCK_SEQPACKET,
        "dgram": socket.SOCK_DGRAM,
    }[live_type]
    live = socket.socket(socket.AF_UNIX, type_)
    live.bind(path)
    if type_ != socket.SOCK_DGRAM:
        live.listen(4)
    inode = os.lstat(path).st_ino

    async def main():
        sink = Sink()
        with pytest.raises(FileExistsError, match="in use"):
            await open_endpoint(parse_link_uri(f"{scheme}://{path}"), sink)
        assert sink.opened == []

    try:
        run(main())
        assert os.lstat(path).st_ino == inode  # the live socket's file is still its own
        probe = socket.socket(socket.AF_UNIX, type_)
        probe.connect(path)  # and it still answers
        probe.close()
    finally:
        live.close()


# ---- vsock: parsing and listening only (never connect) ------------------------------------


@pytest.mark.parametrize(
    ("text", "cid", "port"),
    [
        ("vsock://:1024", None, 1024),
        ("vsock://1024", None, 1024),
        ("vsock://2:1024", 2, 1024),
        ("vsock://4294967295:4294967295", VMADDR_CID_ANY, 4294967295),
        ("vsock://3:1024?framing=len16le", 3, 1024),
    ],
)
def test_vsock_uri_parsing(text, cid, port):
    uri = parse_link_uri(text)
    assert (uri.scheme, uri.cid, uri.port) == ("vsock", cid, port)
    assert uri.framing == ("len16le" if "len16le" in text else "len32be")
    assert str(uri) == text


@pytest.mark.parametrize(
    "text",
    ["vsock://:0", "vsock://x:1024", "vsock://2:abc", "vsock://2:4294967296", "vsock://-1:5"],
)
def test_vsock_uri_rejected(text):
    with pytest.raises(ValueError, match="vsock"):
        parse_link_uri(text)


def test_vsock_listen_socket_binds_any_cid_or_explains():
    port = 0x7FF00000 + os.getpid() % 0xFFFF
    try:
        sock = vsock_listen_socket(None, port)
    except OSError as e:
        # No vsock here (no module, no device, port taken): the error must say so.
        assert str(e) and (e.errno is not None or "AF_VSOCK" in str(e))
        return
    try:
        assert sock.family == socket.AF_VSOCK
        assert sock.getsockname() == (VMADDR_CID_ANY, port)
        assert sock.getblocking() is False
        # A listening socket: accept() would block, not fail with EINVAL.
        with pytest.raises(BlockingIOError):
            sock.accept()
    finally:
        sock.close()


def test_vsock_listen_socket_without_af_vsock(monkeypatch):
    monkeypatch.delattr(socket, "AF_VSOCK", raising=False)
    with pytest.raises(OSError, match="AF_VSOCK is not available"):
        vsock_listen_socket(None, 1024)
