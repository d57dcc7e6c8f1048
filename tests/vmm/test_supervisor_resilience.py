"""A supervisor survives errors nothing translated (a bug, EMFILE): the VMM
it watches must never be left running unwatched."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmmhelpers import ManagerFactory, Recorder, definition

from procurator.core.models import Phase, PowerState
from procurator.worker.manager import VmSpec
from procurator.worker.vmm.base import VmmHandle, VmState
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver


class FlakyHealthChecks:
    """The real driver, but its next ``failures`` health checks raise an
    error no adapter translated."""

    def __init__(self, inner: CloudHypervisorDriver) -> None:
        self.inner = inner
        self.failures = 0
        self.raised = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _fail(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            self.raised += 1
            raise OSError(24, "Too many open files")

    # A health check is a state read, or a counters read when those are due
    # and the VMM reported no state change (VmManager._probe).
    def state(self, handle: VmmHandle, *, timeout: float) -> VmState:
        self._fail()
        return self.inner.state(handle, timeout=timeout)

    def counters(self, handle: VmmHandle, *, timeout: float) -> Mapping[str, Mapping[str, int]]:
        self._fail()
        return self.inner.counters(handle, timeout=timeout)


def test_an_untranslated_error_does_not_end_supervision(
    make_manager: ManagerFactory, driver: CloudHypervisorDriver, recorder: Recorder
) -> None:
    flaky = FlakyHealthChecks(driver)
    manager = make_manager(driver=flaky)
    first = manager.ensure(VmSpec("vm1", "h1", definition()))
    assert first.phase is Phase.RUNNING
    flaky.failures = 2
    recorder.wait_for(lambda: flaky.raised == 2)
    # Still supervised: a new desired state is carried out on the same VMM.
    paused = manager.ensure(VmSpec("vm1", "h1", definition(), power=PowerState.PAUSED))
    assert paused.phase is Phase.PAUSED
    assert paused.pid == first.pid
