"""host-switch against a real Linux guest kernel under QEMU.

Why: our own packet builders can agree with our own parsers and still be wrong; a real
kernel's DHCP client, ARP, ICMP and TCP are the reference peer. The guest's only NIC is a
QEMU stream netdev connected to host-switch's unix socket (no slirp/tap, no real network).

Needs ``qemu-system-x86_64`` and, the first time, the Debian mirror (``apt-get download``);
the built image is cached under ``$NETFERRY_CACHE/qemu-guest``. These tests fail (never skip)
when that is not available, so a broken setup is visible.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.interop.qemu_guest import (
    GuestBuildError,
    GuestImage,
    GuestResult,
    build_guest,
    run_guest,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(400)]

GATEWAY = "192.168.127.1"
GUEST_CIDR = "192.168.127.2/24"
HOST_LOOPBACK = "192.168.127.254"  # host-switch's NAT alias for the host's 127.0.0.1
GUEST_TIMEOUT = 150.0  # TCG boot is ~4 s alone, ~20 s with two guests on two cores


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """Build (or reuse) the guest once per session; fail loudly if that is impossible."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 not found in PATH (apt-get install qemu-system-x86)")
    try:
        return build_guest()
    except GuestBuildError as e:
        pytest.fail(f"cannot build the QEMU guest image: {e}")


@pytest.fixture
def http_blob() -> Iterator[tuple[int, str]]:
    """A 1 MiB random file served on 127.0.0.1:<port>/blob; yields (port, sha256 hex)."""
    blob = os.urandom(1 << 20)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/blob":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            self.wfile.write(blob)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="http-blob", daemon=True)
    thread.start()
    try:
        yield server.server_address[1], hashlib.sha256(blob).hexdigest()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _diagnose(result: GuestResult, hostd: Any) -> str:
    """Guest console plus the tail of host-switch's log, for assertion messages."""
    log = ""
    log_path = getattr(hostd, "log_path", None)
    if log_path and Path(log_path).is_file():
        log = Path(log_path).read_text(errors="replace")[-4000:]
    pcap = getattr(hostd, "pcap_path", None)
    return f"{result.describe()}\n--- host-switch log tail ---\n{log}\n(pcap: {pcap})"


def _assert_lease(result: GuestResult, hostd: Any) -> None:
    assert not result.timed_out, f"guest timed out\n{_diagnose(result, hostd)}"
    assert result.lease is not None, f"guest got no DHCP lease\n{_diagnose(result, hostd)}"
    assert result.lease.get("ip") == GUEST_CIDR, _diagnose(result, hostd)
    assert result.lease.get("router") == GATEWAY, _diagnose(result, hostd)


def test_dhcp_lease_and_ping_gateway(hostd: Callable[..., Any], guest_image: GuestImage) -> None:
    """A real kernel gets 192.168.127.2/24 via udhcpc and the gateway answers its pings."""
    h = hostd()
    result = run_guest(guest_image, h.link_path, {"ping": GATEWAY}, timeout=GUEST_TIMEOUT)
    _assert_lease(result, h)
    assert result.results.get("ping") == "ok", f"ping failed\n{_diagnose(result, h)}"
    assert result.done, f"/init did not finish\n{_diagnose(result, h)}"
    assert result.returncode == 0, _diagnose(result, h)


def test_fetch_from_host_loopback(
    hostd: Callable[..., Any], guest_image: GuestImage, http_blob: tuple[int, str]
) -> None:
    """The guest's TCP download of 1 MiB from the host's loopback via .254 arrives intact."""
    port, digest = http_blob
    h = hostd()
    url = f"http://{HOST_LOOPBACK}:{port}/blob"
    result = run_guest(guest_image, h.link_path, {"fetch": url}, timeout=GUEST_TIMEOUT)
    _assert_lease(result, h)
    assert result.results.get("fetch") == f"sha256={digest}", (
        f"fetch of {url} failed or corrupted\n{_diagnose(result, h)}"
    )
    assert result.done, f"/init did not finish\n{_diagnose(result, h)}"


PREFIX6 = "fd00:192:168:127:"  # hostd's default IPv6 prefix (fd00:192:168:127::/64)
GATEWAY6 = "fd00:192:168:127::1"


def test_slaac_address_and_ping6_gateway(
    hostd: Callable[..., Any], guest_image: GuestImage
) -> None:
    """Acceptance 9 of issue 15: a real kernel under QEMU configures its SLAAC address in the
    prefix from hostd's RA (EUI-64 of its MAC), with the default route via the gateway's
    link-local address, and the gateway answers its ICMPv6 echo."""
    h = hostd()
    steps = {"slaac6": PREFIX6, "ping6": GATEWAY6}
    result = run_guest(guest_image, h.link_path, steps, timeout=GUEST_TIMEOUT, ipv6=True)
    _assert_lease(result, h)
    slaac = result.results.get("slaac6", "")
    assert slaac.startswith(f"addr={PREFIX6}5894:efff:fee4:cee/64 router=fe80::"), (
        f"no SLAAC address\n{_diagnose(result, h)}"
    )
    assert result.results.get("ping6") == "ok", f"ping6 failed\n{_diagnose(result, h)}"
    assert result.done, f"/init did not finish\n{_diagnose(result, h)}"
