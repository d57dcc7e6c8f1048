"""A failed live move's incoming VM is removed once on its target, by the
move service, and never shows in the worker's status: it is no VM of the
worker's (the master refuses a status naming a VM it neither assigned
nor took away: "master refused a status report: VM neither assigned").

Before, the move service's removal went through the actuator as a step
the reconciler could see (``WorkerActuator._remove_blocking`` marked the
VM in flight, "removing"): the reconciler, woken by the mark, observed an
unassigned VM stopping, removed it a second time and reported it. And the
VM's events (its removal, its re-adoption) went to the master, which
refuses events of a VM not assigned to the worker, and with them every
other event of the same report: now they stay in the worker's log.

The worker's own runtime (``ReconcilingHandler``: reconciler, actuator,
move service), in process, unconfined, no network, over the fake
cloud-hypervisor; the target restarted while it held the VM incoming
(``VmManager.recover`` keeps it for the move), and its first assignment
names no transfer of the move: the move failed."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vmm"))

from movevms import driver, manager, root
from publisherhelpers import RecordingPublisher
from vmmhelpers import definition, vmm_pids_under

from procurator.core.models import (
    Assignment,
)
from procurator.worker.runtime import ReconcilingHandler, RuntimeOptions
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver
from procurator.worker.vmrecord import Incoming, VmSpec

__all__ = ["driver", "root"]  # fixtures

_DROPPED = "VM vm1 no longer held incoming"


async def test_a_failed_live_move_s_incoming_vm_is_removed_once_and_never_reported(
    root: Path, driver: CloudHypervisorDriver, caplog: pytest.LogCaptureFixture
) -> None:
    state = root / "target"
    first = manager(state, driver)
    held = VmSpec(
        "vm1",
        "h1",
        definition(),
        incoming=Incoming("op-m", ("127.0.0.1", 9), None, b"\x01" * 16),
    )
    try:
        assert first.ensure(held).pid is not None
    finally:
        first.close()  # the worker stops; its incoming VMM lives on
    publisher = RecordingPublisher()
    options = RuntimeOptions(driver="cloud-hypervisor", network=False, jail=None)
    caplog.set_level(logging.INFO, logger="procurator.worker")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        handler = ReconcilingHandler(
            worker_id="host-b",
            state_dir=state,
            options=options,
            publisher=publisher,
            driver=driver,
            transfer_listener=listener,
        )
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(handler.run)
                assert handler.manager.incoming_dropped == {"vm1": "op-m"}
                # The move failed: no transfer of it, and no VM here.
                await handler.on_assignment(Assignment("host-b", 1))
                with trio.fail_after(20):  # a hang guard
                    while handler.manager.get("vm1") is not None:
                        await trio.sleep(0.02)
                # The move service's removal returned; the reconciler, had it
                # seen the VM, has acted and reported by the time every task
                # waits (a removal of its own included: it waits on it).
                with trio.fail_after(20):  # a hang guard
                    while not any(_DROPPED in r.getMessage() for r in caplog.records):
                        await trio.sleep(0.02)
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
        finally:
            handler.close()
    removals = [r for r in caplog.records if r.getMessage() == "removing VM vm1"]
    assert len(removals) == 1, [r.getMessage() for r in caplog.records]
    assert "vm1" not in publisher.named
    assert [e for e in publisher.events if e.vm_id == "vm1"] == []
    assert not (state / "vms" / "vm1").exists()
    assert vmm_pids_under(state) == {}
