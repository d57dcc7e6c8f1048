"""A move's disk transfers on the wire and in the store (issue 30): the
assignment's ``transfers`` and the status's ``transfers`` travel whole in
whole and change-only messages, the worker's transfer address with its
registration; malformed ones are refused naming the field; the store keeps
a worker's transfers with its status (so any master's leader sees them)."""

from __future__ import annotations

from typing import Any

import pytest

from procurator.core.assignments import apply_assignment_changes, assignment_changes
from procurator.core.errors import ValidationError
from procurator.core.models import (
    Assignment,
    DiskTransfer,
    TransferProgress,
    TransferState,
    WorkerInfo,
    WorkerStatus,
)
from procurator.core.status import StatusOutbox, apply_status_changes, status_changes
from procurator.master.store import Store
from procurator.master.store.model import StatusWrite
from procurator.rpc import convert
from procurator.rpc.schema import load_schema

S = load_schema()
TOKEN = "0123456789abcdef" * 2
SEND = DiskTransfer("web-1", "op-m1", False, TOKEN, "10.0.0.2:7400")
RECEIVE = DiskTransfer("web-2", "op-m2", True, TOKEN)
SENDING = TransferProgress("web-1", "op-m1", TransferState.SENDING, 5, 10)
FAILED = TransferProgress("web-2", "op-m2", TransferState.FAILED, message="sha256 differs")


def roundtrip(struct: Any, fill: Any, read: Any, value: Any) -> Any:
    builder = struct.new_message()
    fill(builder, value)
    with struct.from_bytes(builder.to_bytes()) as reader:
        return read(reader)


def test_transfers_travel_whole_in_assignments_and_their_changes() -> None:
    base = Assignment("host-a", 4, (), "op-a")
    new = Assignment("host-a", 5, (), "op-m1", (), (SEND, RECEIVE))
    assert (
        roundtrip(S.Assignment, convert.fill_assignment, convert.assignment_from_reader, new) == new
    )
    changes = assignment_changes(base, new)
    assert changes.transfers == (SEND, RECEIVE)
    back = roundtrip(
        S.AssignmentChanges,
        convert.fill_assignment_changes,
        convert.assignment_changes_from_reader,
        changes,
    )
    assert back == changes and apply_assignment_changes(base, back) == new
    # An empty list clears them.
    assert apply_assignment_changes(new, assignment_changes(new, base_at(base, 6))).transfers == ()


def base_at(assignment: Assignment, generation: int) -> Assignment:
    return Assignment(assignment.worker_id, generation, assignment.vms, assignment.op_id)


def test_transfers_and_the_address_travel_in_statuses_and_registrations() -> None:
    status = WorkerStatus("host-a", 5, (), (), (SENDING, FAILED))
    assert (
        roundtrip(
            S.WorkerStatus, convert.fill_worker_status, convert.worker_status_from_reader, status
        )
        == status
    )
    changes = status_changes(WorkerStatus("host-a", 4), status)
    back = roundtrip(
        S.WorkerStatusChanges,
        convert.fill_status_changes,
        convert.status_changes_from_reader,
        changes,
    )
    assert apply_status_changes(WorkerStatus("host-a", 4), back) == status
    info = WorkerInfo("host-a", driver="qemu", transfer_address="[fd00::2]:7400", live_moves=True)
    assert (
        roundtrip(S.WorkerInfo, convert.fill_worker_info, convert.worker_info_from_reader, info)
        == info
    )
    outbox = StatusOutbox("host-a")
    outbox.publish(WorkerStatus("host-a", 5))
    assert outbox.take() is not None
    outbox.delivered()
    assert not outbox.has_news
    outbox.publish_transfers((SENDING,))
    report = outbox.take()
    assert report is not None and report.transfers == (SENDING,)


def test_malformed_transfers_are_refused_naming_the_field() -> None:
    bad = Assignment(
        "host-a",
        5,
        (),
        "",
        (),
        (
            DiskTransfer("web-1", "op", False, "short", "10.0.0.2:7400"),
            DiskTransfer("web-1", "op", False, TOKEN, "no port"),
        ),
    )
    with pytest.raises(ValidationError) as caught:
        roundtrip(S.Assignment, convert.fill_assignment, convert.assignment_from_reader, bad)
    details = "\n".join(caught.value.details)
    assert "transfers[0].token: must be 32 hex digits" in details
    assert "transfers[1].vmId: VM web-1 is named twice" in details
    assert "transfers[1].peer: must be HOST:PORT" in details
    with pytest.raises(ValidationError, match="transferAddress"):
        roundtrip(
            S.WorkerInfo,
            convert.fill_worker_info,
            convert.worker_info_from_reader,
            WorkerInfo("host-a", transfer_address="nowhere"),
        )


async def test_the_store_keeps_transfers_with_the_status_and_the_address(store: Store) -> None:
    info = WorkerInfo("host-a", driver="qemu", transfer_address="127.0.0.1:7400", live_moves=True)
    registered = await store.register("host-a", "m1", info, unix_ms=1, lease_ms=60_000)
    assert registered.registration is not None
    session = registered.registration.session
    await store.write_status(
        StatusWrite("host-a", "m1", session, 3, 2, whole=True, transfers=(SENDING, FAILED))
    )
    worker = await store.worker("host-a")
    assert worker.status is not None and worker.status.transfers == (SENDING, FAILED)
    assert worker.registration is not None
    assert worker.registration.info == info
    await store.write_status(StatusWrite("host-a", "m1", session, 4, 3))
    worker = await store.worker("host-a")
    assert worker.status is not None and worker.status.transfers == ()
