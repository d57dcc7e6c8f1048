"""The jail's seccomp filter, run on a small classic-BPF interpreter: what
it answers for each kind of call (the real kernel runs it in
tests/confinement/test_jailed_vmm.py)."""

from __future__ import annotations

import struct

import pytest

from procurator.core.seccomp import AUDIT_ARCH_X86_64, DENIED, baseline_filter

ALLOW = 0x7FFF0000
KILL = 0x80000000
EPERM = 0x00050000 | 1
ENOSYS = 0x00050000 | 38


def run(nr: int, *, arch: int = AUDIT_ARCH_X86_64, arg0: int = 0) -> int:
    """What the filter returns for a call (struct seccomp_data fields)."""
    program = baseline_filter()
    insns = [struct.unpack("HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    data = {0: nr, 4: arch, 16: arg0 & 0xFFFFFFFF}
    acc = 0
    pc = 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:  # ld [k]
            acc = data[k]
        elif code == 0x15:  # jeq
            pc += jt if acc == k else jf
        elif code == 0x35:  # jge
            pc += jt if acc >= k else jf
        elif code == 0x45:  # jset
            pc += jt if acc & k else jf
        elif code == 0x06:  # ret
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


@pytest.mark.parametrize("name", sorted(DENIED))
def test_every_denied_call_fails_with_eperm(name: str) -> None:
    assert run(DENIED[name]) == EPERM


@pytest.mark.parametrize(
    ("name", "nr"),
    [("read", 0), ("write", 1), ("mmap", 9), ("ioctl", 16), ("execve", 59), ("setuid", 105)],
)
def test_what_a_vmm_uses_is_allowed(name: str, nr: int) -> None:
    assert run(nr) == ALLOW  # setuid too: without capabilities it fails anyway


def test_clone_may_make_threads_and_processes_but_no_namespace() -> None:
    thread = 0x3D0F00  # CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|...
    assert run(56, arg0=thread) == ALLOW
    assert run(56, arg0=17) == ALLOW  # fork(): SIGCHLD
    for flag in (0x10000000, 0x00020000, 0x20000000, 0x40000000, 0x08000000):
        assert run(56, arg0=17 | flag) == EPERM
    # clone3's flags are behind a pointer: ENOSYS, so libc uses clone.
    assert run(435) == ENOSYS


def test_another_abi_is_killed() -> None:
    assert run(0, arch=0x40000003) == KILL  # i386
    assert run(0x40000000 | 1) == KILL  # x32
