"""The one byte pump of every stream bridge: guestd's vsock → gRPC bridge and WSL proxy
(`guestd/network_setup.py`, `guestd/wsl_proxy.py`) and hostd's vsock dial bridge
(`hostd/guests.py`). hostd's NAT does not use it: its splice drives raw sockets and the
sans-IO TCP connection directly (`hostd/nat/tcp.py`).

`pump` copies one direction until EOF, then half-closes the writer (write_eof) so the peer
sees the end while the other direction carries on; each chunk is drained before the next
read, so a slow reader slows the writer instead of filling memory. A reset or broken pipe
ends that direction quietly: the other direction ends with it, or the caller closes both.
`splice` runs both directions and closes both writers when both are done (or cancelled).
"""

from __future__ import annotations

import asyncio

CHUNK = 1 << 16


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
