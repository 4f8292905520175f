"""What every link is to the switch: a port that delivers batches of frames and takes them.

A link calls `sink.link_opened(link)` once it is connected, `sink.link_frames(link, frames)`
with every complete frame one read produced, `sink.link_vnet(link)` when its frames start
carrying a virtio-net header (negotiated, see `netferry.linkcaps`), and
`sink.link_closed(link, reason)` once when it ends. The switch calls `send_frames` with a
batch; a link writes the batch in one go where its transport allows. A link whose peer
does not read is not allowed to grow memory without bound: beyond `max_backlog` bytes the
frames are dropped and counted, as a full NIC queue would (TCP above recovers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class LinkSink(Protocol):
    def link_opened(self, link: Link) -> None: ...
    def link_frames(self, link: Link, frames: list[bytes]) -> None: ...
    def link_vnet(self, link: Link) -> None: ...
    def link_closed(self, link: Link, reason: str | None) -> None: ...


@dataclass
class LinkCounters:
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped_out: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class Link:
    """Base class: identity, counters and the close-once rule."""

    kind = "link"
    max_backlog = 16 << 20

    def __init__(self, sink: LinkSink, name: str) -> None:
        self.sink = sink
        self.name = name
        self.port = 0
        self.vnet = False  # frames carry a virtio-net header (?offload=vnet)
        self.counters = LinkCounters()
        self.closed = False

    def send_frames(self, frames: list[bytes]) -> None:
        raise NotImplementedError

    def _close_transport(self) -> None:
        raise NotImplementedError

    def close(self, reason: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        if reason:
            self.counters.errors[reason.split(":")[0]] = (
                self.counters.errors.get(reason.split(":")[0], 0) + 1
            )
        try:
            self._close_transport()
        finally:
            self.sink.link_closed(self, reason)

    def _delivered(self, frames: list[bytes]) -> None:
        c = self.counters
        c.frames_in += len(frames)
        c.bytes_in += sum(map(len, frames))
        self.sink.link_frames(self, frames)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} port={self.port}>"
