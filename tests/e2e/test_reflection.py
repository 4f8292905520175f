"""grpcurl describes methods (`Service.Method`), not only messages and services, on every
netferry server: hostd (also in tests/interop/test_clients.py), wsl-proxy and network-setup
(the two share guestd.wsl_proxy.UnixGrpcServer)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, STARTED, _bin, stop_process, wait_for
from tests.e2e.test_guest_side import stack  # noqa: F401  (the guest side's fixture)

pytestmark = pytest.mark.e2e


def describe(sock: str, symbol: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "grpcurl"), "-plaintext", "-unix", sock, "describe", symbol],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_hostd_describes_methods(hostd) -> None:
    h = hostd()
    r = describe(h.api_path, "netferry.v1.HostSwitch.Expose")
    assert r.returncode == 0, r.stderr
    assert "netferry.v1.HostSwitch.Expose is a method:" in r.stdout
    assert (
        "rpc Expose ( .netferry.v1.ExposeRequest ) returns ( .netferry.v1.ExposeResponse );"
        in r.stdout
    )
    r = describe(h.api_path, "grpc.health.v1.Health.Check")
    assert r.returncode == 0 and "grpc.health.v1.Health.Check is a method:" in r.stdout
    r = describe(h.api_path, "netferry.v1.Forward.local")
    assert r.returncode == 0 and "string local = 2;" in r.stdout
    r = describe(h.api_path, "netferry.v1.HostSwitch.NoSuchMethod")
    assert r.returncode != 0 and "Symbol not found" in r.stderr


def test_wsl_proxy_describes_methods(short_tmp: Path) -> None:
    sock = short_tmp / "proxy.sock"
    proc = subprocess.Popen(
        [_bin("wsl-proxy"), "--socket", str(sock)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    STARTED.append(proc)
    try:
        wait_for(sock.exists, 15, "wsl-proxy's socket")
        r = describe(str(sock), "netferry.v1.PortProxy.StreamMappings")
        assert r.returncode == 0, r.stderr
        assert "netferry.v1.PortProxy.StreamMappings is a method:" in r.stdout
        r = describe(str(sock), "grpc.health.v1.Health.Check")
        assert r.returncode == 0 and "rpc Check" in r.stdout
    finally:
        stop_process(proc)


def test_network_setup_describes_methods(stack) -> None:  # noqa: F811
    st = stack(start_hostd=False)
    r = describe(str(st.guest_sock), "netferry.v1.Guest.Handshake")
    assert r.returncode == 0, r.stderr
    assert "netferry.v1.Guest.Handshake is a method:" in r.stdout
    r = describe(str(st.guest_sock), "grpc.health.v1.Health.Check")
    assert r.returncode == 0 and "rpc Check" in r.stdout
