"""A User Mode Linux guest whose only NIC is a bess (SOCK_SEQPACKET) link to a socket.

Why this exists: UML's ``vec0:transport=bess`` is the seqpacket peer gvisor-tap-vsock's README
shows, and a real Linux kernel behind it (DHCP client, ARP, ICMP, TCP) is the reference for
hostd's ``unixpacket://`` links. UML is Debian's ``user-mode-linux`` package; its root is the
host's filesystem over hostfs, read-only (``ro``), and its init is ``uml_init.sh``, which
runs the steps named on the kernel command line and prints ``NETFERRY-<WHAT> ...`` lines on
UML's console (its stdout, ``con0=fd:0,fd:1``); they are parsed as for the QEMU guest.

UML runs under ``uml_exec.py`` (see there: Debian 12's UML cannot run a guest on a host with
AVX-512/AMX without it). The guest's tools are the host's ``/bin/busybox`` (Debian's
``busybox``, which ``udhcpc`` depends on): the root is the host's filesystem anyway, so,
unlike the QEMU guest, nothing is downloaded.

Each run gets a private directory for UML's ``uml_dir`` (its pid file and mconsole socket)
and ``TMPDIR`` (its memory file). UML and every helper process it forks share one new
session, which is killed as a whole and waited for when the run ends, so nothing outlives
:func:`run_uml` even on a timeout.

Network safety: the NIC is a bess link that connects to a socket the caller listens on;
nothing here touches a tap, a bridge or the host's network.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.interop.qemu_guest import DEFAULT_MAC, GuestResult, check_step, parse_console

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "uml_init.sh"
EXEC_WRAPPER = HERE / "uml_exec.py"
UML_BINARY = "linux.uml"
UML_MEMORY = "256M"


class UmlMissing(RuntimeError):
    """linux.uml (or the host busybox the guest runs) is not installed."""


def find_uml() -> str:
    """Path of linux.uml; raises UmlMissing naming the fix."""
    path = shutil.which(UML_BINARY)
    if path is None:
        raise UmlMissing("linux.uml not found (Debian's user-mode-linux): run scripts/bootstrap")
    if not os.access("/bin/busybox", os.X_OK):
        raise UmlMissing("/bin/busybox (the guest's tools) not found: run scripts/bootstrap")
    return path


def uml_command(
    uml: str,
    socket_path: str,
    run_dir: Path,
    steps: dict[str, str],
    mac: str = DEFAULT_MAC,
    init: Path = INIT_SCRIPT,
) -> list[str]:
    """The UML argv as peers-observed.md gives it, plus uml_dir= and the nf.* step words."""
    for path in (socket_path, str(init), str(run_dir)):
        if "," in path or any(c.isspace() for c in path):
            raise ValueError(f"{path!r} must not contain ',' or whitespace (UML's command line)")
    for key, value in steps.items():
        check_step(key, value)
    return [
        uml,
        f"vec0:transport=bess,dst={socket_path},depth=128,gro=1,mac={mac}",
        "root=/dev/root",
        "rootfstype=hostfs",
        "ro",
        f"init={init}",
        f"mem={UML_MEMORY}",
        "con=null",
        "con0=fd:0,fd:1",
        "ssl=null",
        f"uml_dir={run_dir}",  # UML's pid file and mconsole socket: ours to remove
        *(f"nf.{k}={v}" for k, v in steps.items()),
    ]


def _session_members(sid: int) -> list[int]:
    """Pids whose session id is ``sid`` (UML and its helpers), from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the ")" that ends the command name: state ppid pgrp session ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def kill_session(sid: int, timeout: float = 30.0) -> list[int]:
    """SIGKILL every process of session ``sid`` until none is left; returns any survivors."""
    deadline = time.monotonic() + timeout
    while True:
        members = _session_members(sid)
        if not members or time.monotonic() > deadline:
            return members
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


@dataclass
class UmlRun:
    """A UML guest that is running; :meth:`wait` ends it and returns what it printed."""

    proc: subprocess.Popen[bytes]
    command: list[str]
    run_dir: Path
    _stdin_writer: int
    _output: bytearray
    _reader: threading.Thread

    def console(self) -> str:
        return bytes(self._output).decode("utf-8", "replace").replace("\r", "")

    def wait(self, timeout: float) -> GuestResult:
        """Wait for UML to power off (or kill it after ``timeout``); then remove everything."""
        timed_out = False
        survivors: list[int] = []
        try:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
        finally:
            survivors = kill_session(self.proc.pid)
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            os.close(self._stdin_writer)
            self._reader.join(30)
            shutil.rmtree(self.run_dir, ignore_errors=True)
        console = self.console()
        if survivors:
            console += f"\n(UML processes that would not die: {survivors})"
        lease, results = parse_console(console)
        return GuestResult(
            console=console,
            lease=lease,
            results=results,
            returncode=self.proc.returncode,
            timed_out=timed_out,
            command=self.command,
        )


def start_uml(socket_path: str, steps: dict[str, str], mac: str = DEFAULT_MAC) -> UmlRun:
    """Boot UML against ``socket_path`` (a unixpacket listener that must already listen)."""
    uml = find_uml()
    run_dir = Path(tempfile.mkdtemp(prefix="nf-uml-"))
    try:
        cmd = uml_command(uml, socket_path, run_dir, steps, mac)
        # The console reads fd 0 with epoll, which /dev/null does not support: give it a pipe
        # that stays open (and silent) until the run ends.
        stdin_reader, stdin_writer = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, str(EXEC_WRAPPER), *cmd],
                stdin=stdin_reader,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TMPDIR": str(run_dir)},
                start_new_session=True,  # one session to kill: UML forks helpers
            )
        except BaseException:
            os.close(stdin_writer)
            raise
        finally:
            os.close(stdin_reader)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    output = bytearray()

    def read_console() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            output.extend(chunk)
        proc.stdout.close()

    reader = threading.Thread(target=read_console, name="uml-console", daemon=True)
    reader.start()
    return UmlRun(proc, cmd, run_dir, stdin_writer, output, reader)


def run_uml(
    socket_path: str, steps: dict[str, str], timeout: float = 300.0, mac: str = DEFAULT_MAC
) -> GuestResult:
    """Boot UML, wait for it to power off (kill it after ``timeout``), return its console."""
    return start_uml(socket_path, steps, mac).wait(timeout)
