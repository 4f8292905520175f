"""The link capability exchange: vm-switch and hostd agree on virtio-net headers by themselves.

A stream link carries bare Ethernet frames unless both ends know the other is netferry.
The exchange is three frames, each a valid Ethernet frame in the link's own framing, so a
peer that does not speak it sees at most one frame it drops:

1. OFFER (dialer → listener, the dialer's first frame): "I can take and send virtio-net
   headers, frames up to N bytes". Its destination MAC is its own source MAC and its
   ethertype 0x88B5 (IEEE 802 local experimental): a learning switch (gvproxy's, an older
   hostd) learns the source on that port and filters the frame there; a stack drops the
   unknown ethertype. Only the dialer offers (vm-switch); QEMU, UML, gvforwarder and vfkit
   never send one, and a listener answers only an OFFER, so they never see anything new.
2. ACCEPT (listener → dialer): the flags both ends take and the smaller maximum frame.
   Every frame the listener sends after it carries a virtio-net header if `F_VNET` is set.
3. COMMIT (dialer → listener, only if `F_VNET` was accepted): every frame the dialer sends
   after it carries a virtio-net header. Frames the dialer sent between OFFER and COMMIT
   are plain; the listener converts them.

So each direction switches at a marker frame in its own ordered stream, and neither end
waits: frames flow plain while the exchange is in flight. An old hostd never answers and
vm-switch stays plain. Virtio-net headers are accepted only if both ends take frames of
`VNET_MIN_FRAME` bytes (a 64 KiB TSO segment with its headers), which a 2-byte length
framing cannot carry: such links stay plain.

Payload (after the 14-byte Ethernet header, big-endian): MAGIC (14 bytes), version (1),
kind (1), flags (2), max frame (4), zero padding to Ethernet's 46-byte minimum.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ETHERTYPE = 0x88B5
MAGIC = b"netferry-link\x00"
VERSION = 1
OFFER, ACCEPT, COMMIT = 1, 2, 3
KIND_NAMES = {OFFER: "offer", ACCEPT: "accept", COMMIT: "commit"}
F_VNET = 0x0001  # 10-byte virtio-net header (checksum and TCP segmentation offload)
VNET_MIN_FRAME = 10 + 14 + 65535

_BODY = struct.Struct("!14sBBHI")
_ETH = struct.Struct("!6s6sH")
FRAME_LEN = 14 + 46


@dataclass(frozen=True)
class Caps:
    kind: int
    flags: int
    max_frame: int

    @property
    def vnet(self) -> bool:
        return bool(self.flags & F_VNET)

    def describe(self) -> str:
        return f"{KIND_NAMES.get(self.kind, self.kind)} vnet={self.vnet} max_frame={self.max_frame}"


def encode(kind: int, mac: bytes, flags: int = 0, max_frame: int = 0) -> bytes:
    """A capability frame from (and to) `mac`."""
    frame = _ETH.pack(mac, mac, ETHERTYPE) + _BODY.pack(MAGIC, VERSION, kind, flags, max_frame)
    return frame.ljust(FRAME_LEN, b"\x00")


def decode(frame: bytes | bytearray | memoryview) -> Caps | None:
    """The capabilities in `frame`, or None if it is not a capability frame (of our version)."""
    if len(frame) < 14 + _BODY.size or frame[12:14] != b"\x88\xb5":
        return None
    magic, version, kind, flags, max_frame = _BODY.unpack_from(frame, 14)
    if magic != MAGIC or version != VERSION or kind not in KIND_NAMES:
        return None
    return Caps(kind, flags, max_frame)


def answer(offer: Caps, own_flags: int, own_max_frame: int) -> Caps:
    """The listener's ACCEPT for `offer`: what both ends take."""
    max_frame = min(offer.max_frame, own_max_frame)
    flags = offer.flags & own_flags
    if max_frame < VNET_MIN_FRAME:
        flags &= ~F_VNET
    return Caps(ACCEPT, flags, max_frame)


def can_vnet(max_frame: int, framing_max: int) -> bool:
    """Whether a link whose frames may be `max_frame` bytes (and whose length prefix holds
    `framing_max`) can carry virtio-net super-frames."""
    return min(max_frame, framing_max) >= VNET_MIN_FRAME
