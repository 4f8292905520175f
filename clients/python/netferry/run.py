"""`netferry run [options] -- COMMAND`: COMMAND in new namespaces whose only way out is netferry.

The better slirp4netns: works without root (user namespace mapped to root inside), gives
the namespace DHCP, DNS, ICMP, TCP/UDP NAT and published ports from a hostd that runs
outside as the calling user, IPv6 beside IPv4 (SLAAC and the RA's DNS server in the
resolv.conf; `--dhcpv6` for a DHCPv6 lease too, `--no-ipv6` for none), replaces
/etc/resolv.conf inside only, and leaves nothing behind: no process, socket file or temp
directory, also on Ctrl-C and on failure.

    outside (calling user)                  inside (unshare --user --net --mount)
    netferry run ── host-switch ◄─socketpair─► netferry.nsrun ── vm-switch (tap eth0)
                                                               └─ COMMAND

Signals: SIGINT/SIGTERM go to COMMAND (when the terminal sends SIGINT, COMMAND already has
it; netferry does not send it twice). A second SIGINT tears everything down at once.

Teardown cannot leak: the namespace also gets its own PID namespace, whose init is nsrun,
so when nsrun dies the kernel kills everything inside; unshare kills nsrun when it dies
(--kill-child), and unshare and hostd die with netferry (PR_SET_PDEATHSIG), even if
netferry itself is killed with SIGKILL.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import NoReturn

BIN = Path(sys.executable).parent
GUEST_IP = "192.168.127.2"


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when netferry dies, however it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class RunError(Exception):
    """A condition users hit, with what to do about it."""


class UsageExit125Parser(argparse.ArgumentParser):
    """Usage errors exit 125 as netferry's own errors do (126/127 and COMMAND's statuses
    keep their meaning), not argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(125, f"{self.prog}: error: {message}\n")


# Removes the state directory once `netferry run` has gone, however it went (SIGKILL too):
# it reads a pipe only netferry holds, so EOF means netferry has exited.
JANITOR = """
import os, shutil, sys, time
if os.read(0, 1) == b"d":
    sys.exit()  # netferry's own teardown removed it
for _ in range(3):  # hostd and vm-switch die with netferry; a late log file is caught too
    shutil.rmtree(sys.argv[1], ignore_errors=True)
    time.sleep(0.2)
"""


def start_janitor(state: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A detached helper that removes `state` when the returned fd (kept open by netferry,
    inherited by nobody) closes; writing `d` to it instead lets it go without."""
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", JANITOR, str(state)],
        stdin=r,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the terminal's Ctrl-C must not end it before netferry
    )
    os.close(r)
    return proc, w


def check_tun() -> None:
    if not os.path.exists("/dev/net/tun"):
        raise RunError(
            "/dev/net/tun does not exist: load the tun module (modprobe tun) or create the "
            "device node (mknod /dev/net/tun c 10 200 && chmod 0666 /dev/net/tun)"
        )
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        raise RunError(
            "/dev/net/tun is not accessible to this user: most distributions ship it mode "
            "0666 (sudo chmod 0666 /dev/net/tun)"
        )


def check_userns() -> None:
    def read(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    if read("/proc/sys/user/max_user_namespaces") == "0":
        raise RunError(
            "user namespaces are disabled (user.max_user_namespaces = 0): enable them with "
            "'sysctl -w user.max_user_namespaces=15000', or run as root with --netns-only"
        )
    if os.geteuid() != 0 and read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        raise RunError(
            "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0): "
            "enable them with 'sysctl -w kernel.unprivileged_userns_clone=1'"
        )
    if os.geteuid() != 0 and read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        raise RunError(
            "AppArmor restricts unprivileged user namespaces "
            "(kernel.apparmor_restrict_unprivileged_userns = 1): allow them with "
            "'sysctl -w kernel.apparmor_restrict_unprivileged_userns=0' or an AppArmor profile"
        )


def parse_publish(spec: str) -> str:
    """[tcp:|udp:]HOSTADDR:HOSTPORT:GUESTPORT → host-switch's --port-forward form."""
    proto = "tcp"
    for prefix in ("tcp:", "udp:"):
        if spec.startswith(prefix):
            proto, spec = prefix[:-1], spec[len(prefix) :]
    host, sep, guest_port = spec.rpartition(":")
    if not sep or not host or not guest_port.isdigit():
        raise RunError(f"--publish {spec!r}: expected [tcp:|udp:]HOSTADDR:HOSTPORT:GUESTPORT")
    if ":" not in host:
        host = f"127.0.0.1:{host}"  # HOSTPORT:GUESTPORT binds loopback, not every address
    return f"{proto}:{host}={GUEST_IP}:{guest_port}"


def build_parser() -> argparse.ArgumentParser:
    p = UsageExit125Parser(
        prog="netferry run",
        description="Run COMMAND in new user, net and mount namespaces networked by netferry.",
    )
    p.add_argument(
        "--publish",
        "-p",
        action="append",
        default=[],
        metavar="[tcp:|udp:]HOSTADDR:HOSTPORT:GUESTPORT",
        help="publish a guest port on the host (repeatable), as docker -p",
    )
    p.add_argument("--api", metavar="PATH", help="serve the HostSwitch API on this unix socket")
    p.add_argument("--mtu", type=int, default=65520, help="guest MTU (default 65520)")
    p.add_argument("--subnet", help="IPv4 subnet (default 192.168.127.0/24)")
    p.add_argument("--dns-upstream", action="append", default=[], metavar="ADDR[:PORT]")
    p.add_argument("--no-host-loopback", action="store_true")
    p.add_argument(
        "--ready-fd", type=int, metavar="N", help="write '1' to fd N once networking is up"
    )
    p.add_argument("--exit-fd", type=int, metavar="N", help="end the run when fd N is closed")
    p.add_argument("--pcap", metavar="FILE")
    p.add_argument(
        "--netns-only",
        action="store_true",
        help="root only: new net+mount namespaces without a user namespace",
    )
    p.add_argument(
        "--enter",
        type=int,
        metavar="PID",
        help="network the namespaces of process PID instead of creating them",
    )
    p.add_argument("--dhcp-client", choices=["pyroute2", "udhcpc"], default="pyroute2")
    p.add_argument(
        "--no-ipv6",
        action="store_true",
        help="IPv4 only: the switch offers no IPv6 and the namespace's eth0 has none",
    )
    p.add_argument(
        "--dhcpv6",
        action="store_true",
        help="also run a DHCPv6 client in the namespace (the default MAC gets the ::2 of "
        "the IPv6 prefix); without it eth0 gets SLAAC and the RA's DNS server",
    )
    p.add_argument(
        "--no-offload",
        action="store_true",
        help="plain frames between vm-switch and hostd (no TSO/checksum offload)",
    )
    p.add_argument("--debug", action="store_true")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS]")
    return p


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.command = args.command[1:] if args.command[:1] == ["--"] else args.command
        self.state = Path(tempfile.mkdtemp(prefix="netferry-run-"))
        os.chmod(self.state, 0o700)
        self.janitor, self.janitor_fd = start_janitor(self.state)
        self.hostd: subprocess.Popen[bytes] | None = None
        self.inner: subprocess.Popen[bytes] | None = None
        self.sigints = 0
        self.forks = False
        self.inner_done = threading.Event()
        self.interactive = sys.stdin.isatty()

    # -- the pieces ------------------------------------------------------------------------

    def start_hostd(self, link_fd: int) -> None:
        """hostd with the guest's tap fd as its link (`tapfd://`)."""
        a = self.args
        ready_r, ready_w = os.pipe()
        offload = "" if a.no_offload else "?offload=vnet"
        cmd = [
            str(BIN / "host-switch"),
            "--listen",
            f"tapfd://{link_fd}{offload}",
            "--mtu",
            str(a.mtu),
            "--log-format",
            "json",
            "--log-file",
            str(self.state / "hostd.log"),
            "--ready-fd",
            str(ready_w),
        ]
        cmd += ["--api", f"unix://{a.api}"] if a.api else ["--api", "none"]
        if a.subnet:
            cmd += ["--subnet", a.subnet]
        for u in a.dns_upstream:
            cmd += ["--dns-upstream", u]
        if a.no_host_loopback:
            cmd.append("--no-host-loopback")
        if a.no_ipv6:
            cmd.append("--no-ipv6")
        if a.pcap:
            cmd += ["--pcap", a.pcap]
        for spec in a.publish:
            cmd += ["--port-forward", parse_publish(spec)]
        errfile = open(self.state / "hostd.stderr", "wb")
        self.hostd = subprocess.Popen(
            cmd,
            pass_fds=(link_fd, ready_w),
            stdin=subprocess.DEVNULL,
            stderr=errfile,
            start_new_session=True,  # the terminal's Ctrl-C is for COMMAND, not for hostd
            preexec_fn=die_with_parent,
        )
        os.close(ready_w)
        errfile.close()
        with os.fdopen(ready_r, "rb") as r:
            ok = r.read(6) == b"ready\n"  # not until EOF: unshare keeps a copy
        if not ok:
            self.hostd.wait(10)
            raise RunError("the host switch did not start: " + self._hostd_error())

    def _hostd_error(self) -> str:
        import json

        log = self.state / "hostd.log"
        for line in reversed(log.read_text().splitlines() if log.exists() else []):
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("level") == "error":
                return str(ev.get("error") or ev.get("event"))
        path = self.state / "hostd.stderr"
        err = path.read_text(errors="replace") if path.exists() else ""
        return err.strip().splitlines()[-1] if err.strip() else "see its log"

    def start_inner(self, link_fd: int, ready_w: int) -> None:
        a = self.args
        inner = [
            sys.executable,
            "-m",
            "netferry.nsrun",
            "--link-fd",
            str(link_fd),
            "--ready-fd",
            str(ready_w),
            "--state-dir",
            str(self.state),
            "--mtu",
            str(a.mtu),
            "--dhcp-client",
            a.dhcp_client,
        ]
        if a.no_offload:
            inner.append("--no-offload")
        if a.no_ipv6:
            inner.append("--no-ipv6")
        elif a.dhcpv6:
            inner.append("--dhcpv6")
        if a.enter is not None:
            wrapper = ["nsenter", "--target", str(a.enter), "--net", "--mount"]
            if self._has_own_userns(a.enter):
                wrapper += ["--user", "--preserve-credentials"]
            inner += ["--no-resolv-conf", "--wait"]
        else:
            # A PID namespace too: when its init (nsrun) dies, the kernel kills everything in it.
            wrapper = ["unshare", "--net", "--mount", "--propagation", "private", "--pid"]
            wrapper += ["--kill-child", "--mount-proc"]
            if not a.netns_only:
                wrapper[1:1] = ["--user", "--map-root-user"]
        if shutil.which(wrapper[0]) is None:
            raise RunError(f"{wrapper[0]} (util-linux) is not installed")
        self.inner = subprocess.Popen(
            [*wrapper, "--", *inner, "--", *self.command],
            pass_fds=(link_fd, ready_w),
            start_new_session=not self.interactive or a.enter is not None,
            preexec_fn=die_with_parent,
        )
        self.forks = wrapper[0] == "unshare"

    def receive_tap(self, channel: socket.socket) -> int:
        channel.settimeout(60)
        try:
            _, fds, _, _ = socket.recv_fds(channel, 16, 1)
        except TimeoutError:
            raise RunError("the namespace did not hand over its tap within 60 s") from None
        if not fds:
            if self.inner is not None:
                try:
                    rc = self.inner.wait(5)
                except subprocess.TimeoutExpired:
                    rc = None
                if rc is not None and not (self.state / "vm-switch.log").exists():
                    raise RunError(
                        f"the namespace did not come up (exit {rc}); if unshare was refused, "
                        "check user.max_user_namespaces and kernel.unprivileged_userns_clone"
                    )
            log = self.state / "vm-switch.log"
            why = log.read_text()[-1500:] if log.exists() else ""
            raise RunError(
                "the namespace could not create its tap device" + (": " + why if why else "")
            )
        return fds[0]

    def inner_pid(self) -> int | None:
        """The pid of nsrun: unshare forks it (it is pid 1 of the new PID namespace)."""
        if self.inner is None or self.inner.poll() is not None:
            return None
        if not self.forks:
            return self.inner.pid
        try:
            children = Path(f"/proc/{self.inner.pid}/task/{self.inner.pid}/children").read_text()
        except OSError:
            return None
        return int(children.split()[0]) if children.split() else None

    def signal_inner(self, signum: int) -> None:
        pid = self.inner_pid()
        if pid is not None:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    @staticmethod
    def _has_own_userns(pid: int) -> bool:
        try:
            return os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        except OSError as e:
            raise RunError(f"--enter {pid}: cannot inspect process {pid}: {e.strerror}") from None

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        a = self.args
        if a.enter is None and not self.command:
            raise RunError("no COMMAND given: netferry run [options] -- COMMAND [ARGS]")
        if a.enter is not None and self.command:
            raise RunError("--enter PID networks an existing process: give no COMMAND")
        if a.netns_only and os.geteuid() != 0:
            raise RunError("--netns-only needs root (without a user namespace)")
        check_tun()
        if a.enter is None and not a.netns_only:
            check_userns()
        for spec in a.publish:
            parse_publish(spec)
        # The namespace comes up first: vm-switch opens the tap inside it and hands the fd
        # out over `channel`; hostd then owns the tap (no frame stream, no second copy).
        channel, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ready_r, ready_w = os.pipe()
        try:
            self.start_inner(guest_end.fileno(), ready_w)
            os.close(ready_w)
            guest_end.close()
            tap_fd = self.receive_tap(channel)
            try:
                self.start_hostd(tap_fd)
            finally:
                os.close(tap_fd)
            channel.sendall(b"g")  # the guest may start DHCP now
        finally:
            channel.close()
            guest_end.close()
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        if a.exit_fd is not None:
            threading.Thread(target=self._watch_exit_fd, daemon=True).start()
        with os.fdopen(ready_r, "rb") as r:
            ready = r.read(6) == b"ready\n"  # not until EOF: unshare keeps a copy
        if ready and a.ready_fd is not None:
            try:
                os.write(a.ready_fd, b"1")
                os.close(a.ready_fd)
            except OSError:
                pass
        assert self.inner is not None
        while True:
            try:
                rc = self.inner.wait()
                break
            except InterruptedError:
                continue
        self.inner_done.set()
        if not ready:
            if self.sigints:
                return 130
            raise RunError(
                f"the namespace did not come up (exit {rc}); if unshare was refused, check "
                "user.max_user_namespaces and kernel.unprivileged_userns_clone"
            )
        return 128 - rc if rc < 0 else rc

    def _on_sigint(self, signum: int, frame: object) -> None:
        self.sigints += 1
        if self.sigints >= 2:
            # At once, and without Popen.wait (the main thread may hold its lock): killing
            # unshare kills the PID namespace; hostd cleans up its own sockets on SIGTERM.
            for proc, sig in ((self.inner, signal.SIGKILL), (self.hostd, signal.SIGTERM)):
                if proc is not None:
                    try:
                        os.kill(proc.pid, sig)
                    except ProcessLookupError:
                        pass
            shutil.rmtree(self.state, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.write(self.janitor_fd, b"d")
            os._exit(130)
        if not self.interactive:
            self.signal_inner(signal.SIGINT)  # nsrun passes it on to COMMAND

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.signal_inner(signal.SIGTERM)

    def _watch_exit_fd(self) -> None:
        fd = self.args.exit_fd
        while True:
            try:
                select.select([fd], [], [])
                if not os.read(fd, 4096):
                    break
            except OSError:
                break
        # SIGTERM first (COMMAND may clean up); SIGKILL to unshare only if the namespace
        # has not ended after a grace period (that kills everything in it).
        self.signal_inner(signal.SIGTERM)
        if not self.inner_done.wait(15) and self.inner is not None:
            try:
                os.kill(self.inner.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def teardown(self) -> None:
        self.signal_inner(signal.SIGTERM)
        for proc in (self.inner, self.hostd):
            if proc is None or proc.poll() is not None:
                continue
            if proc is self.hostd:
                proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.state, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.write(self.janitor_fd, b"d")
            os.close(self.janitor_fd)
        self.janitor.wait()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = None
    try:
        run = Run(args)
        return run.run()
    except RunError as e:
        print(f"netferry run: {e}", file=sys.stderr)
        return 125
    finally:
        if run is not None:
            run.teardown()


if __name__ == "__main__":
    sys.exit(main())
