"""A live move's source restarted in the migration (vmrecord.MovedOut,
``procurator.worker.move_service``): the VM stays held by its mark until
an assignment says the move is over. Real fake cloud-hypervisor
processes under a real VmManager; the move service's loop runs as the
worker runs it."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vmm"))

from movevms import driver, manager, root
from vmmhelpers import definition, kill_all_under

from procurator.core.models import (
    Assignment,
    DiskTransfer,
    Phase,
    TransferProgress,
    TransferState,
    VmAssignment,
)
from procurator.worker.manager import VmManager
from procurator.worker.move_service import MoveTransfers
from procurator.worker.state import StateDir
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver
from procurator.worker.vmrecord import MOVED_OUT_FILE, MovedOut, VmSpec

__all__ = ["driver", "root"]  # fixtures


IMAGE = "/nix/store/" + "s" * 32 + "-vm"


def restarted_in_migration(
    state: Path, driver: CloudHypervisorDriver, mark_text: str = ""
) -> tuple[VmManager, Path]:
    """A worker that stopped in a live migration of vm1 and whose VMM
    went with it (the guest may run on the target now), restarted: its
    manager, recovered, and the VM's mark (``mark_text``: what the mark
    holds instead of the job's "migrating")."""
    first = manager(state, driver)
    try:
        first.ensure(VmSpec("vm1", "h1", definition()))
    finally:
        first.close()  # the worker stops in the migration; its VMM lives on
    kill_all_under(state)  # and dies with the migration
    # What the migration's job had written before it began.
    mark = StateDir(state).vm_dir("vm1") / MOVED_OUT_FILE
    mark.write_text(mark_text or json.dumps({"op_id": "op-m", "sent": False}))
    second = manager(state, driver)
    second.recover()
    return second, mark


@contextlib.asynccontextmanager
async def move_service(
    here: VmManager, state: Path, published: list[tuple[TransferProgress, ...]] | None = None
) -> AsyncIterator[MoveTransfers]:
    """The worker's move service over ``here``, its loop running (what it
    reports, into ``published``)."""
    published = [] if published is None else published
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        service = MoveTransfers(here, listener, state, on_progress=published.append, retry=0.05)
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            yield service
            nursery.cancel_scope.cancel()


async def steps(service: MoveTransfers, here: VmManager) -> None:
    """A few steps of ``service``'s loop, then after any job they began
    on vm1 (one at a time)."""
    for _ in range(3):
        service.vm_changed()
        await trio.testing.wait_all_tasks_blocked()
    await trio.to_thread.run_sync(here.run_job, "vm1", "probe", lambda ctx: None)


async def test_a_source_restarted_in_a_migration_keeps_the_vm_held_until_an_assignment(
    root: Path, driver: CloudHypervisorDriver
) -> None:
    # Its move is over only when an assignment no longer names it; before
    # the first one (the master not reached yet) the move service knows
    # nothing of it, and cleared the mark at its first step: the VM
    # started again here while its move could still switch it away.
    state = root / "source"
    here, mark = restarted_in_migration(state, driver)
    try:
        async with move_service(here, state) as service:
            await steps(service, here)  # no assignment yet
            held = here.get("vm1")
            assert held is not None and held.moved_out == MovedOut("op-m", False), held
            assert mark.exists() and held.phase is not Phase.RUNNING, held
            # An assignment with the VM, without the move: it failed, the
            # VM starts here again.
            service.take_assignment(Assignment("host-a", 1, (VmAssignment("vm1", "h1", IMAGE),)))
            with trio.fail_after(20):  # a hang guard
                while (now := here.get("vm1")) is None or now.phase is not Phase.RUNNING:
                    await trio.sleep(0.02)
            assert now.moved_out is None and not mark.exists()
        here.remove("vm1")
    finally:
        here.close()


async def test_a_source_restarted_in_a_migration_never_starts_a_vm_the_switch_took(
    root: Path, driver: CloudHypervisorDriver
) -> None:
    # cloud-hypervisor's target resumes the guest itself once the state
    # arrived, and its 'received' switches the move: the source's
    # assignment then names neither the VM nor the move. The mark was
    # cleared as for a failed move, and the VM started here beside the
    # target's until the reconciler removed it.
    state = root / "source"
    here, mark = restarted_in_migration(state, driver)
    try:
        async with move_service(here, state) as service:
            service.take_assignment(Assignment("host-a", 2))  # the switch's
            await steps(service, here)
            held = here.get("vm1")
            assert held is not None and held.moved_out == MovedOut("op-m", False), held
            assert mark.exists() and held.pid is None, held
        here.remove("vm1")  # the reconciler's, for the VM not assigned
        assert not mark.exists()
    finally:
        here.close()


async def test_an_unreadable_mark_holds_the_vm_and_says_what_to_do(
    root: Path, driver: CloudHypervisorDriver
) -> None:
    # The mark half-written by a failing disk: whether the state was sent
    # is unknown, so the VM is held (never started here: it may run on the
    # target). It showed 'moved live to its target (move ?)', and the move
    # service migrated it again ('does not run here: nothing to migrate',
    # the move failing as if the VM ran on here).
    state = root / "source"
    here, mark = restarted_in_migration(state, driver, mark_text='{"op_id": "op-m", "se')
    published: list[tuple[TransferProgress, ...]] = []
    vm = VmAssignment("vm1", "h1", IMAGE)
    migrating = DiskTransfer("vm1", "op-m", False, "ab" * 16, "127.0.0.1:9", live=True)
    try:
        async with move_service(here, state, published) as service:
            service.take_assignment(Assignment("host-a", 1, (vm,), transfers=(migrating,)))
            with trio.fail_after(20):  # a hang guard
                while not any(t.state is not TransferState.PENDING for p in published for t in p):
                    await trio.sleep(0.02)
            (reported,) = [t for p in published for t in p if t.state is not TransferState.PENDING]
            assert reported.state is TransferState.FAILED, reported
            assert MOVED_OUT_FILE in reported.message and "held" in reported.message, reported
            # The move failed, as far as this assignment tells: still held
            # (the assignment may be a lagging master's).
            service.take_assignment(Assignment("host-a", 2, (vm,)))
            await steps(service, here)
            held = here.get("vm1")
            assert held is not None and held.pid is None and held.phase is Phase.STOPPED, held
            assert f"{mark} is unreadable" in held.message and "remove" in held.message, held
            assert "move ?" not in held.message and mark.exists(), held
        here.remove("vm1")
    finally:
        here.close()
