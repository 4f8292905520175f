"""The one error type of the control core, whichever front end (gRPC, HTTP, slirp4netns API)
asked: `kind` says what went wrong and each front end maps it to its own status."""

from __future__ import annotations

KINDS = ("invalid_argument", "already_exists", "not_found", "permission_denied", "unavailable")


MAX_MESSAGE = 400  # an error quoting a huge input would not fit a gRPC status (8 KiB)


def shorten(message: str, limit: int = MAX_MESSAGE) -> str:
    """`message` cut in the middle when long: the field (at the start) and the reason (at
    the end) stay, the quoted input in between is elided with its length."""
    if len(message) <= limit:
        return message
    head, tail = message[: limit // 2], message[-(limit // 3) :]
    return f"{head}...[{len(message) - len(head) - len(tail)} characters]...{tail}"


class ControlError(Exception):
    """A request the control core cannot carry out; the message names the field or holder."""

    def __init__(self, kind: str, message: str) -> None:
        message = shorten(message)
        super().__init__(message)
        assert kind in KINDS, kind
        self.kind = kind
