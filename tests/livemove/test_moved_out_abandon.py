"""A restarted worker's supervisor and the live migration its
predecessor died in (issue 30, ``VmSupervisor._hold_moved_out``): the
``moved-out.json`` mark says "migrating" (not sent) and the VMM still
runs, so the supervisor has the driver abandon the migration before it
lets the VM run on; while that fails, the VM is reported failed and held
with its mark (never claimed running while the migration may hold it
paused), and tried again. Real fake cloud-hypervisor processes; the
driver's ``abandon_migration`` is this test's (the fake's stream dies
with its relay, so it has nothing to undo: test_livemove_abandon.py
undoes a real QEMU's)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vmm"))

from vmmhelpers import FAKE, FAST, FAST_POLICY, definition, kill_all_under

from procurator.core.models import Phase
from procurator.worker.manager import VmManager, VmObservation
from procurator.worker.state import StateDir
from procurator.worker.vmm.base import VmmError, VmmHandle
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver
from procurator.worker.vmrecord import MOVED_OUT_FILE, MovedOut, VmSpec


class AbandoningDriver(CloudHypervisorDriver):
    """The fake cloud-hypervisor's driver whose ``abandon_migration`` is
    counted and, while ``refuse`` says why, fails as a QEMU that cannot
    cancel its migration would."""

    def __init__(self) -> None:
        super().__init__(sys.executable, args=[str(FAKE)])
        self.abandoned: list[int] = []
        self.refuse: str | None = None

    def abandon_migration(self, handle: VmmHandle, *, timeout: float) -> None:
        self.abandoned.append(handle.pid)
        if self.refuse is not None:
            raise VmmError(self.refuse)


@pytest.fixture
def state() -> Iterator[Path]:
    # Short, under /tmp: unix socket paths must stay under 108 bytes.
    made = Path(tempfile.mkdtemp(prefix="pma-", dir="/tmp"))
    try:
        yield made
    finally:
        kill_all_under(made)  # safety net for a failed test; a passing one left none
        shutil.rmtree(made, ignore_errors=True)


def _manager(state: Path, driver: CloudHypervisorDriver) -> VmManager:
    timeouts = dataclasses.replace(FAST, health_interval=0.05)
    return VmManager(state, driver, timeouts=timeouts, policy=FAST_POLICY, jail=None)


def _until(manager: VmManager, phase: Phase) -> VmObservation:
    deadline = time.monotonic() + 30  # a hang guard, not a measure
    while (obs := manager.get("vm1")) is None or obs.phase is not phase:
        assert time.monotonic() < deadline, obs
        time.sleep(0.01)
    return obs


def test_a_restarted_worker_abandons_the_migration_before_the_vm_runs_on(
    state: Path,
) -> None:
    driver = AbandoningDriver()
    first = _manager(state, driver)
    try:
        running = first.ensure(VmSpec("vm1", "h1", definition()))
    finally:
        first.close()  # the worker stops in the migration; its VMM lives on
    # What the dead worker's move wrote before send_migration began.
    mark = StateDir(state).vm_dir("vm1") / MOVED_OUT_FILE
    mark.write_text(json.dumps({"op_id": "op-m", "sent": False}))

    driver.refuse = "migrate_cancel: no answer"
    second = _manager(state, driver)
    try:
        (held,) = second.recover()
        assert held.phase is Phase.FAILED, held
        assert "move op-m" in held.message and "migrate_cancel: no answer" in held.message
        assert held.moved_out == MovedOut("op-m", False) and mark.exists()
        assert driver.abandoned[0] == running.pid

        tries = len(driver.abandoned)
        driver.refuse = None  # tried again after the health interval
        ran_on = _until(second, Phase.RUNNING)
        assert ran_on.pid == running.pid and ran_on.moved_out is None
        assert not mark.exists() and len(driver.abandoned) > tries
        second.remove("vm1")
    finally:
        second.close()
        driver.close()
