"""The inside half of `netferry-slirp4netns`: runs in the target's namespaces (via nsenter),
opens the tap there and hands its fd out over SCM_RIGHTS, then exits.

It attaches to an existing tap of that name (rootlesskit makes `tap0` itself) or creates one,
which then lives as long as the fd netferry holds. With `--configure` it does what
`slirp4netns -c` does: `lo` up, the tap's MAC (if given) and MTU, the guest address, up, and
a default route via the gateway. Without it, it changes nothing in the namespace.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import os
import signal
import socket
import sys

PR_SET_PDEATHSIG = 1


def configure(name: str, mtu: int, mac: str | None, address: str, gateway: str) -> None:
    from pyroute2 import IPRoute

    iface = ipaddress.IPv4Interface(address)
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")
        if lo:
            ipr.link("set", index=lo[0], state="up")
        idx = ipr.link_lookup(ifname=name)[0]
        if mac:
            ipr.link("set", index=idx, address=mac)
        ipr.link("set", index=idx, mtu=mtu)
        ipr.addr("replace", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        ipr.link("set", index=idx, state="up")
        ipr.route("replace", dst="0.0.0.0/0", gateway=gateway, oif=idx)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netferry-nstap")
    p.add_argument("--channel-fd", type=int, required=True)
    p.add_argument("--tap", required=True)
    p.add_argument("--offload", action="store_true", help="virtio-net header + TSO/csum")
    p.add_argument("--configure", metavar="ADDRESS/PREFIX")
    p.add_argument("--gateway")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--mac")
    args = p.parse_args(argv)
    # Short-lived, but it must not outlive netferry-slirp4netns if that is killed meanwhile.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        return 1
    from netferry.guestd.tap import TapError, open_tap

    offload = args.offload
    try:
        try:
            fd = open_tap(args.tap, vnet_hdr=offload)
        except TapError:
            if not offload:
                raise
            offload = False  # a kernel or device without TSO for taps: plain frames
            fd = open_tap(args.tap)
        if args.configure:
            configure(args.tap, args.mtu, args.mac, args.configure, args.gateway)
    except Exception as e:  # TapError, pyroute2's NetlinkError, a lookup that found nothing
        what = "no such device" if isinstance(e, IndexError) else str(e)
        print(f"netferry-slirp4netns: tap {args.tap}: {what}", file=sys.stderr, flush=True)
        return 1
    with socket.socket(fileno=args.channel_fd) as channel:
        socket.send_fds(channel, [b"vnet" if offload else b"tap"], [fd])
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
