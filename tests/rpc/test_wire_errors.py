"""Errors on the wire are data: every method answers a code, a message and an
op id; a malformed request is the sender's fault (``invalid`` naming the
field, one WARNING line), never an ``internal`` error with a traceback; and
no traceback or file path of the master ever reaches a client.

The master runs in this process (on a real TCP socket) so that its log can
be read as it formats it; the malformed requests come from a real process
speaking the protocol with its own, differently typed, copy of the schema
(``evilpeer.py``)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from rpchelpers import served, served_service

import procurator
from procurator.core.errors import (
    NotFoundError,
    ProcuratorError,
    StaleGenerationError,
    UnavailableError,
    ValidationError,
)
from procurator.core.metrics import MetricSample
from procurator.core.models import (
    Assignment,
    EventKind,
    Fleet,
    VmAssignment,
    VmEvent,
    WorkerInfo,
    WorkerStatus,
)
from procurator.core.status import StatusChanges
from procurator.logs import ContextFilter, TextFormatter
from procurator.master.service import MasterService
from procurator.rpc.address import Address
from procurator.rpc.bridge import Bridge
from procurator.rpc.clients import CapnpMasterDialer, open_control
from procurator.rpc.master_server import RemoteNode

EVIL_PEER = Path(__file__).with_name("evilpeer.py")
PATH = "/nix/store/" + "a" * 32 + "-web"


@contextlib.contextmanager
def master_log() -> Iterator[io.StringIO]:
    """The master's log lines as ``procurator.logs`` formats them (text,
    with the ``[op_id=...]`` of each line)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(ContextFilter())
    handler.setFormatter(TextFormatter())
    handler.setLevel(logging.INFO)
    target = logging.getLogger("procurator.rpc")
    target.addHandler(handler)
    old_level = target.level
    target.setLevel(logging.INFO)
    try:
        yield out
    finally:
        target.removeHandler(handler)
        target.setLevel(old_level)


def _no_internals(text: str) -> None:
    """``text`` (an answer a client got) shows nothing of the master's
    insides: no traceback, no source file of ours."""
    assert "Traceback" not in text, text
    assert 'File "' not in text and ".py" not in text, text
    assert str(Path(procurator.__file__).parent) not in text, text


MALFORMED = {
    # scenario (see evilpeer.py) -> the field and the problem named
    "register: text for a struct": "info: wrong type: Message contains non-struct pointer",
    "register: text without its NUL": "info.workerId: text is not NUL-terminated",
    "register: text not UTF-8": "info.workerId: text is not valid UTF-8",
    "reportStatus: a message not UTF-8": "status.vms[1].message: text is not valid UTF-8",
    "apply: a VM id without its NUL": "fleet.workers[0].vms[0].id: text is not NUL-terminated",
    "events: a VM id not UTF-8": "vmId: text is not valid UTF-8",
    # The events' own answer: the status part is taken (below).
    "reportStatusAndEvents: an event's message not UTF-8": (
        "events[0].message: text is not valid UTF-8"
    ),
}


async def test_malformed_requests_are_invalid_and_name_the_field(
    tmp_path: Path, bridge: Bridge
) -> None:
    with master_log() as log:
        async with served_service(tmp_path, bridge) as (_, address):
            peer = await trio.run_process(
                [sys.executable, str(EVIL_PEER), f"{address.host}:{address.port}"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert peer.returncode == 0, peer.stderr.decode()
    answers = {a["scenario"]: a for a in map(json.loads, peer.stdout.decode().splitlines())}
    for scenario, problem in MALFORMED.items():
        got = answers[scenario]
        assert got.get("code") == "invalid", got
        assert got["details"][0].startswith(problem), got
        assert got["message"] == f"malformed message: {got['details'][0]}"
        assert got["opId"].startswith("op-"), got
        _no_internals(json.dumps(got))
    # The connection went on: the well-formed calls between were served.
    assert answers["register"] == {"scenario": "register", "ok": "session"}
    assert answers["status"] == {"scenario": "status", "ok": "answered"}
    assert answers["reportStatus"] == {"scenario": "reportStatus", "ok": "ok"}
    combined = "reportStatusAndEvents: an event's message not UTF-8 (status)"
    assert answers[combined] == {"scenario": combined, "ok": "ok"}
    # The master's log: one WARNING line per malformed request, naming the
    # field and carrying the op id the client got; nothing worse.
    lines = log.getvalue().splitlines()
    assert not [line for line in lines if " ERROR " in line or "Traceback" in line], lines
    warnings = [line for line in lines if " WARNING " in line]
    assert len(warnings) == len(MALFORMED), warnings
    for scenario, problem in MALFORMED.items():
        (line,) = [w for w in warnings if f"[op_id={answers[scenario]['opId']}]" in w]
        assert f"refused, malformed: {problem}" in line


async def test_an_error_answer_carries_no_traceback_or_file_path(
    tmp_path: Path, bridge: Bridge
) -> None:
    async with served_service(tmp_path, bridge) as (_, address):
        peer = await trio.run_process(
            [sys.executable, str(EVIL_PEER), f"{address.host}:{address.port}"],
            capture_stdout=True,
            check=True,
        )
    answers = {a["scenario"]: a for a in map(json.loads, peer.stdout.decode().splitlines())}
    path_id = answers["events: a path for a VM id"]
    assert path_id["code"] == "invalid"
    assert path_id["message"].startswith("vmId: '../../etc/passwd' is not a valid VM id")
    assert path_id["opId"].startswith("op-")
    for answer in answers.values():
        _no_internals(json.dumps(answer))


class ScriptedBackend:
    """A ``MasterBackend`` whose every method raises what ``fail`` says for
    it (by method name), or answers a plain value."""

    def __init__(self, fail: dict[str, BaseException]) -> None:
        self.fail = fail
        self.nodes: list[RemoteNode] = []

    def _maybe_fail(self, method: str) -> None:
        if method in self.fail:
            raise self.fail[method]

    async def apply(self, fleet: Fleet, **_: Any) -> Any:
        self._maybe_fail("apply")

    async def apply_patch(self, patch: Any, **_: Any) -> Any:
        self._maybe_fail("apply_patch")

    async def fleet_status(self) -> Any:
        self._maybe_fail("fleet_status")

    async def wait_change(self, index: int, timeout: float) -> int:
        return index

    async def describe_vm(self, vm_id: str, event_limit: int = 20) -> Any:
        self._maybe_fail("describe_vm")

    async def recent_events(self, vm_id: str = "", limit: int = 100, after_seq: int = 0) -> Any:
        self._maybe_fail("recent_events")

    async def register(self, info: WorkerInfo, node: RemoteNode) -> int:
        self._maybe_fail("register")
        self.nodes.append(node)
        return len(self.nodes)

    async def unregister(self, token: int) -> None:
        return None

    async def get_assignment(self, token: int, known_generation: int) -> Any:
        self._maybe_fail("get_assignment")

    async def report_status(self, token: int, status: WorkerStatus) -> None:
        self._maybe_fail("report_status")

    async def report_status_changes(self, token: int, changes: StatusChanges) -> None:
        self._maybe_fail("report_status_changes")

    async def report_metrics(self, token: int, report: Any) -> None:
        self._maybe_fail("report_metrics")

    async def report_events(self, token: int, events: Any) -> None:
        self._maybe_fail("report_events")

    async def report_status_and_events(
        self, token: int, changes: StatusChanges, events: Any
    ) -> ProcuratorError | None:
        """The service's own split (its two parts are this backend's)."""
        self._maybe_fail("report_status_and_events")
        split = MasterService.report_status_and_events
        return await split(self, token, changes, events)  # type: ignore[arg-type]


BACKEND_METHODS = (
    "apply",
    "apply_patch",
    "fleet_status",
    "describe_vm",
    "recent_events",
    "get_assignment",
    "report_status",
    "report_status_changes",
    "report_metrics",
    "report_events",
    "report_status_and_events",
)


async def _ignore(assignment: Assignment) -> None:
    return None


async def _every_call(bridge: Bridge, address: Address) -> dict[str, BaseException]:
    """Make every call the backend serves; what each raised, by the name of
    the backend method it reaches."""
    raised: dict[str, BaseException] = {}

    async def expect_failure(name: str, call: Any) -> None:
        try:
            await call
        except ProcuratorError as exc:
            raised[name] = exc
        else:
            raise AssertionError(f"{name} did not fail")

    async with open_control(bridge, address) as control:
        fleet = Fleet((("host-a", (VmAssignment("web-1", "a" * 32, PATH),)),))
        await expect_failure("apply", control.apply(fleet, whole=True))
        await expect_failure("apply_patch", control.apply(fleet))
        await expect_failure("fleet_status", control.status())
        await expect_failure("describe_vm", control.describe_vm("web-1"))
        await expect_failure("recent_events", control.events())
    session = await CapnpMasterDialer(bridge, address).connect(WorkerInfo("host-a"), _ignore)
    try:
        await expect_failure("get_assignment", session.get_assignment(0))
        await expect_failure("report_status", session.report_status(WorkerStatus("host-a", 0)))
        await expect_failure(
            "report_status_changes", session.report_status_changes(StatusChanges("host-a", 0))
        )
        await expect_failure(
            "report_metrics", session.report_metrics([MetricSample("procurator_x", 1.0)])
        )
        await expect_failure(
            "report_events", session.report_events([VmEvent("web-1", EventKind.BOOTED)])
        )
        await expect_failure(
            "report_status_and_events",
            session.report_status_and_events(
                StatusChanges("host-a", 0), [VmEvent("web-1", EventKind.BOOTED)]
            ),
        )
    finally:
        await session.aclose()
    return raised


async def test_every_method_answers_a_bug_as_internal_with_an_op_id(bridge: Bridge) -> None:
    backend = ScriptedBackend({name: RuntimeError(f"bug in {name}") for name in BACKEND_METHODS})
    with master_log() as log:
        async with served(bridge, backend) as address:
            raised = await _every_call(bridge, address)
    lines = log.getvalue()
    assert set(raised) == set(BACKEND_METHODS)
    for name, exc in raised.items():
        assert type(exc) is ProcuratorError and exc.code == "internal", (name, exc)
        assert exc.message.endswith(": internal error; see the master's log"), exc.message
        assert exc.op_id.startswith("op-")
        _no_internals(str(exc))
        # The traceback is in the master's log, under the op id the client got.
        (failed,) = [line for line in lines.splitlines() if f"[op_id={exc.op_id}]" in line]
        assert "failed unexpectedly" in failed and " ERROR " in failed
        assert f"RuntimeError: bug in {name}" in lines


async def test_typed_errors_reach_the_client_typed(bridge: Bridge) -> None:
    """Every method, the ones whose results had no error arm before too:
    the client raises the very type the backend raised, from data."""
    fail: dict[str, BaseException] = {
        name: NotFoundError(f"{name}: nothing here") for name in BACKEND_METHODS
    }
    fail["apply"] = StaleGenerationError("moved on", details=["expected 3, is 4"])
    fail["fleet_status"] = UnavailableError("the store is not answering")
    async with served(bridge, ScriptedBackend(fail)) as address:
        raised = await _every_call(bridge, address)
    for name, exc in raised.items():
        assert type(exc) is type(fail[name]), (name, exc)
        assert exc.message == fail[name].message  # no prefix, nothing parsed
    assert raised["apply"].details == ("expected 3, is 4",)


async def test_a_worker_refusing_a_push_answers_typed(bridge: Bridge) -> None:
    """``Node.push`` answers its error as data too: the master's push raises
    the worker's typed error, not a remote failure."""
    backend = ScriptedBackend({})
    async with served(bridge, backend) as address:
        session = await CapnpMasterDialer(bridge, address).connect(WorkerInfo("host-a"), _ignore)
        try:
            (node,) = backend.nodes
            await node.push(Assignment("host-a", 1, ()))
            with pytest.raises(ValidationError, match="is for worker 'host-b', this is 'host-a'"):
                await node.push(Assignment("host-b", 1, ()))
        finally:
            await session.aclose()
