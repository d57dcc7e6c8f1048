"""A live move's target restarted while it held the VM incoming
(``VmManager.recover`` keeps its disk copies; ``procurator.worker.
move_service``): its side of the move is reported failed, and the kept VM
is removed once no transfer of its move is assigned. Real fake
cloud-hypervisor processes under a real VmManager; the move service's
loop runs as the worker runs it, over a hand-written IncomingVms."""

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
    """The worker's IncomingVms (``WorkerActuator``) over a VmManager: a
    removal is the manager's; nothing is held anew in these tests."""

    def __init__(self, here: VmManager) -> None:
        self.here = here
        self.removed: list[tuple[str, str]] = []

    async def hold_incoming(self, vm: VmAssignment, op_id: str, incoming: Incoming) -> None:
        raise AssertionError(f"held anew: {vm.id} for {op_id}")

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


async def test_a_restarted_target_removes_its_kept_incoming_vm_once_the_move_failed(
    root: Path, driver: CloudHypervisorDriver
) -> None:
    # recover kept the VM (its disk copies may be the guest's only ones);
    # after the restart the move service had no memory of holding it, so
    # a move that failed left it (hidden from the reconciler) for good.
    state = root / "target"
    first = manager(state, driver)
    held = VmSpec(
        "vm1",
        "h1",
        definition(),
        incoming=Incoming("op-m", ("127.0.0.1", 9), None, bytes.fromhex(TOKEN)),
    )
    try:
        assert first.ensure(held).pid is not None
    finally:
        first.close()  # the worker stops; its incoming VMM lives on
    here = manager(state, driver)
    incomings = Incomings(here)
    published: list[tuple[TransferProgress, ...]] = []
    vm = VmAssignment("vm1", "h1", IMAGE)
    receiving = DiskTransfer("vm1", "op-m", True, TOKEN, "127.0.0.1:9", live=True, incoming=vm)
    try:
        here.recover()
        async with move_service(here, state, incomings, published) as service:
            # The move not over: the target's side failed, the VM kept.
            service.take_assignment(Assignment("host-b", 1, transfers=(receiving,)))
            with trio.fail_after(20):  # a hang guard
                while not any(t.state is TransferState.FAILED for p in published for t in p):
                    await trio.sleep(0.02)
            assert StateDir(state).exists("vm1") and incomings.removed == []
            # The move failed: no transfer of it, no VM.
            service.take_assignment(Assignment("host-b", 2))
            with trio.fail_after(20):  # a hang guard
                while here.get("vm1") is not None:
                    await trio.sleep(0.02)
        assert incomings.removed == [("vm1", "op-m")]
        assert not StateDir(state).vm_dir("vm1").exists()
        assert vmm_pids_under(state) == {}
    finally:
        here.close()
