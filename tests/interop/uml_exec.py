"""Exec User Mode Linux with the host's XSAVE register set hidden from it.

    python uml_exec.py /usr/bin/linux.uml ARG...

Why: Debian 12's UML (6.1) reads and writes its guests' FPU state with
``PTRACE_{GET,SET}REGSET(NT_X86_XSTATE)`` and a buffer of ``sizeof(struct _xstate)`` (x87,
SSE, AVX). On a host whose XSAVE area is larger (AVX-512, AMX: this machine kind) the host
kernel refuses the short write with EFAULT, and UML dies at its first guest instruction
("userspace - ptrace set fp regs failed, errno = 14"). Newer UML sizes the buffer from the
host. When that regset is unavailable, UML
6.1 falls back to ``PTRACE_{GET,SET}FPREGS`` (x87/SSE only), which works everywhere; this
launcher makes the regset unavailable to UML with a seccomp filter that fails exactly those
two ptrace requests with EINVAL, then execs UML. Everything else is allowed.

Only x87/SSE state is then carried across UML's context switches, so the guest must not use
AVX: ``uml_init.sh`` sets ``GLIBC_TUNABLES`` to keep glibc's string functions off AVX (without
it busybox prints its format strings raw).

The filter is inherited by UML's helper processes; guest system calls never reach it (UML
intercepts them with PTRACE_SYSEMU, which skips seccomp). Standard library only.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
AUDIT_ARCH_X86_64 = 0xC000003E
NR_PTRACE = 101  # x86_64
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
NT_X86_XSTATE = 0x202
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EINVAL = 22

# classic BPF opcodes
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06
# offsets in struct seccomp_data: nr, arch, ip, args[6] (low 32 bits first: little-endian)
OFF_NR, OFF_ARCH, OFF_ARG0, OFF_ARG2 = 0, 4, 16, 32


def _stmt(code: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, 0, 0, k)


def _jeq(k: int, jump_true: int, jump_false: int) -> bytes:
    return struct.pack("=HBBI", BPF_JEQ_K, jump_true, jump_false, k)


def xstate_filter() -> bytes:
    """The BPF program: EINVAL for ptrace(GETREGSET|SETREGSET, _, NT_X86_XSTATE), else allow.

    Jump offsets count instructions skipped after the jump: 0 is the next one.
    """
    return b"".join(
        [
            _stmt(BPF_LD_W_ABS, OFF_ARCH),  # 0
            _jeq(AUDIT_ARCH_X86_64, 0, 7),  # 1: other arch → 9 allow
            _stmt(BPF_LD_W_ABS, OFF_NR),  # 2
            _jeq(NR_PTRACE, 0, 5),  # 3: not ptrace → 9 allow
            _stmt(BPF_LD_W_ABS, OFF_ARG0),  # 4: the request
            _jeq(PTRACE_GETREGSET, 1, 0),  # 5: → 7
            _jeq(PTRACE_SETREGSET, 0, 2),  # 6: neither → 9 allow
            _stmt(BPF_LD_W_ABS, OFF_ARG2),  # 7: the regset type
            _jeq(NT_X86_XSTATE, 1, 0),  # 8: → 10 deny
            _stmt(BPF_RET_K, SECCOMP_RET_ALLOW),  # 9
            _stmt(BPF_RET_K, SECCOMP_RET_ERRNO | EINVAL),  # 10
        ]
    )


def install_filter() -> None:
    libc = ctypes.CDLL(None, use_errno=True)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    program = xstate_filter()
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.addressof(buffer))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: uml_exec.py /path/to/linux.uml [ARG...]")
    if os.uname().machine != "x86_64":
        sys.exit("uml_exec.py: the filter is written for x86_64")
    install_filter()
    os.execv(argv[1], argv[1:])


if __name__ == "__main__":
    main(sys.argv)
