"""Less privilege once hostd runs, as slirp4netns and passt do.

At start (before anything is opened) hostd raises its soft descriptor limit to the hard
one (`raise_nofile_limit`), which the descriptor budget is derived from.

After its links, API sockets and startup forwards are open, hostd:
1. sets PR_SET_NO_NEW_PRIVS: nothing it could ever execute gains privileges (setuid bits
   and file capabilities are ignored), and a seccomp filter needs no CAP_SYS_ADMIN;
2. when it has capabilities (started as root), drops every one but those its run time
   needs, from the effective, permitted, inheritable, ambient and bounding sets:
   - CAP_NET_BIND_SERVICE: forwards added later on ports below 1024;
   - CAP_NET_RAW: the raw ICMP socket (opened at start, kept in case it is reopened) and
     forwards' raw needs;
   - CAP_DAC_OVERRIDE: files at paths users name at run time (unix-socket forwards, the
     state file's rename, pcap) in directories root does not own;
3. with --sandbox, loads a seccomp filter that refuses (EPERM) system calls a network
   switch never makes and an attacker would want: tracing other processes, mounting,
   namespaces, kernel modules, kexec, BPF, keyrings, perf, userfaultfd, clock and swap
   changes, reboot. Everything else is allowed (a deny list, as slirp4netns's is not; an
   allow list would break with each Python, grpcio and libc release).

The binding is libseccomp's own Python module (Debian's python3-seccomp, version-locked to
the system's libseccomp2 and security-maintained with it); scripts/bootstrap links it into
the venv. PyPI's pyseccomp (ctypes, last release 2021) was the alternative; a hand-written
BPF program would be a second seccomp compiler to keep correct.
"""

from __future__ import annotations

import ctypes
import errno
import os

import structlog

log = structlog.get_logger("hostd.privileges")

PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_DAC_OVERRIDE = 1
CAP_NET_BIND_SERVICE = 10
CAP_NET_RAW = 13
KEEP_CAPS = (CAP_DAC_OVERRIDE, CAP_NET_BIND_SERVICE, CAP_NET_RAW)
KEEP_NAMES = ("cap_dac_override", "cap_net_bind_service", "cap_net_raw")
LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Refused with EPERM under --sandbox.
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsmount", "fsconfig", "fspick", "mount_setattr",
    "unshare", "setns",
    "init_module", "finit_module", "delete_module",
    "kexec_load", "kexec_file_load", "reboot",
    "bpf", "perf_event_open", "userfaultfd",
    "add_key", "request_key", "keyctl",
    "swapon", "swapoff", "acct", "quotactl", "syslog", "vhangup",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "iopl", "ioperm", "open_by_handle_at", "name_to_handle_at", "lookup_dcookie",
    "fanotify_init", "uselib", "personality",
)  # fmt: skip


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(libc: ctypes.CDLL, option: int, arg: int = 0) -> None:
    if libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl({option}): {os.strerror(e)}")


def effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def drop_capabilities(keep: tuple[int, ...] = KEEP_CAPS) -> None:
    libc = _libc()
    mask = 0
    for cap in keep:
        mask |= 1 << cap
    last = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last + 1):
        if not mask >> cap & 1:
            # EINVAL: a capability this kernel does not know; EPERM: no CAP_SETPCAP (then
            # the bounding set stays, the capsets below still drop).
            if libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0:
                if ctypes.get_errno() not in (errno.EINVAL, errno.EPERM):
                    raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")
    libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0)
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    current = effective_caps()
    keep_now = mask & current
    for i in range(2):
        word = (keep_now >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = word
        data[i].inheritable = 0
    if libc.capset(ctypes.byref(header), data) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"capset: {os.strerror(e)}")


def apply_sandbox() -> None:
    """Load the seccomp deny list into this process (every thread: TSYNC)."""
    try:
        import seccomp
    except ImportError:
        raise OSError(
            errno.ENOSYS,
            "--sandbox needs libseccomp's Python module (apt-get install python3-seccomp; "
            "scripts/bootstrap links it into the venv)",
        ) from None
    flt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        try:
            flt.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (ValueError, RuntimeError):
            continue  # not a system call on this architecture
    flt.set_attr(seccomp.Attr.CTL_TSYNC, 1)  # grpc's and asyncio's threads too
    flt.load()


def raise_nofile_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit, at start: the descriptor budget
    (hostd/nat/budget.py) is derived from it. Raising the soft limit needs no privilege,
    but it is done before `drop_privileges` all the same, so the order never matters.
    Returns (before, after); `hostd.ready` logs them."""
    from netferry.hostd.nat.budget import raise_nofile_limit as raise_limit

    return raise_limit()


def drop_privileges(sandbox: bool = False) -> None:
    """NO_NEW_PRIVS, capabilities when we have any, then the seccomp filter if asked."""
    libc = _libc()
    _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
    had = effective_caps()
    if had:
        drop_capabilities()
    if sandbox:
        apply_sandbox()
    log.info(
        "privileges.dropped",
        no_new_privs=True,
        capabilities_kept=[n for c, n in zip(KEEP_CAPS, KEEP_NAMES, strict=True) if had >> c & 1],
        sandbox=sandbox,
    )
