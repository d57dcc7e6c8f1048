"""Helpers for the QEMU driver tests: image configs, VM directories, the
readiness marker, the stop ladder, commands inside a network namespace."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from procurator.core.vmdef import VmDefinition
from procurator.worker.state import StateDir
from procurator.worker.vmm.base import VmmError, VmmHandle, VmmPaths
from procurator.worker.vmm.process import terminate, wait_exit
from procurator.worker.vmm.qemu import QemuDriver

READY = b"PROCURATOR-READY"
# Bounds for failure, not performance: a TCG boot takes a few seconds.
BOOT_LIMIT = 120.0
POWER_OFF_LIMIT = 30.0


def image_definition(image: Path, *, cmdline: str = "", **extra: Any) -> VmDefinition:
    """The image's VM with its paths made absolute and the serial port on
    ``serial.log`` (the worker's job in production), ``cmdline`` appended
    and ``extra`` VmConfig sections set."""
    config: dict[str, Any] = json.loads((image / "vm-config.json").read_text())
    payload = config["payload"]
    for key in ("kernel", "initramfs"):
        if key in payload and not os.path.isabs(payload[key]):
            payload[key] = str(image / payload[key])
    payload["cmdline"] = f"{payload.get('cmdline', '')} {cmdline}".strip()
    config.update(extra)
    return VmDefinition.from_vm_config(config)


def make_paths(state_dir: Path, vm_id: str) -> VmmPaths:
    """The paths a worker with ``state_dir`` gives VM ``vm_id`` (its
    directory made)."""
    paths = StateDir(state_dir).paths(vm_id)
    paths.vm_dir.mkdir(parents=True, exist_ok=True)
    return paths


def wait_for_ready(paths: VmmPaths, handle: VmmHandle) -> str:
    """Wait for the readiness marker; return the serial log so far."""
    deadline = time.monotonic() + BOOT_LIMIT
    while time.monotonic() < deadline:
        text = paths.serial_file.read_bytes() if paths.serial_file.exists() else b""
        if READY in text:
            return text.decode(errors="replace")
        if wait_exit(handle.pid, handle.pid_start_ticks, 0.0):
            pytest.fail(f"QEMU exited before the marker:\n{text.decode(errors='replace')}")
        time.sleep(0.05)
    pytest.fail(f"no {READY!r} within {BOOT_LIMIT} s:\n{paths.serial_file.read_text()}")


def stop_vm(driver: QemuDriver, handle: VmmHandle) -> str:
    """The stop ladder (power button, quit, signals); returns the step that
    ended QEMU. About one stock guest in six under TCG ignores the button."""
    if wait_exit(handle.pid, handle.pid_start_ticks, 0.0):
        return "already gone"
    try:
        driver.power_button(handle, timeout=5.0)
        if wait_exit(handle.pid, handle.pid_start_ticks, POWER_OFF_LIMIT):
            return "power button"
    except VmmError:
        pass
    try:
        driver.shutdown_vmm(handle, timeout=5.0)
        if wait_exit(handle.pid, handle.pid_start_ticks, 5.0):
            return "quit"
    except VmmError:
        pass
    terminate(handle.pid, handle.pid_start_ticks, grace=5.0)
    return "signals"


@dataclass
class Vms:
    """Boots VMs for one test and stops every one of them at teardown."""

    root: Path
    driver: QemuDriver = field(default_factory=lambda: QemuDriver(accel="tcg"))
    running: list[VmmHandle] = field(default_factory=list)

    def launch(
        self, name: str, definition: VmDefinition, driver: QemuDriver | None = None
    ) -> tuple[VmmHandle, VmmPaths]:
        paths = make_paths(self.root, name)
        definition = dataclasses.replace(definition, serial_file=str(paths.serial_file))
        handle = (driver or self.driver).launch(definition, paths, timeout=30.0)
        self.running.append(handle)
        return handle, paths

    def stop_all(self) -> None:
        for handle in self.running:
            stop_vm(self.driver, handle)


def in_netns(netns: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=check
        )

    return run
