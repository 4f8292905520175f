"""Only hostd's owner drives it: another real local user (`nobody`) is refused on every API
door (gRPC and HTTP, unix and TCP) while the owner's CLI, SDK, grpcurl and curl work."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, _bin, free_tcp_port, require_root

pytestmark = pytest.mark.e2e

TOKEN = "s3cret-token-0123456789abcdef"


def as_nobody(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {"PATH": "/usr/bin:/bin", "HOME": "/", **(env or {})}
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *cmd],
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
    )


@pytest.fixture
def open_dir(short_tmp: Path):
    """Let other users traverse the test directory (restored after)."""
    mode = short_tmp.stat().st_mode & 0o777
    os.chmod(short_tmp, 0o755)
    try:
        yield short_tmp
    finally:
        os.chmod(short_tmp, mode)


def test_other_user_refused_owner_served(hostd, open_dir: Path) -> None:
    require_root()
    token_file = open_dir / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    grpc_port, http_port = free_tcp_port(), free_tcp_port()
    http_sock = open_dir / "h" / "http.sock"
    h = hostd(
        "--api-token-file", str(token_file),
        "--http-api", f"tcp://127.0.0.1:{http_port}",
        "--http-api", f"unix://{http_sock}",
        name="h",
    )  # fmt: skip
    os.chmod(h.dir, 0o755)
    # A second hostd serves gRPC on TCP (one --api per hostd).
    h2 = hostd(
        "--api", f"tcp://127.0.0.1:{grpc_port}", "--api-token-file", str(token_file), name="h2"
    )
    netferry = _bin("netferry")
    tcp_api = f"tcp://127.0.0.1:{grpc_port}"

    # Unix sockets are 0600; loosen them to show the uid check stands on its own.
    for path in (h.api_path, str(http_sock)):
        assert os.stat(path).st_mode & 0o777 == 0o600
    r = as_nobody(netferry, "--api", h.api, "leases")
    assert r.returncode == 3 and "Permission denied" in r.stderr  # the file mode refuses
    for path in (h.api_path, str(http_sock)):
        os.chmod(path, 0o666)

    # --- another user: every door refuses --------------------------------------------------
    for args in (["leases"], ["forwards"], ["expose", "127.0.0.1:18888", "192.168.127.2:22"],
                 ["dns", "add", "x.test", "a", "A", "192.168.127.9"], ["policy", "ls"]):  # fmt: skip
        r = as_nobody(netferry, "--api", h.api, *args)
        assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr, (args, r.stderr)
        r = as_nobody(netferry, "--api", tcp_api, *args)
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr, (args, r.stderr)
        r = as_nobody(netferry, "--api", tcp_api, *args, env={"NETFERRY_API_TOKEN": "wrong" * 4})
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr, (args, r.stderr)
    r = as_nobody(netferry, "--api", h.api, "--timeout", "5", "tunnel", "192.168.127.2:22", env={})
    assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr
    grpcurl = str(BIN / "grpcurl")
    r = as_nobody(grpcurl, "-plaintext", f"127.0.0.1:{grpc_port}", "list")
    assert r.returncode != 0 and "Unauthenticated" in r.stderr
    r = as_nobody(grpcurl, "-plaintext", "-unix", h.api_path, "list")
    assert r.returncode != 0 and "PermissionDenied" in r.stderr
    for target in ("/stats", "/leases", "/services/forwarder/all"):
        r = as_nobody("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                      f"http://127.0.0.1:{http_port}{target}")  # fmt: skip
        assert r.stdout == "401", target
        r = as_nobody("curl", "-s", "-H", "Authorization: Bearer nope-nope-nope-nope",
                      "-o", "/dev/null", "-w", "%{http_code}",
                      f"http://127.0.0.1:{http_port}{target}")  # fmt: skip
        assert r.stdout == "401", target
        r = as_nobody("curl", "-s", "-w", " %{http_code}", "--unix-socket", str(http_sock),
                      f"http://x{target}")  # fmt: skip
        assert r.stdout.endswith(" 403") and "not hostd's uid" in r.stdout, (
            r,
            h.proc.poll(),
            h.log_text()[-3000:],
        )
    r = as_nobody(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
        "-d", '{"local":":18888","remote":"192.168.127.2:22"}',
        f"http://127.0.0.1:{http_port}/services/forwarder/expose",
    )  # fmt: skip
    assert r.stdout == "401"

    # --- the owner: everything works -----------------------------------------------------
    def owner(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [netferry, *args], capture_output=True, text=True, timeout=60,
            env={**os.environ, **(env or {})},
        )  # fmt: skip

    assert owner("--api", h.api, "--json", "forwards").returncode == 0
    r = owner("--api", tcp_api, "--token-file", str(token_file), "--json", "leases")
    assert r.returncode == 0 and json.loads(r.stdout) == []
    r = owner("--api", tcp_api, "--json", "forwards", env={"NETFERRY_API_TOKEN": TOKEN})
    assert r.returncode == 0 and json.loads(r.stdout) == []
    r = subprocess.run(
        [grpcurl, "-plaintext", "-H", f"authorization: Bearer {TOKEN}",
         f"127.0.0.1:{grpc_port}", "netferry.v1.HostSwitch/ListLeases"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        ["curl", "-sf", "-H", f"Authorization: Bearer {TOKEN}",
         f"http://127.0.0.1:{http_port}/services/forwarder/all"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0 and json.loads(r.stdout) == []
    r = subprocess.run(
        ["curl", "-sf", "--unix-socket", str(http_sock), "http://x/leases"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0
    assert h2.proc.poll() is None and h.proc.poll() is None


def test_tcp_api_without_token_refuses_to_start(short_tmp: Path) -> None:
    port = free_tcp_port()
    for flag in ("--api", "--http-api"):
        r = subprocess.run(
            [_bin("host-switch"), "--listen", f"unix://{short_tmp}/l.sock",
             flag, f"tcp://127.0.0.1:{port}", "--dns-upstream", "127.0.0.1:9"]
            + (["--api", "none"] if flag == "--http-api" else []),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert r.returncode == 2 and "needs --api-token-file" in r.stderr, r.stderr
