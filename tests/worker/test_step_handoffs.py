"""A reconciler's step crosses into trio once at its end (issue 31 target 2).

``WorkerActuator`` runs a step in a thread and tells ``on_change`` of each
phase the step shows meanwhile: each call is a wake-up of trio (a system
call, a context switch, a loop turn). The step's end is not one of them:
``to_thread`` wakes trio with the end anyway, and the reconciler looks at
the VM again then. The actuator here is the worker's own, on a real
``VmManager`` and ``ImageManager``; the store is a fake of the ``Store``
port that no step of these reaches (the image is refused before)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

from procurator.core.confinement import ImageLimits
from procurator.core.errors import ValidationError
from procurator.core.models import VmAssignment
from procurator.nix.image import ImageManager
from procurator.worker.actuator import WorkerActuator
from procurator.worker.manager import VmManager
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver


class UnreachedStore:
    """The ``Store`` port; a refused image never gets this far."""

    def is_valid(self, path: str) -> bool:
        raise AssertionError("not reached")

    def realise(self, path: str, *, root: Path | None = None) -> None:
        raise AssertionError("not reached")

    def closure(self, path: str) -> frozenset[str]:
        raise AssertionError("not reached")

    def add_root(self, path: str, link: Path) -> None:
        raise AssertionError("not reached")

    def add_root_beside(self, path: str, link: Path, witness: Path) -> bool:
        raise AssertionError("not reached")

    def has_root(self, link: Path) -> bool:
        raise AssertionError("not reached")

    def remove_root(self, link: Path) -> None:
        raise AssertionError("not reached")


async def test_a_steps_end_is_no_hand_off_of_its_own(tmp_path: Path) -> None:
    manager = VmManager(tmp_path / "state", CloudHypervisorDriver("/nonexistent/cloud-hypervisor"))
    told: list[tuple[str, bool]] = []  # (vm id, told from the trio thread)
    trio_thread = threading.current_thread()

    def on_change(vm_id: str) -> None:
        told.append((vm_id, threading.current_thread() is trio_thread))

    actuator = WorkerActuator(
        manager,
        ImageManager(
            UnreachedStore(),
            tmp_path / "state",
            limits=ImageLimits(max_vcpus=2, max_memory_mib=512),
        ),
        None,
        limiter=trio.CapacityLimiter(2),
        serial_file=lambda vm_id: str(tmp_path / f"{vm_id}.serial"),
        on_change=on_change,
    )
    try:
        with pytest.raises(ValidationError):
            await actuator.ensure(VmAssignment("vm1", "h1", "/not/a/store/path"), "op-1")
        # The step showed "preparing the image" (one call, from its thread);
        # its end is seen without one: the VM shows no step in flight.
        assert told == [("vm1", False)]
        assert await actuator.observe_some(["vm1"]) == {}
        assert "vm1" not in await actuator.observe()

        await actuator.remove("vm2", "op-2")  # nothing to remove: the step alone
        assert told[1:] == [("vm2", False)]  # "removing"; the end rides on to_thread's
        assert await actuator.observe_some(["vm2"]) == {}
    finally:
        manager.close()
