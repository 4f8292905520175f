"""`host-switch`: the hostd daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import signal
import sys
from collections.abc import Callable

import structlog

from hostd.config import (
    DEFAULT_SUBNET,
    MAX_MTU,
    MIN_MTU,
    NetworkConfig,
    parse_address,
    parse_dhcp_range,
    parse_subnet,
)
from hostd.services.dhcp import parse_static_lease
from hostd.services.dns import parse_record_spec, parse_upstream, upstreams_from_resolv_conf
from hostd.stack.ethernet import parse_mac
from netferry.log import add_logging_arguments, configure_logging
from netferry.uri import parse_link_uri

log = structlog.get_logger("hostd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="host-switch",
        description="netferry's host switch: a userspace network for VMs and namespaces.",
    )
    p.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="URI",
        help="link endpoint (repeatable): unix:///path, tcp://host:port, unixpacket:///path, "
        "unixgram:///path, vsock://[CID]:PORT, fd://N, stdio://; streams take "
        "?framing=len32be|len16le",
    )
    net = p.add_argument_group("network")
    net.add_argument("--subnet", default=DEFAULT_SUBNET, help="IPv4 subnet (default %(default)s)")
    net.add_argument("--gateway-mac", default="5a:94:ef:e4:0c:dd")
    net.add_argument("--gateway-ip", metavar="IP", help="the gateway's address (default: .1)")
    net.add_argument(
        "--host-ip",
        metavar="IP",
        help="the address that reaches the host's 127.0.0.1 (default: .254); may equal "
        "--gateway-ip, as in slirp4netns's plan",
    )
    net.add_argument(
        "--dns-ip", metavar="IP", help="the DNS server's address (default: the gateway's)"
    )
    net.add_argument(
        "--guest-ip", metavar="IP", help="the default guest's static lease address (default: .2)"
    )
    net.add_argument(
        "--dhcp-range",
        metavar="FIRST-LAST",
        help="dynamic DHCP pool, inclusive (default: .3 to broadcast-2)",
    )
    net.add_argument(
        "--mtu", type=int, default=1500, help=f"guest MTU, {MIN_MTU}..{MAX_MTU} (default 1500)"
    )
    net.add_argument(
        "--static-lease",
        action="append",
        default=[],
        metavar="MAC=IP",
        help="fixed DHCP lease (repeatable; default 5a:94:ef:e4:0c:ee=.2)",
    )
    net.add_argument("--lease-time", type=int, default=3600, metavar="SECONDS")
    net.add_argument(
        "--no-host-loopback",
        action="store_true",
        help="refuse traffic to the host-loopback address (.254 → 127.0.0.1)",
    )
    dns = p.add_argument_group("dns")
    dns.add_argument(
        "--dns-upstream",
        action="append",
        default=[],
        metavar="ADDR[:PORT]",
        help="resolver for names outside the local zones (repeatable; default: the host's "
        "/etc/resolv.conf)",
    )
    dns.add_argument(
        "--dns-record",
        action="append",
        default=[],
        metavar="NAME=TYPE:VALUE",
        help="static record, e.g. db.containers.internal=A:192.168.127.2 (repeatable)",
    )
    dns.add_argument("--dns-search", action="append", default=[], metavar="DOMAIN")
    lim = p.add_argument_group("limits")
    lim.add_argument("--udp-idle-timeout", type=float, default=90.0, metavar="SECONDS")
    lim.add_argument("--udp-max-flows", type=int, default=4096)
    lim.add_argument("--icmp-idle-timeout", type=float, default=30.0, metavar="SECONDS")
    lim.add_argument("--icmp-max-flows", type=int, default=1024)
    lim.add_argument(
        "--tcp-connect-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give up a host dial after this long; the guest gets ICMP host unreachable",
    )
    lim.add_argument(
        "--tcp-max-pending",
        type=int,
        default=1024,
        help="host dials in progress at once; beyond it the oldest dial is abandoned",
    )
    lim.add_argument("--tcp-time-wait", type=float, default=60.0, metavar="SECONDS")
    lim.add_argument(
        "--tcp-ack-delay",
        type=float,
        default=0.002,
        metavar="SECONDS",
        help="how long an ACK for a small guest segment may wait to ride on the reply "
        "(delayed ACK, at most 0.2; 0: at once)",
    )
    p.add_argument("--pcap", metavar="FILE", help="write every frame through the switch here")
    p.add_argument(
        "--event-loop",
        choices=("asyncio", "uvloop", "auto"),
        default="asyncio",
        help="asyncio's own loop (default: as fast here, see bench/README.md), uvloop (must "
        "be installed), or auto: uvloop when installed",
    )
    p.add_argument(
        "--ready-fd",
        type=int,
        metavar="N",
        help="write 'ready' to fd N (then close it) once every link and the API listen",
    )
    api = p.add_argument_group("api")
    api.add_argument(
        "--api",
        metavar="URI",
        help="HostSwitch gRPC API: unix:///path (created 0600) or tcp://HOST:PORT; 'none' "
        "disables it (default: unix:///run/netferry/hostd.sock as root, else "
        "$XDG_RUNTIME_DIR/netferry/hostd.sock)",
    )
    api.add_argument(
        "--port-forward",
        action="append",
        default=[],
        metavar="[tcp:|udp:|unix:]LOCAL=REMOTE",
        help="static forward at start, e.g. 127.0.0.1:2222=192.168.127.2:22 (repeatable)",
    )
    guest = p.add_argument_group("guests")
    guest.add_argument(
        "--guest",
        action="append",
        default=[],
        metavar="URI",
        help="handshake with network-setup at unix:///path or vsock://CID:PORT (repeatable); "
        "redone when the guest's data link drops",
    )
    guest.add_argument(
        "--guest-data",
        metavar="URI",
        help="data address offered to guests (default: the first unix/tcp/vsock --listen)",
    )
    add_logging_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> NetworkConfig:
    subnet = parse_subnet(args.subnet)
    static = dict(parse_static_lease(s) for s in args.static_lease)
    if args.dns_upstream:
        upstreams = [parse_upstream(u) for u in args.dns_upstream]
    else:
        upstreams = upstreams_from_resolv_conf()

    def address(value: str | None, what: str) -> ipaddress.IPv4Address | None:
        return None if value is None else parse_address(value, what)

    return NetworkConfig(
        subnet=subnet,
        gateway_ip=address(args.gateway_ip, "--gateway-ip"),  # type: ignore[arg-type]
        host_ip=address(args.host_ip, "--host-ip"),  # type: ignore[arg-type]
        dns_ip=address(args.dns_ip, "--dns-ip"),  # type: ignore[arg-type]
        guest_ip=address(args.guest_ip, "--guest-ip"),  # type: ignore[arg-type]
        dhcp_range=parse_dhcp_range(args.dhcp_range) if args.dhcp_range else None,
        gateway_mac=parse_mac(args.gateway_mac),
        mtu=args.mtu,
        host_loopback=not args.no_host_loopback,
        static_leases=static,
        dns_upstreams=upstreams,
        dns_search=list(args.dns_search),
        udp_idle_timeout=args.udp_idle_timeout,
        udp_max_flows=args.udp_max_flows,
        icmp_idle_timeout=args.icmp_idle_timeout,
        icmp_max_flows=args.icmp_max_flows,
        lease_time=args.lease_time,
        tcp_connect_timeout=args.tcp_connect_timeout,
        tcp_max_pending=args.tcp_max_pending,
        tcp_time_wait=args.tcp_time_wait,
        tcp_ack_delay=args.tcp_ack_delay,
    )


def parse_port_forward(spec: str) -> tuple[str, str, str]:
    """'[tcp:|udp:|unix:]LOCAL=REMOTE' → (protocol, local, remote)."""
    protocol = "tcp"
    for prefix in ("tcp:", "udp:", "unix:"):
        if spec.startswith(prefix):
            protocol, spec = prefix[:-1], spec[len(prefix) :]
            break
    local, sep, remote = spec.rpartition("=")
    if not sep or not local or not remote:
        raise ValueError(f"--port-forward {spec!r}: expected [tcp:|udp:|unix:]LOCAL=REMOTE")
    return protocol, local, remote


async def run(args: argparse.Namespace, config: NetworkConfig) -> int:
    from hostd.api.server import ApiServer, default_api_path
    from hostd.forwards import ForwardError
    from hostd.switch import HostSwitch

    switch = HostSwitch(config, pcap_path=args.pcap)
    for spec in args.dns_record:
        zone, record = parse_record_spec(spec, switch.network.zones)
        switch.network.zones.add_records(zone, [record])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def dump_stats() -> None:
        if switch.pcap is not None:
            switch.pcap.flush()
        log.info("hostd.stats", stats=switch.stats())

    loop.add_signal_handler(signal.SIGUSR1, dump_stats)  # `kill -USR1`: stats to the log
    api: ApiServer | None = None
    guests = None
    try:
        for uri in args.listen:
            await switch.listen(parse_link_uri(uri))
        if args.api != "none":
            api = ApiServer(switch, args.api or f"unix://{default_api_path()}")
            await api.start()
        for spec in args.port_forward:
            protocol, local, remote = parse_port_forward(spec)
            await switch.forwards.expose(protocol, local, remote)
        from hostd.guests import GuestManager

        guests = GuestManager.from_args(switch, args)
        if guests is not None:
            guests.start()
    except (OSError, ForwardError) as e:
        log.error("startup.failed", error=str(e))
        if api is not None:
            await api.stop()
        await switch.close()
        return 1
    if args.ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)
    log.info(
        "hostd.ready",
        subnet=str(config.subnet),
        gateway=str(config.gateway_ip),
        host_loopback=str(config.host_ip) if config.host_loopback else "refused",
        dns=str(config.dns_ip),
        mtu=config.mtu,
        dns_upstreams=[f"{h}:{p}" for h, p in config.dns_upstreams],
    )
    await stop.wait()
    log.info("hostd.stopping", stats=switch.stats())
    if guests is not None:
        await guests.stop()
    if api is not None:
        await api.stop()
    await switch.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_format, "debug" if args.debug else "info", args.log_file)
    if not args.listen:
        parser.error("at least one --listen URI is required")
    try:
        for uri in args.listen:
            parse_link_uri(uri)
        config = config_from_args(args)
        for spec in args.dns_record:
            parse_record_spec(spec)
        for spec in args.port_forward:
            parse_port_forward(spec)
        from hostd.guests import validate_args

        validate_args(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        loop_factory = event_loop_factory(args.event_loop)
    except ImportError as e:
        parser.error(f"--event-loop uvloop: {e}")
    with contextlib.suppress(KeyboardInterrupt):
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            profile_to = os.environ.get("NETFERRY_HOSTD_CPROFILE")
            if profile_to:  # bench/README.md: call counts that py-spy's samples lack
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
                try:
                    return runner.run(run(args, config))
                finally:
                    profiler.disable()
                    profiler.dump_stats(profile_to)
            return runner.run(run(args, config))
    return 130


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop (libuv) when asked for or, with "auto", when installed; None: asyncio's own."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    sys.exit(main())
