"""A live move's target whose hold of the VM incoming failed, and the
removal that should have undone it failed too (``WorkerActuator.
hold_incoming`` removes what a failed hold took; that removal can fail or
time out): the VM, hidden from the reconciler as incoming, kept its VMM,
cgroup and GC root for as long as the worker ran, since the move service
forgot it held it. It is removed as a failed move's once no transfer of
its op is assigned. Real fake cloud-hypervisor processes under a real
VmManager; the move service's loop runs as the worker runs it, over a
hand-written IncomingVms."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vmm"))

from movevms import driver, manager, root
from vmmhelpers import definition, vmm_pids_under

from procurator.core.errors import TemporaryError
from procurator.core.models import (
    Assignment,
    DiskTransfer,
    TransferProgress,
    TransferState,
    VmAssignment,
)
from procurator.worker.manager import VmManager
from procurator.worker.move_service import MoveTransfers
from procurator.worker.state import StateDir
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver
from procurator.worker.vmrecord import Incoming, VmSpec

IMAGE = "/nix/store/" + "t" * 32 + "-vm"
TOKEN = "cd" * 16

__all__ = ["driver", "root"]  # fixtures


class Incomings:
    """The worker's IncomingVms (``WorkerActuator``) over a VmManager: the
    hold launches the incoming VMM, then fails as if the ensure had failed
    and so had the removal undoing it; a later removal is the manager's."""

    def __init__(self, here: VmManager) -> None:
        self.here = here
        self.removed: list[tuple[str, str]] = []

    async def hold_incoming(self, vm: VmAssignment, op_id: str, incoming: Incoming) -> None:
        spec = VmSpec(vm.id, vm.hash, definition(), op_id=op_id, incoming=incoming)
        await trio.to_thread.run_sync(self.here.ensure, spec)
        raise TemporaryError(f"VM {vm.id}: remove not done (the failed hold's removal)")

    async def drop_incoming(self, vm_id: str, op_id: str) -> None:
        self.removed.append((vm_id, op_id))
        await trio.to_thread.run_sync(lambda: self.here.remove(vm_id, op_id=op_id))


@contextlib.asynccontextmanager
async def move_service(
    here: VmManager,
    state: Path,
    incomings: Incomings,
    published: list[tuple[TransferProgress, ...]],
) -> AsyncIterator[MoveTransfers]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        service = MoveTransfers(
            here, listener, state, on_progress=published.append, retry=0.05, incoming=incomings
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            yield service
            nursery.cancel_scope.cancel()


async def test_a_failed_hold_whose_removal_failed_is_removed_once_the_move_failed(
    root: Path, driver: CloudHypervisorDriver
) -> None:
    state = root / "target"
    here = manager(state, driver)
    incomings = Incomings(here)
    published: list[tuple[TransferProgress, ...]] = []
    vm = VmAssignment("vm1", "h1", IMAGE)
    receiving = DiskTransfer("vm1", "op-m", True, TOKEN, "127.0.0.1:9", live=True, incoming=vm)
    try:
        async with move_service(here, state, incomings, published) as service:
            service.take_assignment(Assignment("host-b", 1, transfers=(receiving,)))
            # The hold failed (reported failed; its VM, still held, may be
            # reported ready next: the move decides).
            with trio.fail_after(20):  # a hang guard
                while not any(t.state is not TransferState.PENDING for p in published for t in p):
                    await trio.sleep(0.02)
            held = here.get("vm1")
            assert held is not None and held.incoming == "op-m" and held.pid is not None
            # The move failed: no transfer of it, no VM (its VMM stopped).
            service.take_assignment(Assignment("host-b", 2))
            with trio.fail_after(20):  # a hang guard
                while here.get("vm1") is not None:
                    await trio.sleep(0.02)
        assert incomings.removed == [("vm1", "op-m")]
        assert not StateDir(state).vm_dir("vm1").exists()
        assert vmm_pids_under(state) == {}
    finally:
        here.close()
