"""Whether this host's KVM runs the guests a worker boots: stock kernels.

QEMU's ``--qemu-accel auto`` asks it (``QemuDriver.accel``). ``/dev/kvm``
opening is not enough: some hosts (a cloud VM without nested
virtualization) offer a *paravirtual* KVM, PVM (the ``kvm_pvm`` module),
which runs only guest kernels built for it. A stock kernel under it never
starts: on the development machine (AMD EPYC guest, no ``svm`` flag,
``kvm_pvm`` loaded) Debian's 6.1 kernel under ``qemu -accel kvm -M
microvm`` printed nothing in 15 s, not even with ``earlyprintk``, where
``-accel tcg`` booted it at once.

The rule, from facts the kernel publishes (no probe VM, no ioctl):

- ``/dev/kvm`` opens read-write (else there is no KVM for us);
- the KVM module is not PVM (``/sys/module/kvm_pvm`` absent);
- the CPU advertises hardware virtualization (``vmx`` or ``svm`` among
  the ``flags`` of ``/proc/cpuinfo``): without it, any KVM is a software
  one, as PVM is.

All three: KVM; else TCG (slower, and always right). The verdict says why,
for the worker's log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KvmVerdict", "kvm_verdict"]

_HARDWARE_FLAGS = frozenset({"vmx", "svm"})


@dataclass(frozen=True, slots=True)
class KvmVerdict:
    """Whether KVM runs stock guests here (``usable``), and why."""

    usable: bool
    reason: str


def kvm_verdict(
    device: Path = Path("/dev/kvm"),
    *,
    cpuinfo: Path = Path("/proc/cpuinfo"),
    modules: Path = Path("/sys/module"),
) -> KvmVerdict:
    """See the module docstring; the paths are the host's (tests give
    their own)."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return KvmVerdict(False, f"{device} does not open ({exc.strerror or exc}): TCG")
    os.close(fd)
    if (modules / "kvm_pvm").exists():
        return KvmVerdict(
            False,
            f"{device} is PVM, a paravirtual KVM (module kvm_pvm) that runs only guest "
            "kernels built for it, not stock ones: TCG (--qemu-accel kvm forces it)",
        )
    flags = _cpu_flags(cpuinfo)
    if flags is not None and not flags & _HARDWARE_FLAGS:
        return KvmVerdict(
            False,
            f"{device} opens, but the CPU has no hardware virtualization (no vmx or svm "
            f"in {cpuinfo}): a software KVM does not run stock guests: TCG "
            "(--qemu-accel kvm forces it)",
        )
    return KvmVerdict(True, f"{device} opens and the CPU has hardware virtualization: KVM")


def _cpu_flags(cpuinfo: Path) -> frozenset[str] | None:
    """The first CPU's flags; None when the file cannot be read or has none
    (another architecture: the rule does not apply, KVM is taken)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return None
