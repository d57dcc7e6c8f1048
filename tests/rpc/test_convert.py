"""capnp <-> models: round trips, validation of what comes off the wire."""

from __future__ import annotations

from typing import Any

import capnp
import pytest

from procurator.core.control import (
    ApplyRequest,
    ApplyResult,
    FleetStatus,
    VmDescription,
    WorkerConnection,
    WorkerEvent,
)
from procurator.core.errors import (
    LimitExceededError,
    StaleGenerationError,
    ValidationError,
)
from procurator.core.metrics import MetricSample, MetricsReport
from procurator.core.models import (
    Assignment,
    Capacity,
    EventKind,
    Fleet,
    Phase,
    PowerChange,
    PowerState,
    VmAssignment,
    VmEvent,
    VmStatus,
    WorkerDiff,
    WorkerInfo,
    WorkerStatus,
)
from procurator.core.validation import LIMITS, check_request_id
from procurator.rpc import convert
from procurator.rpc.schema import load_schema

S = load_schema()
PATH = "/nix/store/" + "a" * 32 + "-web"


def roundtrip(struct: Any, fill: Any, read: Any, *args: Any) -> Any:
    builder = struct.new_message()
    fill(builder, *args)
    with struct.from_bytes(builder.to_bytes(), traversal_limit_in_words=1 << 30) as reader:
        return read(reader)


def big_assignment(count: int) -> Assignment:
    return Assignment(
        "host-a",
        7,
        tuple(
            VmAssignment(
                f"vm-{i}",
                f"h{i}",
                PATH,
                PowerState.STOPPED if i % 3 == 0 else PowerState.RUNNING,
                i % 4,
                (i % 2) * 512,
            )
            for i in range(count)
        ),
        "op-0123456789ab",
    )


def test_enum_tables_match_the_schema() -> None:
    for names, enum in (
        (convert.POWER_NAMES, S.PowerState),
        (convert.PHASE_NAMES, S.Phase),
        (convert.EVENT_KIND_NAMES, S.EventKind),
        (convert.ERROR_CODE_NAMES, S.ErrorCode),
        (convert.HEALTH_KIND_NAMES, S.HealthKind),
        (convert.HEALTH_NAMES, S.Health),
        (convert.PREPARE_STATE_NAMES, S.PrepareState),
    ):
        ordinals = enum.schema.enumerants
        assert list(names) == sorted(ordinals, key=ordinals.__getitem__)


def test_assignment_of_ten_thousand_vms_round_trips() -> None:
    assignment = big_assignment(10_000)
    got = roundtrip(
        S.Assignment, convert.fill_assignment, convert.assignment_from_reader, assignment
    )
    assert got == assignment


def test_fleet_round_trips_sorted() -> None:
    fleet = Fleet(
        (
            ("w-b", (VmAssignment("b", "h", PATH),)),
            ("w-a", (VmAssignment("z", "h", PATH), VmAssignment("a", "h", PATH))),
        )
    )
    got = roundtrip(S.Fleet, convert.fill_fleet, convert.fleet_from_reader, fleet)
    assert [w for w, _ in got.workers] == ["w-a", "w-b"]
    assert [vm.id for vm in got.workers[0][1]] == ["a", "z"]


def test_status_info_events_metrics_round_trip() -> None:
    status = WorkerStatus(
        "host-a",
        5,
        (
            VmStatus(
                "web-1", Phase.CRASH_LOOP, "h1", "dying", 3, "10.0.0.2", PowerState.RUNNING, "op-1"
            ),
            VmStatus("web-2", Phase.PENDING),
        ),
    )
    assert (
        roundtrip(
            S.WorkerStatus, convert.fill_worker_status, convert.worker_status_from_reader, status
        )
        == status
    )
    info = WorkerInfo("host-a", "0.1.0", metrics_url="http://h:9", driver="qemu")
    assert (
        roundtrip(S.WorkerInfo, convert.fill_worker_info, convert.worker_info_from_reader, info)
        == info
    )
    samples = (
        MetricSample("procurator_vm_up", 1.0, "web-1", (("kind", "x"),)),
        MetricSample("w", 2.5),
    )
    whole = MetricsReport("host-a", samples)
    assert roundtrip(S.MetricsReport, convert.fill_metrics, convert.metrics_from_reader, whole) == (
        whole
    )
    change = MetricsReport(
        "host-a",
        samples[:1],
        (("procurator_vm_up", "web-2", (("kind", "y"),)), ("w2", "", ())),
        whole=False,
    )
    assert (
        roundtrip(S.MetricsReport, convert.fill_metrics, convert.metrics_from_reader, change)
        == change
    )

    events = (VmEvent("web-1", EventKind.READOPTED, "m", "op-2", 1234),)
    builder = S.WorkerEvent.new_message()
    convert.fill_worker_events([builder], [WorkerEvent("host-a", events[0])])
    with S.WorkerEvent.from_bytes(builder.to_bytes()) as reader:
        assert convert.worker_events_from_reader([reader]) == (WorkerEvent("host-a", events[0]),)


def test_apply_result_and_errors_round_trip() -> None:
    result = ApplyResult(
        3,
        True,
        (
            WorkerDiff(
                "host-a",
                added=("a",),
                replaced=("b",),
                removed=("c",),
                power_changed=(PowerChange("d", PowerState.RUNNING, PowerState.PAUSED),),
                updated=("e",),
            ),
        ),
        "op-1",
        False,
    )
    assert (
        roundtrip(
            S.ApplyResult, convert.fill_apply_result, convert.apply_result_from_reader, result
        )
        == result
    )

    def fill_error(builder: Any, error: Any) -> None:
        convert.fill_error(builder.init("error"), error)

    with pytest.raises(StaleGenerationError) as info:
        roundtrip(
            S.ApplyResult,
            fill_error,
            convert.apply_result_from_reader,
            StaleGenerationError("moved", details=["x"], op_id="op-9"),
        )
    assert (info.value.details, info.value.op_id) == (("x",), "op-9")


def test_fleet_status_round_trips() -> None:
    status = FleetStatus(
        4,
        (
            WorkerConnection(
                "host-a",
                True,
                10,
                4,
                WorkerStatus("host-a", 4),
                11,
                2,
                info=WorkerInfo("host-a", "1.0", Capacity(2, 4096, 0), "http://h:9301/m", "qemu"),
            ),
            WorkerConnection("host-b", False, 0, 2, None, 0, 1),
        ),
        change_index=1_764_950_000_123_456,
    )
    assert (
        roundtrip(
            S.FleetStatus, convert.fill_fleet_status, convert.fleet_status_from_reader, status
        )
        == status
    )


def test_vm_description_round_trips() -> None:
    description = VmDescription(
        vm_id="web-1",
        fleet_generation=7,
        worker_id="host-a",
        desired_generation=6,
        desired_op_id="op-6",
        desired=None,
        observed_by="host-a",
        worker_connected=True,
        observed_generation=5,
        status=VmStatus("web-1", Phase.RUNNING, observed_hash="a" * 32),
        change_index=1_764_950_000_123_456,
    )
    assert (
        roundtrip(
            S.DescribeResult,
            convert.fill_describe_result,
            convert.describe_result_from_reader,
            description,
        )
        == description
    )


def test_bad_values_name_their_field() -> None:
    builder = S.Assignment.new_message()
    convert.fill_assignment(builder, big_assignment(3))
    builder.vms[1].id = "Not/Valid"
    builder.vms[2].nixStorePath = "/etc/passwd"
    builder.vms[0].resources.vcpus = 100_000
    with (
        pytest.raises(ValidationError) as info,
        S.Assignment.from_bytes(builder.to_bytes()) as reader,
    ):
        convert.assignment_from_reader(reader)
    details = "\n".join(info.value.details)
    assert "assignment.vms[1].id" in details
    assert "assignment.vms[2].nixStorePath" in details
    assert "assignment.vms[0].resources.vcpus" in details

    status = S.WorkerStatus.new_message(workerId="host-a")
    status.init("vms", 1)[0].id = "web-1"
    status.vms[0].message = "x" * (LIMITS.max_text + 1)
    with (
        pytest.raises(ValidationError, match="problem") as info,
        S.WorkerStatus.from_bytes(status.to_bytes()) as reader,
    ):
        convert.worker_status_from_reader(reader)
    assert "status.vms[0].message: longer than" in info.value.details[0]

    # A VM reported twice: a worker keeps one entry per VM.
    status = S.WorkerStatus.new_message(workerId="host-a")
    for entry, vm_id in zip(status.init("vms", 3), ("web-1", "web-2", "web-1"), strict=True):
        entry.id = vm_id
    with (
        pytest.raises(ValidationError, match="problem") as info,
        S.WorkerStatus.from_bytes(status.to_bytes()) as reader,
    ):
        convert.worker_status_from_reader(reader)
    assert info.value.details == ("status.vms[2].id: VM 'web-1' is reported twice (vms[0])",)


def test_every_entry_is_checked_although_valid_values_are_remembered() -> None:
    """The decoder skips re-matching a hash or store path already valid in
    the same list; a value valid as one field must still be checked as the
    other, and every bad entry is named, not only the first."""
    builder = S.Assignment.new_message()
    convert.fill_assignment(builder, big_assignment(5))
    builder.vms[0].hash = "samehash"
    builder.vms[1].nixStorePath = "samehash"  # a valid hash, not a store path
    builder.vms[2].nixStorePath = "/etc/passwd"
    builder.vms[4].nixStorePath = "/etc/passwd"
    builder.vms[3].hash = PATH  # a valid store path, not a hash
    builder.vms[3].power = 2
    with (
        pytest.raises(ValidationError) as info,
        S.Assignment.from_bytes(builder.to_bytes()) as reader,
    ):
        convert.assignment_from_reader(reader)
    named = {line.split(":")[0] for line in info.value.details}
    assert named == {
        "assignment.vms[1].nixStorePath",
        "assignment.vms[2].nixStorePath",
        "assignment.vms[3].hash",
        "assignment.vms[4].nixStorePath",
    }


def test_resources_left_unset_read_as_zero_and_unknown_power_as_running() -> None:
    builder = S.Assignment.new_message(workerId="host-a", generation=1)
    entries = builder.init("vms", 2)
    for index, entry in enumerate(entries):
        entry.id = f"vm-{index}"
        entry.hash = f"h{index}"
        entry.nixStorePath = PATH
    entries[1].resources.vcpus = 2  # memory left 0: as the image says
    entries[1].power = 99  # an enumerant of a newer peer
    with S.Assignment.from_bytes(builder.to_bytes()) as reader:
        vms = convert.assignment_from_reader(reader).vms
    assert [(vm.vcpus, vm.memory_mib, vm.power) for vm in vms] == [
        (0, 0, PowerState.RUNNING),
        (2, 0, PowerState.RUNNING),
    ]


def test_too_long_lists_are_refused_before_building() -> None:
    builder = S.MetricsReport.new_message(workerId="host-a")
    builder.init("samples", convert.MAX_SAMPLES_PER_REPORT + 1)
    with (
        pytest.raises(LimitExceededError, match=r"metrics\.samples"),
        S.MetricsReport.from_bytes(builder.to_bytes()) as reader,
    ):
        convert.metrics_from_reader(reader)


def test_metrics_reports_read_as_whole_unless_marked_a_change() -> None:
    def message(*, change: bool, ended: str = "", vm_id: str = "") -> bytes:
        builder = S.MetricsReport.new_message(workerId="host-a")
        builder.init("samples", 1)[0].name = "procurator_x"
        if change:
            builder.change = True
        if ended:
            series = builder.init("ended", 1)[0]
            series.name = ended
            series.vmId = vm_id
        return bytes(builder.to_bytes())

    # An older worker's report: no `change`, no `ended`.
    with S.MetricsReport.from_bytes(message(change=False)) as reader:
        report = convert.metrics_from_reader(reader)
    assert report == MetricsReport("host-a", (MetricSample("procurator_x", 0.0),))
    # A whole report ends nothing; ended series are checked as samples are.
    with (
        pytest.raises(ValidationError) as info,
        S.MetricsReport.from_bytes(message(change=False, ended="procurator_y")) as reader,
    ):
        convert.metrics_from_reader(reader)
    assert info.value.details == ("metrics.ended: a whole report ends no series",)
    with (
        pytest.raises(ValidationError) as info,
        S.MetricsReport.from_bytes(
            message(change=True, ended="procurator_y", vm_id="Not An Id")
        ) as reader,
    ):
        convert.metrics_from_reader(reader)
    assert [d.split(":")[0] for d in info.value.details] == ["metrics.ended[0].vmId"]


def test_unknown_enumerants_read_as_the_first_value() -> None:
    builder = S.VmStatus.new_message(id="web-1")
    builder.phase = 4
    with S.VmStatus.from_bytes(builder.to_bytes()) as reader:

        class Fake:
            raw = 99

        assert convert._enum(convert._PHASE, Fake()) is Phase.UNKNOWN
        assert convert._enum(convert._PHASE, reader.phase) is Phase.RUNNING


def test_over_long_messages_are_cut_by_the_sender_not_refused() -> None:
    """A VMM's log tail can make a status or event message longer than the
    wire allows; the receiver would refuse the whole report for it."""
    long = "x" * (LIMITS.max_text * 3)
    status = WorkerStatus(
        "host-a", 1, (VmStatus("web-1", Phase.FAILED, "h", long, 0, "", PowerState.STOPPED),)
    )
    got = roundtrip(
        S.WorkerStatus, convert.fill_worker_status, convert.worker_status_from_reader, status
    )
    (vm,) = got.vms
    assert len(vm.message) == LIMITS.max_text and vm.message.endswith("[cut]")
    assert vm.message.startswith("x" * 100)

    builder = S.VmEvent.new_message()
    convert._fill_event(builder, VmEvent("web-1", EventKind.FAILED, long))
    assert len(builder.message) == LIMITS.max_text
    assert convert.clip_text("short") == "short"


def _apply_params(request: ApplyRequest) -> Any:
    """``Control.apply``'s parameters as written by the client, read back."""
    builder = capnp._MallocMessageBuilder().init_root(S.Control.schema.methods["apply"].param_type)
    convert.fill_apply_request(builder, request)
    return builder.as_reader()


def test_apply_request_round_trips_with_its_request_id() -> None:
    fleet = Fleet((("host-a", (VmAssignment("web-1", "h", PATH),)),))
    for request in (
        ApplyRequest(fleet),
        ApplyRequest(fleet, expected_generation=0, dry_run=True, request_id="ci-1234.retry_2"),
        ApplyRequest(fleet, expected_generation=7, request_id="x" * 64),
    ):
        assert convert.apply_request_from_reader(_apply_params(request)) == request


def test_a_bad_request_id_is_refused_on_both_sides() -> None:
    fleet = Fleet(())
    for bad in ("x" * 65, "has space", "slash/y", "naïve", "\n"):
        assert check_request_id(bad) is not None, bad
        with pytest.raises(ValidationError, match=r"^requestId: .* is not 1 to 64 characters"):
            convert.apply_request_from_reader(_apply_params(ApplyRequest(fleet, request_id=bad)))
    assert check_request_id("a") is None and check_request_id("A-z_0.9") is None


def test_a_replayed_apply_result_round_trips() -> None:
    result = ApplyResult(5, True, (), "op-0123456789ab", False, replayed=True)
    assert (
        roundtrip(
            S.ApplyResult, convert.fill_apply_result, convert.apply_result_from_reader, result
        )
        == result
    )


def test_a_message_past_the_traversal_limit_is_limit_exceeded_not_a_bug() -> None:
    builder = S.WorkerStatus.new_message(workerId="host-a")
    for index, vm in enumerate(builder.init("vms", 100)):
        vm.id = f"web-{index}"
    with S.WorkerStatus.from_bytes(builder.to_bytes(), traversal_limit_in_words=64) as reader:
        with pytest.raises(convert.READ_ERRORS) as caught:
            convert.worker_status_from_reader(reader, "status")
        error = convert.malformed_error(reader, caught.value, "status")
    assert isinstance(error, LimitExceededError)
    assert error.details == (
        "status: message exceeds the traversal limit (too large, or read more than once)",
    )
