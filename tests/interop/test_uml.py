"""host-switch against User Mode Linux over bess: hostd's ``unixpacket://`` link and a real kernel.

Why: UML's ``vec0:transport=bess`` is the SOCK_SEQPACKET peer the gvisor-tap-vsock README
shows; its DHCP client, ARP, ICMP and TCP are a real Linux kernel's, not our own builders'.

host-switch runs with ``--listen unixpacket://SOCK`` (beside the fixture's unused unix
listener), and UML is started exactly as ``shared/reference/peers-observed.md`` gives it::

    linux.uml vec0:transport=bess,dst=SOCK,depth=128,gro=1,mac=5a:94:ef:e4:0c:ee \
        root=/dev/root rootfstype=hostfs ro init=tests/interop/uml_init.sh mem=256M \
        con=null con0=fd:0,fd:1 ssl=null \
        uml_dir=RUN_DIR nf.ping=192.168.127.1 nf.fetch=http://192.168.127.254:PORT/blob?mib=16

(``uml_dir`` keeps UML's pid file and mconsole socket in a directory the test removes; the
``nf.*`` words are the steps for ``uml_init.sh``). It runs under ``uml_exec.py``, a seccomp
wrapper without which Debian 12's UML 6.1 dies at its first guest instruction on a host with
AVX-512/AMX (see there). UML boots in about a second; the whole test takes a few seconds.

Needs Debian's ``user-mode-linux`` and ``busybox`` (scripts/bootstrap installs both); fails,
never skips, when they are missing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import STARTED, Blob, Hostd, HttpServer
from tests.interop.qemu_guest import DEFAULT_MAC, GuestResult
from tests.interop.uml_guest import UmlMissing, find_uml, start_uml

pytestmark = [pytest.mark.interop, pytest.mark.timeout(600)]

GATEWAY = "192.168.127.1"
GUEST_CIDR = "192.168.127.2/24"
HOST_LOOPBACK = "192.168.127.254"  # host-switch's NAT alias for the host's 127.0.0.1
FETCH_MIB = 16
# Boot is ~1 s and the fetch ~50 MB/s; generous for a loaded CI machine.
UML_TIMEOUT = 300.0


def _prefix_sha256(blob: Blob, mib: int) -> str:
    h = hashlib.sha256()
    with open(blob.path, "rb") as f:
        for _ in range(mib):
            h.update(f.read(1 << 20))
    return h.hexdigest()


def _diagnose(result: GuestResult, h: Hostd) -> str:
    """UML's console plus the tail of host-switch's log, for assertion messages."""
    return (
        f"UML command: {' '.join(result.command)}\n{result.describe()}\n"
        f"--- host-switch log tail ---\n{h.log_text()[-4000:]}\n(pcap: {h.pcap_path})"
    )


def test_uml_over_bess_lease_ping_and_16mib_fetch(
    hostd: Callable[..., Hostd], http_server: HttpServer, short_tmp: Path
) -> None:
    """UML gets .2 by DHCP over unixpacket, pings .1, fetches 16 MiB via .254 byte-exact."""
    try:
        find_uml()
    except UmlMissing as e:
        pytest.fail(str(e))
    bess_socket = short_tmp / "bess.sock"
    h = hostd("--listen", f"unixpacket://{bess_socket}")
    url = f"http://{HOST_LOOPBACK}:{http_server.port}/blob?mib={FETCH_MIB}"
    expected = _prefix_sha256(http_server.blob, FETCH_MIB)

    run = start_uml(str(bess_socket), {"ping": GATEWAY, "fetch": url})
    STARTED.append(run.proc)  # the session check fails the run if UML outlived its test
    result = run.wait(UML_TIMEOUT)
    why = _diagnose(result, h)

    assert not result.timed_out, f"UML did not power off within {UML_TIMEOUT}s\n{why}"
    assert result.lease is not None, f"UML got no DHCP lease\n{why}"
    assert result.lease.get("ip") == GUEST_CIDR, f"wrong lease {result.lease}\n{why}"
    assert result.lease.get("router") == GATEWAY, f"wrong router {result.lease}\n{why}"
    assert result.results.get("ping") == "ok", f"ping {GATEWAY} failed\n{why}"
    assert result.results.get("fetch") == f"sha256={expected}", (
        f"fetch of {url} failed or corrupted (want sha256={expected})\n{why}"
    )
    assert result.done, f"uml_init.sh did not finish\n{why}"
    assert result.returncode == 0, f"UML did not halt cleanly\n{why}"

    # hostd's side: the lease is in its table (gRPC), and it was granted while the one link
    # that ever came up, UML's unixpacket connection, was up (hostd's log, in order).
    with h.client() as api:
        leases = {lease.mac: lease.ip for lease in api.leases()}
    assert leases.get(DEFAULT_MAC) == GUEST_CIDR.split("/")[0], f"hostd's leases: {leases}\n{why}"
    events = [e for e in h.log_events() if e.get("event") in ("link.up", "dhcp.lease", "link.down")]
    ups = [e for e in events if e["event"] == "link.up"]
    assert len(ups) == 1 and ups[0]["link"].startswith("unixpacket://"), f"{events}\n{why}"
    link = ups[0]["link"]
    sequence = [
        (e["event"], e.get("link") or (e.get("mac"), e.get("ip")))
        for e in events
        if e.get("link", link) == link
    ]
    assert sequence[:2] == [
        ("link.up", link),
        ("dhcp.lease", (DEFAULT_MAC, GUEST_CIDR.split("/")[0])),
    ], f"hostd's link and lease events: {sequence}\n{why}"
    assert ("link.down", link) in sequence, f"UML's link never went down: {sequence}\n{why}"


def test_uml_slaac_and_ping6_gateway(hostd: Callable[..., Hostd], short_tmp: Path) -> None:
    """Issue 15 on a second real kernel: UML configures its SLAAC address (EUI-64 of its
    MAC) from hostd's RA over bess and pings the gateway over IPv6."""
    try:
        find_uml()
    except UmlMissing as e:
        pytest.fail(str(e))
    bess_socket = short_tmp / "bess.sock"
    h = hostd("--listen", f"unixpacket://{bess_socket}")
    run = start_uml(
        str(bess_socket), {"slaac6": "fd00:192:168:127:", "ping6": "fd00:192:168:127::1"}
    )
    STARTED.append(run.proc)
    result = run.wait(UML_TIMEOUT)
    why = _diagnose(result, h)
    assert not result.timed_out, f"UML did not power off within {UML_TIMEOUT}s\n{why}"
    slaac = result.results.get("slaac6", "")
    assert slaac.startswith("addr=fd00:192:168:127:5894:efff:fee4:cee/64 router=fe80::"), why
    assert result.results.get("ping6") == "ok", f"ping6 failed\n{why}"
    assert result.done, f"uml_init.sh did not finish\n{why}"
