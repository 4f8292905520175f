"""`host-switch`: the hostd daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import re
import signal
import sys
from collections.abc import Callable

import structlog

from netferry.goflags import parse_args as parse_go_flags
from netferry.hostd.api.http import parse_http_api_uri
from netferry.hostd.config import (
    DEFAULT_SUBNET,
    DEFAULT_SUBNET6,
    MAX_MTU,
    MIN_MTU,
    NetworkConfig,
    parse_address,
    parse_dhcp_range,
    parse_subnet,
    parse_subnet6,
)
from netferry.hostd.errors import ControlError
from netferry.hostd.services.dhcp import parse_static_lease
from netferry.hostd.services.dns import (
    parse_record_spec,
    parse_upstream,
    upstreams_from_resolv_conf,
)
from netferry.hostd.stack.ethernet import parse_mac
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
        help="refuse traffic to the host-loopback addresses (.254 → 127.0.0.1, and "
        "IPv6 ::254 → ::1)",
    )
    net6 = p.add_argument_group("IPv6")
    net6.add_argument(
        "--subnet6",
        default=DEFAULT_SUBNET6,
        metavar="PREFIX",
        help="IPv6 prefix, a /64 (SLAAC needs 64-bit interface identifiers; default "
        "%(default)s). The plan: gateway ::1 (and its EUI-64 link-local, the source of "
        "router advertisements), host loopback ::254 → the host's ::1, DNS on the gateway, "
        "::2 by DHCPv6 for the default MAC, a DHCPv6 pool ::1000-::1fff, any address by SLAAC",
    )
    net6.add_argument(
        "--no-ipv6",
        action="store_true",
        help="serve no IPv6: no router advertisements, NDP or DHCPv6; IPv6 frames are "
        "dropped and counted (network.ipv6_dropped)",
    )
    net6.add_argument(
        "--ndp-max-neighbours",
        type=int,
        default=4096,
        metavar="N",
        help="guest IPv6 addresses the neighbour cache holds; beyond it the least recently "
        "used is evicted (ndp.evicted; default %(default)s)",
    )
    net6.add_argument(
        "--ndp-pending-packets",
        type=int,
        default=64,
        metavar="N",
        help="packets held for one guest IPv6 address while a neighbour solicitation asks "
        "for it; beyond it they are dropped (ndp_queue_dropped; default %(default)s)",
    )
    net6.add_argument(
        "--ndp-pending-addresses",
        type=int,
        default=256,
        metavar="N",
        help="unresolved guest IPv6 addresses with packets held at once; beyond it the "
        "oldest address's packets are dropped (default %(default)s)",
    )
    net6.add_argument(
        "--ra-interval",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="the longest wait between unsolicited router advertisements, 4..1800 (RFC 4861 "
        "MaxRtrAdvInterval; the shortest is a third of it, at least 3 s; default %(default)g)",
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
    dns.add_argument(
        "--dns-regexp",
        action="append",
        default=[],
        metavar="ZONE=IP=REGEXP",
        help="gvproxy's regexp record: names of ZONE (relative to it) that REGEXP matches "
        "resolve to IP, unless they have records of their own (repeatable)",
    )
    dns.add_argument(
        "--dns-default",
        action="append",
        default=[],
        metavar="ZONE=IP",
        help="gvproxy's DefaultIP: every other name of ZONE resolves to IP (repeatable)",
    )
    dns.add_argument("--dns-search", action="append", default=[], metavar="DOMAIN")
    lim = p.add_argument_group("limits")
    lim.add_argument("--udp-idle-timeout", type=float, default=90.0, metavar="SECONDS")
    lim.add_argument("--udp-max-flows", type=int, default=4096)
    lim.add_argument(
        "--flow-guest-share",
        type=float,
        default=0.5,
        metavar="FRACTION",
        help="the part of a full UDP or ICMP flow table beyond which a guest's new flow "
        "evicts its own least recently used flow, not another guest's (a guest is its "
        "switch port, IPv4 and IPv6 together)",
    )
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
    lim.add_argument(
        "--tcp-max-half-open",
        type=int,
        default=4096,
        help="guest connections in SYN_RECEIVED at once (dialling, or handshaking with the "
        "gateway's own services); beyond it new SYNs are refused with RST",
    )
    lim.add_argument(
        "--tcp-max-connections",
        type=int,
        default=65536,
        help="established guest connections at once; beyond it new SYNs are refused with RST",
    )
    lim.add_argument(
        "--tcp-port-share",
        type=float,
        default=0.5,
        metavar="FRACTION",
        help="the part of each TCP limit one switch port (guest link) may hold",
    )
    lim.add_argument("--tcp-time-wait", type=float, default=60.0, metavar="SECONDS")
    lim.add_argument(
        "--reassembly-max-bytes",
        type=int,
        default=4 << 20,
        metavar="BYTES",
        help="fragments IPv4 reassembly holds at once, and IPv6's as much again; beyond it "
        "the oldest partial datagram gives way (default %(default)s)",
    )
    lim.add_argument(
        "--reassembly-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a partial IPv4 or IPv6 datagram waits for its missing fragments "
        "(default %(default)g)",
    )
    lim.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="host sockets guests may hold at once: NAT connections and dials, UDP and ICMP "
        "flows, forwarded clients; beyond it new ones are refused (RST, ICMP unreachable) "
        "and counted (default: the descriptor limit, raised to the hard limit at start, less "
        "a reserve of an eighth, at least 256, that links, the API and DNS always have)",
    )
    lim.add_argument(
        "--max-connections-per-guest",
        type=int,
        metavar="N",
        help="of --max-connections, what one guest may hold: its switch port, IPv4 and IPv6 "
        "together (default: half)",
    )
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
        "--http-api",
        action="append",
        default=[],
        metavar="URI",
        help="gvproxy's HTTP API (/services/forwarder/*, /stats, /leases, /tunnel, ...) on "
        "unix:///path (created 0600) or tcp://HOST:PORT (repeatable); POST /connect there "
        "turns the connection into a link (2-byte LE frames, as gvforwarder); "
        "append ?connect=0 to refuse /connect (gvproxy's -services)",
    )
    api.add_argument(
        "--api-token-file",
        metavar="FILE",
        help="a TCP API (--api tcp://, --http-api tcp://) requires this token: clients send "
        "'authorization: Bearer TOKEN' (gRPC metadata) or 'Authorization: Bearer TOKEN' (HTTP); "
        "without it hostd refuses to serve an API on TCP",
    )
    api.add_argument(
        "--insecure-tcp-api",
        action="store_true",
        help="serve a TCP API without a token (what gvproxy does: anyone who can connect may "
        "drive hostd; a warning is logged); netferry-gvproxy sets it for -listen tcp://",
    )
    api.add_argument(
        "--guest-expose",
        choices=("self", "any", "off"),
        default="self",
        help="the forwarder API inside the network on the gateway's port 80: guests may "
        "expose ports that forward to themselves (self, default), to any guest (any), or "
        "the port is closed (off)",
    )
    api.add_argument(
        "--port-forward",
        action="append",
        default=[],
        metavar="[tcp:|udp:|unix:]LOCAL=REMOTE",
        help="static forward at start, e.g. 127.0.0.1:2222=192.168.127.2:22 (repeatable)",
    )
    pol = p.add_argument_group("outbound policy")
    pol.add_argument(
        "--allow",
        action="append",
        default=[],
        type=lambda text: ("allow", text),
        dest="policy",
        metavar="RULE",
        help="allow new guest flows to RULE = CIDR[:PORT[-PORT]][/tcp|udp|icmp] (IPv6 with "
        "ports in brackets: [2001:db8::/32]:443/tcp), or 'host' for the CIDR (every IPv4 and "
        "IPv6 address of this host, loopback included); rules are tried in the order given, "
        "first match wins, default allow; 0.0.0.0/0 matches both families, ::/0 IPv6 only "
        "(repeatable)",
    )
    pol.add_argument(
        "--deny",
        action="append",
        default=[],
        type=lambda text: ("deny", text),
        dest="policy",
        metavar="RULE",
        help="refuse new guest flows to RULE (TCP: RST; UDP, ICMP: ICMP administratively "
        "prohibited); also applies to DNS upstreams (repeatable)",
    )
    st = p.add_argument_group("state")
    st.add_argument(
        "--state-file",
        metavar="PATH",
        help="keep forwards, DNS changes, dynamic leases and policy rules made at run time "
        "here (written atomically on change and at exit, restored at start)",
    )
    st.add_argument(
        "--state-reset-on-error",
        action="store_true",
        help="a state file that cannot be read is moved aside to PATH.corrupt-TIME and hostd "
        "starts fresh (default: it refuses to start)",
    )
    priv = p.add_argument_group("privileges")
    priv.add_argument(
        "--sandbox",
        action="store_true",
        help="after start, apply a seccomp filter refusing dangerous system calls (ptrace, "
        "mount, kexec, bpf, module loading, ...) with EPERM",
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
    add_port_security_arguments(p)
    add_logging_arguments(p)
    return p


# ---- port security (issue 16.1) --------------------------------------------------------------


def add_port_security_arguments(p: argparse.ArgumentParser) -> None:
    sec = p.add_argument_group("port security")
    sec.add_argument(
        "--port-security",
        choices=("on", "off"),
        default="on",
        help="bind each port's source addresses to what DHCP (or first use) gave it, bound "
        "its MACs and refuse a MAC another port holds; off for setups that bridge other hosts "
        "through a port (default %(default)s)",
    )
    sec.add_argument(
        "--no-port-security",
        dest="port_security",
        action="store_const",
        const="off",
        help="same as --port-security off",
    )
    sec.add_argument(
        "--port-max-macs",
        type=int,
        default=64,
        metavar="N",
        help="source MACs one port may use (port security on; default %(default)s)",
    )
    sec.add_argument(
        "--port-max-leases",
        type=int,
        default=16,
        metavar="N",
        help="DHCP (and DHCPv6) offers and leases one port may hold, and addresses it may bind "
        "(0: no limit; default %(default)s)",
    )
    sec.add_argument(
        "--mac-age",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="a MAC unseen this long may be replaced or move to another port (default %(default)s)",
    )


def port_security_config(config: NetworkConfig, args: argparse.Namespace) -> NetworkConfig:
    for name in ("port_max_macs", "port_max_leases"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or more")
    if args.port_max_macs == 0 and args.port_security == "on":
        raise ValueError("--port-max-macs 0 leaves no MAC to a port: use --port-security off")
    if args.mac_age <= 0:
        raise ValueError("--mac-age must be positive")
    config.port_security = args.port_security == "on"
    config.port_max_macs = args.port_max_macs
    config.port_max_leases = args.port_max_leases
    config.mac_age = args.mac_age
    return config


def config_from_args(args: argparse.Namespace) -> NetworkConfig:
    subnet = parse_subnet(args.subnet)
    subnet6 = parse_subnet6_flag(args.subnet6)
    static = dict(parse_static_lease(s) for s in args.static_lease)
    if args.dns_upstream:
        upstreams = [parse_upstream(u) for u in args.dns_upstream]
    else:
        upstreams = upstreams_from_resolv_conf()

    def address(value: str | None, what: str) -> ipaddress.IPv4Address | None:
        return None if value is None else parse_address(value, what)

    config = NetworkConfig(
        subnet=subnet,
        gateway_ip=address(args.gateway_ip, "--gateway-ip"),  # type: ignore[arg-type]
        host_ip=address(args.host_ip, "--host-ip"),  # type: ignore[arg-type]
        dns_ip=address(args.dns_ip, "--dns-ip"),  # type: ignore[arg-type]
        guest_ip=address(args.guest_ip, "--guest-ip"),  # type: ignore[arg-type]
        dhcp_range=parse_dhcp_range(args.dhcp_range) if args.dhcp_range else None,
        gateway_mac=parse_mac(args.gateway_mac),
        mtu=args.mtu,
        host_loopback=not args.no_host_loopback,
        ipv6=not args.no_ipv6,
        subnet6=subnet6,
        static_leases=static,
        dns_upstreams=upstreams,
        dns_search=list(args.dns_search),
        udp_idle_timeout=args.udp_idle_timeout,
        udp_max_flows=args.udp_max_flows,
        flow_guest_share=args.flow_guest_share,
        icmp_idle_timeout=args.icmp_idle_timeout,
        icmp_max_flows=args.icmp_max_flows,
        reassembly_max_bytes=args.reassembly_max_bytes,
        reassembly_timeout=args.reassembly_timeout,
        ndp_max_neighbours=args.ndp_max_neighbours,
        ndp_pending_packets=args.ndp_pending_packets,
        ndp_pending_addresses=args.ndp_pending_addresses,
        ra_interval=args.ra_interval,
        lease_time=args.lease_time,
        tcp_connect_timeout=args.tcp_connect_timeout,
        tcp_max_pending=args.tcp_max_pending,
        tcp_max_half_open=args.tcp_max_half_open,
        tcp_max_connections=args.tcp_max_connections,
        tcp_port_share=args.tcp_port_share,
        tcp_time_wait=args.tcp_time_wait,
        tcp_ack_delay=args.tcp_ack_delay,
        max_connections=args.max_connections,
        max_connections_per_guest=args.max_connections_per_guest,
    )
    return port_security_config(config, args)


def parse_subnet6_flag(text: str) -> ipaddress.IPv6Network:
    """--subnet6: an IPv6 network of exactly 64 bits (SLAAC's interface identifiers)."""
    try:
        net = parse_subnet6(text)
    except ValueError as e:
        raise ValueError(f"--subnet6: {e}") from None
    if net.prefixlen != 64:
        example = ipaddress.IPv6Network((net.network_address, 64), strict=False)
        raise ValueError(
            f"--subnet6 {text}: must be a /64 (SLAAC forms 64-bit interface identifiers), "
            f"e.g. {example}"
        )
    return net


def address_plan6(config: NetworkConfig) -> dict[str, object]:
    """The IPv6 plan as the startup log shows it."""
    if not config.ipv6:
        return {"ipv6": "off"}
    return {
        "subnet6": str(config.subnet6),
        "gateway6": str(config.gateway6),
        "gateway6_link_local": str(config.gateway6_link_local),
        "host_loopback6": str(config.host6) if config.host_loopback else "refused",
        "dns6": str(config.dns6),
        "guest6": str(config.guest6),
        "dhcp6_pool": "-".join(str(a) for a in config.dhcp6_range or ()),
    }


def parse_dns_regexp(spec: str) -> tuple[str, str, str]:
    """'ZONE=IP=REGEXP' → (zone, ip, regexp), checked (the regexp may hold '=')."""
    zone, _, rest = spec.partition("=")
    ip, sep, pattern = rest.partition("=")
    if not zone or not sep or not pattern:
        raise ValueError(f"--dns-regexp {spec!r}: expected ZONE=IP=REGEXP")
    try:
        ipaddress.ip_address(ip)
        re.compile(pattern)
    except (ValueError, re.error) as e:
        raise ValueError(f"--dns-regexp {spec!r}: {e}") from None
    return zone, ip, pattern


def parse_dns_default(spec: str) -> tuple[str, str]:
    zone, sep, ip = spec.partition("=")
    try:
        ipaddress.ip_address(ip)
    except ValueError as e:
        raise ValueError(f"--dns-default {spec!r}: expected ZONE=IP ({e})") from None
    if not zone or not sep:
        raise ValueError(f"--dns-default {spec!r}: expected ZONE=IP")
    return zone, ip


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


async def run(args: argparse.Namespace, config: NetworkConfig, state: dict | None = None) -> int:
    from netferry.hostd.api.http import HttpApiServer, serve_gateway_http
    from netferry.hostd.api.server import ApiServer, default_api_path
    from netferry.hostd.control import Control
    from netferry.hostd.policy import parse_rule
    from netferry.hostd.state import StateError, StateStore, dns_snapshot
    from netferry.hostd.switch import HostSwitch

    switch = HostSwitch(config, pcap_path=args.pcap)
    control = Control(switch)
    if args.guest_expose != "off":
        serve_gateway_http(control, allow_any=args.guest_expose == "any")
    for spec in args.dns_record:
        zone, record = parse_record_spec(spec, switch.network.zones)
        switch.network.zones.add_records(zone, [record])
    for zone, ip, pattern in map(parse_dns_regexp, args.dns_regexp):
        control.add_dns_pattern(zone, pattern, ip)
    for zone, ip in map(parse_dns_default, args.dns_default):
        control.set_dns_default(zone, ip)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def dump_stats() -> None:
        if switch.pcap is not None:
            switch.pcap.flush()
        log.info("hostd.stats", stats=switch.stats())

    loop.add_signal_handler(signal.SIGUSR1, dump_stats)  # `kill -USR1`: stats to the log
    policy = switch.network.policy
    policy.static_rules = [parse_rule(action, text, static=True) for action, text in args.policy]
    switch.apply_policy()
    token = read_token(args.api_token_file) if args.api_token_file else None
    store: StateStore | None = None
    api: ApiServer | None = None
    http_apis: list[HttpApiServer] = []
    guests = None
    try:
        # Flags first, then what the state file adds, all before the first link opens.
        for spec in args.port_forward:
            protocol, local, remote = parse_port_forward(spec)
            await control.expose(protocol, local, remote, static=True)
        if args.state_file:
            store = StateStore(control, args.state_file)
            store.dns_base = dns_snapshot(control)
            if state is not None:
                await store.restore(state)
            control.change_listeners.append(store.changed)
        for uri in args.listen:
            link_uri = parse_link_uri(uri)
            if link_uri.scheme == "stdio":
                # A per-VM helper on stdin/stdout: when its peer closes stdin, hostd is done.
                switch.event_listeners.append(stop_on_stdio_close(stop))
            await switch.listen(link_uri)
        if args.api != "none":
            api = ApiServer(
                control,
                args.api or f"unix://{default_api_path()}",
                token=token,
                insecure_tcp=args.insecure_tcp_api,
            )
            await api.start()
        for uri in args.http_api:
            http_apis.append(
                HttpApiServer(control, uri, token=token, insecure_tcp=args.insecure_tcp_api)
            )
            await http_apis[-1].start()
        from netferry.hostd.guests import GuestManager

        guests = GuestManager.from_args(switch, args)
        if guests is not None:
            guests.start()
        from netferry.hostd.privileges import drop_privileges

        drop_privileges(sandbox=args.sandbox)
    except (OSError, ControlError, StateError) as e:
        log.error("startup.failed", error=str(e))
        print(f"host-switch: error: {e}", file=sys.stderr)
        for server in http_apis:
            await server.stop()
        if api is not None:
            await api.stop()
        await switch.close()
        return 1
    if args.ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)
    if args.insecure_tcp_api and token is None:
        log.warning(
            "api.tcp_without_token",
            apis=[u for u in [args.api or "", *args.http_api] if u.startswith("tcp://")],
            effect="any local user who can connect may drive hostd",
        )
    log.info(
        "hostd.ready",
        subnet=str(config.subnet),
        gateway=str(config.gateway_ip),
        host_loopback=str(config.host_ip) if config.host_loopback else "refused",
        dns=str(config.dns_ip),
        **address_plan6(config),
        mtu=config.mtu,
        dns_upstreams=[f"{h}:{p}" for h, p in config.dns_upstreams],
        policy_rules=len(policy.all_rules()),
        state_file=store.path if store else None,
        nofile_limit=switch.nofile_limit,
        nofile_limit_raised_from=getattr(args, "nofile_limit", (None,))[0],
        max_connections=switch.budget.limit,
        max_connections_per_guest=switch.budget.per_guest,
    )
    await stop.wait()
    log.info("hostd.stopping", stats=switch.stats())
    if guests is not None:
        await guests.stop()
    if store is not None:
        await store.close()  # before the switch closes its forwards
    for server in http_apis:
        await server.stop()
    if api is not None:
        await api.stop()
    await switch.close()
    return 0


def stop_on_stdio_close(stop: asyncio.Event) -> Callable[[str, dict], None]:
    def listener(kind: str, fields: dict) -> None:
        if kind == "link_down" and str(fields.get("link", "")).startswith("stdio://"):
            log.info("hostd.stdin_closed", effect="stopping")
            stop.set()

    return listener


def read_token(path: str) -> str:
    """The API token: the file's first line, at least 16 characters; OSError/ValueError."""
    with open(path) as f:
        token = f.readline().strip()
    if len(token) < 16:
        raise ValueError(f"--api-token-file {path}: the token must be at least 16 characters")
    return token


def load_state(args: argparse.Namespace) -> dict | None:
    """The state file's content before the loop starts; a file that cannot be used ends
    hostd with one line naming it, or with --state-reset-on-error is moved aside."""
    from netferry.hostd.state import StateError, StateStore

    store = StateStore(None, args.state_file)  # type: ignore[arg-type]
    try:
        return store.read()
    except StateError as e:
        if not args.state_reset_on_error:
            raise
        aside = store.move_aside()
        log.warning("state.reset", path=store.path, moved_to=aside, error=str(e))
        return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Go flag syntax too (-debug, -subnet=..., -port-forward X): Rancher Desktop's
    # host-switch flags have the same names as ours.
    args = parse_go_flags(parser, argv)
    configure_logging(args.log_format, "debug" if args.debug else "info", args.log_file)
    if not args.listen and not args.http_api:
        parser.error("at least one --listen or --http-api URI is required")
    try:
        for uri in args.listen:
            parse_link_uri(uri)
        config = config_from_args(args)
        for spec in args.dns_record:
            parse_record_spec(spec)
        for spec in args.port_forward:
            parse_port_forward(spec)
        for spec in args.dns_regexp:
            parse_dns_regexp(spec)
        for spec in args.dns_default:
            parse_dns_default(spec)
        for uri in args.http_api:
            parse_http_api_uri(uri)
        from netferry.hostd.guests import validate_args
        from netferry.hostd.policy import parse_rule

        validate_args(args)
        for action, text in args.policy:
            parse_rule(action, text)
        tcp_apis = [u for u in [args.api or "", *args.http_api] if u.startswith("tcp://")]
        if tcp_apis and not args.api_token_file and not args.insecure_tcp_api:
            raise ValueError(
                f"{tcp_apis[0]}: an API on TCP needs --api-token-file (anyone who can connect "
                "could drive hostd otherwise; --insecure-tcp-api serves it anyway)"
            )
        if args.api_token_file:
            read_token(args.api_token_file)
        if args.state_file:
            parent = os.path.dirname(os.path.abspath(args.state_file))
            if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
                raise ValueError(
                    f"--state-file {args.state_file}: directory {parent} does not exist or is "
                    "not writable"
                )
    except OSError as e:
        parser.error(f"--api-token-file: {e.strerror or e}: {e.filename}")
    except ValueError as e:
        parser.error(str(e))
    from netferry.hostd.privileges import raise_nofile_limit

    # Before privileges are dropped; the descriptor budget is derived from it.
    args.nofile_limit = raise_nofile_limit()
    state = None
    if args.state_file:
        from netferry.hostd.state import StateError

        try:
            state = load_state(args)
        except StateError as e:
            print(f"host-switch: error: {e}", file=sys.stderr)
            return 1
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
                    return runner.run(run(args, config, state))
                finally:
                    profiler.disable()
                    profiler.dump_stats(profile_to)
            return runner.run(run(args, config, state))
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
