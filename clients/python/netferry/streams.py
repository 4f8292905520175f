"""The one byte pump of every stream bridge: guestd's vsock → gRPC bridge and WSL proxy
(`guestd/network_setup.py`, `guestd/wsl_proxy.py`) and hostd's vsock dial bridge
(`hostd/guests.py`). hostd's NAT does not use it: its splice drives raw sockets and the
sans-IO TCP connection directly (`hostd/nat/tcp.py`).

`pump` copies one direction until EOF, then half-closes the writer (write_eof) so the peer
sees the end while the other direction carries on; each chunk is drained before the next
read, so a slow reader slows the writer instead of filling memory. A reset or broken pipe
ends that direction quietly: the other direction ends with it, or the caller closes both.
`splice` runs both directions and closes both writers when both are done (or cancelled).

`send_queued` is the frame links' writer (hostd's stream links and vm-switch's link): a
queue of pieces sent gathered with sendmsg, no joining copy, as much as the socket takes
without blocking; what is left waits for the caller's writability callback.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from itertools import islice

CHUNK = 1 << 16
IOV_MAX = 1024  # Linux's limit on pieces per sendmsg


def send_queued(sock: socket.socket, queue: deque[bytes | memoryview]) -> int:
    """Send from the head of `queue` until it is empty or the socket would block; returns the
    bytes sent. A piece sent in part stays at the head as a view of its rest. Errors other
    than would-block are raised (the pieces not sent stay queued)."""
    sent = 0
    sendmsg = sock.sendmsg
    while queue:
        try:
            n = sendmsg(list(islice(queue, IOV_MAX)))
        except (BlockingIOError, InterruptedError):
            break
        sent += n
        while n:
            head = queue[0]
            if n >= len(head):
                n -= len(head)
                queue.popleft()
            else:
                queue[0] = memoryview(head)[n:]
                n = 0
    return sent


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Copy `reader` to `writer` until EOF, then half-close; returns the bytes copied."""
    copied = 0
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            copied += len(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass
    return copied


async def splice(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> None:
    """Both directions between stream pair a and stream pair b; both writers closed after."""
    try:
        await asyncio.gather(pump(a_reader, b_writer), pump(b_reader, a_writer))
    finally:
        a_writer.close()
        b_writer.close()
