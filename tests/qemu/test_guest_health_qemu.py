"""Guest health checks (and prepare) with real guests: a worker (``ReconcilingHandler``,
QEMU under TCG, its network in a namespace) boots the test image, whose
guest serves HTTP on port 80, and its "bad" variant, which never opens the
port (``nix/test-image``, ``--arg service false``). The good guest turns
healthy over HTTP, then over TCP when its check changes (in place: the
same boot); the bad one is checked all along and never does. One boot each.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from procurator.core.assignments import AssignmentChanges
from procurator.core.metrics import MetricSample
from procurator.core.models import (
    Assignment,
    Health,
    HealthCheck,
    HealthKind,
    Phase,
    PreparedImage,
    PrepareState,
    VmAssignment,
    VmEvent,
    VmStatus,
    WorkerStatus,
)
from procurator.core.status import StatusChanges
from procurator.core.validation import store_path_hash
from procurator.lab import build_test_image
from procurator.worker.runtime import ReconcilingHandler, RuntimeOptions

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.nix]

BOOT_LIMIT = 240.0  # bounds for failure, not performance: two TCG boots


class Recorder:
    """The link, as far as the handler can tell: every VM's status as
    published, and each VM's health in the order it was published."""

    def __init__(self) -> None:
        self.vms: dict[str, VmStatus] = {}
        self.healths: dict[str, list[Health]] = {}
        self.prepared: tuple[PreparedImage, ...] = ()

    def publish_status(self, status: WorkerStatus) -> None:
        raise AssertionError("the reconciling worker publishes changes")

    def publish_status_changes(self, changes: StatusChanges) -> None:
        for vm in changes.changed:
            self.vms[vm.id] = vm
            self.healths.setdefault(vm.id, []).append(vm.health)
        for vm_id in changes.removed:
            self.vms.pop(vm_id, None)

    def publish_events(self, events: Sequence[VmEvent]) -> None:
        pass

    def publish_metrics(self, samples: Sequence[MetricSample]) -> None:
        pass

    def publish_prepared(self, prepared: tuple[PreparedImage, ...]) -> None:
        self.prepared = prepared

    async def wait(self, vm_id: str, health: Health) -> VmStatus:
        with trio.fail_after(BOOT_LIMIT):
            while (vm := self.vms.get(vm_id)) is None or vm.health is not health:
                await trio.sleep(0.1)
        return vm


def _vm(vm_id: str, image: str, check: HealthCheck) -> VmAssignment:
    return VmAssignment(vm_id, store_path_hash(image), image, health=check)


async def test_the_good_guest_turns_healthy_and_the_bad_one_never(
    test_image: Path, netns: str, tmp_path: Path
) -> None:
    good = str(test_image)
    bad = build_test_image(
        "--argstr", "name", "procurator-test-vm-bad", "--arg", "service", "false"
    )
    # QEMU runs in the namespace, where the network manager makes the taps.
    wrapper = tmp_path / "qemu-in-netns"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {netns} qemu-system-x86_64 "$@"\n')
    wrapper.chmod(0o755)
    options = RuntimeOptions(
        driver="qemu",
        vmm_binary=str(wrapper),
        qemu_accel="tcg",
        bridge="br-health",
        subnet="10.123.0.0/24",
        jail=None,
        stop_grace=5.0,
        guest_check_interval=0.5,
    )
    recorder = Recorder()
    handler = ReconcilingHandler(
        worker_id="host-a",
        state_dir=tmp_path / "state",
        options=options,
        publisher=recorder,
        netns=netns,
    )
    http = HealthCheck(HealthKind.HTTP, 80, "/", 200, min_healthy_ms=2000, interval_ms=500)
    tcp = HealthCheck(HealthKind.TCP, 80, min_healthy_ms=1000, interval_ms=500)
    async with trio.open_nursery() as nursery:
        await nursery.start(handler.run)
        try:
            # The good image is also prepared (rooted apart) through the same worker.
            await handler.on_assignment(
                Assignment(
                    "host-a", 1, (_vm("good", good, http), _vm("bad", bad, tcp)), "op-1", (good,)
                )
            )
            booted = await recorder.wait("good", Health.HEALTHY)
            with trio.fail_after(60):
                while [(i.path, i.state) for i in recorder.prepared] != [
                    (good, PrepareState.READY)
                ]:
                    await trio.sleep(0.1)
            assert booted.phase is Phase.RUNNING and booted.address.startswith("10.123.0.")
            observed = handler.manager.get("good")
            assert observed is not None and observed.pid
            # The check changes; the guest stays the same (no restart, no replacement).
            changes = AssignmentChanges("host-a", 1, 2, "op-2", (_vm("good", good, tcp),))
            assert await handler.on_assignment(changes)
            assert recorder.vms["good"].health is Health.PENDING
            again = await recorder.wait("good", Health.HEALTHY)
            assert (again.restarts, again.observed_hash) == (booted.restarts, booted.observed_hash)
            still = handler.manager.get("good")
            assert still is not None and still.pid == observed.pid
            # By now the bad guest has been running and checked for seconds.
            failing = await recorder.wait("bad", Health.UNHEALTHY)
            assert failing.phase is Phase.RUNNING
            assert failing.message.startswith(f"tcp {failing.address}:80: ")
            assert Health.HEALTHY not in recorder.healths["bad"]
            assert handler.health.checks > 4
            assert recorder.prepared == ()  # generation 2 names nothing to prepare
            assert handler.preparer.roots() == {good}  # the VM "good" runs it still
        finally:
            with trio.CancelScope(shield=True), trio.fail_after(120):
                await handler.on_assignment(Assignment("host-a", 3, (), "op-3"))
                while recorder.vms or handler.preparer.roots():
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
