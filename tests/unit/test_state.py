"""The state file's content: DNS kept as the difference from the flags (removals of flag
records included), a round trip through restore, and the atomic write."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from netferry.hostd.config import NetworkConfig
from netferry.hostd.control import Control, DnsRecordSpec
from netferry.hostd.state import StateStore, dns_snapshot


async def _switch_and_control():  # type: ignore[no-untyped-def]
    from netferry.hostd.switch import HostSwitch

    switch = HostSwitch(NetworkConfig(dns_upstreams=[]))
    return switch, Control(switch)


def test_dns_difference_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state.json"

    async def first() -> bytes:
        switch, control = await _switch_and_control()
        store = StateStore(control, str(path))
        store.dns_base = dns_snapshot(control)
        control.remove_dns_records("containers.internal.", ["gateway"])  # a default record
        control.add_dns_records("svc.test.", [DnsRecordSpec("db", "A", "192.168.127.7", 30)])
        control.add_dns_pattern("svc.test.", "^web-[0-9]+$", "192.168.127.8")
        control.set_dns_default("docker.internal.", "192.168.127.9")
        control.add_policy_rule("deny", "10.0.0.0/8:22/tcp")
        control.add_policy_rule("allow", "[2001:db8::/32]:443/tcp")  # IPv6 round-trips too
        control.remove_dns_zone("docker.internal.")
        control.add_dns_zone("docker.internal.")  # back, but empty: its host record is gone
        data = store.snapshot()
        store.write(data)
        await switch.close()
        return data

    data = asyncio.run(first())
    saved = json.loads(path.read_text())
    assert json.loads(data) == saved and os.stat(path).st_mode & 0o777 == 0o600
    containers = next(z for z in saved["dns"]["zones"] if z["name"] == "containers.internal.")
    assert containers["removed"] == [  # every record of the name: its AAAA too
        ["gateway.containers.internal.", "A", "192.168.127.1", 0],
        ["gateway.containers.internal.", "AAAA", "fd00:192:168:127::1", 0],
    ]
    assert saved["policy"] == [
        {"action": "deny", "rule": "10.0.0.0/8:22/tcp"},
        {"action": "allow", "rule": "[2001:db8::/32]:443/tcp"},
    ]

    async def second() -> tuple[list, list, list, tuple]:
        switch, control = await _switch_and_control()
        store = StateStore(control, str(path))
        store.dns_base = dns_snapshot(control)
        state = store.read()
        assert state is not None
        await store.restore(state)
        zones = control.dns_zones()
        rules = [str(r) for r in control.policy_rules()]
        extras = control.dns_extras("svc.test."), control.dns_extras("docker.internal.")
        await switch.close()
        return zones, rules, [], extras

    zones, rules, _, extras = asyncio.run(second())
    by_zone = {z: {(r.name, r.rtype, r.value, r.ttl) for r in recs} for z, recs in zones}
    assert ("gateway.containers.internal.", "A", "192.168.127.1", 0) not in by_zone[
        "containers.internal."
    ]
    assert ("host.containers.internal.", "A", "192.168.127.254", 0) in by_zone[
        "containers.internal."
    ]
    assert by_zone["svc.test."] == {("db.svc.test.", "A", "192.168.127.7", 30)}
    assert by_zone["docker.internal."] == set()
    assert extras[0] == ([("^web-[0-9]+$", "192.168.127.8")], None)
    assert extras[1] == ([], None)  # the zone was removed after its DefaultIP was set
    assert rules == ["deny 10.0.0.0/8:22/tcp", "allow [2001:db8::/32]:443/tcp"]


def test_write_is_atomic_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    store = StateStore(None, str(path))  # type: ignore[arg-type]
    store.write(b'{"version": 1}\n')
    assert path.read_text() == '{"version": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_released_lease_is_an_event_so_the_state_file_forgets_it() -> None:
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    from netferry.hostd.stack.network import LeaseEvent
    from tests.unit.test_network import GW_IP, dhcp_frame, feed, make_net

    mac, ip = "5a:94:ef:e4:0c:42", "192.168.127.3"
    net = make_net()
    feed(net, dhcp_frame(mac, 1, [("message-type", "discover")]), now=1.0)
    feed(net, dhcp_frame(mac, 2, [("message-type", "request"), ("server_id", GW_IP),
                                  ("requested_addr", ip)]), now=2.0)  # fmt: skip
    assert list(net.events) == [LeaseEvent(mac, ip, None)]
    net.events.clear()
    release = bytes(
        Ether(src=mac, dst="5a:94:ef:e4:0c:dd")
        / IP(src=ip, dst=GW_IP)
        / UDP(sport=68, dport=67)
        / BOOTP(chaddr=bytes.fromhex(mac.replace(":", "")) + bytes(10), xid=3, ciaddr=ip)
        / DHCP(options=[("message-type", "release"), ("server_id", GW_IP), "end"])
    )
    feed(net, release, now=3.0)
    assert list(net.events) == [LeaseEvent(mac, ip, None, released=True)]
    assert net.dhcp.leases(3.0) == []


def _restore(path: Path, leases6: list) -> tuple[str | None, list]:
    """Restore a state file holding `leases6`: the StateError's text (or None), the
    DHCPv6 leases bound after."""
    from netferry.hostd.state import StateError

    path.write_text(json.dumps({"version": 1, "leases6": leases6}))

    async def run() -> tuple[str | None, list]:
        switch, control = await _switch_and_control()
        store = StateStore(control, str(path))
        error = None
        try:
            state = store.read()
            assert state is not None
            await store.restore(state)
        except StateError as e:
            error = str(e)
        leases = switch.network.dhcp6.leases(switch.loop.time())
        await switch.close()
        return error, leases

    return asyncio.run(run())


def test_malformed_leases6_entry_is_a_state_error_naming_it(tmp_path: Path) -> None:
    error, leases = _restore(tmp_path / "state.json", [42])
    assert error is not None and "leases6[0]: not an object" in error and leases == []


def test_leases6_entry_with_a_bad_mac_is_skipped_not_bound(tmp_path: Path) -> None:
    import time

    duid = "00030001020000000007"
    entry = {"ip": "fd00:192:168:127::1005", "expires": time.time() + 600, "duid": duid,
             "iaid": 1, "hostname": None}  # fmt: skip
    error, leases = _restore(tmp_path / "state.json", [dict(entry, mac="not-a-mac")])
    assert error is None and leases == []
    error, leases = _restore(tmp_path / "state.json", [dict(entry, mac="02:00:00:00:00:07")])
    assert error is None and [(lease.mac, str(lease.ip)) for lease in leases] == [
        ("02:00:00:00:00:07", "fd00:192:168:127::1005")
    ]
