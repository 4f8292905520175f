"""A socket created inside a network namespace the test made: sans-IO cores are fed from the
test process itself, with no daemon in between (a socket keeps its namespace for life)."""

from __future__ import annotations

import ctypes
import os
import socket

from tests.conftest import Netns

CLONE_NEWNET = 0x40000000


def socket_in_netns(ns: Netns, *args: int) -> socket.socket:
    """A socket (default: UDP over IPv6) created inside `ns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns.name}")
        try:
            sock = socket.socket(*(args or (socket.AF_INET6, socket.SOCK_DGRAM)))
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)
    return sock
