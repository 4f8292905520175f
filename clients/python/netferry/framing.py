"""Frame codecs for links that carry Ethernet frames over a byte stream.

A stream link (QEMU `-netdev stream`, passt, gvforwarder, Rancher Desktop's vm-switch)
prefixes every Ethernet frame with its length:

- ``len32be``: 4-byte big-endian length (QEMU, passt, gvproxy's `-listen-qemu`);
- ``len16le``: 2-byte little-endian length (gvforwarder, hyperkit/vpnkit, gvproxy stdio).

Packet links (SOCK_SEQPACKET, SOCK_DGRAM) carry one bare frame per packet and need no codec.

`StreamDeframer.feed` takes whatever a `recv` returned and gives back every complete frame
in it, so one read can yield many frames (the hot path handles them in one pass). A zero
length or a length above the link's maximum is a protocol error: the link is dropped, since
nothing after it can be trusted to be aligned.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

# gvproxy caps stream frames at 128 KiB (its "security: cap the packet size" fix); so do we.
MAX_FRAME = 128 * 1024

_LEN32BE = struct.Struct("!I")
_LEN16LE = struct.Struct("<H")


class FramingError(ValueError):
    """The stream is not (or no longer) correctly framed; the link must be dropped."""


class Framing:
    """A length-prefix codec: `name`, header size and the encode/decode of the length."""

    __slots__ = ("_struct", "header_size", "max_length", "name")

    def __init__(self, name: str, header: struct.Struct, max_length: int) -> None:
        self.name = name
        self._struct = header
        self.header_size = header.size
        self.max_length = max_length

    def header(self, length: int) -> bytes:
        return self._struct.pack(length)

    def encode(self, frame: bytes | bytearray | memoryview) -> bytes:
        return self._struct.pack(len(frame)) + bytes(frame)

    def encode_many(self, frames: Iterable[bytes | bytearray | memoryview]) -> list[bytes]:
        """Header and frame pieces ready for `transport.writelines` (no joining copies)."""
        pack = self._struct.pack
        out: list[bytes] = []
        for frame in frames:
            out.append(pack(len(frame)))
            out.append(frame)  # type: ignore[arg-type]
        return out

    def unpack_length(self, buf: bytes | bytearray | memoryview, offset: int) -> int:
        return self._struct.unpack_from(buf, offset)[0]


FRAMINGS: dict[str, Framing] = {
    "len32be": Framing("len32be", _LEN32BE, 0xFFFFFFFF),
    "len16le": Framing("len16le", _LEN16LE, 0xFFFF),
}


def get_framing(name: str) -> Framing:
    try:
        return FRAMINGS[name]
    except KeyError:
        raise ValueError(
            f"unknown framing {name!r}: expected one of {', '.join(sorted(FRAMINGS))}"
        ) from None


class StreamDeframer:
    """Splits a byte stream into frames; keeps a partial frame between reads."""

    __slots__ = ("_buf", "framing", "max_frame")

    def __init__(self, framing: Framing, max_frame: int = MAX_FRAME) -> None:
        self.framing = framing
        self.max_frame = min(max_frame, framing.max_length)
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held that do not yet make a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        frames: list[bytes] = []
        hsize = self.framing.header_size
        unpack = self.framing.unpack_length
        limit = self.max_frame
        buf = self._buf
        view = memoryview(data)
        if buf:
            # Finish the partial frame with just the bytes it lacks, then parse `data` in
            # place: a read is not copied into the buffer (super-frames straddle every read).
            if len(buf) < hsize:
                take = hsize - len(buf)
                buf += view[:take]
                view = view[take:]
                if len(buf) < hsize:
                    return frames
            length = self._check(unpack(buf, 0), limit)
            need = hsize + length - len(buf)
            if len(view) < need:
                buf += view
                return frames
            buf += view[:need]
            frames.append(bytes(buf[hsize:]))
            buf.clear()
            view = view[need:]
        pos = 0
        end = len(view)
        while end - pos >= hsize:
            length = self._check(unpack(view, pos), limit)
            start = pos + hsize
            if end - start < length:
                break
            frames.append(bytes(view[start : start + length]))
            pos = start + length
        if pos < end:
            buf += view[pos:]
        return frames

    @staticmethod
    def _check(length: int, limit: int) -> int:
        if length == 0:
            raise FramingError("zero-length frame")
        if length > limit:
            raise FramingError(f"frame of {length} bytes exceeds the maximum of {limit}")
        return length
