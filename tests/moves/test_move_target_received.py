"""A cloud-hypervisor live move's target reports ``received`` once its
incoming VMM holds the whole state (issue 30): the master switches such a
move on it (``core.move.TARGET_COMPLETES_LIVE``, bbc557a), so a source
whose worker died after the migration completed (before it could report
``sent``) no longer fails the move and stops the guest the target's
cloud-hypervisor already resumed. Before, the target said ``ready`` to the
end. Real fake cloud-hypervisor processes under a real VmManager and the
worker's move service, the state over a real TCP socket from a source VMM
that no worker reports for (its worker gone). And the master's side: the
target's report is of its preparing generation (the migrate step moves
only the source's), which the leader ignored, so the 'received' never
switched a move outside a pure test that gave the target the move's
generation."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vmm"))

from movevms import driver, root
from vmmhelpers import FAST, FAST_POLICY, definition

from procurator.core.models import (
    Assignment,
    DiskTransfer,
    EventKind,
    Phase,
    PowerState,
    TransferProgress,
    TransferState,
    VmAssignment,
    VmEvent,
    WorkerStatus,
)
from procurator.core.move import Move, MoveAction, MoveKind, MovePhase, MoveStep, advance, step
from procurator.worker.manager import VmManager, VmObservation
from procurator.worker.move_service import MoveTransfers
from procurator.worker.state import StateDir
from procurator.worker.vmm import process
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver
from procurator.worker.vmrecord import Incoming, VmSpec

TOKEN = bytes(range(0x40, 0x50))
IMAGE = "/nix/store/" + "r" * 32 + "-vm"

__all__ = ["driver", "root"]  # fixtures


class Incomings:
    """The worker's IncomingVms (``WorkerActuator``) over a VmManager."""

    def __init__(self, here: VmManager) -> None:
        self.here = here

    async def hold_incoming(self, vm: VmAssignment, op_id: str, incoming: Incoming) -> None:
        spec = VmSpec(vm.id, vm.hash, definition(), op_id=op_id, incoming=incoming)
        await trio.to_thread.run_sync(self.here.ensure, spec)

    async def drop_incoming(self, vm_id: str, op_id: str) -> None:
        await trio.to_thread.run_sync(lambda: self.here.remove(vm_id, op_id=op_id))


def _last(published: list[tuple[TransferProgress, ...]]) -> TransferProgress | None:
    return next((t for t in published[-1] if t.op_id == "op-m"), None) if published else None


async def test_a_cloud_hypervisor_target_reports_received_once_the_state_arrived(
    root: Path, driver: CloudHypervisorDriver
) -> None:
    events: list[VmEvent] = []

    def on_change(obs: VmObservation, event: VmEvent | None) -> None:
        if event is not None:
            events.append(event)

    state = root / "target"
    here = VmManager(
        state, driver, timeouts=FAST, policy=FAST_POLICY, on_change=on_change, jail=None
    )
    source_paths = StateDir(root / "source").paths("vm1")
    source_paths.vmm_dir.mkdir(parents=True)
    source = driver.launch(definition(), source_paths, timeout=20.0)
    vm = VmAssignment("vm1", "h1", IMAGE)
    receiving = DiskTransfer(
        "vm1", "op-m", True, TOKEN.hex(), "127.0.0.1:9", live=True, incoming=vm
    )
    published: list[tuple[TransferProgress, ...]] = []
    try:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            service = MoveTransfers(
                here,
                listener,
                state,
                on_progress=published.append,
                retry=0.05,
                incoming=Incomings(here),
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                service.take_assignment(Assignment("host-b", 1, (), transfers=(receiving,)))
                with trio.fail_after(20):  # a hang guard: the incoming VMM listens
                    while (now := _last(published)) is None or now.state is not TransferState.READY:
                        await trio.sleep(0.02)
                held = here.get("vm1")
                assert held is not None and held.incoming == "op-m" and held.pid is not None
                host, port = now.memory.rsplit(":", 1)
                # The source's last pass (its guest paused) and the stream:
                # its worker is gone, nobody reports 'sent' for it.
                driver.pause(source, timeout=5.0)
                await trio.to_thread.run_sync(
                    lambda: driver.send_migration(
                        source, memory=(host, int(port)), disks=None, token=TOKEN, timeout=20.0
                    )
                )
                with trio.fail_after(20):  # a hang guard: before, 'ready' to the end
                    while (now := _last(published)) is None or now.state is TransferState.READY:
                        await trio.sleep(0.02)
                assert now.state is TransferState.RECEIVED, now
                # The master's switch: the same VM, held no longer; it runs
                # in the incoming VMM (not booted again).
                switch = Assignment("host-b", 2, (vm,), transfers=(receiving,))
                service.take_assignment(switch)
                spec = VmSpec("vm1", "h1", definition(), op_id="op-m")
                switched = await trio.to_thread.run_sync(here.ensure, spec)
                nursery.cancel_scope.cancel()
        assert (switched.phase, switched.pid, switched.incoming) == (
            Phase.RUNNING,
            held.pid,
            "",
        ), switched
        booted = [e.message.split(":")[0] for e in events if e.kind is EventKind.BOOTED]
        assert booted == ["moved in live (move op-m)"], events
        here.remove("vm1")
    finally:
        here.close()
        if process.is_alive(source.pid, source.pid_start_ticks):
            driver.shutdown_vmm(source, timeout=5.0)
            process.terminate(source.pid, source.pid_start_ticks, grace=2.0)


def test_the_leader_takes_the_targets_word_of_the_preparing_generation() -> None:
    path = "/nix/store/" + "c" * 32 + "-c"
    vm = VmAssignment("a", "h1", path, PowerState.RUNNING, 1, 128)
    move = Move("a", "w1", "w2", MoveKind.LIVE, MovePhase.PENDING, "op-m", 0, 1_000, image=path)
    migrating = advance(move, MovePhase.MIGRATING, now_ms=2, generation=7)
    assignments = {"w1": Assignment("w1", 7, (vm,)), "w2": Assignment("w2", 6)}

    def decide(state: TransferState, *, lost: tuple[str, ...] = ()) -> MoveStep:
        # The target's status: of generation 6, its last (the prepare's).
        target = WorkerStatus("w2", 6, (), (), (TransferProgress("a", "op-m", state),))
        return step(
            migrating,
            assignments=assignments,
            statuses={"w1": None, "w2": target},
            lost=lost,
            now_ms=10,
            target_driver="cloud-hypervisor",
        )

    assert decide(TransferState.RECEIVED) == MoveStep(MoveAction.SWITCH)
    assert decide(TransferState.RECEIVED, lost=("w1",)) == MoveStep(MoveAction.SWITCH)
    assert decide(TransferState.READY) == MoveStep(MoveAction.WAIT)
    cancel = decide(TransferState.FAILED)
    assert cancel.action is MoveAction.CANCEL and "w2 lost the incoming VM" in cancel.reason
