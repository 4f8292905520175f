"""Tap devices and link set-up inside the guest's namespace (pyroute2 for netlink)."""

from __future__ import annotations

import fcntl
import os
import struct

from pyroute2 import AsyncIPRoute

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


class TapError(OSError):
    pass


TAP_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6


def set_tap_offload(fd: int, on: bool) -> None:
    """Turn the tap's checksum/TSO offload on or off (the fd must have IFF_VNET_HDR)."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, TAP_OFFLOADS if on else 0)


def open_tap(name: str, vnet_hdr: bool = False, offload: bool = True) -> int:
    """Create (or attach to) tap `name`; returns a non-blocking fd. The device lives as long
    as the fd unless it was made persistent by someone else."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TapError(
            "/dev/net/tun does not exist: load the tun module (modprobe tun) or create the "
            "node (mknod /dev/net/tun c 10 200)"
        ) from None
    except PermissionError:
        raise TapError(
            "/dev/net/tun is not accessible: most distributions ship it mode 0666 "
            "(chmod 0666 /dev/net/tun)"
        ) from None
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        if vnet_hdr and offload:
            # The guest kernel may then hand us unsummed TCP/UDP and 64 KiB TCP segments
            # (TSO), and takes the same from us: per-packet cost drops by the MSS ratio.
            fcntl.ioctl(fd, TUNSETOFFLOAD, TAP_OFFLOADS)
    except OSError as e:
        os.close(fd)
        raise TapError(f"cannot create tap {name!r}: {e.strerror}") from None
    return fd


async def configure_link(name: str, mac: str | None, mtu: int) -> int:
    """Set MAC and MTU, bring `lo` and `name` up; returns the interface index."""
    async with AsyncIPRoute() as ipr:
        lo = await ipr.link_lookup(ifname="lo")
        if lo:
            await ipr.link("set", index=lo[0], state="up")
        idx = (await ipr.link_lookup(ifname=name))[0]
        if mac:
            await ipr.link("set", index=idx, address=mac)
        await ipr.link("set", index=idx, mtu=mtu)
        await ipr.link("set", index=idx, state="up")
        return idx


async def set_mtu(name: str, mtu: int) -> None:
    async with AsyncIPRoute() as ipr:
        await ipr.link("set", index=(await ipr.link_lookup(ifname=name))[0], mtu=mtu)
