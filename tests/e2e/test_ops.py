"""Operating hostd safely: the state file across kill -9, and corrupt state files."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import STARTED, _bin, free_tcp_port, wait_for
from tests.e2e.test_api import GUEST_FILE_SERVER

pytestmark = pytest.mark.e2e

DYNAMIC_MAC = "5a:94:ef:e4:0c:42"


def fetch(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


def netferry(api: str, *args: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run(
        [_bin("netferry"), "--api", api, "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
        **kw,
    )


def test_state_survives_kill9(hostd, guest, short_tmp: Path) -> None:
    state = short_tmp / "state.json"
    h = hostd("--state-file", str(state))
    g = guest(h, mac=DYNAMIC_MAC)
    guest_ip = g.ip
    payload = os.urandom(3 << 20)
    (short_tmp / "payload").write_bytes(payload)
    server = g.ns.popen(
        sys.executable, "-c", GUEST_FILE_SERVER, "8080", str(short_tmp / "payload"),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout.readline().strip() == "listening"
        port = free_tcp_port()
        netferry(h.api, "expose", f"127.0.0.1:{port}", f"{guest_ip}:8080")
        netferry(h.api, "dns", "add", "svc.test", "db", "A", "192.168.127.77")
        netferry(h.api, "policy", "deny", "10.99.0.0/16:443/tcp")

        def saved() -> dict | None:
            try:
                data = json.loads(state.read_text())
            except (OSError, ValueError):
                return None
            done = (
                data["forwards"]
                and data["policy"]
                and data["leases"]
                and any(z["name"] == "svc.test." for z in data["dns"]["zones"])
            )
            return data if done else None

        data = wait_for(saved, 10, "the state file to hold the run-time changes")
        assert data["leases"][0]["mac"] == DYNAMIC_MAC and data["leases"][0]["ip"] == guest_ip
        assert state.stat().st_mode & 0o777 == 0o600

        h.proc.kill()  # no SIGTERM: nothing gets written at exit
        h.proc.wait()
        ready_before = h.log_text().count('"hostd.ready"')
        h.proc = subprocess.Popen(h.args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        STARTED.append(h.proc)
        wait_for(lambda: h.log_text().count('"hostd.ready"') > ready_before, 15, "hostd to restart")
        # The lease is back before the guest asks again (restored at start).
        leases = json.loads(netferry(h.api, "leases").stdout)
        assert [(x["mac"], x["ip"]) for x in leases] == [(DYNAMIC_MAC, guest_ip)]
        forwards = json.loads(netferry(h.api, "forwards").stdout)
        assert [(f["local"], f["remote"]) for f in forwards] == [
            (f"127.0.0.1:{port}", f"{guest_ip}:8080")
        ]
        zones = {z["name"]: z for z in json.loads(netferry(h.api, "dns", "ls").stdout)}
        assert {"name": "db.svc.test.", "type": "DNS_RECORD_TYPE_A", "value": "192.168.127.77"} in [
            {k: r[k] for k in ("name", "type", "value")} for r in zones["svc.test."]["records"]
        ]
        rules = json.loads(netferry(h.api, "policy", "ls").stdout)
        assert [(r["action"], r["rule"]) for r in rules] == [
            ("POLICY_ACTION_DENY", "10.99.0.0/16:443/tcp")
        ]
        # The guest reconnects and keeps its address; the forward carries data to it.
        wait_for(lambda: len(h.stats()["links"]) == 1, 30, "the guest to reconnect")
        assert g.ip == guest_ip
        got = wait_for(lambda: fetch(port) or None, 30, "data through the restored forward")
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
        # The guest's name resolves from inside too.
        r = g.ns.run("dig", "+short", "+tries=1", "+time=5", "@192.168.127.1", "db.svc.test")
        assert r.stdout.split() == ["192.168.127.77"]
    finally:
        server.kill()
        server.wait()


def test_state_written_on_sigterm_and_flags_not_copied(hostd, short_tmp: Path) -> None:
    state = short_tmp / "state.json"
    fixed = free_tcp_port()
    h = hostd(
        "--state-file", str(state),
        "--port-forward", f"127.0.0.1:{fixed}=192.168.127.2:22",
        "--deny", "10.0.0.0/8",
        "--dns-record", "flag.containers.internal=A:192.168.127.9",
    )  # fmt: skip
    h.stop()
    data = json.loads(state.read_text())
    assert data["forwards"] == [] and data["policy"] == [] and data["leases"] == []
    assert data["dns"] == {"zones": [], "removed_zones": []}


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"version": 1, "forwards": 7}'])
def test_corrupt_state_file_is_one_line_naming_it(short_tmp: Path, content: bytes) -> None:
    state = short_tmp / "state.json"
    state.write_bytes(content)
    link = short_tmp / "link.sock"
    args = [_bin("host-switch"), "--listen", f"unix://{link}", "--api", "none"]
    args += ["--dns-upstream", "127.0.0.1:9", "--state-file", str(state)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("host-switch: error: state file ") and str(state) in lines[0]
    assert state.read_bytes() == content  # nothing lost
    assert not link.exists()


def test_corrupt_state_file_moved_aside_with_flag(short_tmp: Path) -> None:
    state = short_tmp / "state.json"
    state.write_bytes(b"\x00garbage")
    link = short_tmp / "link.sock"
    logf = short_tmp / "hostd.log"
    args = [_bin("host-switch"), "--listen", f"unix://{link}", "--api", "none"]
    args += ["--dns-upstream", "127.0.0.1:9", "--state-file", str(state)]
    args += ["--state-reset-on-error", "--log-format", "json", "--log-file", str(logf)]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    STARTED.append(proc)
    try:
        wait_for(lambda: logf.exists() and '"hostd.ready"' in logf.read_text(), 15, "hostd")
        aside = [p for p in short_tmp.iterdir() if p.name.startswith("state.json.corrupt-")]
        assert len(aside) == 1 and aside[0].read_bytes() == b"\x00garbage"
        assert '"state.reset"' in logf.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert json.loads(state.read_text())["version"] == 1


def test_root_without_ping_group_pings_through_raw_socket(hostd, guest) -> None:
    """Debian's default ping_group_range "1 0" permits no ping sockets: hostd as root falls
    back to a raw ICMP socket (CAP_NET_RAW), so the guest's pings beyond the gateway work."""
    range_file = Path("/proc/sys/net/ipv4/ping_group_range")
    old = range_file.read_text().strip()
    range_file.write_text("1 0")
    try:
        h = hostd()
        g = guest(h)
        r = g.ns.run("ping", "-c", "3", "-i", "0.2", "-W", "5", "192.168.127.254", check=False)
        assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout
        events = [e["event"] for e in h.log_events()]
        assert "nat.icmp.raw_socket" in events
        assert "icmp.ping_sockets_not_permitted" not in events
        # Two pingers at once keep their own sequence (replies matched by id and source).
        a = g.ns.popen("ping", "-c", "5", "-i", "0.2", "-W", "5", "192.168.127.254",
                       stdout=subprocess.PIPE, text=True)  # fmt: skip
        b = g.ns.run("ping", "-c", "5", "-i", "0.2", "-W", "5", "192.168.127.254", check=False)
        out_a, _ = a.communicate(timeout=30)
        assert " 0% packet loss" in out_a and " 0% packet loss" in b.stdout
    finally:
        range_file.write_text(old)


FORBIDDEN_PROBE = r"""
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if sys.argv[1] == "sandbox":
    from netferry.hostd.privileges import apply_sandbox
    apply_sandbox()
CLONE_NEWNS, PTRACE_TRACEME = 0x00020000, 0
results = {}
for name, call in (
    ("unshare", lambda: libc.unshare(CLONE_NEWNS)),
    ("ptrace", lambda: libc.ptrace(PTRACE_TRACEME, 0, None, None)),
    ("mount", lambda: libc.mount(b"none", b"/nonexistent-nf", b"tmpfs", 0, None)),
):
    rc = call()
    results[name] = "ok" if rc == 0 else errno.errorcode[ctypes.get_errno()]
print(results)
"""


def test_sandbox_refuses_forbidden_syscalls(hostd) -> None:
    # The running hostd (the fixture turns --sandbox on) has the filter and no new privileges.
    h = hostd("--sandbox")
    status = Path(f"/proc/{h.proc.pid}/status").read_text()
    assert "\nSeccomp:\t2\n" in status and "\nNoNewPrivs:\t1\n" in status
    # Its capabilities: only CAP_DAC_OVERRIDE, CAP_NET_BIND_SERVICE and CAP_NET_RAW are left.
    cap_eff = int(next(x for x in status.splitlines() if x.startswith("CapEff:")).split()[1], 16)
    assert cap_eff == (1 << 1) | (1 << 10) | (1 << 13)
    # The same filter, loaded by the same function, refuses the calls root could make.
    run = [sys.executable, "-c", FORBIDDEN_PROBE]
    plain = subprocess.run([*run, "plain"], capture_output=True, text=True, timeout=30)
    assert plain.stdout.strip() == "{'unshare': 'ok', 'ptrace': 'ok', 'mount': 'ENOENT'}"
    boxed = subprocess.run([*run, "sandbox"], capture_output=True, text=True, timeout=30)
    assert boxed.stdout.strip() == "{'unshare': 'EPERM', 'ptrace': 'EPERM', 'mount': 'EPERM'}"
    # And hostd still works under it: the API answers and a forward listens.
    with h.client() as api:
        port = free_tcp_port()
        api.expose("tcp", f"127.0.0.1:{port}", "192.168.127.2:22")
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_state_file_in_a_missing_directory_is_a_usage_error(short_tmp: Path) -> None:
    r = subprocess.run(
        [_bin("host-switch"), "--listen", f"unix://{short_tmp}/l.sock", "--api", "none",
         "--state-file", str(short_tmp / "nope" / "state.json")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 2 and "does not exist or is not writable" in r.stderr
