"""netferry-slirp4netns under the real rootless container tools that run slirp4netns:
rootlesskit 1.1.0 (`--slirp4netns-binary`, `--port-driver=slirp4netns`, rootlessctl) and
podman 4.3 with runc (`network_cmd_path`, `port_handler=slirp4netns`), each as an
unprivileged user this module creates with subordinate uid/gid ranges and removes after.

They fail (never skip) when a tool is missing: scripts/bootstrap installs them. podman's
image is made here from Debian's busybox-static (`apt-get download` + `dpkg -x`, never
installed: that would replace the machine's busybox), cached under $NETFERRY_CACHE.
Every transfer is checked by sha256; all traffic stays on loopback and inside the
namespaces these tools make.
"""

from __future__ import annotations

import hashlib
import io
import os
import pwd
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, free_tcp_port, serve_bytes, wait_for

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

USER = f"nfs4n{os.getpid() % 100000}"
SLIRP = str(BIN / "netferry-slirp4netns")


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run scripts/bootstrap")


@pytest.fixture(scope="module")
def rootless_user() -> Iterator[pwd.struct_passwd]:
    """A normal user with subuid/subgid ranges (Debian's useradd adds them); /dev/net/tun
    0666 as distributions ship it. Removed (processes, home, ranges) afterwards."""
    if os.geteuid() != 0:
        pytest.fail("these tests need root to create the unprivileged user")
    require("useradd", "userdel", "newuidmap", "newgidmap")
    subprocess.run(["useradd", "--create-home", USER], check=True)
    tun_mode = os.stat("/dev/net/tun").st_mode & 0o777
    try:
        for f in ("/etc/subuid", "/etc/subgid"):
            if not any(line.startswith(f"{USER}:") for line in Path(f).read_text().splitlines()):
                flag = "--add-subuids" if f.endswith("uid") else "--add-subgids"
                subprocess.run(["usermod", flag, "3000000-3065535", USER], check=True)
        os.chmod("/dev/net/tun", 0o666)
        yield pwd.getpwnam(USER)
    finally:
        os.chmod("/dev/net/tun", tun_mode)
        kill_all_of(USER)
        # podman's storage has files owned by subordinate ids: userdel --remove takes them.
        subprocess.run(["userdel", "--remove", "--force", USER], check=False, capture_output=True)
        for f in ("/etc/subuid", "/etc/subgid"):
            lines = Path(f).read_text().splitlines(keepends=True)
            kept = [line for line in lines if not line.startswith(f"{USER}:")]
            if kept != lines:
                Path(f).write_text("".join(kept))


def kill_all_of(user: str) -> None:
    """SIGKILL every process of `user` and wait until even their zombies are reaped (podman's
    pause process is reparented to init here), so a user made later with the same uid does
    not inherit them."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True).returncode == 1:
            return  # none matched, zombies included
        time.sleep(0.2)
    pytest.fail(f"processes of {user} outlived SIGKILL for 30 s: {user_procs(user)}")


def as_user(user: str, script: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    path = f"PATH={BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    return subprocess.Popen(
        ["su", user, "-s", "/bin/sh", "-c", f"cd /tmp && export {path} {exports}; {script}"], **kw
    )


def user_procs(user: str) -> str:
    return subprocess.run(["pgrep", "-u", user, "-a"], capture_output=True, text=True).stdout


@pytest.fixture
def host_blob() -> Iterator[tuple[int, bytes]]:
    """An HTTP server on the host's 127.0.0.1 serving 4 MiB of random bytes at /blob."""
    body = os.urandom(4 << 20)
    with serve_bytes(body) as port:
        yield port, body


def fetch_sha(url: str) -> str | None:
    r = subprocess.run(["curl", "-sf", "--max-time", "10", url], capture_output=True)
    return hashlib.sha256(r.stdout).hexdigest() if r.returncode == 0 else None


# ---- rootlesskit ---------------------------------------------------------------------------

# Inside rootlesskit's child (root of its user namespace, /etc copied up): report the address,
# fetch the host's blob through 10.0.2.2, serve a fresh random file on :80, wait for stdin.
INNER = r"""
ip -4 -o addr show tap0 | awk '{print "ADDR", $4}'
echo "FETCH $(curl -s --max-time 10 http://10.0.2.2:$HOSTPORT/blob | sha256sum | cut -c1-64)"
curl -s --max-time 10 -o /dev/null http://10.0.2.2:$HOSTPORT/blob; echo "CURL_RC $?"
head -c 4194304 /dev/urandom > /etc/nf-page
echo "PAGE $(sha256sum /etc/nf-page | cut -d' ' -f1)"
python3 -m http.server 80 -d /etc >/dev/null 2>&1 &
echo READY
read line
kill $!
"""


@pytest.mark.parametrize(
    "host_loopback", [False, True], ids=["disable-host-loopback", "host-loopback"]
)
def test_rootlesskit_runs_netferry_slirp4netns(rootless_user, host_blob, host_loopback):
    require("rootlesskit", "rootlessctl", "curl")
    host_port, blob = host_blob
    published, runtime = free_tcp_port(), free_tcp_port()
    state = Path(tempfile.mkdtemp(prefix="nf-rk-"))
    os.chown(state, rootless_user.pw_uid, rootless_user.pw_gid)
    rk = [
        "rootlesskit", "--net=slirp4netns", f"--slirp4netns-binary={SLIRP}",
        "--port-driver=slirp4netns", f"--state-dir={state}/rk",
        "-p", f"127.0.0.1:{published}:80/tcp", "--copy-up=/etc",
    ]  # fmt: skip
    if not host_loopback:
        rk.append("--disable-host-loopback")
    p = as_user(
        rootless_user.pw_name,
        " ".join(shlex.quote(a) for a in [*rk, "sh", "-c", INNER]),
        env={"HOSTPORT": str(host_port)},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: dict[str, str] = {}
    try:
        while "READY" not in lines:
            line = p.stdout.readline()
            if not line:
                p.kill()
                pytest.fail(f"rootlesskit ended early: {p.communicate(timeout=30)[1]}")
            key, _, value = line.strip().partition(" ")
            lines[key] = value
        assert lines["ADDR"] == "10.0.2.100/24"
        if host_loopback:
            assert lines["FETCH"] == hashlib.sha256(blob).hexdigest()
            assert lines["CURL_RC"] == "0"
        else:
            assert lines["CURL_RC"] == "7"  # could not connect: refused by netferry
        want = lines["PAGE"]
        assert wait_for(lambda: fetch_sha(f"http://127.0.0.1:{published}/nf-page") == want, 30,
                        "the published port to serve the page")  # fmt: skip
        if not host_loopback:
            # rootlessctl at run time: through rootlesskit into our API socket.
            ctl = ["rootlessctl", f"--socket={state}/rk/api.sock"]
            spec = f"127.0.0.1:{runtime}:80/tcp"
            add = as_user(rootless_user.pw_name, shlex.join([*ctl, "add-ports", spec]),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
            out, err = add.communicate(timeout=30)
            assert add.returncode == 0, err
            port_id = out.strip()
            assert fetch_sha(f"http://127.0.0.1:{runtime}/nf-page") == want
            ls = as_user(rootless_user.pw_name, shlex.join([*ctl, "list-ports"]),
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
            listed = ls.communicate(timeout=30)[0]
            rows = {tuple(line.split()[2:4]) for line in listed.splitlines()[1:]}
            assert rows == {("127.0.0.1", str(published)), ("127.0.0.1", str(runtime))}
            rm = as_user(rootless_user.pw_name, shlex.join([*ctl, "remove-ports", port_id]),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
            assert rm.communicate(timeout=30) and rm.returncode == 0
            assert fetch_sha(f"http://127.0.0.1:{runtime}/nf-page") is None
            assert fetch_sha(f"http://127.0.0.1:{published}/nf-page") == want
        p.stdin.write("done\n")
        p.stdin.flush()
        p.communicate(timeout=60)
        assert p.returncode == 0
        # rootlesskit ends netferry-slirp4netns with SIGKILL: nothing may outlive that.
        wait_for(lambda: user_procs(rootless_user.pw_name) == "", 10, "no process of the user")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        kill_all_of(rootless_user.pw_name)
        shutil.rmtree(state, ignore_errors=True)


# ---- podman --------------------------------------------------------------------------------

BUSYBOX_PACKAGE = "busybox-static"


def busybox_static() -> Path:
    """Debian's static busybox binary, fetched once with `apt-get download` and unpacked with
    `dpkg -x` into $NETFERRY_CACHE/busybox-static (never installed on this machine)."""
    cache = Path(os.environ.get("NETFERRY_CACHE", str(REPO / ".cache"))) / "busybox-static"
    binary = cache / "root" / "bin" / "busybox"
    if binary.exists():
        return binary
    require("apt-get", "dpkg")
    cache.mkdir(parents=True, exist_ok=True)
    debs = list(cache.glob("busybox-static_*.deb"))
    if not debs:
        r = subprocess.run(["apt-get", "download", BUSYBOX_PACKAGE], cwd=cache,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        debs = list(cache.glob("busybox-static_*.deb"))
        if r.returncode != 0 or not debs:
            pytest.fail(f"apt-get download {BUSYBOX_PACKAGE} failed (apt-get update?): {r.stderr}")
    subprocess.run(["dpkg", "-x", str(debs[0]), str(cache / "root")], check=True)
    if not binary.exists():
        pytest.fail(f"{debs[0]} has no bin/busybox")
    return binary


def image_tarball(busybox: Path, dest: Path, page: bytes) -> Path:
    """A root filesystem: busybox, /bin/sh, and /www/page for its httpd to serve."""
    tar = dest / "rootfs.tar"
    with tarfile.open(tar, "w") as t:

        def add(name: str, data: bytes, mode: int) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            t.addfile(info, io.BytesIO(data))

        for d in ("bin", "www", "tmp", "etc"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            t.addfile(info)
        add("bin/busybox", busybox.read_bytes(), 0o755)
        link = tarfile.TarInfo("bin/sh")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        t.addfile(link)
        add("www/page", page, 0o644)
    return tar


# Records how podman ran it and how it ended; the program itself runs unchanged.
RECORDER = """#!/bin/sh
echo "$@" >> {record}/argv
{slirp} "$@"
rc=$?
case "$*" in *--ready-fd*|*"-r "*) echo "$rc" > {record}/rc ;; esac
exit $rc
"""


def test_podman_runs_netferry_slirp4netns(rootless_user):
    require("podman", "runc", "curl", "newuidmap")
    user = rootless_user.pw_name
    base = Path(tempfile.mkdtemp(prefix="nf-podman-"))
    try:
        run_dir, record = base / "run", base / "record"
        for d in (base, run_dir, record, base / "config" / "containers", base / "data"):
            d.mkdir(parents=True, exist_ok=True)
        recorder = base / "netferry-slirp4netns"
        recorder.write_text(RECORDER.format(record=record, slirp=SLIRP))
        recorder.chmod(0o755)
        (base / "config" / "containers" / "containers.conf").write_text(
            "[engine]\n"
            f'network_cmd_path = "{recorder}"\n'
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
        )
        (base / "config" / "containers" / "storage.conf").write_text('[storage]\ndriver = "vfs"\n')
        page = os.urandom(2 << 20)
        image_tarball(busybox_static(), base, page)
        subprocess.run(["chown", "-R", f"{user}:{user}", str(base)], check=True)
        os.chmod(run_dir, 0o700)
        env = {
            "HOME": str(base),
            "XDG_CONFIG_HOME": str(base / "config"),
            "XDG_DATA_HOME": str(base / "data"),
            "XDG_RUNTIME_DIR": str(run_dir),
        }

        def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
            p = as_user(user, shlex.join(["podman", *args]), env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
            out, err = p.communicate(timeout=timeout)
            return subprocess.CompletedProcess(args, p.returncode, out, err)

        r = podman("import", str(base / "rootfs.tar"), "localhost/nf-busybox")
        assert r.returncode == 0, r.stderr
        port = free_tcp_port()
        r = podman("run", "-d", "--name", "nfweb",
                   "--network", "slirp4netns:port_handler=slirp4netns",
                   "-p", f"127.0.0.1:{port}:80", "localhost/nf-busybox",
                   "/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/www")  # fmt: skip
        assert r.returncode == 0, r.stderr
        want = hashlib.sha256(page).hexdigest()
        assert wait_for(lambda: fetch_sha(f"http://127.0.0.1:{port}/page") == want, 60,
                        "the container's page through the published port")  # fmt: skip

        # podman passes --enable-ipv6: the container takes fd00::/64 by SLAAC, and DNS ::3
        # answers over IPv6 (ping needs NET_RAW, which podman's containers do not have)
        def slaac() -> bool:
            out = podman("exec", "nfweb", "/bin/busybox", "ip", "-6", "addr").stdout
            return "inet6 fd00::" in out and "tentative" not in out

        wait_for(slaac, 30, "a SLAAC address in fd00::/64 in the container")
        r = podman(
            "exec", "nfweb", "/bin/busybox", "nslookup", "host.containers.internal", "fd00::3"
        )
        assert r.returncode == 0 and "Address: fd00::2" in r.stdout, r.stdout + r.stderr
        argv = (record / "argv").read_text()
        assert "--help" in argv  # podman checked the flags first
        run_line = argv.splitlines()[-1]
        assert "--netns-type=path" in run_line and "--api-socket" in run_line
        api_socket = run_line.split("--api-socket ")[1].split()[0]
        assert os.path.exists(api_socket)
        r = podman("stop", "-t", "2", "nfweb")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: (record / "rc").exists(), 10, "netferry-slirp4netns to end")
        assert (record / "rc").read_text().split() == ["0"]  # exit 0 on the exit fd closing
        assert not os.path.exists(api_socket)
        # Running ones: an exited child that podman's pause process has not reaped yet is a
        # zombie, as it would be for slirp4netns itself.
        ps = subprocess.run(["ps", "-u", user, "-o", "stat=,args="], capture_output=True, text=True)
        left = [ln for ln in ps.stdout.splitlines() if "netferry" in ln and not ln.startswith("Z")]
        assert left == []
        assert fetch_sha(f"http://127.0.0.1:{port}/page") is None
        r = podman("rm", "nfweb")
        assert r.returncode == 0, r.stderr
    finally:
        kill_all_of(user)  # podman's pause process, and its zombie
        shutil.rmtree(base, ignore_errors=True)
