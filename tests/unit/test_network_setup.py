"""guestd/network_setup.py: the vsock bridge to the gRPC socket (a unix listener stands in
for AF_VSOCK: nothing here connects to a vsock CID) and the vsock listener's bind."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile

import pytest

from netferry.guestd import network_setup as ns
from netferry.uri import parse_link_uri
from tests.unit.helpers import unix_echo


def test_guest_bridge_pipes_to_the_grpc_socket() -> None:
    """network-setup's vsock bridge, with a unix listener standing in for AF_VSOCK."""

    async def main() -> None:
        d = tempfile.mkdtemp(prefix="nf-br-")
        target, front = os.path.join(d, "t.sock"), os.path.join(d, "f.sock")
        echo = await unix_echo(target)
        lsock = socket.socket(socket.AF_UNIX)
        lsock.bind(front)
        lsock.listen()
        lsock.setblocking(False)
        bridge = ns.Bridge(lsock, target)
        await bridge.start()
        try:
            r, w = await asyncio.open_unix_connection(front)
            w.write(b"x" * 200000)
            got = await asyncio.wait_for(r.readexactly(200000), 5)
            assert got == b"x" * 200000 and bridge.connections == 1
            w.close()
        finally:
            bridge.close()
            echo.close()
            for p in (target, front):
                os.unlink(p)
            os.rmdir(d)

    asyncio.run(main())


def test_vsock_listener_binds_without_connecting() -> None:
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("no AF_VSOCK in this Python")
    try:
        s = ns.vsock_listener(parse_link_uri(f"vsock://:{40000 + os.getpid() % 20000}"))
    except OSError as e:
        pytest.skip(f"vsock not available here ({e})")
    assert s.family == socket.AF_VSOCK
    s.close()
