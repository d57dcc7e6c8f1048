"""The rollout contract in the core's change-only messages: an assignment's
``prepare`` and a status's ``prepared`` travel whole with every update and
report, and replace the base's (procurator.core.assignments, .status)."""

from __future__ import annotations

import pytest

from procurator.core.assignments import (
    AssignmentChanges,
    apply_assignment_changes,
    assignment_changes,
    compose,
)
from procurator.core.errors import ValidationError
from procurator.core.models import (
    Assignment,
    Health,
    HealthCheck,
    HealthKind,
    Phase,
    PreparedImage,
    PrepareState,
    VmAssignment,
    VmStatus,
    WorkerStatus,
)
from procurator.core.status import StatusOutbox, apply_status_changes, status_changes

OLD = "/nix/store/" + "a" * 32 + "-web"
NEW = "/nix/store/" + "b" * 32 + "-web"
TCP = HealthCheck(HealthKind.TCP, port=22, min_healthy_ms=1000)


def assignment(generation: int, *vms: VmAssignment, prepare: tuple[str, ...] = ()) -> Assignment:
    return Assignment("host-a", generation, vms, f"op-{generation}", prepare)


def test_prepare_travels_whole_in_assignment_changes() -> None:
    web = VmAssignment("web", "a", OLD)
    base = assignment(1, web)
    preparing = assignment(2, web, prepare=(NEW,))
    changes = assignment_changes(base, preparing)
    assert changes.size == 0 and changes.prepare == (NEW,)
    assert apply_assignment_changes(base, changes) == preparing
    # Switched: the VM changes, the list empties (and the empty list clears).
    switched = assignment(3, VmAssignment("web", "b", NEW))
    then = assignment_changes(preparing, switched)
    assert apply_assignment_changes(preparing, then) == switched
    assert compose(changes, then) == assignment_changes(base, switched)
    assert compose(base, changes) == preparing


def test_a_check_that_changes_is_an_upsert_of_the_same_vm() -> None:
    base = assignment(1, VmAssignment("web", "a", OLD))
    checked = assignment(2, VmAssignment("web", "a", OLD, health=TCP))
    changes = assignment_changes(base, checked)
    assert [vm.health for vm in changes.upserted] == [TCP]
    assert apply_assignment_changes(base, changes) == checked


def test_a_path_to_prepare_twice_is_refused() -> None:
    with pytest.raises(ValidationError, match="prepare twice"):
        AssignmentChanges("host-a", 1, 2, prepare=(NEW, NEW)).check()


def test_prepared_travels_whole_in_status_changes() -> None:
    vms = (VmStatus("web", Phase.RUNNING, health=Health.PENDING),)
    base = WorkerStatus("host-a", 1, vms)
    pending = WorkerStatus("host-a", 1, vms, (PreparedImage(NEW),))
    changes = status_changes(base, pending)
    assert changes.size == 0 and changes.prepared == pending.prepared
    assert apply_status_changes(base, changes) == pending
    healthy = WorkerStatus("host-a", 1, (VmStatus("web", Phase.RUNNING, health=Health.HEALTHY),))
    assert apply_status_changes(pending, status_changes(pending, healthy)) == healthy


def test_the_outbox_reports_prepared_progress_and_sends_it_again_when_lost() -> None:
    outbox = StatusOutbox("host-a")
    ready = (PreparedImage(NEW, PrepareState.READY),)
    # Progress alone makes no report before the VMs' status is published.
    outbox.publish_prepared((PreparedImage(NEW),))
    assert outbox.take() is None
    outbox.publish(WorkerStatus("host-a", 1, (VmStatus("web", Phase.RUNNING),)))
    first = outbox.take()
    assert isinstance(first, WorkerStatus) and first.prepared == (PreparedImage(NEW),)
    outbox.delivered()
    assert outbox.take() is None
    outbox.publish_prepared(ready)
    report = outbox.take()
    assert report is not None and not isinstance(report, WorkerStatus)
    assert report.size == 0 and report.prepared == ready
    outbox.undelivered()
    again = outbox.take()
    assert again is not None and not isinstance(again, WorkerStatus)
    assert again.prepared == ready
    outbox.delivered()
    assert outbox.take() is None
    # A VM's change carries the progress too (the wire's list replaces the base's).
    outbox.publish(WorkerStatus("host-a", 1, (VmStatus("web", Phase.STOPPING),)))
    report = outbox.take()
    assert report is not None and report.prepared == ready
