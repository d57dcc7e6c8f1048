"""The rollout contract on the wire: health checks sent with a worker's VMs,
health reported per VM, images to prepare and their progress, in whole
messages and change-only ones; what is refused, naming the field."""

from __future__ import annotations

import pytest
from test_convert import roundtrip

from procurator.core.assignments import AssignmentChanges
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
from procurator.core.status import StatusChanges
from procurator.rpc import convert
from procurator.rpc.schema import load_schema

S = load_schema()
OLD = "/nix/store/" + "a" * 32 + "-web"
NEW = "/nix/store/" + "b" * 32 + "-web"
HTTP = HealthCheck(HealthKind.HTTP, 8080, "/sant\u00e9?full=1", 204, 30_000, 500)
TCP = HealthCheck(HealthKind.TCP, 22, min_healthy_ms=0)


def test_assignment_with_checks_and_images_to_prepare_round_trips() -> None:
    assignment = Assignment(
        "host-a",
        4,
        (
            VmAssignment("web-1", "a", OLD, health=HTTP),
            VmAssignment("web-2", "a", OLD, health=TCP, reschedule=True),
            VmAssignment("web-3", "a", OLD, health=HealthCheck()),
            VmAssignment("db", "a", OLD),
        ),
        "op-4",
        (NEW,),
    )
    got = roundtrip(
        S.Assignment, convert.fill_assignment, convert.assignment_from_reader, assignment
    )
    assert got == assignment
    changes = AssignmentChanges("host-a", 4, 5, "op-5", assignment.vms[:2], ("db",), (NEW, OLD))
    got_changes = roundtrip(
        S.AssignmentChanges,
        convert.fill_assignment_changes,
        convert.assignment_changes_from_reader,
        changes,
    )
    assert got_changes == changes


def test_status_with_health_and_prepared_round_trips() -> None:
    status = WorkerStatus(
        "host-a",
        4,
        (
            VmStatus("web-1", Phase.RUNNING, "a", health=Health.HEALTHY),
            VmStatus(
                "web-2", Phase.RUNNING, "a", "tcp 10.0.0.3:22: refused", health=Health.UNHEALTHY
            ),
            VmStatus("db", Phase.RUNNING, "a"),
        ),
        (
            PreparedImage(NEW, PrepareState.READY),
            PreparedImage(OLD, PrepareState.FAILED, "cannot be realised: no substituter has it"),
        ),
    )
    got = roundtrip(
        S.WorkerStatus, convert.fill_worker_status, convert.worker_status_from_reader, status
    )
    assert got == status
    changes = StatusChanges("host-a", 5, status.vms[:1], ("db",), status.prepared)
    got_changes = roundtrip(
        S.WorkerStatusChanges,
        convert.fill_status_changes,
        convert.status_changes_from_reader,
        changes,
    )
    assert got_changes == changes


def test_an_http_check_without_a_status_expects_200_and_an_unknown_kind_reads_as_none() -> None:
    builder = S.Assignment.new_message(workerId="host-a", generation=1)
    entries = builder.init("vms", 2)
    for entry, vm_id in zip(entries, ("web-1", "web-2"), strict=True):
        entry.id, entry.hash, entry.nixStorePath = vm_id, "a", OLD
    entries[0].health.kind = "http"
    entries[0].health.port = 80
    entries[0].health.path = "/"
    entries[1].health.port = 80
    with S.Assignment.from_bytes(builder.to_bytes()) as reader:
        assignment = convert.assignment_from_reader(reader)
    assert assignment.vms[0].health == HealthCheck(HealthKind.HTTP, 80, "/", 200, 0, 0)
    assert assignment.vms[1].health is not None
    assert assignment.vms[1].health.kind is HealthKind.NONE


@pytest.mark.parametrize(
    ("kind", "port", "path", "expect", "problem"),
    [
        ("tcp", 0, "", 0, "vms[0].health.port: a tcp check needs a port"),
        ("http", 0, "/", 200, "vms[0].health.port: a http check needs a port"),
        ("http", 80, "healthz", 200, "vms[0].health.path: 'healthz' is not an HTTP path"),
        ("http", 80, "/a b", 200, "vms[0].health.path: '/a b' is not an HTTP path"),
        ("http", 80, "/a\r\nHost: x", 200, "is not an HTTP path"),
        ("http", 80, "/", 999, "vms[0].health.expect: 999 is not an HTTP status"),
    ],
)
def test_a_bad_check_is_refused_naming_its_field(
    kind: str, port: int, path: str, expect: int, problem: str
) -> None:
    builder = S.Assignment.new_message(workerId="host-a", generation=1)
    entry = builder.init("vms", 1)[0]
    entry.id, entry.hash, entry.nixStorePath = "web-1", "a", OLD
    health = entry.health
    health.kind, health.port, health.path, health.expect = kind, port, path, expect
    with (
        pytest.raises(ValidationError) as info,
        S.Assignment.from_bytes(builder.to_bytes()) as reader,
    ):
        convert.assignment_from_reader(reader)
    assert problem in "\n".join(info.value.details)


def test_bad_paths_to_prepare_and_prepared_are_refused_naming_their_field() -> None:
    builder = S.AssignmentChanges.new_message(workerId="host-a", baseGeneration=1, generation=2)
    paths = builder.init("prepare", 3)
    paths[0], paths[1], paths[2] = NEW, "/etc/passwd", NEW
    with (
        pytest.raises(ValidationError) as info,
        S.AssignmentChanges.from_bytes(builder.to_bytes()) as reader,
    ):
        convert.assignment_changes_from_reader(reader)
    details = "\n".join(info.value.details)
    assert "changes.prepare[1]: '/etc/passwd' is not a Nix store path" in details
    assert f"changes.prepare[2]: {NEW} is named twice" in details

    status = S.WorkerStatus.new_message(workerId="host-a")
    status.init("prepared", 1)[0].path = "/tmp/x"
    with (
        pytest.raises(ValidationError) as info,
        S.WorkerStatus.from_bytes(status.to_bytes()) as reader,
    ):
        convert.worker_status_from_reader(reader)
    assert "status.prepared[0].path" in info.value.details[0]


def test_rollout_settings_named_twice_are_refused_naming_their_field() -> None:
    # Two settings for one name cannot be told apart (``Fleet.rollout_for``
    # takes one); the reader refused them with a TypeError, from sorting
    # them by their (unorderable) settings when the names tie.
    builder = S.Fleet.new_message()
    for field in ("groupRollouts", "vmRollouts"):
        items = builder.init(field, 3)
        for index, item in enumerate(items):
            item.name = "web" if index < 2 else "db"
            item.settings.maxParallel = index + 1
    with pytest.raises(ValidationError) as info, S.Fleet.from_bytes(builder.to_bytes()) as reader:
        convert.fleet_from_reader(reader)
    details = "\n".join(info.value.details)
    assert "fleet.groupRollouts[1].name: 'web' is named twice" in details
    assert "fleet.vmRollouts[1].name: 'web' is named twice" in details
