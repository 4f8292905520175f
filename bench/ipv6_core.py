"""The IPv6 building blocks alone, in hot loops: nanoseconds or microseconds of Python per
call of the sans-IO IPv6 modules (hostd/stack/ipv6.py, icmpv6.py, ndp.py and
hostd/services/dhcpv6.py), before they are wired into the receive path.

    .venv/bin/python bench/ipv6_core.py [--rounds N]

Inputs are built beforehand, outside the timing. Nothing is asserted: it prints figures,
with the IPv4 parser's beside them for scale.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from ipaddress import IPv6Address

from netferry.hostd.services.dhcpv6 import Dhcpv6Config, Dhcpv6Server
from netferry.hostd.stack import icmpv6, ipv4, ipv6, ndp

SRC = IPv6Address("fd00:192:168:127::2").packed
DST = IPv6Address("fd00:192:168:127::1").packed


def per_call(fn: Callable[[], object], rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - start) / rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100_000)
    rounds = ap.parse_args().rounds

    v6 = ipv6.build_ipv6(SRC, DST, ipv6.NH_TCP, bytes(1440))
    v6_ext = ipv6.build_ipv6(SRC, DST, ipv6.NH_DEST_OPTS, bytes([6, 0]) + bytes(6) + bytes(1432))
    v4 = ipv4.build_ipv4(bytes(4), bytes(4), ipv4.PROTO_TCP, bytes(1480))
    big = bytes(65000)
    frags = [ipv6.parse_ipv6(f) for f in ipv6.fragment(SRC, DST, 17, big, 1500, 1)]

    def reassemble() -> None:
        r = ipv6.Reassembler()
        for f in frags:
            r.add(f, 0.0)

    echo = icmpv6.build_echo_request(SRC, DST, 1, 1, bytes(56))
    ra = ndp.RouterAdvertisement(
        source_lla=bytes(6), mtu=1500, prefixes=[ndp.PrefixInfo(bytes(16))], rdnss=[DST]
    )
    server = Dhcpv6Server(Dhcpv6Config())
    solicit = bytes.fromhex(
        "01000005000100 0a000300015a94efe40cee 0003000c00000001 0000000000000000 000e0000".replace(
            " ", ""
        )
    )
    link_local = IPv6Address("fe80::1")

    rows = [
        ("parse_ipv4, 1500-byte TCP packet", lambda: ipv4.parse_ipv4(v4), rounds, 1e9, "ns"),
        ("parse_ipv6, 1500-byte TCP packet", lambda: ipv6.parse_ipv6(v6), rounds, 1e9, "ns"),
        (
            "parse_ipv6, with a dest. options header",
            lambda: ipv6.parse_ipv6(v6_ext),
            rounds,
            1e9,
            "ns",
        ),
        ("build_header (IPv6)", lambda: ipv6.build_header(SRC, DST, 6, 1440), rounds, 1e9, "ns"),
        (
            "fragment 65000 bytes at MTU 1500",
            lambda: ipv6.fragment(SRC, DST, 17, big, 1500, 1),
            rounds // 50,
            1e6,
            "us",
        ),
        (f"reassemble 65000 bytes ({len(frags)} fragments)", reassemble, rounds // 50, 1e6, "us"),
        (
            "parse_icmpv6 echo (checksum verified)",
            lambda: icmpv6.parse_icmpv6(SRC, DST, echo),
            rounds,
            1e9,
            "ns",
        ),
        (
            "build_ra (prefix, MTU, RDNSS, SLLA)",
            lambda: ndp.build_ra(DST, ipv6.ALL_NODES, ra),
            rounds // 10,
            1e6,
            "us",
        ),
        (
            "DHCPv6 rapid-commit solicit → reply",
            lambda: server.handle(solicit, link_local, None, 0.0),
            rounds // 10,
            1e6,
            "us",
        ),
    ]
    for name, fn, n, scale, unit in rows:
        print(f"{name:48s} {per_call(fn, max(n, 1)) * scale:10.1f} {unit}")


if __name__ == "__main__":
    main()
