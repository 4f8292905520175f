"""NAT rules in the guest's isolated namespace: one nftables table, `ip netferry`.

What it owns: the table `ip netferry` in the namespace it is applied to, and two sysctls of
that namespace (`net.ipv4.conf.all.route_localnet=1`, `net.ipv4.ip_forward=1`). Nothing
outside the table is ever touched, so removing the table undoes every rule.

The rules (Rancher Desktop's historic vm-switch rules, in their own table):

- prerouting (dstnat): a connection arriving on the tap (`eth0`, from hostd's forwards) or on
  the inside veth (`veth-rd-ns`, from wsl-proxy in the default namespace) for any local
  address of the namespace is DNATed to 127.0.0.1, port unchanged, so services bound to
  127.0.0.1 are reachable, as they are in Docker Desktop and WSL's localhost forwarding.
  `route_localnet` lets the kernel route to and from 127.0.0.1 over a non-loopback device.
  The trade-off: a service bound only to the tap's or the veth's own address is not
  reachable through a forward (bind 0.0.0.0 or 127.0.0.1). `ports` restricts the DNAT to
  the given ports.
- postrouting (srcnat): traffic from the veth subnet (the default namespace) leaving
  through `eth0` is masqueraded to the tap's address, so the default namespace can use the
  virtual network (and hostd's NAT) through the guest namespace.

Replies need nothing: conntrack reverses both translations. The rules name interfaces,
never addresses learnt by DHCP, so they survive vm-switch re-creating `eth0`.

`python -m netferry.guestd.nat_rules apply|remove --netns NAME` does the same from a shell.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence

TABLE = "netferry"


class NatError(RuntimeError):
    pass


def ruleset(
    tap: str = "eth0",
    veth: str = "veth-rd-ns",
    veth_subnet: str = "192.168.143.0/24",
    ports: Sequence[int] = (),
) -> str:
    """The nft script for the table (it deletes and re-creates the table atomically)."""
    match_ports = ""
    if ports:
        plist = ", ".join(str(p) for p in sorted(set(ports)))
        match_ports = f"meta l4proto {{ tcp, udp }} th dport {{ {plist} }} "
    return f"""table ip {TABLE}
delete table ip {TABLE}
table ip {TABLE} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname {{ "{tap}", "{veth}" }} fib daddr type local {match_ports}dnat ip to 127.0.0.1
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {veth_subnet} oifname "{tap}" masquerade
    }}
}}
"""


def _in_netns(netns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=20)
    except FileNotFoundError as e:
        raise NatError(f"{argv[0]} is not installed ({e})") from None


def apply(
    netns: str | None,
    tap: str = "eth0",
    veth: str = "veth-rd-ns",
    veth_subnet: str = "192.168.143.0/24",
    ports: Sequence[int] = (),
) -> None:
    """Create (or replace) the table and set the sysctls in namespace `netns` (None: ours)."""
    for key in ("net.ipv4.conf.all.route_localnet", "net.ipv4.ip_forward"):
        r = _run(_in_netns(netns, ["sysctl", "-q", "-w", f"{key}=1"]))
        if r.returncode != 0:
            raise NatError(f"sysctl {key}=1 failed: {r.stderr.strip()}")
    r = _run(_in_netns(netns, ["nft", "-f", "-"]), ruleset(tap, veth, veth_subnet, ports))
    if r.returncode != 0:
        raise NatError(f"nft rejected the {TABLE} table: {r.stderr.strip()}")


def remove(netns: str | None) -> bool:
    """Delete the table; True if it existed."""
    r = _run(_in_netns(netns, ["nft", "delete", "table", "ip", TABLE]))
    return r.returncode == 0


def exists(netns: str | None) -> bool:
    r = _run(_in_netns(netns, ["nft", "list", "table", "ip", TABLE]))
    return r.returncode == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m netferry.guestd.nat_rules", description=__doc__)
    p.add_argument("action", choices=["apply", "remove", "show"])
    p.add_argument("--netns", help="named namespace (ip netns); default: the current one")
    p.add_argument("--tap", default="eth0")
    p.add_argument("--veth", default="veth-rd-ns")
    p.add_argument("--veth-subnet", default="192.168.143.0/24")
    p.add_argument("--port", type=int, action="append", default=[])
    a = p.parse_args(argv)
    if a.action == "show":
        print(ruleset(a.tap, a.veth, a.veth_subnet, a.port), end="")
        return 0
    try:
        if a.action == "apply":
            apply(a.netns, a.tap, a.veth, a.veth_subnet, a.port)
        else:
            remove(a.netns)
    except NatError as e:
        print(f"nat_rules: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
