"""The jail's own syscall filter: a classic-BPF seccomp program, built here
(pure: bytes out), installed by the jailer on every VMM right before exec.

Why one of our own when cloud-hypervisor (``--seccomp``) and QEMU
(``-sandbox``) bring theirs: a VMM's own list is written for that VMM and
varies with its version and options (QEMU's default list leaves namespaces
and user namespaces alone), and a VMM may not install one at all (a
wrapper, another build, the benchmark's fake). This filter is the floor
every jailed VMM runs on, whatever it then adds: the calls no VMM needs and
that an escaped guest would use to widen its reach into the kernel —

- making or entering namespaces (``unshare``, ``setns``, ``clone`` with a
  ``CLONE_NEW*`` flag; ``clone3`` answers ENOSYS so that libc falls back to
  ``clone``, whose flags the filter can read): a user namespace would give
  it a fresh set of capabilities over new mount, network and other
  namespaces, and with them much more of the kernel to attack;
- changing mounts (old and new mount API, ``pivot_root``, ``chroot``);
- tracing and reading other processes (``ptrace``, ``process_vm_*``,
  ``kcmp``), eBPF, keyrings, ``userfaultfd``, ``perf_event_open``;
- kernel code and machine state (modules, ``kexec``, ``reboot``, swap,
  ``acct``, quotas, the kernel log, raw I/O ports), handle-based opens.

Denied calls fail with EPERM (ENOSYS for ``clone3``): the VMM sees an error
it can handle, not a kill. A call from another architecture's ABI (x32,
i386 ``int 0x80``) kills the process: the numbers below are x86_64's.
Filters stack: the VMM's own filter applies on top of this one, and
``Seccomp_filters`` in ``/proc`` counts both.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

__all__ = ["DENIED", "baseline_filter"]

AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_EPERM = 1
_ENOSYS = 38
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
# classic BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
# offsets in struct seccomp_data
_NR = 0
_ARCH = 4
_ARG0_LOW = 16

_CLONE = 56
_CLONE3 = 435
#: CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_CLONE_NAMESPACES = 0x7E020000

#: x86_64 system calls no VMM needs, by name (the numbers never change).
DENIED: Mapping[str, int] = {
    "ptrace": 101,
    "syslog": 103,
    "pivot_root": 155,
    "chroot": 161,
    "acct": 163,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "iopl": 172,
    "ioperm": 173,
    "init_module": 175,
    "delete_module": 176,
    "quotactl": 179,
    "lookup_dcookie": 212,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "perf_event_open": 298,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
}


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def baseline_filter() -> bytes:
    """The filter as ``struct sock_filter`` instructions (8 bytes each),
    ready for ``prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ...)``."""
    denied = sorted(set(DENIED.values()))
    # Layout (a jump is relative to the next instruction; classic BPF jumps
    # only forward):
    #   0 ld arch   1 jeq x86_64 ? 3 : 2   2 ret KILL
    #   3 ld nr     4 jge X32 -> kill       5 jeq clone3 -> enosys
    #   6 jeq clone -> flags                7.. jeq <denied> -> eperm
    #   allow: ret ALLOW
    #   flags: ld arg0; jset CLONE_NEW* -> eperm; ret ALLOW
    #   eperm: ret ERRNO|EPERM   enosys: ret ERRNO|ENOSYS   kill: ret KILL
    n = len(denied)
    allow = 7 + n
    flags = allow + 1
    eperm = flags + 3
    enosys = eperm + 1
    kill = enosys + 1
    out = [
        _insn(_LD_W_ABS, 0, 0, _ARCH),
        _insn(_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        _insn(_RET_K, 0, 0, _RET_KILL_PROCESS),
        _insn(_LD_W_ABS, 0, 0, _NR),
        _insn(_JGE_K, kill - 5, 0, _X32_SYSCALL_BIT),
        _insn(_JEQ_K, enosys - 6, 0, _CLONE3),
        _insn(_JEQ_K, flags - 7, 0, _CLONE),
    ]
    for index, number in enumerate(denied):
        out.append(_insn(_JEQ_K, eperm - (8 + index), 0, number))
    out += [
        _insn(_RET_K, 0, 0, _RET_ALLOW),  # allow
        _insn(_LD_W_ABS, 0, 0, _ARG0_LOW),  # flags
        _insn(_JSET_K, eperm - (flags + 2), 0, _CLONE_NAMESPACES),
        _insn(_RET_K, 0, 0, _RET_ALLOW),
        _insn(_RET_K, 0, 0, _RET_ERRNO | _EPERM),  # eperm
        _insn(_RET_K, 0, 0, _RET_ERRNO | _ENOSYS),  # enosys
        _insn(_RET_K, 0, 0, _RET_KILL_PROCESS),  # kill
    ]
    assert len(out) == kill + 1
    return b"".join(out)
