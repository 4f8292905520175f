"""A guest that speaks gvforwarder's wire, written from the facts in
shared/reference/peers-observed.md (not from gvforwarder's code): it connects to a unix
socket, writes the exact 85-byte `POST /connect` request, never reads a reply, and then
pumps frames between a tap device and the socket with a 2-byte little-endian length.

    python3 gvforwarder_peer.py SOCKET TAPNAME

Run inside a network namespace; the tap must exist (the test creates it with the guest's
MAC). Prints "connected" once the preface is written; exits when the socket closes.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import sys

PREFACE = (
    b"POST /connect HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\n"
    b"Content-Length: 0\r\n\r\n"
)
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def main() -> int:
    path, tap_name = sys.argv[1], sys.argv[2]
    assert len(PREFACE) == 85
    tap = open_tap(tap_name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(PREFACE)
    print("connected", flush=True)
    buf = bytearray()
    while True:
        readable, _, _ = select.select([tap, sock], [], [])
        if tap in readable:
            frame = os.read(tap, 65536)
            sock.sendall(struct.pack("<H", len(frame)) + frame)
        if sock in readable:
            data = sock.recv(1 << 20)
            if not data:
                return 0
            buf += data
            while len(buf) >= 2:
                (n,) = struct.unpack_from("<H", buf)
                if len(buf) < 2 + n:
                    break
                os.write(tap, bytes(buf[2 : 2 + n]))
                del buf[: 2 + n]


if __name__ == "__main__":
    sys.exit(main())
