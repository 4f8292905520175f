"""IPv6 on the guest side with hostd (issue 15): vm-switch in a namespace over hostd's unix
socket brings IPv6 up with its defaults (SLAAC, RA route, RDNSS into the resolv.conf) or a
DHCPv6 client (`--dhcpv6`), pings the gateway over IPv6, and hostd's live capture carries
that exchange, read back with tshark."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import STARTED, _bin, stop_process, wait_for

pytestmark = pytest.mark.e2e

PREFIX6 = "fd00:192:168:127:"
GATEWAY6 = "fd00:192:168:127::1"
SLAAC6 = "fd00:192:168:127:5894:efff:fee4:cee"  # EUI-64 of the default MAC


def global6(g) -> str:
    return g.ns.run("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global").stdout


def wait_v6(g, *addresses: str) -> None:
    def up() -> bool:
        if g.proc.poll() is not None:
            pytest.fail(f"vm-switch exited {g.proc.returncode}:\n{g.log_text()}")
        out = global6(g)
        return all(f"inet6 {a}/" in out for a in addresses) and "tentative" not in out

    wait_for(up, 60, f"{addresses} on the guest's eth0", step=0.2)


def test_vm_switch_slaac_rdnss_and_ping6(hostd, guest):
    h = hostd()
    g = guest(h)
    wait_v6(g, SLAAC6)
    route = g.ns.run("ip", "-6", "route", "show", "default").stdout
    assert "default via fe80::" in route and "proto ra" in route, route
    wait_for(lambda: GATEWAY6 in g.resolv_conf.read_text(), 30, "the RDNSS server")
    lines = g.resolv_conf.read_text().splitlines()
    assert lines.index("nameserver 192.168.127.1") < lines.index(f"nameserver {GATEWAY6}")
    r = g.ns.run("ping", "-6", "-c", "2", "-W", "5", GATEWAY6, check=False)
    assert r.returncode == 0, r.stdout + r.stderr + g.log_text()
    assert '"ipv6.up"' in g.log_text() or "ipv6.up" in g.log_text()


def test_vm_switch_dhcpv6_gets_its_static_address(hostd, netns, short_tmp):
    """`--dhcpv6`: ISC dhclient -6 under vm-switch gets ::2 (the default MAC's static
    lease) beside the SLAAC address; its lease file and script live in a temp dir that is
    gone after vm-switch stops."""
    h = hostd()
    ns = netns()
    log = short_tmp / "vm-switch.log"
    resolv = short_tmp / "resolv.conf"
    proc = ns.popen(_bin("vm-switch"), "--connect", h.link_uri, "--dhcpv6", "--dhcp-client",
                    "udhcpc", "--resolv-conf", str(resolv), "--log-format", "json",
                    "--log-file", str(log), stdin=subprocess.DEVNULL)  # fmt: skip
    STARTED.append(proc)
    try:

        def up() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"vm-switch exited {proc.returncode}:\n{log.read_text()}")
            out = ns.run("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global",
                         check=False)  # fmt: skip
            return (
                f"inet6 {PREFIX6}:2/128" in out.stdout
                and f"inet6 {SLAAC6}/64" in out.stdout
                and "tentative" not in out.stdout
            )

        wait_for(up, 60, "::2 by DHCPv6 and the SLAAC address", step=0.2)
        wait_for(lambda: '"dhcpv6.bound"' in log.read_text(), 10, "vm-switch to see the lease")
        wait_for(lambda: GATEWAY6 in resolv.read_text(), 30, "the v6 DNS server")
        r = ns.run("ping", "-6", "-c", "1", "-W", "5", "-I", f"{PREFIX6}:2", GATEWAY6, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        tmpdirs = [d for d in os.listdir("/tmp") if d.startswith("vm-switch-dhcp6-")]
        assert tmpdirs
    finally:
        stop_process(proc)
    left = set(d for d in os.listdir("/tmp") if d.startswith("vm-switch-dhcp6-"))
    assert not left & set(tmpdirs), left


def test_capture_carries_ipv6_with_tshark(hostd, guest, short_tmp):
    h = hostd()
    g = guest(h)
    wait_v6(g, SLAAC6)
    pcap = short_tmp / "v6.pcap"
    netferry = [os.path.join(os.path.dirname(sys.executable), "netferry"), "--api", h.api]
    cap = subprocess.Popen([*netferry, "capture", "--protocol", "icmp", "--host", GATEWAY6,
                            "--duration", "20", "-w", str(pcap)])  # fmt: skip
    try:
        time.sleep(0.5)  # the capture is registered before the traffic starts
        r = g.ns.run("ping", "-6", "-c", "3", "-i", "0.2", "-W", "5", GATEWAY6, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        g.ns.run("ping", "-c", "1", "-W", "5", "192.168.127.1")  # v4: filtered out
    finally:
        cap.terminate()
        cap.wait(10)
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-T", "fields", "-e", "ipv6.src", "-e", "ipv6.dst",
         "-e", "icmpv6.type", "-e", "ip.src"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lines = [line.split("\t") for line in out.splitlines()]
    assert sum(x[:3] == [SLAAC6, GATEWAY6, "128"] for x in lines) == 3, out
    assert sum(x[:3] == [GATEWAY6, SLAAC6, "129"] for x in lines) == 3, out
    assert all(x[3] == "" and GATEWAY6 in x[:2] for x in lines), out  # the filter held
    # the --pcap file of the whole switch has them too (complete once hostd has stopped)
    h.stop()
    out = subprocess.run(
        ["tshark", "-r", h.pcap_path, "-Y", "icmpv6.type == 129", "-T", "fields",
         "-e", "ipv6.src"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.split().count(GATEWAY6) >= 3, out


def test_vm_switch_ready_without_an_ipv6_router(hostd, netns, short_tmp):
    """A hostd without IPv6 (--no-ipv6, as netferry-gvproxy by default) never answers the
    router solicitation: vm-switch still writes `ready` on --ready-fd (with an hour-long
    --ipv6-timeout, so only the router wait can end the wait), says why, and stops
    polling the tap (`ipv6.no_router`); the guest has no global IPv6 address."""
    h = hostd("--no-ipv6")
    ns = netns()
    log = short_tmp / "vm-switch.log"
    ready_r, ready_w = os.pipe()
    proc = ns.popen(_bin("vm-switch"), "--connect", h.link_uri, "--dhcp-client", "udhcpc",
                    "--ready-fd", str(ready_w), "--ipv6-timeout", "3600", "--log-format",
                    "json", "--log-file", str(log), stdin=subprocess.DEVNULL,
                    pass_fds=(ready_w,))  # fmt: skip
    STARTED.append(proc)
    os.close(ready_w)
    try:
        with os.fdopen(ready_r, "rb") as r:
            assert r.read() == b"ready\n", log.read_text()  # EOF would mean it exited
        text = log.read_text()
        assert '"ipv6.not_up"' in text, text
        wait_for(lambda: '"ipv6.no_router"' in log.read_text(), 30, "the tap poll to stop")
        assert proc.poll() is None, log.read_text()
        out = ns.run("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global").stdout
        assert out.strip() == "", out
        r = ns.run("ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
        assert "inet 192.168.127.2/24" in r, r
    finally:
        stop_process(proc)
