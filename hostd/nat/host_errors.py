"""ICMP errors that host sockets hear, told to the guest whose flow they belong to.

A NAT flow's host socket (UDP, ping) has IP_RECVERR / IPV6_RECVERR on, so the kernel queues
every ICMP error about it with its details (`sock_extended_err`: origin, ICMP type and code,
and the MTU of a "packet too big" in `ee_info`) instead of reducing the hard ones to an errno
and dropping the soft ones (host unreachable, time exceeded, packet too big). `drain` reads
that queue (MSG_ERRQUEUE, bounded); `relay` sends each error to the guest about the packet
`quote` (the guest's IP header + the start of its datagram):
- an ICMPv6 error to a v6 guest goes as itself (`Network.send_icmp6_error`, type and code
  unchanged, the MTU of a packet too big);
- an ICMPv4 error to a v4 guest goes as itself (`Network.send_icmp_error`);
- anything else (a local error such as EMSGSIZE, or a failure that only has an errno:
  connect()/send() with ENETUNREACH on a host without a route) is mapped from the errno
  to an ICMPv4 type and code, which `Network.send_icmp_error` maps again for a v6 guest.

A queued error also makes the socket readable (EPOLLERR) and sets its pending error, which
the next recv()/send() returns once; callers drain the queue whenever those fail, or a
readable socket had nothing to read, so a queued error is told once and never spins the loop.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass
from typing import Protocol

from netferry.hostd.stack import icmp

SOL_IP = 0
SOL_IPV6 = 41
IP_RECVERR = 11
IPV6_RECVERR = 25
SO_EE_ORIGIN_LOCAL = 1
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
EXTENDED_ERR = struct.Struct("=IBBBBII")  # errno, origin, type, code, pad, info, data
DRAIN_MAX = 64  # errors read per call: a flood of them must not hold the loop

# ICMPv6 (RFC 4443) numbers, as `hostd/stack/icmpv6.py` has them.
ICMP6_DEST_UNREACHABLE = 1
ICMP6_PACKET_TOO_BIG = 2
ICMP6_TIME_EXCEEDED = 3
ICMP6_PARAM_PROBLEM = 4

# An errno that stands for an ICMP error (or a routing failure) → ICMPv4 type and code.
ERRNO_TO_ICMP: dict[int, tuple[int, int]] = {
    errno.ECONNREFUSED: (icmp.DEST_UNREACHABLE, icmp.PORT_UNREACHABLE),
    errno.ENETUNREACH: (icmp.DEST_UNREACHABLE, icmp.NET_UNREACHABLE),
    errno.EHOSTUNREACH: (icmp.DEST_UNREACHABLE, icmp.HOST_UNREACHABLE),
    errno.EADDRNOTAVAIL: (icmp.DEST_UNREACHABLE, icmp.HOST_UNREACHABLE),  # no source address
    errno.EAFNOSUPPORT: (icmp.DEST_UNREACHABLE, icmp.NET_UNREACHABLE),  # no IPv6 on the host
    errno.EACCES: (icmp.DEST_UNREACHABLE, icmp.ADMIN_PROHIBITED),  # a firewall's reject
    errno.EPERM: (icmp.DEST_UNREACHABLE, icmp.ADMIN_PROHIBITED),
    errno.ENOPROTOOPT: (icmp.DEST_UNREACHABLE, icmp.PROTO_UNREACHABLE),
    errno.EMSGSIZE: (icmp.DEST_UNREACHABLE, icmp.FRAG_NEEDED),
}


class ErrorSink(Protocol):
    """What `relay` needs of `Network`."""

    def send_icmp_error(
        self, src: bytes, dst: bytes, type_: int, code: int, quote: bytes, mtu: int = 0
    ) -> None: ...

    def send_icmp6_error(
        self, src: bytes, dst: bytes, type_: int, code: int, quote: bytes, param: int = 0
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class HostError:
    errno: int
    origin: int  # SO_EE_ORIGIN_*
    type: int
    code: int
    info: int  # the MTU of a "packet too big" / "fragmentation needed"


def enable_recverr(sock: socket.socket) -> None:
    """Queue ICMP errors about `sock` with their details (see the module docstring)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_RECVERR, 1)
    else:
        sock.setsockopt(SOL_IP, IP_RECVERR, 1)


def drain(sock: socket.socket) -> list[HostError]:
    """The errors queued on `sock` (at most DRAIN_MAX), oldest first."""
    v6 = sock.family == socket.AF_INET6
    level, kind = (SOL_IPV6, IPV6_RECVERR) if v6 else (SOL_IP, IP_RECVERR)
    errors: list[HostError] = []
    for _ in range(DRAIN_MAX):
        try:
            _data, ancdata, _flags, _addr = sock.recvmsg(0, 512, socket.MSG_ERRQUEUE)
        except OSError:  # EAGAIN: the queue is empty (or the socket is gone)
            break
        for cmsg_level, cmsg_type, cmsg_data in ancdata:
            if cmsg_level == level and cmsg_type == kind and len(cmsg_data) >= EXTENDED_ERR.size:
                err, origin, type_, code, _pad, info, _ = EXTENDED_ERR.unpack_from(cmsg_data)
                errors.append(HostError(err, origin, type_, code, info))
    return errors


def relay(sink: ErrorSink, src: bytes, guest: bytes, quote: bytes, error: HostError) -> bool:
    """Tell `guest` about `error` (from `src`, the flow's destination); False when it is
    nothing a guest would hear (an errno without an ICMP meaning)."""
    if not quote:
        return False
    if error.origin == SO_EE_ORIGIN_ICMP6 and len(guest) == 16:
        param = error.info if error.type in (ICMP6_PACKET_TOO_BIG, ICMP6_PARAM_PROBLEM) else 0
        sink.send_icmp6_error(src, guest, error.type, error.code, quote, param)
        return True
    if error.origin == SO_EE_ORIGIN_ICMP and len(guest) == 4:
        if error.type not in (icmp.DEST_UNREACHABLE, icmp.TIME_EXCEEDED):
            return False
        mtu = error.info if error.code == icmp.FRAG_NEEDED else 0
        sink.send_icmp_error(src, guest, error.type, error.code, quote, mtu)
        return True
    return relay_errno(sink, src, guest, quote, error.errno, error.info)


def relay_errno(
    sink: ErrorSink, src: bytes, guest: bytes, quote: bytes, err: int | None, mtu: int = 0
) -> bool:
    """Tell `guest` about a failure known only by its errno (see ERRNO_TO_ICMP)."""
    mapped = ERRNO_TO_ICMP.get(err) if err is not None else None
    if mapped is None or not quote:
        return False
    type_, code = mapped
    if code == icmp.FRAG_NEEDED and not mtu:
        return False  # a local "too big" without the size the guest should use
    sink.send_icmp_error(src, guest, type_, code, quote, mtu)
    return True
