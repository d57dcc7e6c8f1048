"""``--qemu-accel auto``: KVM only where it runs stock guests
(procurator.worker.vmm.kvm). This machine's /dev/kvm is PVM (module
kvm_pvm), a paravirtual KVM under which a stock kernel never starts; auto
took it because /dev/kvm opened, and every VM hung silently."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from procurator.worker.vmm.kvm import kvm_verdict
from procurator.worker.vmm.qemu import QemuDriver

AMD_FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr syscall nx lm"


def host(
    tmp_path: Path, *, flags: str | None = AMD_FLAGS, pvm: bool = False, device: bool = True
) -> dict[str, Path]:
    """A host's files as kvm_verdict reads them: the device (a file that
    opens read-write, or none), /proc/cpuinfo, /sys/module."""
    kvm = tmp_path / "kvm"
    if device:
        kvm.write_bytes(b"")
    cpuinfo = tmp_path / "cpuinfo"
    lines = ["processor\t: 0", "model name\t: AMD EPYC"]
    if flags is not None:
        lines.append(f"flags\t\t: {flags}")
    cpuinfo.write_text("\n".join(lines) + "\n\n")
    modules = tmp_path / "module"
    (modules / "kvm").mkdir(parents=True)
    if pvm:
        (modules / "kvm_pvm").mkdir()
    return {"device": kvm, "cpuinfo": cpuinfo, "modules": modules}


@pytest.mark.parametrize(
    ("flags", "pvm", "device", "usable", "said"),
    [
        (f"{AMD_FLAGS} svm", False, True, True, "hardware virtualization: KVM"),
        (f"{AMD_FLAGS} vmx", False, True, True, "hardware virtualization: KVM"),
        (None, False, True, True, "hardware virtualization: KVM"),  # no flags: not x86
        (f"{AMD_FLAGS} hypervisor", True, True, False, "is PVM"),
        (f"{AMD_FLAGS} svm", True, True, False, "is PVM"),
        (f"{AMD_FLAGS} hypervisor", False, True, False, "no hardware virtualization"),
        (f"{AMD_FLAGS} svm", False, False, False, "does not open"),
    ],
)
def test_kvm_is_taken_only_where_it_runs_stock_guests(
    tmp_path: Path, flags: str | None, pvm: bool, device: bool, usable: bool, said: str
) -> None:
    files = host(tmp_path, flags=flags, pvm=pvm, device=device)
    verdict = kvm_verdict(files["device"], cpuinfo=files["cpuinfo"], modules=files["modules"])
    assert verdict.usable is usable
    assert said in verdict.reason
    assert verdict.reason.endswith(": KVM" if usable else "")


def test_auto_says_why_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="procurator.worker.vmm.qemu")
    driver = QemuDriver(accel="auto", kvm_device=tmp_path / "no-kvm")
    assert [driver.accel, driver.accel] == ["tcg", "tcg"]
    (line,) = [r.getMessage() for r in caplog.records if "acceleration auto" in r.getMessage()]
    assert f"{tmp_path / 'no-kvm'} does not open" in line


def test_auto_takes_tcg_on_this_machine_s_paravirtual_kvm() -> None:
    # Where /dev/kvm is PVM (this machine: verified that a stock Debian
    # kernel prints nothing under -accel kvm and boots under tcg), auto is
    # TCG; elsewhere auto follows the rule the table above checks.
    kvm = Path("/dev/kvm")
    accel = QemuDriver(accel="auto").accel
    if Path("/sys/module/kvm_pvm").exists() and os.access(kvm, os.R_OK | os.W_OK):
        assert accel == "tcg"
    else:
        assert accel == ("kvm" if kvm_verdict().usable else "tcg")
