"""The stop ladder: how a VM's supervisor ends a VMM, the same for every driver.

Each rung only if the VMM still runs: a paused guest is resumed first (it
cannot answer the power button, and should flush its disks) — unless the
VM is being removed (``resume_paused=False``): its disks go with it, and
a paused VM may be paused because it runs elsewhere now (the fence paused
it, healing moved it), so it must never run here again; then the power
button is skipped too (a paused guest cannot answer it). The power
button, then wait ``power_button_wait``; ``shutdown_vm``;
``shutdown_vmm``, then wait ``shutdown_vmm_wait``; SIGTERM, then wait
``sigterm_wait``; SIGKILL, then wait ``sigkill_wait``. Once one API rung
times out the API is treated as hung and the remaining API rungs are
skipped (each would only burn another timeout): the signals come next. A
VMM that another driver started gets the signals only (``api=False``):
its API is not this driver's to speak.

Only the supervisor that owns the VM runs its ladder, in one of its turns;
nothing here is shared between VMs.
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

    def run(
        self, handle: VmmHandle, reason: str, *, api: bool = True, resume_paused: bool = True
    ) -> str:
        """Stop the VMM of ``handle``; returns the rung that ended it.
        Raises ``StopFailed`` if it survives SIGKILL. ``resume_paused``:
        see the module docstring."""
        log.info("VM %s: stopping VMM pid %s: %s", self.vm_id, handle.pid, reason)
        if process.wait_exit(handle.pid, handle.pid_start_ticks, 0.0):
            how = "already exited"
        else:
            how = (self._api(handle, resume_paused) if api else "") or self._signals(handle)
        if not how:
            raise StopFailed(
                f"VM {self.vm_id}: VMM pid {handle.pid} survived SIGKILL for "
                f"{self.t.sigkill_wait:g} s"
            )
        log.info("VM %s: VMM pid %s stopped by %s", self.vm_id, handle.pid, how)
        return how

    def _api(self, handle: VmmHandle, resume_paused: bool) -> str:
        """The API rungs; the one that ended the VMM, or "" (once one times
        out, the API is hung: the signals come next)."""
        paused = self._paused(handle)
        if paused and resume_paused:
            log.info("VM %s: resuming the paused guest so it can shut down", self.vm_id)
            try:
                self.driver.resume(handle, timeout=self.t.api)
                paused = False
            except (VmmError, VmmRejected) as exc:
                log.info("VM %s: not resumed before stopping: %s", self.vm_id, exc)
        t, d = self.t, self.driver
        rungs: list[tuple[str, Callable[..., None], float]] = [
            ("vm.shutdown", d.shutdown_vm, 0.0),
            ("vmm.shutdown", d.shutdown_vmm, t.shutdown_vmm_wait),
        ]
        if not paused:
            rungs.insert(0, ("power button", d.power_button, t.power_button_wait))
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

    def _paused(self, handle: VmmHandle) -> bool:
        """Is the guest paused? A paused guest cannot answer the power
        button: it is resumed first so it shuts down cleanly (flushes its
        disks) rather than waiting out the button and being cut off further
        down the ladder, or, when it must not run again, skips the button.
        A VMM that does not say is taken as running (the ladder as before)."""
        try:
            return self.driver.state(handle, timeout=self.t.api) is VmState.PAUSED
        except (VmmError, VmmRejected) as exc:
            log.info("VM %s: state unknown before stopping: %s", self.vm_id, exc)
            return False
