"""IPv6's control plane against real clients: a kernel guest (vm-switch's tap in a namespace)
takes its DHCPv6 lease with ISC dhclient -6, and grpcurl, the SDK, the `netferry` CLI and
gvproxy's HTTP /leases list it; a state file keeps it over a hostd restart (a client that
comes later gets another address, the returning one its own); `dig AAAA` over IPv6 reaches
the gateway's local zones. netferry-slirp4netns's --enable-ipv6: tests/e2e/test_slirp4netns.py."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, Netns, wait_for
from tests.e2e.test_dhcpv6_client import dhclient_log, run_dhclient

pytestmark = pytest.mark.e2e

PREFIX = "fd00:192:168:127::"
MAC1 = "02:00:00:00:00:61"
MAC2 = "02:00:00:00:00:62"


def link_local_ready(ns: Netns) -> bool:
    """dhclient -6 needs a link-local address that has passed DAD."""
    out = ns.run("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link").stdout
    return "inet6 fe80:" in out and "tentative" not in out


def global_addresses(ns: Netns) -> list[str]:
    out = ns.run("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global").stdout
    return [line.split()[3] for line in out.splitlines() if "tentative" not in line]


def dhcpv6_lease(ns: Netns, tmp: Path, want: str) -> None:
    """dhclient -6 in the guest until it has configured `want` (then it is stopped)."""
    tmp.mkdir(exist_ok=True)
    wait_for(lambda: link_local_ready(ns), 30, f"a link-local address in {ns.name}")
    proc, _got, log = run_dhclient(ns, tmp)
    try:
        wait_for(
            lambda: f"{want}/64" in global_addresses(ns),
            60,
            f"dhclient -6 to configure {want}:\n{dhclient_log(tmp)}",
            step=0.2,
        )
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def grpcurl_leases(api_path: str) -> list[dict]:
    r = subprocess.run(
        [str(BIN / "grpcurl"), "-plaintext", "-unix", api_path,
         "netferry.v1.HostSwitch/ListLeases"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout).get("leases", [])


def test_dhcpv6_lease_in_every_lease_api_and_kept_over_a_restart(hostd, guest, short_tmp):
    state = short_tmp / "state.json"
    http = short_tmp / "http.sock"
    h = hostd("--state-file", str(state), "--http-api", f"unix://{http}")
    g1 = guest(h, mac=MAC1)
    first = f"{PREFIX}1000"  # the pool's first address: MAC1 is not the default MAC
    dhcpv6_lease(g1.ns, short_tmp / "dhclient1", first)

    # grpcurl (reflection, no proto files)
    by_ip = {x["ip"]: x for x in grpcurl_leases(h.api_path)}
    assert by_ip[first]["mac"] == MAC1 and not by_ip[first].get("static", False)
    assert g1.ip in by_ip  # the IPv4 lease beside it
    # the SDK
    (v6,) = [x for x in h.client().leases() if ":" in x.ip]
    assert (v6.ip, v6.mac, v6.static) == (first, MAC1, False)
    assert v6.expires.seconds > 0
    # the netferry CLI
    r = subprocess.run(
        [str(BIN / "netferry"), "--api", h.api, "--json", "leases"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert {(x["ip"], x["mac"]) for x in json.loads(r.stdout)} >= {(first, MAC1)}
    r = subprocess.run(
        [str(BIN / "netferry"), "--api", h.api, "leases"], capture_output=True, text=True
    )
    assert any(first in line and MAC1 in line for line in r.stdout.splitlines()), r.stdout
    # gvproxy's HTTP API: IP → MAC
    r = subprocess.run(
        ["curl", "-sf", "--unix-socket", str(http), "http://x/services/dhcp/leases"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0 and json.loads(r.stdout)[first] == MAC1

    # A restart: the state file (written at exit) brings the binding back before the guest
    # says anything, so a client that comes later gets another address...
    h.restart()
    saved = json.loads(state.read_text())
    assert [(x["ip"], x["mac"]) for x in saved["leases6"]] == [(first, MAC1)]
    assert {x["ip"]: x["mac"] for x in grpcurl_leases(h.api_path)}[first] == MAC1
    g2 = guest(h, mac=MAC2)
    dhcpv6_lease(g2.ns, short_tmp / "dhclient2", f"{PREFIX}1001")
    # ...and the returning one keeps its own (same DUID: dhclient's -D LL from its MAC).
    g1.ns.run("ip", "-6", "addr", "flush", "dev", "eth0", "scope", "global")
    dhcpv6_lease(g1.ns, short_tmp / "dhclient1b", first)
    leases = {x["ip"]: x["mac"] for x in grpcurl_leases(h.api_path)}
    assert leases[first] == MAC1 and leases[f"{PREFIX}1001"] == MAC2


def test_dig_aaaa_over_ipv6_from_a_slaac_guest(hostd, guest):
    h = hostd()
    g = guest(h)
    gateway6 = f"{PREFIX}1"

    def slaac() -> bool:
        prefix = ipaddress.IPv6Network(f"{PREFIX}/64")
        return any(ipaddress.IPv6Interface(a).ip in prefix for a in global_addresses(g.ns))

    wait_for(slaac, 30, "a SLAAC address in the guest", step=0.2)
    route = g.ns.run("ip", "-6", "route", "show", "default").stdout
    assert "via fe80::5894:efff:fee4:cdd" in route  # the gateway's link-local, from its RA

    def dig(qtype: str, name: str) -> list[str]:
        out = g.ns.run("dig", "+short", "+time=5", "+tries=2", qtype, name, f"@{gateway6}")
        return out.stdout.split()

    assert dig("AAAA", "host.containers.internal") == [f"{PREFIX}254"]
    assert dig("A", "host.containers.internal") == ["192.168.127.254"]
    assert dig("AAAA", "gateway.docker.internal") == [gateway6]
    out = g.ns.run("dig", "+tcp", "+short", "AAAA", "host.docker.internal", f"@{gateway6}")
    assert out.stdout.split() == [f"{PREFIX}254"]


def test_no_ipv6_serves_no_aaaa_and_no_router_advertisement(hostd, guest):
    h = hostd("--no-ipv6")
    g = guest(h)
    out = g.ns.run("dig", "+short", "+time=5", "AAAA", "host.containers.internal", "@192.168.127.1")
    assert out.stdout.strip() == ""  # NODATA
    # the guest's router solicitations were dropped and counted, and it has no prefix
    wait_for(lambda: h.stats()["network"].get("ipv6_dropped", 0) > 0, 30, "the guest's RS dropped")
    assert global_addresses(g.ns) == []
