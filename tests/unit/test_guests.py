"""hostd/guests.py: the vsock dial bridge (a fake dialer over a unix socket stands in for
AF_VSOCK), the handshake's protocol version and the data addresses offered to guests."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile

import pytest

from netferry.guestd import network_setup as ns
from netferry.hostd import guests
from netferry.uri import parse_link_uri
from tests.unit.helpers import unix_echo


def test_hostd_vsock_dial_bridge_with_a_fake_dialer() -> None:
    async def main() -> None:
        d = tempfile.mkdtemp(prefix="nf-br-")
        target = os.path.join(d, "t.sock")
        echo = await unix_echo(target)

        def dial() -> socket.socket:  # stands in for AF_VSOCK connect((cid, port))
            s = socket.socket(socket.AF_UNIX)
            s.connect(target)
            return s

        bridge = guests.VsockDialBridge(3, 6669, dial)
        await bridge.start()
        try:
            assert oct(os.stat(bridge.path).st_mode & 0o777) == "0o600"
            r, w = await asyncio.open_unix_connection(bridge.path)
            w.write(b"hello")
            assert await asyncio.wait_for(r.readexactly(5), 5) == b"hello"
            w.close()
        finally:
            await bridge.close()
            echo.close()
            os.unlink(target)
            os.rmdir(d)
        assert not os.path.exists(bridge.dir)

    asyncio.run(main())


def test_versions_and_data_addresses() -> None:
    assert guests.PROTOCOL_VERSION == ns.PROTOCOL_VERSION
    listen = ["unixgram:///x/g.sock", "unix:///run/nf/link.sock?framing=len16le"]
    assert guests.offered_data_address(listen, None) == (
        "unix:///run/nf/link.sock?framing=len16le", "unix:///run/nf/link.sock?framing=len16le#",
    )  # fmt: skip
    assert guests.offered_data_address(["vsock://:1024"], None) == (
        "vsock://2:1024",
        "vsock://:1024#",
    )
    assert guests.offered_data_address(["unix:///a"], "vsock://2:1024") == ("vsock://2:1024", "")
    with pytest.raises(ValueError, match="needs a unix"):
        guests.offered_data_address(["unixgram:///x"], None)
    with pytest.raises(ValueError, match="CID"):
        guests.parse_guest_uri("vsock://:6669")
    with pytest.raises(ValueError, match="expected"):
        guests.parse_guest_uri("tcp://1.2.3.4:5")
    assert ns.fd_uri(parse_link_uri("unix:///p?framing=len16le")) == "fd://3?framing=len16le"
    assert ns.fd_uri(parse_link_uri("vsock://2:1024")) == "fd://3"
    # hostd did not offer virtio-net headers: vm-switch must not negotiate them
    assert ns.fd_uri(parse_link_uri("vsock://2:1024"), vnet_hdr=False) == "fd://3?offload=none"
    assert (
        ns.fd_uri(parse_link_uri("unix:///p?framing=len16le"), vnet_hdr=False)
        == "fd://3?framing=len16le&offload=none"
    )
    assert (
        parse_link_uri(ns.fd_uri(parse_link_uri("unix:///p?framing=len16le"))).framing == "len16le"
    )
