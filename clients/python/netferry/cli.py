"""`netferry`: the command-line client of hostd's HostSwitch API.

Human tables by default, `--json` for scripts. Exit status: 0 done; 1 hostd refused the
request (the message says why, with the gRPC status); 2 bad usage; 3 hostd unreachable.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Iterator

import grpc
from google.protobuf.json_format import MessageToDict

from netferry.client import (
    CAPTURE_PROTOCOLS,
    PROTOCOL_NAMES,
    PROTOCOLS,
    RECORD_TYPE_NAMES,
    HostSwitchClient,
    NetferryError,
    read_token,
)
from netferry.v1 import host_pb2 as pb

POLICY_ACTION_NAMES = {pb.POLICY_ACTION_ALLOW: "allow", pb.POLICY_ACTION_DENY: "deny"}

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
# What gRPC says when it never got to hostd (hostd's own messages never say these).
UNREACHABLE_WORDS = ("failed to connect", "no such file", "connection refused", "socket closed")


def as_json(msg) -> dict:  # type: ignore[no-untyped-def]
    return MessageToDict(msg, preserving_proto_field_name=True)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_forwards(forwards, js: bool) -> None:  # type: ignore[no-untyped-def]
    if js:
        print(json.dumps([as_json(f) for f in forwards], indent=2))
        return
    rows = [
        [
            PROTOCOL_NAMES.get(f.protocol, "?"),
            f.local,
            f.remote,
            str(f.active),
            str(f.total),
            human_bytes(f.bytes_to_guest),
            human_bytes(f.bytes_from_guest),
        ]
        for f in forwards
    ]
    print(table(rows, ["proto", "local", "remote", "active", "total", "to guest", "from guest"]))


def print_stats(s, js: bool) -> None:  # type: ignore[no-untyped-def]
    if js:
        print(json.dumps(as_json(s)), flush=True)
        return
    rows = []
    for name in ("tcp", "udp", "icmp", "arp"):
        p = getattr(s, name)
        rows.append(
            [
                name,
                str(p.packets_from_guests),
                human_bytes(p.bytes_from_guests),
                str(p.packets_to_guests),
                human_bytes(p.bytes_to_guests),
            ]
        )
    print(table(rows, ["proto", "pkts in", "bytes in", "pkts out", "bytes out"]))
    print(
        f"frames in/out {s.frames_in}/{s.frames_out}  malformed {s.malformed}  dropped "
        f"{s.dropped}  tcp {s.tcp_connections} (+{s.tcp_pending_dials} dialling)  udp flows "
        f"{s.udp_flows}  icmp flows {s.icmp_flows}  forwards {s.forwards}  links {len(s.links)}",
        flush=True,
    )


def stdin_chunks() -> Iterator[bytes]:
    while chunk := sys.stdin.buffer.read1(65536):
        yield chunk


def run(args: argparse.Namespace) -> int:
    try:
        token = read_token(args.token_file)
    except OSError as e:
        raise ValueError(f"--token-file: {e.strerror or e}: {args.token_file}") from None
    api = HostSwitchClient(args.api, timeout=args.timeout, token=token)
    js = args.json
    cmd = args.command
    if cmd in ("expose", "unexpose"):
        protocol, local = split_protocol(args.protocol, args.local)
        if cmd == "expose":
            f = api.expose(protocol, local, args.remote)
            text = f"exposed {protocol} {f.local} → {f.remote}"
        else:
            f = api.unexpose(protocol, local)
            text = f"removed {protocol} {f.local} → {f.remote}"
        print(json.dumps(as_json(f)) if js else text)
    elif cmd == "forwards":
        print_forwards(api.forwards(), js)
    elif cmd == "stats":
        if args.watch:
            try:
                for s in api.watch_stats(args.interval):
                    print_stats(s, js)
                    if not js:
                        print()
            except KeyboardInterrupt:
                return 0
        else:
            print_stats(api.stats(), js)
    elif cmd == "leases":
        leases = api.leases()
        if js:
            print(json.dumps([as_json(x) for x in leases], indent=2))
        else:
            rows = [
                [
                    x.mac,
                    x.ip,
                    x.hostname,
                    "static" if x.static else "dynamic",
                    x.expires.ToDatetime().isoformat(timespec="seconds"),
                ]
                for x in leases
            ]
            print(table(rows, ["mac", "ip", "hostname", "kind", "expires"]))
    elif cmd == "dns":
        if args.dns_command == "add":
            zone = api.dns_add(args.zone, [(args.name, args.type, args.value, args.ttl)])
            print(json.dumps(as_json(zone)) if js else f"{zone.name}: {len(zone.records)} records")
        elif args.dns_command == "rm":
            n = api.dns_remove(args.zone, args.names)
            print(json.dumps({"removed": n}) if js else f"removed {n} records")
        else:
            zones = api.dns_zones()
            if js:
                print(json.dumps([as_json(z) for z in zones], indent=2))
            else:
                rows = [
                    [z.name, r.name, RECORD_TYPE_NAMES.get(r.type, "?"), r.value, str(r.ttl)]
                    for z in zones
                    for r in z.records
                ]
                print(table(rows, ["zone", "name", "type", "value", "ttl"]))
    elif cmd == "policy":
        if args.policy_command in ("allow", "deny"):
            at = api.policy_add(args.policy_command, args.rule, args.index)
            text = f"rule {at}: {args.policy_command} {args.rule}"
            print(json.dumps({"index": at}) if js else text)
        elif args.policy_command == "rm":
            rule = api.policy_remove(args.index)
            print(json.dumps(as_json(rule)) if js else f"removed {rule.rule}")
        else:
            rules = api.policy_rules()
            if js:
                print(json.dumps([as_json(r) for r in rules], indent=2))
            else:
                rows = [
                    [str(i), POLICY_ACTION_NAMES.get(r.action, "?"), r.rule,
                     "flag" if r.static else "api"]
                    for i, r in enumerate(rules)
                ]  # fmt: skip
                print(table(rows, ["#", "action", "rule", "from"]))
    elif cmd == "connections":
        view = api.connections()
        if js:
            print(json.dumps(as_json(view), indent=2))
        else:
            rows = [
                [f.time.ToDatetime().isoformat(timespec="seconds"), f.protocol, f.source,
                 f.destination, "allow" if f.allowed else "DENY", f.rule or "(default)"]
                for f in view.flows
            ]  # fmt: skip
            print(table(rows, ["time", "proto", "source", "destination", "verdict", "rule"]))
            print(f"allowed {view.allowed}  denied {view.denied}")
    elif cmd == "capture":
        out = open(args.write, "wb") if args.write else sys.stdout.buffer
        # SIGTERM ends a capture as Ctrl-C does: between records, so the pcap stays whole
        # (killed mid-write it ended cut short in the middle of a packet).
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            for chunk in api.capture(
                args.protocol, args.host or "", args.port, args.count, args.duration
            ):
                out.write(chunk)
                out.flush()
        except (KeyboardInterrupt, BrokenPipeError):
            pass
        finally:
            if args.write:
                out.close()
    elif cmd == "tunnel":
        for chunk in api.tunnel(args.address, stdin_chunks(), connect_timeout=args.timeout):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    elif cmd == "events":
        try:
            for ev in api.events():
                if js:
                    print(json.dumps(as_json(ev)), flush=True)
                else:
                    kind = ev.WhichOneof("kind")
                    body = as_json(getattr(ev, kind))
                    print(
                        f"{ev.time.ToDatetime().isoformat(timespec='milliseconds')} {kind} "
                        + " ".join(f"{k}={v}" for k, v in body.items()),
                        flush=True,
                    )
        except KeyboardInterrupt:
            return 0
    api.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netferry", description="netferry command-line client")
    p.add_argument("--api", help="hostd API: unix:///path, /path or host:port ($NETFERRY_API)")
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="token for an API on TCP (hostd's --api-token-file; default $NETFERRY_API_TOKEN)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    e = sub.add_parser("expose", help="forward a host address into the guest network")
    e.add_argument("-p", "--protocol", choices=sorted(PROTOCOLS), help="default tcp")
    e.add_argument(
        "local",
        help="127.0.0.1:8080, :8080, [::1]:8080 or a socket path (unix); a tcp:, udp: or "
        "unix: prefix names the protocol (udp:127.0.0.1:5353)",
    )
    e.add_argument(
        "remote", help="guest address, e.g. 192.168.127.2:80, [fd00:192:168:127::2]:80 or [MAC]:80"
    )
    u = sub.add_parser("unexpose", help="remove a forward")
    u.add_argument("-p", "--protocol", choices=sorted(PROTOCOLS), help="default tcp")
    u.add_argument("local")
    sub.add_parser("forwards", help="list forwards")
    s = sub.add_parser("stats", help="counters")
    s.add_argument("--watch", action="store_true", help="stream until Ctrl-C")
    s.add_argument("--interval", type=float, default=1.0)
    sub.add_parser("leases", help="DHCP and DHCPv6 leases")
    d = sub.add_parser("dns", help="local DNS records")
    dsub = d.add_subparsers(dest="dns_command", required=True, metavar="add|rm|ls")
    da = dsub.add_parser("add")
    da.add_argument("zone")
    da.add_argument("name")
    da.add_argument("type", choices=["A", "AAAA", "CNAME"], type=str.upper)
    da.add_argument("value")
    da.add_argument("--ttl", type=int, default=0)
    dr = dsub.add_parser("rm")
    dr.add_argument("zone")
    dr.add_argument("names", nargs="+")
    dsub.add_parser("ls")
    po = sub.add_parser("policy", help="outbound policy rules")
    posub = po.add_subparsers(dest="policy_command", required=True, metavar="ls|allow|deny|rm")
    posub.add_parser("ls")
    for action in ("allow", "deny"):
        pa = posub.add_parser(action)
        pa.add_argument(
            "rule",
            help="CIDR[:PORT[-PORT]][/tcp|udp|icmp] ([IPv6 CIDR]:PORT with ports), or host "
            "for the CIDR",
        )
        pa.add_argument("--index", type=int, help="position among the run-time rules")
    pr = posub.add_parser("rm")
    pr.add_argument("index", type=int)
    sub.add_parser("connections", help="recent new flows with the policy's verdict")
    c = sub.add_parser("capture", help="live pcap to stdout (netferry capture | tshark -r -)")
    c.add_argument("--protocol", choices=sorted(CAPTURE_PROTOCOLS))
    c.add_argument("--host", help="IPv4 or IPv6 address (source or destination)")
    c.add_argument("--port", type=int, default=0)
    c.add_argument("-c", "--count", type=int, default=0, help="stop after N frames")
    c.add_argument("--duration", type=float, help="stop after S seconds")
    c.add_argument("-w", "--write", metavar="FILE", help="write to FILE instead of stdout")
    t = sub.add_parser("tunnel", help="stdin/stdout to HOST:PORT inside the virtual network")
    t.add_argument(
        "address", help="e.g. 192.168.127.2:22 (ssh -o ProxyCommand='netferry tunnel %%h:%%p')"
    )
    sub.add_parser("events", help="stream events until Ctrl-C")
    sub.add_parser("demo", help="bring up hostd and a namespace guest and show it working")
    sub.add_parser("run", help="run a command in namespaces networked by netferry (see run -h)")
    sub.add_parser("agent", help="publish port mappings to wsl-proxy and hostd (see agent -h)")
    return p


def split_protocol(flag: str | None, local: str) -> tuple[str, str]:
    """`udp:127.0.0.1:5353` (as --port-forward writes it) or -p udp with `127.0.0.1:5353`."""
    for name in PROTOCOLS:
        if local.startswith(name + ":") and not local.startswith(name + "://"):
            if flag is not None and flag != name:
                raise ValueError(f"local: {local!r} says {name}, but -p says {flag}")
            return name, local[len(name) + 1 :]
    return flag or "tcp", local


def hostd_unreachable(e: NetferryError) -> bool:
    """The call never reached hostd (as opposed to hostd, or a guest behind it, refusing):
    gRPC's own connection failures, or a deadline with nothing heard from hostd."""
    message = e.message.lower()
    if e.code == grpc.StatusCode.UNAVAILABLE:
        return any(
            words in message
            for words in (
                "failed to connect",
                "no such file",
                "connection refused",
                "socket closed",
            )
        )
    if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "did not answer" not in message  # a guest's silence is reported as such
    return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:  # its own options and a COMMAND after them
        from netferry.run import main as run_main

        return run_main(argv[1:])
    if argv[:1] == ["agent"]:  # the guest agent: its own options
        from netferry.agent import main as agent_main

        return agent_main(argv[1:])
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from netferry.demo import main as demo_main

        return demo_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return run(args)
    except NetferryError as e:
        if hostd_unreachable(e):
            print(
                f"netferry: cannot reach hostd at {args.api or 'the default socket'}: {e.message}",
                file=sys.stderr,
            )
            return EXIT_UNREACHABLE
        print(f"netferry {args.command}: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except ValueError as e:
        print(f"netferry {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
