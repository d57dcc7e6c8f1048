"""Live moves' steps and what each writes and sends (procurator.core.move,
procurator.master.move): pure, over stored assignments and statuses."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from livesim import LiveSim

from procurator.core.errors import ValidationError
from procurator.core.models import (
    Assignment,
    DiskTransfer,
    Fleet,
    PowerState,
    PreparedImage,
    PrepareState,
    TransferProgress,
    TransferState,
    VmAssignment,
    WorkerStatus,
)
from procurator.core.move import (
    TARGET_COMPLETES_LIVE,
    Move,
    MoveAction,
    MoveKind,
    MovePhase,
    MoveStep,
    advance,
    step,
    transfer_progress,
)
from procurator.master.move import plan_move, with_moves
from procurator.master.service import MasterService
from procurator.master.store import FleetStore, StatusWrite
from procurator.master.store.codec import decode_transfers, encode_transfers
from procurator.rpc import convert
from procurator.rpc.schema import load_schema

PATH = "/nix/store/" + "c" * 32 + "-c"
VM = VmAssignment("a", "h1", PATH, PowerState.RUNNING, 1, 128)
TOKEN = "ab" * 16
S = load_schema()
MOVE = dataclasses.replace(
    Move("a", "w1", "w2", MoveKind.LIVE, MovePhase.PENDING, "op-m", 0, 1_000, image=PATH),
    token=TOKEN,
)
PREPARING = advance(MOVE, MovePhase.PREPARING, now_ms=1, generation=6)
MIGRATING = advance(MOVE, MovePhase.MIGRATING, now_ms=2, generation=7)
SWITCHING = advance(MOVE, MovePhase.SWITCHING, now_ms=3, generation=8)
ON_SOURCE = {"w1": Assignment("w1", 5, (VM,)), "w2": Assignment("w2", 5)}


def reports(worker: str, generation: int, state: TransferState, **kw: object) -> WorkerStatus:
    progress = TransferProgress("a", "op-m", state, **kw)  # type: ignore[arg-type]
    image = (PreparedImage(PATH, PrepareState.READY),) if worker == "w2" else ()
    return WorkerStatus(worker, generation, (), image, (progress,))


READY = reports("w2", 6, TransferState.READY, memory="10.0.0.2:7401", disks="10.0.0.2:7402")


def decide(
    move: Move,
    *statuses: WorkerStatus,
    assignments: dict[str, Assignment] = ON_SOURCE,
    now: int = 10,
    lost: tuple[str, ...] = (),
    driver: str = "cloud-hypervisor",
) -> MoveStep:
    return step(
        move,
        assignments=assignments,
        statuses={s.worker_id: s for s in statuses},
        lost=lost,
        now_ms=now,
        target_driver=driver,
    )


def test_a_live_move_prepares_an_incoming_vmm_migrates_then_switches() -> None:
    assert decide(MOVE) == MoveStep(MoveAction.PREPARE)
    # The target's incoming VMM listens, as of the prepare's generation.
    assert decide(PREPARING) == MoveStep(MoveAction.WAIT)
    assert decide(PREPARING, dataclasses.replace(READY, observed_generation=5)).action is (
        MoveAction.WAIT
    )
    assert decide(PREPARING, reports("w2", 6, TransferState.PENDING)).action is MoveAction.WAIT
    assert decide(PREPARING, READY) == MoveStep(MoveAction.MIGRATE)
    # Migrating: the source reports its bytes, then that send_migration returned.
    sending = reports("w1", 7, TransferState.SENDING, done=30, total=120)
    assert decide(MIGRATING, READY, sending) == MoveStep(MoveAction.WAIT)
    assert transfer_progress(MIGRATING, {"w1": sending}) == "25%"
    sent = reports("w1", 7, TransferState.SENT, done=120, total=120)
    assert decide(MIGRATING, READY, sent) == MoveStep(MoveAction.SWITCH)
    # cloud-hypervisor's own switch: the target runs the VM before the
    # source's call returned (or the source's worker died in the call).
    held = reports("w2", 7, TransferState.RECEIVED)
    assert decide(MIGRATING, held) == MoveStep(MoveAction.SWITCH)
    # After the switch, as a cold move: done once the target runs it.
    on_target = {"w1": Assignment("w1", 8), "w2": Assignment("w2", 8, (VM,))}
    assert decide(SWITCHING, assignments=on_target).action is MoveAction.WAIT


def test_a_failure_before_the_switch_leaves_the_vm_running_on_its_source() -> None:
    def fails(move: Move, *statuses: WorkerStatus, **kw: object) -> str:
        answer = decide(move, *statuses, **kw)  # type: ignore[arg-type]
        assert answer.action is MoveAction.FAIL and not answer.revert
        return answer.reason

    refused = reports("w2", 6, TransferState.FAILED, message="no such tap")
    assert fails(PREPARING, refused) == "worker w2 cannot take the VM incoming: no such tap"
    broken = reports("w1", 7, TransferState.FAILED, message="Connection reset by peer")
    assert fails(MIGRATING, READY, broken) == (
        "the migration failed on w1: Connection reset by peer; the VM runs on there"
    )
    # Migrating, only a lost source fails it at once; anything else asks
    # the source to cancel first (test_move_cancel.py).
    assert fails(MIGRATING, READY, lost=("w1",)) == "the source worker w1 is lost"
    assert fails(PREPARING, lost=("w2",)) == "the target worker w2 is lost"
    assert fails(PREPARING, READY, now=1_000) == (
        "not done before the deadline (in phase preparing)"
    )
    paused = {"w1": Assignment("w1", 6, (dataclasses.replace(VM, power=PowerState.PAUSED),))}
    assert "power was changed" in fails(PREPARING, assignments=paused)
    # The fail writes a generation for both (the target stops its incoming
    # VMM, the source drops the transfer) and never touches the VM's power.
    plan = plan_move(MIGRATING, decide(MIGRATING, broken), ON_SOURCE, now_ms=20)
    assert plan is not None and plan.move.phase is MovePhase.FAILED
    assert plan.changes == {"w1": (VM,), "w2": ()}


def test_once_the_source_sent_the_state_only_the_switch_is_left() -> None:
    """The master killed between the source's report and the switch: the
    new leader reads the same stored reports and switches, whatever else
    is true by then (the deadline passed, a worker lost): the source's
    guest is stopped for good and only the target holds its state, so
    resuming the source could run it twice (cloud-hypervisor's target
    resumed by itself) or on disks that are no longer the VM's."""
    sent = reports("w1", 7, TransferState.SENT, done=1, total=1)
    for kw in ({}, {"now": 5_000}, {"lost": ("w1",)}, {"lost": ("w2",)}):
        assert decide(MIGRATING, READY, sent, **kw) == MoveStep(MoveAction.SWITCH)  # type: ignore[arg-type]
    # An apply that removed the VM meanwhile: its state is dropped with the
    # target's incoming VMM (the apply asked for no VM).
    gone = decide(MIGRATING, sent, assignments={"w1": Assignment("w1", 9)})
    assert gone.action is MoveAction.FAIL and "is dropped" in gone.reason
    # A report of an older generation says nothing of this phase.
    stale = reports("w1", 6, TransferState.SENT)
    assert decide(MIGRATING, READY, stale) == MoveStep(MoveAction.WAIT)


def test_a_qemu_targets_received_never_switches_a_move_the_source_did_not_send() -> None:
    """The switch on a target's word is cloud-hypervisor's alone (its
    target resumes the guest itself). A QEMU target's guest runs only at
    finish_incoming, so its "received" proves nothing of the source's
    guest: a switch on it while the source has not sent would run the VM
    on the target beside a source that runs on, or that a restart's undo
    starts again (docs/SNAPSHOTS.md). Only the source's "sent" counts."""
    held = reports("w2", 7, TransferState.RECEIVED)
    for driver in ("qemu", ""):  # "": the target's driver not known
        assert decide(MIGRATING, held, driver=driver) == MoveStep(MoveAction.WAIT)
        sending = reports("w1", 7, TransferState.SENDING, done=1, total=2)
        assert decide(MIGRATING, held, sending, driver=driver) == MoveStep(MoveAction.WAIT)
        # Nor past the deadline or with the source lost: the move ends
        # (or asks the source to cancel) with the VM the source's.
        for kw in ({"now": 5_000}, {"lost": ("w1",)}):
            answer = decide(MIGRATING, held, driver=driver, **kw)  # type: ignore[arg-type]
            assert answer.action is not MoveAction.SWITCH
        sent = reports("w1", 7, TransferState.SENT, done=2, total=2)
        assert decide(MIGRATING, held, sent, driver=driver) == MoveStep(MoveAction.SWITCH)
    assert "qemu" not in TARGET_COMPLETES_LIVE
    assert decide(MIGRATING, held, driver="cloud-hypervisor") == MoveStep(MoveAction.SWITCH)


def test_the_target_holds_the_vm_incoming_and_the_source_is_sent_its_addresses() -> None:
    plan = plan_move(MOVE, MoveStep(MoveAction.PREPARE), ON_SOURCE, now_ms=1, token=TOKEN)
    assert plan is not None and plan.changes == {"w2": ()} and plan.move.token == TOKEN
    preparing = dataclasses.replace(plan.move, generation=6)
    target = with_moves(Assignment("w2", 6), [preparing], ON_SOURCE, {})
    assert target.prepare == (PATH,)
    assert target.transfers == (DiskTransfer("a", "op-m", True, TOKEN, live=True, incoming=VM),)
    # The source hears nothing until it migrates.
    assert with_moves(ON_SOURCE["w1"], [preparing], ON_SOURCE, {}) is ON_SOURCE["w1"]
    plan = plan_move(preparing, MoveStep(MoveAction.MIGRATE), ON_SOURCE, now_ms=2)
    assert plan is not None and plan.changes == {"w1": (VM,)}
    assert plan.move.token == TOKEN  # the prepare's, which the target checks
    migrating = dataclasses.replace(plan.move, generation=7)
    source = with_moves(ON_SOURCE["w1"], [migrating], ON_SOURCE, {}, {"w2": READY})
    assert source.transfers == (
        DiskTransfer("a", "op-m", False, TOKEN, "10.0.0.2:7401", live=True, disks="10.0.0.2:7402"),
    )
    # The switch moves the VM, its power as stored; the target keeps its
    # transfer (it lets the incoming VMM run for this op only), without
    # the VM, now in its assignment.
    plan = plan_move(migrating, MoveStep(MoveAction.SWITCH), ON_SOURCE, now_ms=3)
    assert plan is not None and plan.changes == {"w1": (), "w2": (VM,)}
    switching = dataclasses.replace(plan.move, generation=8)
    moved = {"w1": Assignment("w1", 8), "w2": Assignment("w2", 8, (VM,))}
    target = with_moves(moved["w2"], [switching], moved, {})
    assert target.prepare == ()
    assert target.transfers == (DiskTransfer("a", "op-m", True, TOKEN, live=True),)
    assert with_moves(moved["w1"], [switching], moved, {}) is moved["w1"]


def test_the_store_keeps_where_a_targets_incoming_vmm_listens() -> None:
    # The leader after a failover reads the target's status from the store,
    # and sends the source these addresses.
    listening = (*READY.transfers, TransferProgress("b", "op-n", TransferState.SENDING, 1, 2))
    assert decode_transfers(encode_transfers(listening)) == listening
    # A release older than live moves reads the same text, addresses aside.
    data = json.loads(encode_transfers(listening))
    assert [row[0] for row in data["transfers"]] == ["a", "b"]


async def test_a_new_leader_switches_a_move_whose_source_sent_the_state(tmp_path: Path) -> None:
    """The master dies after the source's 'sent' is stored and before the
    switch: the next leader switches (test_once_the_source_sent_the_state_
    only_the_switch_is_left says why), and the VM runs on the target only."""
    vm = VmAssignment("web-1", "h-web-1", PATH, vcpus=1, memory_mib=512)
    async with await FleetStore.open(tmp_path / "m.db") as store:
        async with trio.open_nursery() as nursery:
            first = MasterService(store, push_timeout=1.0, worker_lease=60, leader_lease=1.0)
            await nursery.start(first.run)
            a, b = LiveSim(first, "host-a"), LiveSim(first, "host-b")
            await a.start(nursery)
            await b.start(nursery)
            await first.apply(Fleet((("host-a", (vm,)),)))
            # Recorded as `procurator move --live` will once the workers
            # take live moves (the master refuses it until then).
            now_ms = int(time.time() * 1000)
            move = dataclasses.replace(
                MOVE,
                vm_id="web-1",
                source="host-a",
                target="host-b",
                op_id="op-live",
                started_unix_ms=now_ms,
                deadline_unix_ms=now_ms + 60_000,
                image=PATH,
                token="",
            )
            await store.start_move(move)
            with trio.fail_after(30):  # a hang guard
                while (await store.moves("web-1"))[0].phase is not MovePhase.MIGRATING:
                    await trio.sleep(0.02)
            # The source was sent where the target's incoming VMM listens,
            # with the token the target got; the target holds it incoming.
            with trio.fail_after(10):
                while not a.sent:
                    await trio.sleep(0.01)
            (incoming,) = b.sent
            assert incoming.receive and incoming.live and incoming.incoming == vm
            assert a.sent == [
                DiskTransfer("web-1", "op-live", False, incoming.token, "127.0.0.1:7401", live=True)
            ]
            assert (await first.moves("web-1"))[0].progress == "25%"
            nursery.cancel_scope.cancel()  # the leader dies (and every session with it)
        # ... once the source's report that send_migration returned is
        # stored: its guest stopped for good, the state on the target.
        (migrating,) = await store.moves("web-1")
        source = await store.worker("host-a")
        assert source.registration is not None
        await store.write_status(
            StatusWrite(
                "host-a",
                source.registration.master_id,
                source.registration.session,
                migrating.generation,
                int(time.time() * 1000),
                whole=True,
                transfers=(TransferProgress("web-1", "op-live", TransferState.SENT, 4, 4),),
            )
        )
        async with trio.open_nursery() as nursery:
            second = MasterService(store, push_timeout=1.0, worker_lease=60, leader_lease=1.0)
            await nursery.start(second.run)
            b = LiveSim(second, "host-b")  # the source stays away
            await b.start(nursery)
            with trio.fail_after(30):  # a hang guard
                while not (done := (await store.moves("web-1"))[0]).over:
                    await trio.sleep(0.02)
            assert done.phase is MovePhase.DONE, done.reason
            assert b.running == {"web-1"}
            fleet = await second.fleet_status()
            desired = {w.worker_id: [v.id for v in w.desired_vms] for w in fleet.workers}
            assert desired == {"host-a": [], "host-b": ["web-1"]}
            # The target was sent its transfer through the switch, without
            # the VM (now in its assignment): it lets the incoming VMM run.
            assert DiskTransfer("web-1", "op-live", True, incoming.token, live=True) in b.sent
            nursery.cancel_scope.cancel()


def test_live_transfers_and_where_the_target_listens_cross_the_wire() -> None:
    incoming = DiskTransfer("a", "op-m", True, TOKEN, live=True, incoming=VM)
    send = DiskTransfer(
        "b", "op-n", False, TOKEN, "10.0.0.2:7401", live=True, disks="[fd00::2]:7402"
    )
    assignment = Assignment("w1", 5, (), "op-m", (), (incoming, send))
    assert roundtrip(
        S.Assignment, convert.fill_assignment, convert.assignment_from_reader, assignment
    ) == (assignment)
    status = WorkerStatus("w2", 6, (), (), READY.transfers)
    assert (
        roundtrip(
            S.WorkerStatus, convert.fill_worker_status, convert.worker_status_from_reader, status
        )
        == status
    )
    bad = Assignment("w1", 5, (), "", (), (dataclasses.replace(send, disks="nowhere"),))
    with pytest.raises(ValidationError, match=r"transfers\[0\].disks: must be HOST:PORT"):
        roundtrip(S.Assignment, convert.fill_assignment, convert.assignment_from_reader, bad)
    lying = WorkerStatus("w2", 6, (), (), (dataclasses.replace(READY.transfers[0], memory="x"),))
    with pytest.raises(ValidationError, match=r"transfers\[0\].memory: must be HOST:PORT"):
        roundtrip(
            S.WorkerStatus, convert.fill_worker_status, convert.worker_status_from_reader, lying
        )


def roundtrip(struct: Any, fill: Any, read: Any, value: Any) -> Any:
    builder = struct.new_message()
    fill(builder, value)
    with struct.from_bytes(builder.to_bytes()) as reader:
        return read(reader)
