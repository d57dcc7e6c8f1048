"""The stop ladder: how a VM's supervisor ends a VMM, the same for every driver.

Each rung only if the VMM still runs: a paused guest is resumed first (it
cannot answer the power button, and should flush its disks); the power
button, then wait ``power_button_wait``; ``shutdown_vm``; ``shutdown_vmm``,
then wait ``shutdown_vmm_wait``; SIGTERM, then wait ``sigterm_wait``;
SIGKILL, then wait ``sigkill_wait``. Once one API rung times out the API is
treated as hung and the remaining API rungs are skipped (each would only
burn another timeout): the signals come next. A VMM that another driver
started gets the signals only (``api=False``): its API is not this
driver's to speak.

Only the supervisor thread that owns the VM runs its ladder; nothing here
is shared between VMs.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

from procurator.worker.vmm import process
from procurator.worker.vmm.base import (
    VmmDriver,
    VmmError,
    VmmHandle,
    VmmRejected,
    VmmTimeout,
    VmState,
)
from procurator.worker.vmrecord import Timeouts

__all__ = ["StopFailed", "StopLadder"]

log = logging.getLogger(__name__)


class StopFailed(VmmError):
    """The VMM survived the whole stop ladder (e.g. stuck in the kernel)."""


class StopLadder:
    """The ladder for the VMMs of VM ``vm_id`` (see the module docstring)."""

    def __init__(self, driver: VmmDriver, timeouts: Timeouts, vm_id: str) -> None:
        self.driver = driver
        self.t = timeouts
        self.vm_id = vm_id

    def run(self, handle: VmmHandle, reason: str, *, api: bool = True) -> str:
        """Stop the VMM of ``handle``; returns the rung that ended it.
        Raises ``StopFailed`` if it survives SIGKILL."""
        log.info("VM %s: stopping VMM pid %s: %s", self.vm_id, handle.pid, reason)
        if process.wait_exit(handle.pid, handle.pid_start_ticks, 0.0):
            how = "already exited"
        else:
            how = (self._api(handle) if api else "") or self._signals(handle)
        if not how:
            raise StopFailed(
                f"VM {self.vm_id}: VMM pid {handle.pid} survived SIGKILL for "
                f"{self.t.sigkill_wait:g} s"
            )
        log.info("VM %s: VMM pid %s stopped by %s", self.vm_id, handle.pid, how)
        return how

    def _api(self, handle: VmmHandle) -> str:
        """The API rungs; the one that ended the VMM, or "" (once one times
        out, the API is hung: the signals come next)."""
        self._resume_paused(handle)
        t, d = self.t, self.driver
        rungs: list[tuple[str, Callable[..., None], float]] = [
            ("power button", d.power_button, t.power_button_wait),
            ("vm.shutdown", d.shutdown_vm, 0.0),
            ("vmm.shutdown", d.shutdown_vmm, t.shutdown_vmm_wait),
        ]
        for name, call, wait in rungs:
            taken = True
            try:
                call(handle, timeout=t.api)
            except VmmTimeout as exc:
                log.warning("VM %s: %s: %s; API hung, signals next", self.vm_id, name, exc)
                return ""
            except (VmmError, VmmRejected) as exc:
                log.info("VM %s: %s not taken: %s", self.vm_id, name, exc)
                taken = False
            if process.wait_exit(handle.pid, handle.pid_start_ticks, wait if taken else 0.0):
                return name
        return ""

    def _signals(self, handle: VmmHandle) -> str:
        """SIGTERM, then SIGKILL; the one that ended the VMM, or ""."""
        for sig, wait in (
            (signal.SIGTERM, self.t.sigterm_wait),
            (signal.SIGKILL, self.t.sigkill_wait),
        ):
            process.signal_process(handle.pid, handle.pid_start_ticks, sig)
            if process.wait_exit(handle.pid, handle.pid_start_ticks, wait):
                return sig.name
        return ""

    def _resume_paused(self, handle: VmmHandle) -> None:
        """A paused guest cannot answer the power button: resume it first so
        it shuts down cleanly (flushes its disks) rather than waiting out
        the button and being cut off further down the ladder."""
        try:
            if self.driver.state(handle, timeout=self.t.api) is VmState.PAUSED:
                log.info("VM %s: resuming the paused guest so it can shut down", self.vm_id)
                self.driver.resume(handle, timeout=self.t.api)
        except (VmmError, VmmRejected) as exc:
            log.info("VM %s: not resumed before stopping: %s", self.vm_id, exc)
