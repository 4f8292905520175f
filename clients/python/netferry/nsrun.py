"""The inside half of `netferry run`: runs as root of fresh user, net and mount namespaces.

Started by `netferry run` through `unshare` (or `nsenter`). It starts vm-switch on the link
fd it inherited, waits for the lease (IPv4, and IPv6 unless --no-ipv6: vm-switch's ready
waits for the SLAAC address and route too), puts the lease's resolv.conf (both families'
DNS servers) over /etc/resolv.conf in this mount namespace only (the mounts were made
private first, so nothing reaches the host), tells the outside it is ready, runs COMMAND,
and exits with COMMAND's status.
SIGINT and SIGTERM are passed on to COMMAND.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """This process (and, as preexec_fn, a child) gets SIGKILL when its parent dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def fail(message: str, code: int = 125) -> int:
    print(f"netferry run: {message}", file=sys.stderr, flush=True)
    return code


def bind_resolv_conf(source: str) -> str | None:
    """Bind `source` over /etc/resolv.conf (following a symlink to its target); None or why."""
    target = os.path.realpath("/etc/resolv.conf")
    if not os.path.exists(target):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        try:
            Path(target).touch()
        except OSError as e:
            return f"cannot create {target} to mount over: {e.strerror}"
    r = subprocess.run(["mount", "--bind", source, target], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot bind-mount the guest resolv.conf over {target}: {r.stderr.strip()}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netferry-nsrun")
    p.add_argument("--link-fd", type=int, required=True)
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--mtu", type=int, required=True)
    p.add_argument("--dhcp-client", default="pyroute2")
    p.add_argument("--no-resolv-conf", action="store_true")
    p.add_argument("--no-offload", action="store_true")
    p.add_argument("--no-ipv6", action="store_true")
    p.add_argument("--dhcpv6", action="store_true")
    p.add_argument("--wait", action="store_true", help="no command: run until signalled")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    # Entered with nsenter (which execs us), our parent is `netferry run` itself: without
    # this a SIGKILLed netferry would leave us and vm-switch running.
    die_with_parent()
    if os.getppid() == 1:
        return fail("netferry run is gone")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    state = Path(args.state_dir)
    resolv = state / "resolv.conf"
    vm_ready_r, vm_ready_w = os.pipe()
    vm = subprocess.Popen(
        [
            str(BIN / "vm-switch"),
            "--give-tap",
            str(args.link_fd),
            *([] if args.no_offload else ["--offload"]),
            *(["--no-ipv6"] if args.no_ipv6 else ["--dhcpv6"] if args.dhcpv6 else []),
            "--mtu",
            str(args.mtu),
            "--dhcp-client",
            args.dhcp_client,
            "--resolv-conf",
            str(resolv),
            "--ready-fd",
            str(vm_ready_w),
            "--log-format",
            "json",
            "--log-file",
            str(state / "vm-switch.log"),
        ],
        pass_fds=(args.link_fd, vm_ready_w),
        stdin=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    os.close(vm_ready_w)
    os.close(args.link_fd)
    child: subprocess.Popen[bytes] | None = None
    pending_signal: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signum)
        else:
            pending_signal.append(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        with os.fdopen(vm_ready_r, "rb") as r:
            ready = r.read(6) == b"ready\n"  # EOF without it: vm-switch failed
        if not ready:
            log = (
                (state / "vm-switch.log").read_text() if (state / "vm-switch.log").exists() else ""
            )
            return fail("vm-switch did not get the network up:\n" + log[-2000:])
        if not args.no_resolv_conf:
            why = bind_resolv_conf(str(resolv))
            if why:
                return fail(why)
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)
        if pending_signal:
            return 128 + pending_signal[0]
        if args.wait or not command:
            while not pending_signal:
                signal.pause()
            return 0
        try:
            child = subprocess.Popen(command)
        except OSError as e:
            return fail(f"cannot run {command[0]}: {e.strerror}", 127 if e.errno == 2 else 126)
        if pending_signal:  # it came while COMMAND was starting: it is still COMMAND's
            child.send_signal(pending_signal[0])
        while True:
            try:
                rc = child.wait()
                break
            except InterruptedError:
                continue
        return 128 - rc if rc < 0 else rc
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        if vm.poll() is None:
            vm.terminate()
            try:
                vm.wait(5)
            except subprocess.TimeoutExpired:
                vm.kill()
                vm.wait()


if __name__ == "__main__":
    sys.exit(main())
