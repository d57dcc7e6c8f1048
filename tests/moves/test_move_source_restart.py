"""A live move's source restarted in the migration (vmrecord.MovedOut,
``procurator.worker.move_service``): the VM stays held by its mark until
an assignment says the move is over. Real fake cloud-hypervisor
processes under a real VmManager; the move service's loop runs as the
worker runs it."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vmm"))

from vmmhelpers import FAST, FAST_POLICY, definition, fake_driver, kill_all_under

from procurator.core.models import Assignment, Phase, TransferProgress
from procurator.worker.manager import VmManager
from procurator.worker.move_service import MoveTransfers
from procurator.worker.state import StateDir
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver
from procurator.worker.vmrecord import MOVED_OUT_FILE, MovedOut, VmSpec


@pytest.fixture
def root() -> Iterator[Path]:
    # Short, under /tmp: unix socket paths must stay under 108 bytes.
    made = Path(tempfile.mkdtemp(prefix="pms-", dir="/tmp"))
    try:
        yield made
    finally:
        kill_all_under(made)  # safety net for a failed test; a passing one left none
        shutil.rmtree(made, ignore_errors=True)


@pytest.fixture
def driver() -> Iterator[CloudHypervisorDriver]:
    made = fake_driver()
    yield made
    made.close()


def manager(state_dir: Path, driver: CloudHypervisorDriver) -> VmManager:
    return VmManager(
        state_dir,
        driver,
        timeouts=FAST,
        policy=FAST_POLICY,
        on_change=lambda obs, event: None,
        jail=None,
    )


async def test_a_source_restarted_in_a_migration_keeps_the_vm_held_until_an_assignment(
    root: Path, driver: CloudHypervisorDriver
) -> None:
    # The worker stopped in the migration and its VMM went (the guest may
    # run on the target now): the mark holds the VM. Its move is over only
    # when an assignment no longer names it; before the first one (the
    # master not reached yet) the move service knows nothing of it, and
    # cleared the mark at its first step: the VM started again here
    # while its move could still switch it to the target.
    state = root / "source"
    spec = VmSpec("vm1", "h1", definition())
    first = manager(state, driver)
    try:
        first.ensure(spec)
    finally:
        first.close()  # the worker stops in the migration; its VMM lives on
    kill_all_under(state)  # and dies with the migration
    # What the migration's job had written before it began.
    mark = StateDir(state).vm_dir("vm1") / MOVED_OUT_FILE
    mark.write_text(json.dumps({"op_id": "op-m", "sent": False}))
    second = manager(state, driver)
    published: list[tuple[TransferProgress, ...]] = []
    try:
        second.recover()
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            service = MoveTransfers(
                second, listener, state, on_progress=published.append, retry=0.05
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                for _ in range(3):  # a few of its steps, no assignment yet
                    service.vm_changed()
                    await trio.testing.wait_all_tasks_blocked()
                # After any job a step began on the VM (one at a time).
                await trio.to_thread.run_sync(second.run_job, "vm1", "probe", lambda ctx: None)
                held = second.get("vm1")
                assert held is not None and held.moved_out == MovedOut("op-m", False), held
                assert mark.exists() and held.phase is not Phase.RUNNING, held
                # An assignment without the move: it is over, the VM starts here.
                service.take_assignment(Assignment("host-a", 1))
                with trio.fail_after(20):  # a hang guard
                    while (now := second.get("vm1")) is None or now.phase is not Phase.RUNNING:
                        await trio.sleep(0.02)
                assert now.moved_out is None and not mark.exists()
                nursery.cancel_scope.cancel()
        second.remove("vm1")
    finally:
        second.close()
