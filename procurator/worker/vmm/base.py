"""The VMM driver port: what the VmManager needs from a hypervisor.

One driver instance serves all VMs of a worker; every method is blocking and
thread-safe (each VM's supervisor thread calls it for its own VM only). A
driver never decides policy (restarts, backoff, the order of the stop ladder):
the VmManager does, the same way for every driver.

The configuration language is cloud-hypervisor's ``VmConfig`` (see the
OpenAPI description, v53) for every driver: the QEMU driver translates it.
By the time a driver sees a config, the worker has already made it safe
(confinement) and filled in everything host-facing: disk copies, tap, MAC,
serial file. The API socket, event and log files are spawn arguments
(``VmmPaths``), never part of the image's config.

Starting a VM: call ``launch_vm(driver, paths, config, timeout=...)``. A VMM
that can wait for its config (cloud-hypervisor) is spawned, then given the
VM; one that needs the config on its command line (QEMU) implements
``VmmLauncher.launch`` and gets both at once. Either way no process is left
behind when it raises.

Errors: drivers raise only ``VmmError`` subclasses (a ``TemporaryError``:
the VMM may answer later) or ``VmmRejected`` (a ``PermanentError``: the VMM
refused the config). Library exceptions (httpx, OSError, JSON) never leak.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from procurator.core.errors import PermanentError, TemporaryError
from procurator.worker.vmm.process import terminate, wait_exit

__all__ = [
    "VmState",
    "VmmDriver",
    "VmmError",
    "VmmGone",
    "VmmHandle",
    "VmmLauncher",
    "VmmPaths",
    "VmmRejected",
    "VmmTimeout",
    "launch_vm",
]


class VmmError(TemporaryError):
    """The VMM did not do what was asked; it may later."""


class VmmTimeout(VmmError):
    """The VMM did not answer in time (hung, or overloaded)."""


class VmmGone(VmmError):
    """The VMM process is not there (exited, or never started)."""


class VmmRejected(PermanentError):
    """The VMM refused a request (4xx); ``details`` carries its error chain."""

    def __init__(self, message: str, *, status: int = 0, details: tuple[str, ...] = ()) -> None:
        super().__init__(message, details=details)
        self.status = status


class VmState(enum.Enum):
    """The VM's state as the VMM reports it (``vm.info`` ``state``)."""

    NOT_CREATED = "NotCreated"
    CREATED = "Created"
    RUNNING = "Running"
    SHUTDOWN = "Shutdown"
    PAUSED = "Paused"
    BREAKPOINT = "BreakPoint"


@dataclass(frozen=True, slots=True)
class VmmPaths:
    """Host paths the worker owns for one VM's VMM (all inside its VM dir)."""

    vm_dir: Path
    api_socket: Path
    event_file: Path
    log_file: Path
    serial_file: Path


@dataclass(frozen=True, slots=True)
class VmmHandle:
    """Transient facts about a running VMM, persisted in ``handles.json`` and
    always re-checked against the OS before being trusted: the pid must be
    alive *and* have the recorded start time (``/proc/<pid>/stat`` field 22)
    so a recycled pid is never mistaken for our VMM."""

    driver: str
    pid: int
    pid_start_ticks: int
    api_socket: str

    def to_json(self) -> dict[str, Any]:
        return {
            "driver": self.driver,
            "pid": self.pid,
            "pid_start_ticks": self.pid_start_ticks,
            "api_socket": self.api_socket,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VmmHandle:
        return cls(
            driver=str(data["driver"]),
            pid=int(data["pid"]),
            pid_start_ticks=int(data["pid_start_ticks"]),
            api_socket=str(data["api_socket"]),
        )


class VmmDriver(Protocol):
    """One hypervisor. Methods block; ``timeout`` is seconds for that call."""

    name: str

    def spawn(self, paths: VmmPaths, *, timeout: float) -> VmmHandle:
        """Start one VMM process in its own session (so it outlives the
        worker), wait until its API answers, return its handle. The process
        has no VM yet. Raises ``VmmError`` (and leaves no process) on failure."""
        ...

    def create_and_boot(
        self, handle: VmmHandle, config: Mapping[str, Any], *, timeout: float
    ) -> None:
        """Create the VM from ``config`` and boot it; confirm it runs."""
        ...

    def state(self, handle: VmmHandle, *, timeout: float) -> VmState:
        """Ask the VMM for the VM's state (``VmmTimeout`` if it hangs)."""
        ...

    def pause(self, handle: VmmHandle, *, timeout: float) -> None: ...

    def resume(self, handle: VmmHandle, *, timeout: float) -> None: ...

    def power_button(self, handle: VmmHandle, *, timeout: float) -> None:
        """Ask the guest to power off (ACPI). Returns at once."""
        ...

    def shutdown_vm(self, handle: VmmHandle, *, timeout: float) -> None:
        """Stop the VM hard; the VMM process may stay."""
        ...

    def shutdown_vmm(self, handle: VmmHandle, *, timeout: float) -> None:
        """Ask the VMM process to exit."""
        ...

    def counters(self, handle: VmmHandle, *, timeout: float) -> Mapping[str, Mapping[str, int]]:
        """Device counters by device id (``vm.counters``); latency sentinels
        (u64::MAX) already filtered out."""
        ...

    def state_mark(self, paths: VmmPaths) -> Hashable | None:
        """A cheap token (no API call) that changes whenever the VMM reports
        a change of the VM's state, or None when the driver cannot tell. The
        VmManager reads the state again only when the token changed; None
        means on every health check."""
        ...


@runtime_checkable
class VmmLauncher(Protocol):
    """A driver whose VMM takes the VM's config when it starts (QEMU)."""

    def launch(self, paths: VmmPaths, config: Mapping[str, Any], *, timeout: float) -> VmmHandle:
        """Start the VMM with the VM from ``config``, boot it, confirm it
        runs, return the handle. Leaves no process behind when it raises."""
        ...


def launch_vm(
    driver: VmmDriver, paths: VmmPaths, config: Mapping[str, Any], *, timeout: float
) -> VmmHandle:
    """Start a VMM running the VM from ``config``, for any driver; the one
    entry point for booting a VM. ``timeout`` bounds the whole start. On
    failure no VMM process is left (the error is re-raised)."""
    if isinstance(driver, VmmLauncher):
        return driver.launch(paths, config, timeout=timeout)
    deadline = time.monotonic() + timeout
    handle = driver.spawn(paths, timeout=timeout)
    try:
        driver.create_and_boot(handle, config, timeout=max(0.0, deadline - time.monotonic()))
    except BaseException:
        # The VMM has no running guest yet: nothing to save, only to stop.
        # Any refusal (a 4xx too) must not skip the signals below.
        with contextlib.suppress(VmmError, VmmRejected):
            driver.shutdown_vmm(handle, timeout=1.0)
        if not wait_exit(handle.pid, handle.pid_start_ticks, 2.0):
            terminate(handle.pid, handle.pid_start_ticks, grace=2.0)
        raise
    return handle
