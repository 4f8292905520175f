"""The one error type of the control core, whichever front end (gRPC, HTTP, slirp4netns API)
asked: `kind` says what went wrong and each front end maps it to its own status."""

from __future__ import annotations

KINDS = ("invalid_argument", "already_exists", "not_found", "permission_denied", "unavailable")


class ControlError(Exception):
    """A request the control core cannot carry out; the message names the field or holder."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        assert kind in KINDS, kind
        self.kind = kind
