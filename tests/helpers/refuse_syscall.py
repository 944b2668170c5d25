"""``python -m tests.helpers.refuse_syscall NAME serve ...``: the resolver under a seccomp
filter that refuses one system call with ENOSYS, as a strict container profile or a
sandbox does (the C library's call then fails as the kernel's). Linux on x86-64 only:
:data:`NUMBERS` says which calls, :func:`available` whether it can run here."""

from __future__ import annotations

import ctypes
import errno
import platform
import runpy
import struct
import sys

#: x86-64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl).
NUMBERS = {"recvmmsg": 299, "sendmmsg": 307}
_AUDIT_ARCH_X86_64 = 0xC000003E
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
# Classic BPF: LD|W|ABS, JMP|JEQ|K, RET|K.
_LD, _JEQ, _RET = 0x20, 0x15, 0x06


def available() -> bool:
    return sys.platform == "linux" and platform.machine() == "x86_64"


def refuse(name: str) -> None:
    """From now on, this process's ``name`` calls fail with ENOSYS."""
    program = [
        (_LD, 0, 0, 4),  # the call's architecture
        (_JEQ, 0, 3, _AUDIT_ARCH_X86_64),
        (_LD, 0, 0, 0),  # the call's number
        (_JEQ, 0, 1, NUMBERS[name]),
        (_RET, 0, 0, _RET_ERRNO | errno.ENOSYS),
        (_RET, 0, 0, _RET_ALLOW),
    ]
    raw = b"".join(struct.pack("HBBI", *op) for op in program)
    filters = ctypes.create_string_buffer(raw)

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = Program(len(program), ctypes.addressof(filters))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


if __name__ == "__main__":
    refuse(sys.argv[1])
    sys.argv = ["resolver", *sys.argv[2:]]
    runpy.run_module("resolver", run_name="__main__", alter_sys=True)
