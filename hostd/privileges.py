"""Less privilege once hostd is running (filled in below)."""

from __future__ import annotations


def drop_privileges(sandbox: bool = False) -> None:
    return None
