"""The sans-IO core alone, in a hot loop: microseconds of Python per 1-byte request-response
through `Network` (no sockets, no kernel, no event loop), to see what the core costs apart
from everything around it.

    .venv/bin/python bench/core.py [--rounds N] [--offload] [--profile]

A guest connection to .254:80 is opened frame by frame; then each round feeds the guest's
1-byte request (one frame, as the guest's tap would hand it over), reads it as the NAT
would, queues a 1-byte reply and takes the frame that carries it (with the ACK). Frames are
built with scapy beforehand, outside the timing. Nothing is asserted: it prints a figure.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from netferry.hostd.config import NetworkConfig
from netferry.hostd.stack.network import VNET_LEN, VNET_NONE, Network, TcpDial

GW_MAC = "5a:94:ef:e4:0c:dd"
GUEST_MAC = "5a:94:ef:e4:0c:ee"


def frame(offload: bool, flags: str, seq: int, ack: int = 0, payload: bytes = b"") -> bytes:
    pkt = (
        Ether(src=GUEST_MAC, dst=GW_MAC)
        / IP(src="192.168.127.2", dst="192.168.127.254")
        / TCP(sport=40000, dport=80, flags=flags, seq=seq, ack=ack, window=65535)
        / payload
    )
    return (VNET_NONE if offload else b"") + bytes(pkt)


def run(rounds: int, offload: bool, profile: bool) -> float:
    net = Network(NetworkConfig())
    port = net.add_port(vnet=offload)
    net.receive_frames(port, [frame(offload, "S", 1000)], 0.0)
    dial = next(ev for ev in net.events if isinstance(ev, TcpDial))
    conn = dial.conn
    net.events.clear()
    net.tcp_accept(conn, 0.0)
    (synack,) = net.frames_to_send(0.0)[port]
    ours = Ether(synack[VNET_LEN:] if offload else synack)[TCP].seq + 1
    net.receive_frames(port, [frame(offload, "A", 1001, ours)], 0.0)
    net.frames_to_send(0.0)
    net.events.clear()
    requests = [frame(offload, "PA", 1001 + i, ours + i, b"x") for i in range(rounds)]
    profiler = cProfile.Profile() if profile else None
    now = 1.0
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    for request in requests:
        now += 0.0003
        net.receive_frames(port, [request], now)
        net.pull_tcp_events()
        net.events.clear()
        conn.read()
        conn.send(b"y")
        net.tcp_touch(conn)
        out = net.frames_to_send(now)
        net.get_timer()
        if len(out.get(port, ())) != 1:
            raise SystemExit(f"expected one reply frame, got {out}")
    elapsed = time.perf_counter() - start
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    return elapsed / rounds * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20000)
    ap.add_argument("--offload", action="store_true", help="frames with a virtio-net header")
    ap.add_argument("--profile", action="store_true", help="cProfile the loop (slower)")
    args = ap.parse_args()
    us = run(args.rounds, args.offload, args.profile)
    kind = "offload" if args.offload else "plain"
    print(f"{us:.1f} µs of core per 1-byte request-response ({kind} port, {args.rounds} rounds)")


if __name__ == "__main__":
    main()
