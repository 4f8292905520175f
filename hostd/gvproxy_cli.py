"""`netferry-gvproxy`: gvproxy's command line and YAML configuration, run as host-switch.

gvproxy (gvisor-tap-vsock) users start it with Go flags (`-listen`, `-listen-qemu`,
`-ssh-port`, `-config FILE`, ...). This entry point parses exactly those (argparse, behind
netferry.goflags, so `-flag`, `--flag`, `-flag=value` and `-flag value` all work), translates
them into host-switch's own command line and calls `hostd.cli.main` with it, in this process.
Translating to argv rather than building a NetworkConfig directly keeps one path from the
command line to the switch: host-switch's parser validates everything again, and whatever
`host-switch --help` documents is what a gvproxy flag means here.

The translation (also the README's table):
- `-listen URI` (repeatable) → `--http-api URI` (gvproxy's HTTP API and `POST /connect`);
  `-services URI` → `--http-api URI?connect=0` (the API without /connect).
- `-listen-qemu URI` → `--listen URI` (4-byte big-endian frames); `-listen-bess
  unixpacket://P` → `--listen unixpacket://P`; `-listen-stdio X` (any non-empty value) →
  `--listen stdio://`; `-listen-vfkit unixgram://P` → `--listen unixgram://P`. As gvproxy:
  bess must be unixpacket://, vfkit unixgram://, and qemu+bess cannot be combined.
- `-mtu N` (0 → 1500), `-subnet`, `-pcap`, `-debug`, `-log-file`; `-gatewayIP`, `-deviceIP`,
  `-hostIP` → `--gateway-ip`, `--guest-ip`, `--host-ip`, emitted only when they differ from
  what the subnet gives (.1, .2, last usable).
- `-ssh-port N` (default 2222; -1 off; else 1024..65535) → `--port-forward
  127.0.0.1:N=DEVICE_IP:22`. Without `-config` only, as gvproxy.
- `-pid-file F`: our pid is written there and the file removed on exit.
- `-config FILE`: gvproxy's YAML (see `translate_config`); flags given on the command line
  override it.
- Not honoured, each refused with a message naming it (exit 2): `-listen-vpnkit`,
  `-forward-sock/-forward-dest/-forward-user/-forward-identity`, `-ec2-metadata-access`,
  `-notification`.
netferry's own additions: `-api URI` (host-switch's gRPC API; default none, so two
gvproxies never race for one default path), `-dns-upstream ADDR` (repeatable) and
`-ipv6` / `-subnet6 PREFIX`. gvproxy serves no IPv6 (its guests see no router
advertisement, and AAAA questions about its zones get empty answers), so the drop-in keeps
IPv6 off (`--no-ipv6`) unless `-ipv6` asks for host-switch's IPv6 plan (default prefix
fd00:192:168:127::/64, or `-subnet6`; gateway ::1, host loopback ::254 → ::1, ::2 by
DHCPv6 for the device's MAC).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata

from netferry.goflags import GoFlagError, normalize
from netferry.hostd.config import DEFAULT_SUBNET

DEFAULT_SSH_PORT = 2222
# `-services URI`: the HTTP API without /connect (the interface agreed with host-switch).
SERVICES_QUERY = "connect=0"
USAGE_EXIT = 2  # Go's flag package exits 2 on a bad command line
CONFIG_EXIT = 1  # gvproxy log.Fatal()s on a bad configuration

UNSUPPORTED_FLAGS = {
    "listen_vpnkit": ("-listen-vpnkit", "vpnkit's protocol is not implemented; use "
                      "-listen-qemu, -listen-vfkit or -listen (POST /connect)"),
    "forward_sock": ("-forward-sock", "SSH unix-socket forwarding is not implemented; expose "
                     "a unix socket through the HTTP API (protocol unix) instead"),
    "forward_dest": ("-forward-dest", "SSH unix-socket forwarding is not implemented"),
    "forward_user": ("-forward-user", "SSH unix-socket forwarding is not implemented"),
    "forward_identity": ("-forward-identity", "SSH unix-socket forwarding is not implemented"),
    "notification": ("-notification", "notifications are not implemented; host-switch's "
                     "gRPC WatchEvents (-api) reports link and lease events"),
}  # fmt: skip


class GvproxyError(ValueError):
    """A command line or configuration netferry-gvproxy refuses; the message names it."""

    def __init__(self, message: str, exit_code: int = USAGE_EXIT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Translation:
    argv: list[str] = field(default_factory=list)  # host-switch's command line
    pid_file: str | None = None
    warnings: list[str] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="netferry-gvproxy",
        description="gvproxy's command line, run by netferry's host-switch.",
    )
    add = p.add_argument
    add("--config", metavar="FILE", help="gvproxy's YAML configuration; flags override it")
    add("--listen", action="append", metavar="URI", help="HTTP API and /connect (repeatable)")
    add("--services", metavar="URI", help="HTTP API without /connect")
    add("--listen-qemu", metavar="URI", help="QEMU stream (unix:// or tcp://)")
    add("--listen-bess", metavar="URI", help="UML bess, unixpacket://PATH")
    add("--listen-stdio", metavar="X", help="any value: frames on stdin/stdout")
    add("--listen-vfkit", metavar="URI", help="vfkit, unixgram://PATH")
    add("--listen-vpnkit", metavar="URI", help="not supported")
    add("--mtu", type=int, metavar="N", help="guest MTU (0: 1500)")
    add("--subnet", metavar="CIDR", help=f"default {DEFAULT_SUBNET}")
    add("--gatewayIP", metavar="IP")
    add("--deviceIP", metavar="IP")
    add("--hostIP", metavar="IP")
    add("--ssh-port", type=int, metavar="N", help="127.0.0.1:N → guest :22 (2222; -1 off)")
    add("--pcap", metavar="FILE")
    add("--debug", action="store_true")
    add("--pid-file", metavar="FILE")
    add("--log-file", metavar="FILE")
    add("--version", action="store_true")
    for name in ("forward-sock", "forward-dest", "forward-user", "forward-identity"):
        add(f"--{name}", action="append", help="not supported")
    add("--ec2-metadata-access", action="store_true", help="not supported")
    add("--notification", metavar="URI", help="not supported")
    # netferry's own
    add("--api", default="none", metavar="URI", help="host-switch's gRPC API (default none)")
    add("--dns-upstream", action="append", default=[], metavar="ADDR[:PORT]")
    add(
        "--ipv6",
        action="store_true",
        help="serve IPv6 (host-switch's plan): gvproxy serves none, so off by default",
    )
    add(
        "--subnet6",
        metavar="PREFIX",
        help="the IPv6 /64 with -ipv6 (default fd00:192:168:127::/64)",
    )
    return p


def _derived(subnet: ipaddress.IPv4Network) -> dict[str, ipaddress.IPv4Address]:
    return {
        "gateway": subnet.network_address + 1,
        "device": subnet.network_address + 2,
        "host": subnet.broadcast_address - 1,
    }


def _subnet(text: str, where: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(str(text), strict=False)  # Go's ParseCIDR keeps host bits
    except ValueError as e:
        raise GvproxyError(f"{where}: invalid subnet {text!r}: {e}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise GvproxyError(f"{where}: {text!r}: only IPv4 subnets are supported")
    return net


def _ip(text: object, where: str, exit_code: int = USAGE_EXIT) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(str(text))
    except ValueError:
        raise GvproxyError(f"{where}: {text!r} is not an IPv4 address", exit_code) from None


def _with_query(uri: str, query: str) -> str:
    return f"{uri}{'&' if '?' in uri else '?'}{query}"


# ---- the YAML configuration --------------------------------------------------------------

TOP_KEYS = {"listen", "log-level", "stack", "interfaces", "forwards", "pid-file", "log-file",
            "services", "ec2-metadata-access", "notification"}  # fmt: skip
STACK_KEYS = {"debug", "capture-file", "mtu", "subnet", "gatewayIP", "deviceIP", "hostIP",
              "gatewayMacAddress", "dns", "dnsSearchDomains", "forwards", "nat",
              "gatewayVirtualIPs", "dhcpStaticLeases", "vpnKitUUIDMacAddresses",
              "ec2MetadataAccess", "tcpMaxInFlight", "tcpConnectTimeout"}  # fmt: skip
INTERFACE_KEYS = {"vpnkit", "qemu", "bess", "stdio", "vfkit"}


def load_config(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise GvproxyError(f"-config {path}: {e.strerror or e}", CONFIG_EXIT) from None
    except yaml.YAMLError as e:
        raise GvproxyError(f"-config {path}: not valid YAML: {e}", CONFIG_EXIT) from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise GvproxyError(f"-config {path}: expected a mapping at the top level", CONFIG_EXIT)
    return doc


def _mapping(value: object, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise GvproxyError(f"{where}: expected a mapping", CONFIG_EXIT)
    return value


def _list(value: object, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise GvproxyError(f"{where}: expected a list", CONFIG_EXIT)
    return value


@dataclass
class Settings:
    """gvproxy's settings after the configuration file and the flags are merged."""

    listen: list[str] = field(default_factory=list)
    services: str = ""
    qemu: str = ""
    bess: str = ""
    stdio: str = ""
    vfkit: str = ""
    mtu: int = 0
    subnet: str = DEFAULT_SUBNET
    gateway_ip: str = ""
    device_ip: str = ""
    host_ip: str = ""
    gateway_mac: str = ""
    ssh_port: int | None = DEFAULT_SSH_PORT
    pcap: str = ""
    debug: bool = False
    pid_file: str = ""
    log_file: str = ""
    forwards: list[str] = field(default_factory=list)  # host-switch --port-forward specs
    static_leases: list[str] = field(default_factory=list)  # MAC=IP
    dns_records: list[str] = field(default_factory=list)  # NAME=A:IP
    dns_regexps: list[str] = field(default_factory=list)  # ZONE=IP=REGEXP
    dns_defaults: list[str] = field(default_factory=list)  # ZONE=IP
    dns_search: list[str] = field(default_factory=list)
    nat: dict | None = None
    gateway_virtual_ips: list | None = None
    tcp_max_pending: int | float | None = None
    tcp_connect_timeout: float | None = None


def settings_from_config(doc: dict, warnings: list[str]) -> Settings:
    """gvproxy's YAML → Settings. Config mode: no SSH forward, as gvproxy."""
    s = Settings(ssh_port=None)
    for key in doc:
        if key not in TOP_KEYS:
            warnings.append(f"config: unknown key {key!r} ignored (gvproxy ignores it too)")
    s.listen = [str(u) for u in _list(doc.get("listen"), "listen")]
    level = str(doc.get("log-level") or "info").lower()
    s.debug = level in ("debug", "trace")
    s.pid_file = str(doc.get("pid-file") or "")
    s.log_file = str(doc.get("log-file") or "")
    s.services = str(doc.get("services") or "")
    if doc.get("ec2-metadata-access"):
        raise GvproxyError("config: ec2-metadata-access: not supported by netferry", CONFIG_EXIT)
    if doc.get("notification"):
        raise GvproxyError(f"config: notification: {UNSUPPORTED_FLAGS['notification'][1]}",
                           CONFIG_EXIT)  # fmt: skip
    if _list(doc.get("forwards"), "forwards"):
        raise GvproxyError(
            "config: forwards: SSH unix-socket forwards are not supported by netferry "
            "(expose a unix socket through the HTTP API instead)",
            CONFIG_EXIT,
        )
    interfaces = _mapping(doc.get("interfaces"), "interfaces")
    for key in interfaces:
        if key not in INTERFACE_KEYS:
            warnings.append(f"config: unknown key interfaces.{key} ignored")
    if interfaces.get("vpnkit"):
        raise GvproxyError(f"config: interfaces.vpnkit: {UNSUPPORTED_FLAGS['listen_vpnkit'][1]}",
                           CONFIG_EXIT)  # fmt: skip
    s.qemu = str(interfaces.get("qemu") or "")
    s.bess = str(interfaces.get("bess") or "")
    s.stdio = str(interfaces.get("stdio") or "")
    s.vfkit = str(interfaces.get("vfkit") or "")
    stack = _mapping(doc.get("stack"), "stack")
    for key in stack:
        if key not in STACK_KEYS:
            warnings.append(f"config: unknown key stack.{key} ignored")
    s.debug = s.debug or bool(stack.get("debug"))
    s.pcap = str(stack.get("capture-file") or "")
    mtu = _number(stack, "mtu", int)
    if mtu is not None:
        s.mtu = int(mtu)
    s.subnet = str(stack.get("subnet") or DEFAULT_SUBNET)
    s.gateway_ip = str(stack.get("gatewayIP") or "")
    s.device_ip = str(stack.get("deviceIP") or "")
    s.host_ip = str(stack.get("hostIP") or "")
    s.gateway_mac = str(stack.get("gatewayMacAddress") or "")
    if stack.get("ec2MetadataAccess"):
        raise GvproxyError("config: stack.ec2MetadataAccess: not supported by netferry",
                           CONFIG_EXIT)  # fmt: skip
    for i, zone in enumerate(_list(stack.get("dns"), "stack.dns")):
        where = f"stack.dns[{i}]"
        zone = _mapping(zone, where)
        name = str(zone.get("name") or "").rstrip(".")
        if not name:
            raise GvproxyError(f"config: {where}.name: a zone needs a name", CONFIG_EXIT)
        if zone.get("defaultIP"):
            default = _ip(zone.get("defaultIP"), f"config: {where}.defaultIP", CONFIG_EXIT)
            s.dns_defaults.append(f"{name}.={default}")
        for j, rec in enumerate(_list(zone.get("records"), f"{where}.records")):
            rwhere = f"{where}.records[{j}]"
            rec = _mapping(rec, rwhere)
            if rec.get("regexp"):
                ip = _ip(rec.get("ip"), f"config: {rwhere}.ip", CONFIG_EXIT)
                s.dns_regexps.append(f"{name}.={ip}={rec['regexp']}")
                continue
            rname = str(rec.get("name") or "").rstrip(".")
            if not rname:
                raise GvproxyError(f"config: {rwhere}.name: a record needs a name", CONFIG_EXIT)
            ip = _ip(rec.get("ip"), f"config: {rwhere}.ip", CONFIG_EXIT)
            s.dns_records.append(f"{rname}.{name}=A:{ip}")
    s.dns_search = [str(d) for d in _list(stack.get("dnsSearchDomains"), "stack.dnsSearchDomains")]
    for local, remote in _mapping(stack.get("forwards"), "stack.forwards").items():
        local = str(local)
        proto = "tcp"
        if local.startswith("udp:"):
            proto, local = "udp", local[4:]
        s.forwards.append(f"{proto}:{local}={remote}")
    for ip, mac in _mapping(stack.get("dhcpStaticLeases"), "stack.dhcpStaticLeases").items():
        s.static_leases.append(f"{mac}={_ip(ip, 'config: stack.dhcpStaticLeases', CONFIG_EXIT)}")
    if "nat" in stack:
        s.nat = _mapping(stack.get("nat"), "stack.nat")
    if "gatewayVirtualIPs" in stack:
        s.gateway_virtual_ips = _list(stack.get("gatewayVirtualIPs"), "stack.gatewayVirtualIPs")
    s.tcp_max_pending = _number(stack, "tcpMaxInFlight", int)
    tcp_connect_timeout = _number(stack, "tcpConnectTimeout", float)
    s.tcp_connect_timeout = None if tcp_connect_timeout is None else float(tcp_connect_timeout)
    return s


def _number(stack: dict, key: str, kind: type[int] | type[float]) -> int | float | None:
    value = stack.get(key)
    if value is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise GvproxyError(f"config: stack.{key}: {value!r} is not a number", CONFIG_EXIT) from None


# ---- flags + configuration → host-switch ---------------------------------------------------


def refuse_unsupported(args: argparse.Namespace) -> None:
    for dest, (flag, why) in UNSUPPORTED_FLAGS.items():
        if getattr(args, dest):
            raise GvproxyError(f"{flag}: not supported by netferry-gvproxy: {why}")
    if args.ec2_metadata_access:
        raise GvproxyError(
            "-ec2-metadata-access: not supported by netferry-gvproxy: 169.254.0.0/16 is "
            "never forwarded"
        )


def merge(args: argparse.Namespace, config: dict | None) -> Translation:
    """Flags (and the configuration, if any) → host-switch's command line."""
    refuse_unsupported(args)
    t = Translation()
    s = settings_from_config(config, t.warnings) if config is not None else Settings()
    # Flags given on the command line override the file.
    if args.listen:
        s.listen = list(args.listen)
    for flag, attr in (("services", "services"), ("listen_qemu", "qemu"),
                       ("listen_bess", "bess"), ("listen_stdio", "stdio"),
                       ("listen_vfkit", "vfkit"), ("subnet", "subnet"), ("pcap", "pcap"),
                       ("pid_file", "pid_file"), ("log_file", "log_file"),
                       ("gatewayIP", "gateway_ip"), ("deviceIP", "device_ip"),
                       ("hostIP", "host_ip")):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            setattr(s, attr, value)
    if args.mtu is not None:
        s.mtu = args.mtu
    if args.debug:
        s.debug = True
    if args.ssh_port is not None:
        if config is not None:
            t.warnings.append("-ssh-port is ignored with -config, as gvproxy (use stack.forwards)")
        else:
            s.ssh_port = args.ssh_port

    argv = t.argv
    # links
    if s.qemu and s.bess:
        raise GvproxyError("-listen-qemu and -listen-bess cannot be used together")
    if s.qemu:
        if not s.qemu.startswith(("unix://", "tcp://")):
            raise GvproxyError(f"-listen-qemu {s.qemu}: expected unix://PATH or tcp://HOST:PORT")
        argv += ["--listen", s.qemu]
    if s.bess:
        if not s.bess.startswith("unixpacket://"):
            raise GvproxyError(f"-listen-bess {s.bess}: bess listen address must be unixpacket://")
        argv += ["--listen", s.bess]
    if s.stdio:
        argv += ["--listen", "stdio://"]
    if s.vfkit:
        if not s.vfkit.startswith("unixgram://"):
            raise GvproxyError(f"-listen-vfkit {s.vfkit}: vfkit listen address must be unixgram://")
        argv += ["--listen", s.vfkit]
    for uri in s.listen:
        argv += ["--http-api", uri]
    if s.services:
        argv += ["--http-api", _with_query(s.services, SERVICES_QUERY)]
    if any(uri.startswith("tcp://") for uri in [*s.listen, s.services or ""]):
        # gvproxy's API on TCP has no authentication and its clients send no token: the
        # drop-in serves it the same way, and host-switch logs a warning saying so.
        argv += ["--insecure-tcp-api"]
    if not (s.qemu or s.bess or s.stdio or s.vfkit or s.listen or s.services):
        raise GvproxyError(
            "no listener: give -listen, -listen-qemu, -listen-bess, -listen-stdio or "
            "-listen-vfkit (or -config with listen/interfaces)"
        )
    # the network
    subnet = _subnet(s.subnet, "-subnet")
    argv += ["--subnet", str(subnet)]
    if s.mtu < 0:
        raise GvproxyError(f"-mtu {s.mtu}: must be 0 (1500) or a positive number")
    argv += ["--mtu", str(s.mtu or 1500)]
    derived = _derived(subnet)
    chosen = dict(derived)
    for key, value, flag, option in (("gateway", s.gateway_ip, "-gatewayIP", "--gateway-ip"),
                                     ("device", s.device_ip, "-deviceIP", "--guest-ip"),
                                     ("host", s.host_ip, "-hostIP", "--host-ip")):  # fmt: skip
        if value:
            ip = _ip(value, flag)
            if ip not in subnet:
                raise GvproxyError(f"{flag} {ip}: not in subnet {subnet}")
            chosen[key] = ip
            if ip != derived[key]:
                argv += [option, str(ip)]
    if len(set(chosen.values())) != 3:
        raise GvproxyError("-gatewayIP, -deviceIP and -hostIP must be three different addresses")
    if s.gateway_mac:
        argv += ["--gateway-mac", s.gateway_mac]
    # An empty nat / gatewayVirtualIPs is gvproxy's default ({hostIP: 127.0.0.1}, [hostIP]).
    if s.nat and {str(k): str(v) for k, v in s.nat.items()} != {str(chosen["host"]): "127.0.0.1"}:
        raise GvproxyError(
            f"config: stack.nat: only {{{chosen['host']}: 127.0.0.1}} (the host loopback at "
            f"hostIP) is supported by netferry, got {s.nat}",
            CONFIG_EXIT,
        )
    if s.gateway_virtual_ips and [str(ip) for ip in s.gateway_virtual_ips] != [str(chosen["host"])]:
        raise GvproxyError(
            f"config: stack.gatewayVirtualIPs: only [{chosen['host']}] (hostIP) is supported by "
            f"netferry, got {s.gateway_virtual_ips}",
            CONFIG_EXIT,
        )
    for lease in s.static_leases:
        argv += ["--static-lease", lease]
    for record in s.dns_records:
        argv += ["--dns-record", record]
    for spec in s.dns_regexps:
        argv += ["--dns-regexp", spec]
    for spec in s.dns_defaults:
        argv += ["--dns-default", spec]
    for domain in s.dns_search:
        argv += ["--dns-search", domain]
    # forwards: -ssh-port (default mode only), then the file's
    if s.ssh_port is not None and s.ssh_port != -1:
        if not 1024 <= s.ssh_port <= 65535:
            raise GvproxyError(f"-ssh-port {s.ssh_port}: must be -1 (off) or 1024..65535")
        argv += ["--port-forward", f"127.0.0.1:{s.ssh_port}={chosen['device']}:22"]
    for spec in s.forwards:
        argv += ["--port-forward", spec]
    if s.tcp_max_pending is not None:
        argv += ["--tcp-max-pending", str(s.tcp_max_pending)]
    if s.tcp_connect_timeout is not None:
        argv += ["--tcp-connect-timeout", str(s.tcp_connect_timeout)]
    # observability and netferry's own
    if s.pcap:
        argv += ["--pcap", s.pcap]
    if s.debug:
        argv.append("--debug")
    if s.log_file:
        argv += ["--log-file", s.log_file]
    argv += ["--api", args.api]
    if args.subnet6 and not args.ipv6:
        raise GvproxyError("-subnet6 needs -ipv6 (gvproxy serves no IPv6: it is off by default)")
    if args.ipv6:
        if args.subnet6:
            argv += ["--subnet6", args.subnet6]
    else:
        argv.append("--no-ipv6")
    for upstream in args.dns_upstream:
        argv += ["--dns-upstream", upstream]
    t.pid_file = s.pid_file or None
    return t


def translate(argv: Sequence[str]) -> Translation:
    """gvproxy's command line → host-switch's (raises GvproxyError)."""
    parser = build_parser()
    try:
        normalized = normalize(argv, parser)
    except GoFlagError as e:
        raise GvproxyError(str(e)) from None
    args = parser.parse_args(normalized)
    config = load_config(args.config) if args.config else None
    return merge(args, config)


def version() -> str:
    try:
        return metadata.version("netferry")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def write_pid_file(path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def remove_pid_file(path: str) -> None:
    """Only our own: a file another process wrote there since is left alone."""
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            if int(f.read().strip() or 0) != os.getpid():
                return
        os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args = parser.parse_args(normalize(argv, parser))
    except GoFlagError as e:
        parser.error(str(e))
    if args.version:
        print(f"gvproxy version netferry-{version()} (netferry-gvproxy)")
        return 0
    try:
        config = load_config(args.config) if args.config else None
        t = merge(args, config)
    except GvproxyError as e:
        print(f"netferry-gvproxy: {e}", file=sys.stderr)
        return e.exit_code
    for w in t.warnings:
        print(f"netferry-gvproxy: warning: {w}", file=sys.stderr)
    from netferry.hostd import cli

    if t.pid_file:
        try:
            write_pid_file(t.pid_file)
        except OSError as e:
            print(f"netferry-gvproxy: -pid-file {t.pid_file}: {e.strerror or e}", file=sys.stderr)
            return CONFIG_EXIT
    try:
        return cli.main(t.argv)
    finally:
        if t.pid_file:
            remove_pid_file(t.pid_file)


if __name__ == "__main__":
    sys.exit(main())
