"""`netferry-slirp4netns`: slirp4netns's command line, address plan and API socket on netferry.

rootlesskit (`--slirp4netns-binary`), podman (`network_cmd_path` in containers.conf) and
AutoHCK start slirp4netns as an external program; pointed at this one they get netferry:

    netferry-slirp4netns [OPTIONS] PID|PATH [TAPNAME]

1. A helper (`netferry.nstap`) enters the namespaces of PID (or `--netns-type=path` PATH and
   `--userns-path`) with nsenter, attaches to tap TAPNAME or creates it, configures it only
   with `-c`, hands the fd out over SCM_RIGHTS and exits.
2. This process runs hostd's switch in-process on that fd (`tapfd://`, with virtio-net
   offload when the kernel allows it) with slirp4netns's plan: guest .100, gateway and host
   loopback .2 (→ 127.0.0.1 unless `--disable-host-loopback`), DNS .3, DHCP .15-.30, of
   10.0.2.0/24 or `--cidr`; and the JSON API on `--api-socket` (`hostd.api.slirp`).
   With `--enable-ipv6` (only then, as slirp4netns) IPv6 too, with slirp4netns's plan:
   fd00::/64 announced in router advertisements (guests configure themselves by SLAAC, as
   with slirp4netns `-c`), gateway and host loopback ::2 (→ ::1 unless
   `--disable-host-loopback`), DNS ::3; DHCPv6 besides (::100 for the default MAC). Where
   this differs from libslirp's IPv6 (README, "netferry-slirp4netns"): the RA comes from
   the gateway's EUI-64 link-local (libslirp: fe80::2) with M and O set because DHCPv6
   serves addresses (libslirp: neither, information requests only), RDNSS names ::3 always
   (libslirp: only when the host has an IPv6 resolver); the API's `add_hostfwd` stays
   IPv4-only, as slirp4netns 1.2.0's (an IPv6 `host_addr` is `bad arguments.host_addr`);
   IPv6 forwards go through `--api` (gRPC).
3. `1` on the ready fd once all that serves; it ends with exit 0 when the exit fd closes, on
   SIGTERM or SIGINT (or if the tap fails), removing the API socket. As with slirp4netns,
   the tap fd keeps the namespace alive: callers end us (rootlesskit with SIGKILL, podman
   by closing the exit fd). There is no child to leave behind after a SIGKILL: the helper
   is gone by then (and dies with us if not), and a tap we created goes with our fd. A
   socket file left by a SIGKILL is replaced by the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import structlog

from netferry.log import configure_logging

log = structlog.get_logger("netferry.slirp4netns")

SLIRP4NETNS_VERSION = "1.2.0"  # the version whose command line and API this follows
DEFAULT_CIDR = "10.0.2.0/24"
MAX_SLIRP_MTU = 65521
HOSTD_MAX_MTU = 65520
HOSTD_MIN_MTU = 576


class Slirp4netnsError(Exception):
    """Something users must fix; printed as `netferry-slirp4netns: ...`, exit 1."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"netferry-slirp4netns: {message}\n")  # slirp4netns exits 1 on bad usage


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="netferry-slirp4netns",
        usage="netferry-slirp4netns [OPTION]... PID|PATH [TAPNAME]",
        description="User-mode networking for unprivileged network namespaces: slirp4netns's "
        "command line and API socket, served by netferry.",
        add_help=False,
        allow_abbrev=False,  # slirp4netns's getopt takes no abbreviations of long options
    )
    o = p.add_argument
    o("-c", "--configure", action="store_true", help="bring up and configure TAPNAME")
    o("-e", "--exit-fd", type=int, metavar="FD", help="exit when FD is closed")
    o("-r", "--ready-fd", type=int, metavar="FD", help="write '1' to FD and close it when ready")
    o("-m", "--mtu", type=int, default=1500, metavar="MTU", help="MTU (default 1500, max 65521)")
    o("--cidr", default=DEFAULT_CIDR, metavar="CIDR", help=f"network (default {DEFAULT_CIDR})")
    o(
        "--disable-host-loopback",
        "--no-host-loopback",
        action="store_true",
        help="refuse connections to the host's 127.0.0.1 through the gateway (.2)",
    )
    o("--netns-type", choices=("pid", "path"), default="pid", help="pid (default) or path")
    o("--userns-path", metavar="PATH", help="user namespace to join (with --netns-type=path)")
    o("-a", "--api-socket", metavar="PATH", help="serve the JSON API on this unix socket")
    o(
        "--enable-sandbox",
        "--create-sandbox",
        action="store_true",
        help="once serving: no new privileges, capabilities dropped (no private mount "
        "namespace yet)",
    )
    o(
        "--enable-seccomp",
        action="store_true",
        help="once serving: hostd's seccomp deny list (ptrace, mount, namespaces, modules, "
        "bpf, ... refused with EPERM)",
    )
    o("--disable-dns", action="store_true", help="no forwarding of other names from .3")
    o("--macaddress", metavar="MAC", help="the tap's MAC address (with --configure)")
    o(
        "--outbound-addr",
        metavar="IPv4|IFNAME",
        help="accepted; not honoured: outbound sockets are not bound (warning)",
    )
    o("--outbound-addr6", metavar="IPv6|IFNAME", help="accepted; not honoured (warning)")
    o(
        "-6",
        "--enable-ipv6",
        action="store_true",
        help="serve IPv6: fd00::/64 by router advertisements (SLAAC), gateway and host ::2, "
        "DNS ::3",
    )
    o(
        "--target-type",
        choices=("netns", "bess"),
        default="netns",
        help="netns (default), or bess: serve a User-Mode-Linux bess socket at PATH",
    )
    o("-h", "--help", action="help", help="show this help and exit")
    o("-v", "--version", action="store_true", help="show version and exit")
    ext = p.add_argument_group("netferry's own options")
    ext.add_argument(
        "--dns-upstream",
        action="append",
        default=[],
        metavar="ADDR[:PORT]",
        help="resolver for .3 (repeatable; default: the host's /etc/resolv.conf)",
    )
    ext.add_argument(
        "--api",
        metavar="URI",
        help="also serve netferry's HostSwitch gRPC API (unix:///path): the same forwards",
    )
    ext.add_argument("--log-format", choices=["console", "json"], default="console")
    ext.add_argument("--log-file", metavar="PATH", help="append logs here instead of stderr")
    ext.add_argument("--debug", action="store_true", help="debug-level logs")
    p.add_argument("target", nargs="?", metavar="PID|PATH")
    p.add_argument("tapname", nargs="?", default="tap0", metavar="TAPNAME")
    return p


def version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        NETFERRY_VERSION = version("netferry")
    except PackageNotFoundError:
        NETFERRY_VERSION = "unknown"
    return (
        f"netferry-slirp4netns version {NETFERRY_VERSION}\n"
        f"slirp4netns-compatible: {SLIRP4NETNS_VERSION}\n"
        f"libslirp: none (netferry's own stack)\n"
        f"SLIRP_CONFIG_VERSION_MAX: 4\n"
    )


# ---- the address plan ---------------------------------------------------------------------


def parse_cidr(text: str) -> ipaddress.IPv4Network:
    """slirp4netns's rules: a network address, prefix 1..25 (the guest is network + 100)."""
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError:
        raise Slirp4netnsError(f"invalid CIDR: {text}") from None
    if iface.ip != iface.network.network_address:
        raise Slirp4netnsError(f"CIDR needs to be a network address like 10.0.2.0/24: {text}")
    if not 1 <= iface.network.prefixlen <= 25:
        raise Slirp4netnsError(f"prefix length needs to be 1-25: {text}")
    return iface.network


def network_config(args: argparse.Namespace, mtu: int):  # -> hostd.config.NetworkConfig
    from netferry.hostd.config import NetworkConfig, slirp4netns_plan6
    from netferry.hostd.services.dns import parse_upstream, upstreams_from_resolv_conf

    net = parse_cidr(args.cidr)
    base = net.network_address
    if args.disable_dns:
        upstreams: list[tuple[str, int]] = []
    elif args.dns_upstream:
        upstreams = [parse_upstream(u) for u in args.dns_upstream]
    else:
        upstreams = upstreams_from_resolv_conf()
    return NetworkConfig(
        subnet=net,
        mtu=mtu,
        gateway_ip=base + 2,
        host_ip=base + 2,
        dns_ip=base + 3,
        guest_ip=base + 100,
        dhcp_range=(base + 15, base + 30),
        host_loopback=not args.disable_host_loopback,
        dns_upstreams=upstreams,
        # slirp4netns's IPv6 plan (fd00::/64: guest ::100, gateway and host ::2, DNS ::3),
        # served only with --enable-ipv6, as slirp4netns does.
        ipv6=bool(args.enable_ipv6),
        **slirp4netns_plan6(),  # type: ignore[arg-type]
    )


def effective_mtu(mtu: int) -> int:
    if not 0 < mtu <= MAX_SLIRP_MTU:
        raise Slirp4netnsError(f"MTU must be a positive integer (< {MAX_SLIRP_MTU + 1})")
    if mtu < HOSTD_MIN_MTU:
        raise Slirp4netnsError(f"MTU {mtu}: netferry needs at least {HOSTD_MIN_MTU}")
    return min(mtu, HOSTD_MAX_MTU)


def check_args(args: argparse.Namespace) -> None:
    if args.target is None:
        raise Slirp4netnsError("PID|PATH is required (see --help)")
    if args.target_type == "bess":
        if args.configure or args.userns_path or args.netns_type != "pid":
            raise Slirp4netnsError(
                "--target-type=bess conflicts with --configure, --netns-type and --userns-path"
            )
        return
    if args.netns_type == "pid" and not args.target.isdigit():
        raise Slirp4netnsError(f"PID must be a number (or use --netns-type=path): {args.target}")
    if args.netns_type == "pid" and args.userns_path:
        raise Slirp4netnsError("--userns-path needs --netns-type=path")
    if args.macaddress and not args.configure:
        raise Slirp4netnsError("--macaddress needs --configure")
    if args.macaddress:
        from netferry.hostd.stack.ethernet import parse_mac

        try:
            parse_mac(args.macaddress)
        except ValueError:
            raise Slirp4netnsError(f"bad --macaddress: {args.macaddress}") from None
    for fd, name in ((args.ready_fd, "--ready-fd"), (args.exit_fd, "--exit-fd")):
        if fd is not None:
            try:
                os.fstat(fd)
            except OSError:
                raise Slirp4netnsError(f"{name} {fd}: not an open file descriptor") from None


def warn_unhonoured(args: argparse.Namespace) -> None:
    if args.enable_sandbox:
        log.info(
            "slirp4netns.sandbox",
            flag="--enable-sandbox",
            note="netferry's: no new privileges and capabilities dropped once serving; no "
            "private mount namespace (slirp4netns's pivot_root) yet",
        )
    if args.outbound_addr or args.outbound_addr6:
        log.warning("slirp4netns.outbound_addr_not_honoured", note="outbound sockets unbound")


# ---- the tap, from inside the target's namespaces -----------------------------------------


def nsenter_prefix(args: argparse.Namespace) -> list[str]:
    if args.netns_type == "path":
        cmd = ["nsenter", f"--net={args.target}"]
        if args.userns_path:
            cmd[1:1] = [f"--user={args.userns_path}", "--preserve-credentials"]
        return cmd
    pid = int(args.target)
    try:
        own_userns = os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    except OSError as e:
        raise Slirp4netnsError(f"cannot inspect process {pid}: {e.strerror}") from None
    cmd = ["nsenter", f"--target={pid}", "--net"]
    if own_userns:
        cmd[2:2] = ["--user", "--preserve-credentials"]
    return cmd


def die_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def acquire_tap(args: argparse.Namespace, config, mtu: int) -> tuple[int, bool]:
    """(tap fd, offload) from the helper in the target's namespaces."""
    if shutil.which("nsenter") is None:
        raise Slirp4netnsError("nsenter (util-linux) is not installed")
    channel, inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    cmd = [
        *nsenter_prefix(args),
        "--",
        sys.executable,
        "-m",
        "netferry.nstap",
        "--channel-fd",
        str(inner.fileno()),
        "--tap",
        args.tapname,
        "--mtu",
        str(mtu),
        "--offload",
    ]
    if args.configure:
        prefix = config.subnet.prefixlen
        cmd += ["--configure", f"{config.guest_ip}/{prefix}", "--gateway", str(config.gateway_ip)]
        if args.macaddress:
            cmd += ["--mac", args.macaddress]
    try:
        helper = subprocess.Popen(
            cmd,
            pass_fds=(inner.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
    finally:
        inner.close()
    try:
        channel.settimeout(30)
        try:
            msg, fds, _, _ = socket.recv_fds(channel, 16, 1)
        except TimeoutError:
            helper.kill()
            raise Slirp4netnsError("the namespace did not hand over its tap within 30 s") from None
    finally:
        channel.close()
        _, err = helper.communicate(timeout=30)
    if not fds:
        why = err.decode(errors="replace").strip() or f"helper exited {helper.returncode}"
        raise Slirp4netnsError(why.removeprefix("netferry-slirp4netns: "))
    return fds[0], msg == b"vnet"


# ---- serving ------------------------------------------------------------------------------


async def serve(args: argparse.Namespace, config, link_uri: str) -> int:
    from netferry.hostd.api.slirp import SlirpApi, SlirpApiError
    from netferry.hostd.control import Control
    from netferry.hostd.switch import HostSwitch
    from netferry.uri import parse_link_uri

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    switch = HostSwitch(config)
    control = Control(switch)
    api: SlirpApi | None = None
    grpc_api = None

    def on_event(kind: str, fields: dict) -> None:
        if kind == "link_down" and args.target_type == "netns" and not stop.is_set():
            log.info("slirp4netns.tap_gone", reason=fields.get("reason"))
            stop.set()  # the namespace ended: nothing left to serve

    switch.event_listeners.append(on_event)
    try:
        await switch.listen(parse_link_uri(link_uri))
        if args.api_socket:
            api = SlirpApi(control, args.api_socket)
            await api.start()
        if args.api:
            from netferry.hostd.api.server import ApiServer

            grpc_api = ApiServer(control, args.api)
            await grpc_api.start()
    except (OSError, ValueError, SlirpApiError) as e:
        if api is not None:
            await api.stop()
        await switch.close()
        raise Slirp4netnsError(str(e)) from None

    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            os._exit(0)  # a second signal while stopping: at once (the socket may remain)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    if args.exit_fd is not None:

        def on_exit_fd() -> None:
            try:
                data = os.read(args.exit_fd, 4096)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(args.exit_fd)
                stop.set()

        loop.add_reader(args.exit_fd, on_exit_fd)
    if args.enable_sandbox or args.enable_seccomp:
        from netferry.hostd.privileges import drop_privileges

        try:  # after the tap, the sockets and the namespaces' helper: nothing needs them now
            drop_privileges(sandbox=args.enable_seccomp)
        except OSError as e:
            raise Slirp4netnsError(f"--enable-seccomp: {e.strerror or e}") from None
    if args.ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, b"1")
            os.close(args.ready_fd)
    log.info(
        "slirp4netns.ready",
        target=args.target,
        tap=args.tapname,
        link=link_uri,
        cidr=str(config.subnet),
        gateway=str(config.gateway_ip),
        dns=str(config.dns_ip),
        guest=str(config.guest_ip),
        ipv6=(
            {
                "prefix": str(config.subnet6),
                "gateway": str(config.gateway6),
                "dns": str(config.dns6),
                "guest": str(config.guest6),
            }
            if config.ipv6
            else "off"
        ),
        host_loopback=config.host_loopback,
        mtu=config.mtu,
        api_socket=args.api_socket,
    )
    await stop.wait()
    log.info("slirp4netns.stopping", stats=switch.stats())
    if api is not None:
        await api.stop()
    if grpc_api is not None:
        await grpc_api.stop()
    await switch.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        sys.stdout.write(version_text())
        return 0
    configure_logging(args.log_format, "debug" if args.debug else "info", args.log_file)
    tap_fd: int | None = None
    try:
        check_args(args)
        mtu = effective_mtu(args.mtu)
        if mtu != args.mtu:
            log.warning("slirp4netns.mtu_clamped", asked=args.mtu, mtu=mtu)
        try:
            config = network_config(args, mtu)
        except ValueError as e:
            raise Slirp4netnsError(str(e)) from None
        warn_unhonoured(args)
        if args.target_type == "bess":
            link_uri = f"unixpacket://{Path(args.target).absolute()}"
        else:
            tap_fd, offload = acquire_tap(args, config, mtu)
            link_uri = f"tapfd://{tap_fd}" + ("?offload=vnet" if offload else "")
        with contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(serve(args, config, link_uri))
        return 0
    except Slirp4netnsError as e:
        print(f"netferry-slirp4netns: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
