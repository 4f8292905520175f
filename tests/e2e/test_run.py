"""`netferry run`: rootless namespaces with userspace networking, as slirp4netns users use it."""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN, free_tcp_port, serve_bytes, wait_for

pytestmark = pytest.mark.e2e
USER = "nfrunner"


def resolv_digest() -> str:
    return hashlib.sha256(Path("/etc/resolv.conf").read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def host_resolv_conf_unchanged() -> Iterator[None]:
    before = resolv_digest()
    yield
    assert resolv_digest() == before, "the host's /etc/resolv.conf changed"


@pytest.fixture(scope="module")
def unprivileged_user() -> Iterator[str]:
    """A normal user, and /dev/net/tun mode 0666 as most distributions ship it (both undone
    afterwards)."""
    if os.geteuid() != 0:
        pytest.fail("these tests need root to create the unprivileged user")
    created = False
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", USER], check=True)
        created = True
    tun_mode = os.stat("/dev/net/tun").st_mode & 0o777
    os.chmod("/dev/net/tun", 0o666)
    probe = subprocess.run(
        ["su", USER, "-s", "/bin/sh", "-c", f"{BIN}/python -c 'import netferry.run'"],
        capture_output=True, text=True,
    )  # fmt: skip
    try:
        if probe.returncode != 0:
            pytest.fail(
                f"{BIN}/python is not usable by an unprivileged user ({probe.stderr.strip()}); "
                "scripts/bootstrap builds .venv from /usr/bin/python3 so that it is"
            )
        yield USER
    finally:
        os.chmod("/dev/net/tun", tun_mode)
        if created:
            subprocess.run(["pkill", "-KILL", "-u", USER], check=False)
            subprocess.run(["userdel", "--remove", USER], check=False, capture_output=True)


def as_user(user: str, args: list[str], **kw) -> subprocess.Popen:
    cmd = " ".join(shlex.quote(a) for a in args)
    return subprocess.Popen(["su", user, "-s", "/bin/sh", "-c", f"cd /tmp && exec {cmd}"], **kw)


def netferry_run(*args: str) -> list[str]:
    return [f"{BIN}/netferry", "run", *args]


PREEXISTING: set[str] = set()


@pytest.fixture(autouse=True)
def existing_run_dirs() -> None:
    """Temp dirs of earlier runs (a SIGKILLed netferry cannot remove its own) are not ours."""
    PREEXISTING.clear()
    PREEXISTING.update(glob.glob("/tmp/netferry-run-*"))


def leftovers(user: str) -> list[str]:
    procs = subprocess.run(["pgrep", "-u", user, "-a"], capture_output=True, text=True).stdout
    dirs = [d for d in glob.glob("/tmp/netferry-run-*") if d not in PREEXISTING]
    return [line for line in procs.splitlines() if line.strip()] + dirs


def assert_nothing_remains(user: str, timeout: float = 10) -> None:
    """Within `timeout`, no process of `user` and no run directory is left; on failure
    the message names what was."""
    deadline = time.monotonic() + timeout
    while (left := leftovers(user)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], f"left after the run ended: {left}"


@pytest.fixture
def page_server() -> Iterator[tuple[int, bytes]]:
    body = b"netferry run says hello " + os.urandom(8).hex().encode()
    with serve_bytes(body) as port:
        yield port, body


def test_unprivileged_run_lease_dns_and_fetch(unprivileged_user, page_server, dns_upstream):
    port, body = page_server
    script = (
        "ip -4 addr show eth0; getent ahostsv4 host.containers.internal | head -1; "
        "getent hosts host.containers.internal; "
        f"curl -s http://192.168.127.254:{port}/; echo; exit 7"
    )
    p = as_user(
        unprivileged_user,
        netferry_run("--dns-upstream", dns_upstream.spec, "--", "sh", "-c", script),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = p.communicate(timeout=90)
    assert p.returncode == 7, (out, err)
    assert "inet 192.168.127.2/24" in out
    # the A record; with IPv6 up in the namespace, `getent hosts` prefers the AAAA
    assert "192.168.127.254 STREAM host.containers.internal" in out.replace("  ", " "), out
    assert "fd00:192:168:127::254 host.containers.internal" in out, out
    assert body.decode() in out
    assert leftovers(unprivileged_user) == []


def test_publish_and_runtime_forward(unprivileged_user, dns_upstream, short_tmp):
    os.chmod(short_tmp, 0o777)
    api = str(short_tmp / "api.sock")
    published, runtime = free_tcp_port(), free_tcp_port()
    p = as_user(
        unprivileged_user,
        netferry_run("--publish", f"127.0.0.1:{published}:8080", "--api", api,
                     "--dns-upstream", dns_upstream.spec, "--",
                     "python3", "-m", "http.server", "8080", "-d", "/etc"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:

        def fetch(port: int) -> str:
            r = subprocess.run(["curl", "-s", "--max-time", "5", f"http://127.0.0.1:{port}/hostname"],
                               capture_output=True, text=True)  # fmt: skip
            return r.stdout

        expected = Path("/etc/hostname").read_text()
        wait_for(lambda: fetch(published) == expected, 60, "the published port to serve the page")
        # A forward added at run time through the API socket.
        from netferry.client import HostSwitchClient

        with HostSwitchClient(f"unix://{api}") as client:
            client.expose("tcp", f"127.0.0.1:{runtime}", "192.168.127.2:8080")
            assert fetch(runtime) == expected
            assert {f.local for f in client.forwards()} == {
                f"127.0.0.1:{published}",
                f"127.0.0.1:{runtime}",
            }
        assert oct(os.stat(api).st_mode & 0o777) == "0o600"
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    assert not os.path.exists(api)
    assert_nothing_remains(unprivileged_user)


def test_sigint_reaches_command_and_second_sigint_tears_down(unprivileged_user):
    # The command reports SIGINT and carries on; the second SIGINT to netferry ends it all.
    script = "trap 'echo got-sigint' INT; echo started; while :; do sleep 0.1; done"
    p = as_user(
        unprivileged_user,
        netferry_run("--dns-upstream", "127.0.0.1:9", "--", "sh", "-c", script),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert p.stdout.readline().strip() == "started"
    netferry_pid = wait_for(lambda: _netferry_pid(unprivileged_user), 10, "the netferry process")
    os.kill(netferry_pid, signal.SIGINT)
    assert p.stdout.readline().strip() == "got-sigint"
    os.kill(netferry_pid, signal.SIGINT)
    p.wait(20)
    assert p.returncode == 130
    assert_nothing_remains(unprivileged_user)


def _netferry_pid(user: str) -> int | None:
    out = subprocess.run(["pgrep", "-u", user, "-f", f"{BIN}/netferry run"], capture_output=True,
                         text=True).stdout.split()  # fmt: skip
    return int(out[0]) if out else None


def test_ready_fd_and_exit_fd(unprivileged_user):
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    p = subprocess.Popen(
        ["su", unprivileged_user, "-s", "/bin/sh", "-c",
         f"exec {BIN}/netferry run --ready-fd {ready_w} --exit-fd {exit_r} "
         "--dns-upstream 127.0.0.1:9 -- sleep 600"],
        pass_fds=(ready_w, exit_r), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(ready_w)
    os.close(exit_r)
    t0 = time.monotonic()
    with os.fdopen(ready_r, "rb") as r:
        assert r.read(1) == b"1"  # written once networking is up
    assert p.poll() is None
    os.close(exit_w)  # closing the exit fd ends the run
    p.wait(30)
    print(f"ready after {time.monotonic() - t0:.2f}s")
    assert p.returncode == 128 + signal.SIGTERM
    assert_nothing_remains(unprivileged_user)


def test_user_namespaces_refused_names_cause_and_fix():
    """user.max_user_namespaces = 0: set in a user namespace of the test's own (the limit is
    per user namespace and this machine's top-level sysctl is read-only), so nothing outside
    changes and nothing needs restoring."""
    script = (
        "echo 0 > /proc/sys/user/max_user_namespaces && "
        f"exec {BIN}/netferry run --dns-upstream 127.0.0.1:9 -- true"
    )
    r = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 125, r.stderr
    assert "user namespaces are disabled (user.max_user_namespaces = 0)" in r.stderr
    assert "sysctl -w user.max_user_namespaces" in r.stderr


def test_tun_not_accessible_says_the_fix(unprivileged_user):
    os.chmod("/dev/net/tun", 0o600)
    try:
        p = as_user(unprivileged_user, netferry_run("--", "true"), stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)  # fmt: skip
        _, err = p.communicate(timeout=30)
    finally:
        os.chmod("/dev/net/tun", 0o666)
    assert p.returncode == 125
    assert "/dev/net/tun is not accessible" in err and "chmod 0666 /dev/net/tun" in err


def test_publish_port_in_use_is_a_clear_error(unprivileged_user):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        p = as_user(unprivileged_user, netferry_run("--publish", f"127.0.0.1:{port}:80", "--", "true"),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        _, err = p.communicate(timeout=30)
    finally:
        holder.close()
    assert p.returncode == 125
    assert f"127.0.0.1:{port} is in use by another process" in err
    assert leftovers(unprivileged_user) == []


def test_unknown_option_is_a_usage_error(unprivileged_user):
    r = subprocess.run(netferry_run("--bogus", "--", "true"), capture_output=True, text=True)
    assert r.returncode == 125 and "--bogus" in r.stderr  # netferry's own error, as README says


def test_root_netns_only(page_server):
    port, body = page_server
    r = subprocess.run(
        netferry_run("--netns-only", "--dns-upstream", "127.0.0.1:9", "--", "sh", "-c",
                     f"curl -s http://192.168.127.254:{port}/"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == body.decode()


def enter_ready(pid: int) -> subprocess.Popen:
    """`netferry run --enter PID`, returned once it has written `1` on its ready fd."""
    ready_r, ready_w = os.pipe()
    p = subprocess.Popen(
        netferry_run("--enter", str(pid), "--ready-fd", str(ready_w),
                     "--dns-upstream", "127.0.0.1:9"),
        pass_fds=(ready_w,), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as r:
        ready = r.read(1)
    if ready != b"1":
        p.kill()
        pytest.fail(f"netferry run --enter never got ready: {p.communicate(timeout=10)[1]}")
    return p


def test_enter_networks_an_existing_process(netns, page_server):
    """As `slirp4netns PID tap0`: a process already in its own network namespace gets eth0,
    a lease and the host's loopback through .254; ending netferry removes eth0 again."""
    port, body = page_server
    ns = netns()
    target = ns.popen("sleep", "300")
    p = enter_ready(target.pid)
    try:
        assert "inet 192.168.127.2/24" in ns.run("ip", "-4", "addr", "show", "eth0").stdout
        out = ns.run("curl", "-s", "--max-time", "10", f"http://192.168.127.254:{port}/").stdout
        assert out == body.decode()
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)
        target.kill()
        target.wait()
    assert p.returncode == 0, p.stderr.read()
    assert ns.run("ip", "link", "show", "eth0", check=False).returncode != 0  # tap gone


def test_sigkill_of_enter_leaves_nothing(netns):
    """`kill -9` of `netferry run --enter PID`: vm-switch, nsrun, hostd and the state
    directory all go with it (nothing reparented to init, no /tmp/netferry-run-* left)."""
    ns = netns()
    target = ns.popen("sleep", "300")
    before = set(glob.glob("/tmp/netferry-run-*"))
    p = enter_ready(target.pid)
    try:
        (state,) = set(glob.glob("/tmp/netferry-run-*")) - before
        ours = subprocess.run(["pgrep", "-f", state], capture_output=True, text=True).stdout
        assert len(ours.split()) >= 2, "expected hostd and vm-switch to name the state dir"
        p.kill()
        p.wait(10)

        def gone() -> bool:
            left = subprocess.run(["pgrep", "-f", state], capture_output=True, text=True).stdout
            return not left.strip() and not os.path.exists(state)

        wait_for(gone, 10, f"every process of the run and {state} to be gone")
        assert ns.run("ip", "link", "show", "eth0", check=False).returncode != 0  # tap gone
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        target.kill()
        target.wait()


PREFIX6 = "fd00:192:168:127:"
GATEWAY6 = "fd00:192:168:127::1"


@pytest.mark.parametrize("dhcpv6", [False, True], ids=["slaac", "dhcpv6"])
def test_unprivileged_run_ipv6_slaac_resolv_conf_and_ping(unprivileged_user, dns_upstream, dhcpv6):
    """Issue 15: the namespace's eth0 gets its SLAAC address (and ::2 by DHCPv6 with
    --dhcpv6) and a default route from the RA, the resolv.conf inside names the v6 DNS
    server beside the v4 one, and `ping -6` reaches the gateway; all before COMMAND runs."""
    script = (
        "ip -6 -o addr show dev eth0 scope global; ip -6 route show default; "
        "cat /etc/resolv.conf; ping -6 -c 2 -W 5 " + GATEWAY6
    )
    extra = ["--dhcpv6"] if dhcpv6 else []
    p = as_user(
        unprivileged_user,
        netferry_run("--dns-upstream", dns_upstream.spec, *extra, "--", "sh", "-c", script),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, out + err
    assert f"inet6 {PREFIX6}5894:efff:fee4:cee/64 scope global" in out, out  # EUI-64 SLAAC
    assert (f"inet6 {PREFIX6}:2/128" in out) == dhcpv6, out
    assert "default via fe80::" in out, out
    assert "nameserver 192.168.127.1" in out and f"nameserver {GATEWAY6}" in out, out
    assert "2 received" in out or "2 packets received" in out, out
    assert_nothing_remains(unprivileged_user)


def test_run_no_ipv6_has_none(unprivileged_user, dns_upstream):
    script = "cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6; ip -6 -o addr show dev eth0"
    p = as_user(
        unprivileged_user,
        netferry_run("--no-ipv6", "--dns-upstream", dns_upstream.spec, "--", "sh", "-c", script),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = p.communicate(timeout=90)
    assert p.returncode == 0, out + err
    assert out.split() == ["1"], out
    assert_nothing_remains(unprivileged_user)


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_unprivileged_run_tcp_over_ipv6_to_host_loopback_sha256(
    unprivileged_user, dns_upstream, offload
):
    """16 MiB each way between the namespace and a [::1] server through the v6 host-loopback
    address, over the tap hostd owns (`tapfd://`, MTU 65520: TSO6 super-frames with offload,
    plain frames without), sha256-exact."""
    from tests.e2e.test_ipv6 import GUEST_CLIENT, Sha256Server

    server = Sha256Server(16 << 20)
    try:
        cmd = ["python3", "-c", GUEST_CLIENT, "fd00:192:168:127::254", str(server.port),
               str(len(server.data))]  # fmt: skip
        extra = [] if offload else ["--no-offload"]
        p = as_user(
            unprivileged_user,
            netferry_run("--dns-upstream", dns_upstream.spec, *extra, "--", *cmd),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, out + err
        assert out.split() == [str(len(server.data)), server.sha256], out + err
        wait_for(lambda: server.received, 30, "the server to read the upload")
        assert server.received == [server.sha256]
    finally:
        server.close()
    assert_nothing_remains(unprivileged_user)
