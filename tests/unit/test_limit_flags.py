"""Limits that are flags (IPv6 neighbour discovery, reassembly): hostd's CLI parses them into
`NetworkConfig`, refuses bad values with a usage error naming the flag, and the switch obeys
them (the neighbour cache evicts at its bound, held packets stop at theirs, the router
advertisement deadline follows the interval, reassembly holds what the flags allow)."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet6 import ICMPv6ND_NS, ICMPv6NDOptSrcLLAddr, IPv6
from scapy.layers.l2 import Ether

from netferry.hostd import cli
from netferry.hostd.config import NetworkConfig
from netferry.hostd.stack import ndp
from netferry.hostd.stack.network import Network

GW_MAC = "5a:94:ef:e4:0c:dd"
PREFIX = ipaddress.IPv6Network("fd00:192:168:127::/64")
GW6 = str(PREFIX[1])


def parse(*flags: str) -> NetworkConfig:
    args = cli.build_parser().parse_args(["--listen=stdio://", "--dns-upstream=127.0.0.1", *flags])
    return cli.config_from_args(args)


def test_defaults_are_the_former_constants():
    c = parse()
    assert (c.ndp_max_neighbours, c.ndp_pending_packets, c.ndp_pending_addresses) == (
        4096,
        64,
        256,
    )
    assert c.ra_interval == 600.0
    assert (c.reassembly_max_bytes, c.reassembly_timeout) == (4 << 20, 30.0)


def test_flags_reach_the_config():
    c = parse(
        "--ndp-max-neighbours=8",
        "--ndp-pending-packets=2",
        "--ndp-pending-addresses=3",
        "--ra-interval=30",
        "--reassembly-max-bytes=100000",
        "--reassembly-timeout=5",
    )
    assert (c.ndp_max_neighbours, c.ndp_pending_packets, c.ndp_pending_addresses) == (8, 2, 3)
    assert (c.ra_interval, c.reassembly_max_bytes, c.reassembly_timeout) == (30.0, 100000, 5.0)


@pytest.mark.parametrize(
    "flag",
    [
        "--ndp-max-neighbours=0",
        "--ndp-pending-packets=-1",
        "--ndp-pending-addresses=0",
        "--ra-interval=3",
        "--ra-interval=1801",
        "--reassembly-max-bytes=0",
        "--reassembly-timeout=0",
        "--reassembly-timeout=-2",
    ],
)
def test_a_bad_value_is_a_usage_error_naming_the_flag(flag, capsys, monkeypatch):
    monkeypatch.setattr(cli, "configure_logging", lambda *a: None)  # keep structlog as it is
    with pytest.raises(SystemExit) as exc:
        cli.main(["--listen=stdio://", "--dns-upstream=127.0.0.1", flag])
    assert exc.value.code == 2
    assert flag.split("=")[0] in capsys.readouterr().err


def test_a_value_of_the_wrong_type_is_a_usage_error_too(capsys, monkeypatch):
    monkeypatch.setattr(cli, "configure_logging", lambda *a: None)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--listen=stdio://", "--ra-interval=soon"])
    assert exc.value.code == 2 and "--ra-interval" in capsys.readouterr().err


def net_with(**config) -> Network:
    net = Network(NetworkConfig(**config))
    net.add_port()
    return net


def solicit_from(net: Network, i: int, now: float) -> str:
    """A guest at PREFIX[100 + i] asks for the gateway: the cache learns it."""
    ip, mac = str(PREFIX[100 + i]), f"02:00:00:00:{i >> 8:02x}:{i & 0xFF:02x}"
    ns = IPv6(src=ip, dst=GW6, hlim=255) / ICMPv6ND_NS(tgt=GW6) / ICMPv6NDOptSrcLLAddr(lladdr=mac)
    net.receive_frame(1, bytes(Ether(src=mac, dst=GW_MAC) / ns), now)
    net.frames_to_send()
    return ip


def test_the_neighbour_cache_evicts_at_its_flag():
    net = net_with(ndp_max_neighbours=3)
    assert net.ndp.cache.max_entries == 3
    ips = [solicit_from(net, i, now=1.0 + i) for i in range(5)]
    known = {str(ipaddress.IPv6Address(ip)) for ip, _ in net.ndp.cache.items()}
    assert known == set(ips[2:])  # the two least recently used gave way
    assert net.ndp.cache.stats["evicted"] == 2


def test_held_packets_stop_at_their_flags():
    net = net_with(ndp_pending_packets=2, ndp_pending_addresses=2)
    net.handle_timer(1.0)
    net.frames_to_send()
    unknown = [PREFIX[200 + i].packed for i in range(3)]
    net._queue_for_ndp(unknown[0], [b"a", b"b", b"c"])
    assert net._pending_ndp[unknown[0]] == [b"a", b"b"]
    assert net.stats["ndp_queue_dropped"] == 1
    net._queue_for_ndp(unknown[1], [b"d"])
    net._queue_for_ndp(unknown[2], [b"e"])  # a third address: the oldest's packets go
    assert list(net._pending_ndp) == unknown[1:]
    assert net.stats["ndp_queue_dropped"] == 3


@pytest.mark.parametrize("interval", [4.0, 30.0, 1800.0])
def test_the_advertisement_deadline_follows_the_interval(interval):
    net = net_with(ra_interval=interval)
    sched = net.ndp.scheduler
    assert sched.max_interval == interval
    assert ndp.MIN_DELAY_BETWEEN_RAS <= sched.min_interval <= 0.75 * interval
    now = 0.0
    for n in range(12):
        now = sched.next_deadline()
        assert sched.handle_timer(now)
        gap = sched.next_deadline() - now
        if n >= ndp.MAX_INITIAL_ADVERTISEMENTS:  # past the quick initial ones
            assert sched.min_interval <= gap <= interval


def test_reassembly_flags_reach_both_reassemblers():
    net = net_with(reassembly_max_bytes=50_000, reassembly_timeout=7.0)
    assert net.reassembler.max_bytes == 50_000 and net.reassembler6.max_bytes == 50_000
    assert net.reassembler.timeout == 7.0 and net.reassembler6.timeout == 7.0
