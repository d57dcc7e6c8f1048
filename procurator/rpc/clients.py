"""Clients of the master, for trio code: the control client (CLI, CI) and the
worker's dialer (used by ``procurator.worker.link.MasterLink``).

Every method crosses the bridge once and returns plain models; Cap'n Proto
objects stay on the capnp thread behind :class:`CapnpHandle`s. The master's
errors arrive as data (every method's results carry one) and are raised as
the typed errors of ``procurator.core.errors``; nothing parses an error out
of a string. The worker's ``Node`` answers the master the same way
(``procurator.rpc.answer``). A broken
connection is noticed without waiting for the next call (the connection's
``on_disconnect`` is watched) and surfaces as
:meth:`CapnpMasterSession.wait_disconnected` returning; calls on a dead
connection raise ``UnavailableError``.

TLS: given ``TlsFiles``, both clients dial over mutual TLS and check that the
master's certificate comes from the fleet CA (``procurator.rpc.tls``);
without, they refuse a non-loopback master unless ``insecure``. Over TLS 1.3
a master that refuses our certificate does so only after our side of the
handshake is done, so the refusal shows as the connection closing on the
first call; that error says so.

Metrics reports (``CapnpMasterSession.report_metrics``): the session keeps
what the master holds of this worker's series (``procurator.core.metrics.
ReportedSeries``), so the link hands it every sample and the wire carries
a change once the master acknowledged a whole report of this session and
said it takes changes (``takesChanges``; an older master never says so and
gets whole reports). A change the master refuses (it lost the base: it
restarted, or its series do not fit) is followed at once, in the same
call, by the whole report; a report that may not have arrived (a timeout,
a broken connection) leaves no base, so the next one is whole. A report of
more than ``MAX_SERIES_PER_SLICE`` series crosses as bounded slices in
sequence (``report_slices``), so this session's other calls pass between
them on the capnp thread; a whole report's rest follows as changes only
once the master's answer to its first slice says it takes changes (an
older master gets the whole report again, in one call, and every later
report of the session whole in one call, as before); the
base is delivered when the last slice is acknowledged. Each call of a
report is bounded by the caller's ``call_timeout`` on its own: a whole
report of 10,000 VMs is ~90 calls, and one bound on all of them together
would either be long enough to hide a hung master or fail a report that
the master is answering.
"""

from __future__ import annotations

import contextlib
import logging
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import capnp
import trio

from procurator.core.assignments import AssignmentChanges, AssignmentUpdate
from procurator.core.control import (
    ApplyRequest,
    ApplyResult,
    FleetStatus,
    VmDescription,
    WorkerEvent,
)
from procurator.core.drain import (
    DEFAULT_MAX_UNAVAILABLE,
    ModeAction,
    ModeChange,
    check_max_unavailable,
)
from procurator.core.errors import (
    PermanentError,
    ProcuratorError,
    UnavailableError,
    UnsupportedError,
    ValidationError,
)
from procurator.core.fleetpatch import (
    FleetParts,
    FleetPatch,
    PatchAnswer,
    PatchRequest,
    patch_rounds,
)
from procurator.core.metrics import MetricSample, MetricsReport, ReportedSeries, report_slices
from procurator.core.models import Assignment, Fleet, VmEvent, WorkerInfo, WorkerStatus
from procurator.core.move import DEFAULT_MOVE_TIMEOUT_S, MAX_MOVE_TIMEOUT_S, Move, MoveKind
from procurator.core.rollout import RolloutAction, RolloutView
from procurator.core.snapshot import SnapshotCalls, SnapshotInfo, SnapshotRequest
from procurator.core.status import StatusChanges
from procurator.core.validation import (
    check_request_id,
    check_rollout_id,
    check_vm_id,
    check_worker_id,
)
from procurator.rpc.address import Address, parse_address
from procurator.rpc.answer import answer, error_arm, error_result
from procurator.rpc.bridge import Bridge, CapnpHandle, ClientConnection, connect
from procurator.rpc.convert import (
    apply_result_from_reader,
    assignment_changes_from_reader,
    assignment_from_reader,
    describe_result_from_reader,
    error_from_reader,
    fill_apply_request,
    fill_events,
    fill_metrics,
    fill_patch_request,
    fill_snapshot_list,
    fill_snapshot_request,
    fill_snapshot_result,
    fill_status_changes,
    fill_worker_info,
    fill_worker_status,
    fleet_status_from_reader,
    mode_change_from_reader,
    move_from_reader,
    move_list_from_reader,
    patch_answer_from_reader,
    rollout_result_from_reader,
    snapshot_list_from_reader,
    snapshot_request_from_reader,
    snapshot_result_from_reader,
    worker_events_from_reader,
)
from procurator.rpc.schema import load_schema
from procurator.rpc.tls import TlsFiles, client_context, require_secure

__all__ = [
    "CapnpMasterDialer",
    "CapnpMasterSession",
    "ControlClient",
    "open_control",
]

logger = logging.getLogger(__name__)

_schema = load_schema()

# Gets every pushed update: a whole assignment, or changes to the last one.
OnPush = Callable[[AssignmentUpdate], Awaitable[None]]
T = TypeVar("T")


def _address(address: str | Address) -> Address:
    return address if isinstance(address, Address) else parse_address(address)


def _tls_for(
    address: Address, tls: TlsFiles | None, insecure: bool, what: str
) -> ssl.SSLContext | None:
    """The client TLS context for dialing ``address`` (None: plaintext,
    allowed only where ``require_secure`` allows it)."""
    require_secure(address, tls, insecure=insecure, what=what)
    return client_context(tls) if tls is not None else None


async def _first_answer(call: Awaitable[T], tls: ssl.SSLContext | None) -> T:
    """Await the first call of a connection (capnp thread); over TLS, a
    connection closed before it is answered most likely means the master
    refused our certificate: say so."""
    try:
        return await call
    except capnp.KjException as exc:
        if tls is None or exc.type != "DISCONNECTED":
            raise
        raise UnavailableError(
            "the master closed the TLS connection before answering: it most likely "
            "refused this certificate (not signed by its CA, expired, or not a client "
            "certificate), or it is shutting down; see the master's log"
        ) from None


# ---------------------------------------------------------------- control


class ControlClient:
    """The ``Control`` interface of one master. Use :func:`open_control`."""

    def __init__(self, bridge: Bridge, handle: CapnpHandle[tuple[ClientConnection, Any]]) -> None:
        self._bridge = bridge
        self._handle = handle
        # False once the master answered applyPatch unimplemented (older).
        self._patches = True
        self._chunks = True  # list big workers in chunks (False: the master is older)
        # The digests of the fleet this client last applied to this master
        # through a patch (FleetParts.entry_digests): what it most likely
        # still holds, so the next patch's first send carries what changed
        # (a hint for patch_rounds, never trusted for what is applied).
        self._held: frozenset[bytes] = frozenset()
        # The cut of the fleet this client last applied (any master's answer):
        # the next apply re-encodes only the chunks whose VMs changed
        # (FleetParts.of's ``previous``; a cache of pure work, nothing the
        # master is trusted with). Only a long-lived client gains:
        # ``procurator apply`` runs one apply per process.
        self._parts: FleetParts | None = None

    async def apply(
        self,
        fleet: Fleet,
        *,
        expected_generation: int | None = None,
        dry_run: bool = False,
        request_id: str = "",
        supersede: bool = False,
        whole: bool = False,
    ) -> ApplyResult:
        """Raises ``ValidationError`` / ``StaleGenerationError`` / ... as the
        master answered, ``UnavailableError`` if it cannot be reached.

        ``request_id`` (1 to 64 of ``A-Za-z0-9._-``; "" for none) makes a
        retry safe: an apply the master already committed with that id and
        the same fleet is answered with its result (``replayed``), not
        applied again.

        Sent as a fleet patch (``Control.applyPatch``,
        ``procurator.core.fleetpatch``): the digests of the parts and of big
        workers' chunks first, then those the master does not hold, so a
        one-VM change carries one chunk of one worker's VMs (a whole
        worker's to a master older than chunks, which is not asked again).
        After an apply through this client, the next one's first send
        already carries what changed since (the digests it applied are
        remembered: one round, not two, while no other apply came in
        between; a hint only, the master checks every digest).
        The whole fleet goes instead (``Control.apply``) with ``whole``, to
        a master that does not know patches (it is not asked
        again on this client), and when the master kept asking for parts
        (applies in between kept replacing what it holds). Same result
        either way."""
        if request_id and (problem := check_request_id(request_id)) is not None:
            raise ValidationError(f"request id: {problem}")
        if self._patches and not whole:

            async def send(patch: FleetPatch) -> PatchAnswer:
                return await self.apply_patch(
                    PatchRequest(patch, expected_generation, dry_run, request_id, supersede)
                )

            parts = FleetParts.of(fleet, previous=self._parts)
            self._parts = parts
            try:
                result = await patch_rounds(
                    parts,
                    send,
                    chunked=self._chunks,
                    chunks_refused=self._chunks_refused,
                    held=self._held,
                )
            except UnsupportedError:
                logger.info("the master does not take fleet patches: applying whole fleets")
                self._patches = False
            else:
                if result is not None:
                    if not (result.dry_run or result.replayed):
                        self._held = parts.entry_digests()  # what the master applied
                    return result
        request = ApplyRequest(fleet, expected_generation, dry_run, request_id, supersede)
        self._held = frozenset()  # a whole apply: the next patch starts from digests
        return await self._bridge.run(_apply, self._handle, request, what="apply")

    def _chunks_refused(self) -> None:
        logger.info("the master does not take chunks of workers: sending whole workers' parts")
        self._chunks = False

    async def apply_patch(self, request: PatchRequest) -> PatchAnswer:
        """One ``Control.applyPatch`` call, as :meth:`apply` makes them:
        the result, or the parts the master asks for (nothing applied).
        ``UnsupportedError`` from a master older than fleet patches."""
        return await self._bridge.run(_apply_patch, self._handle, request, what="applyPatch")

    async def status(self, *, wait_index: int = 0, wait: float = 0.0) -> FleetStatus:
        """The fleet's status. With ``wait_index`` (the ``change_index`` of
        an earlier answer) and ``wait`` seconds: a blocking read that answers
        when something changed, or after ``wait``."""
        return await self._bridge.run(
            _status, self._handle, wait_index, _wait_ms(wait), what="status"
        )

    async def events(
        self, vm_id: str = "", limit: int = 100, *, after_seq: int = 0
    ) -> tuple[WorkerEvent, ...]:
        """Recent events, oldest first: the newest ``limit``, or with
        ``after_seq`` the oldest ``limit`` received after that one."""
        if vm_id and (problem := check_vm_id(vm_id)) is not None:
            raise ValidationError(f"vm id: {problem}")
        return await self._bridge.run(_events, self._handle, vm_id, limit, after_seq, what="events")

    async def describe_vm(
        self, vm_id: str, event_limit: int = 20, *, wait_index: int = 0, wait: float = 0.0
    ) -> VmDescription:
        """Everything the master knows about VM ``vm_id``; ``NotFoundError``
        when it knows nothing. ``wait_index`` and ``wait`` block as in
        :meth:`status`."""
        if (problem := check_vm_id(vm_id)) is not None:
            raise ValidationError(f"vm id: {problem}")
        return await self._bridge.run(
            _describe_vm,
            self._handle,
            vm_id,
            event_limit,
            wait_index,
            _wait_ms(wait),
            what=f"describe VM {vm_id}",
        )

    async def snapshot(self, request: SnapshotRequest) -> SnapshotInfo:
        """Create, delete or restore a snapshot (the master forwards it to
        the VM's worker and answers once it is done). Raises the typed error
        the master or the worker answered (its op id set)."""
        request.check()
        return await self._bridge.run(
            _snapshot, self._handle, request, what=f"snapshot {request.action.value}"
        )

    async def list_snapshots(self, vm_id: str = "") -> tuple[SnapshotInfo, ...]:
        """The snapshots of VM ``vm_id``, or of the fleet ("")."""
        if vm_id and (problem := check_vm_id(vm_id)) is not None:
            raise ValidationError(f"vm id: {problem}")
        return await self._bridge.run(_list_snapshots, self._handle, vm_id, what="list snapshots")

    async def change_worker_mode(
        self,
        worker_id: str,
        action: ModeAction,
        max_unavailable: int = DEFAULT_MAX_UNAVAILABLE,
    ) -> ModeChange:
        """Cordon, uncordon or drain ``worker_id`` (docs/SCHEDULING.md)."""
        if (problem := check_worker_id(worker_id)) is not None:
            raise ValidationError(f"worker id: {problem}")
        if action is ModeAction.DRAIN and (problem := check_max_unavailable(max_unavailable)):
            raise ValidationError(problem)
        return await self._bridge.run(
            _change_worker_mode,
            self._handle,
            worker_id,
            action,
            max_unavailable,
            what=f"{action.value} worker {worker_id}",
        )

    async def rollout(
        self, rollout_id: str = "", action: RolloutAction = RolloutAction.STATUS
    ) -> RolloutView:
        """Show or act on a rollout ("": the one under way, else the
        newest; docs/ROLLOUTS.md)."""
        if (problem := check_rollout_id(rollout_id)) is not None:
            raise ValidationError(f"rollout id: {problem}")
        return await self._bridge.run(
            _rollout, self._handle, rollout_id, action, what=f"rollout {action.value}"
        )

    async def move(
        self,
        vm_id: str,
        target: str,
        *,
        kind: MoveKind = MoveKind.COLD,
        timeout_s: int = DEFAULT_MOVE_TIMEOUT_S,
    ) -> Move:
        """Record a move of ``vm_id`` to worker ``target`` (docs/SNAPSHOTS.md);
        the move as recorded, or the typed error it is refused with."""
        if (problem := check_vm_id(vm_id)) is not None:
            raise ValidationError(f"vm id: {problem}")
        if (problem := check_worker_id(target)) is not None:
            raise ValidationError(f"worker id: {problem}")
        if not 1 <= timeout_s <= MAX_MOVE_TIMEOUT_S:
            raise ValidationError(f"timeout: 1-{MAX_MOVE_TIMEOUT_S} s, not {timeout_s}")
        return await self._bridge.run(
            _move, self._handle, vm_id, target, kind, timeout_s, what=f"move {vm_id}"
        )

    async def moves(self, vm_id: str = "") -> tuple[Move, ...]:
        """The moves under way and the newest over (of one VM, or all)."""
        if vm_id and (problem := check_vm_id(vm_id)) is not None:
            raise ValidationError(f"vm id: {problem}")
        return await self._bridge.run(_moves, self._handle, vm_id, what="list moves")


@contextlib.asynccontextmanager
async def open_control(
    bridge: Bridge,
    address: str | Address,
    *,
    tls: TlsFiles | None = None,
    insecure: bool = False,
) -> AsyncIterator[ControlClient]:
    """Connect to the master at ``address`` and yield its control client.
    ``tls``: a control certificate; needed for a non-loopback master unless
    ``insecure``. The master answers ``UnauthorizedError`` to any other
    certificate."""
    target = _address(address)
    context = _tls_for(target, tls, insecure, "connecting to the master at")
    handle = await bridge.run(
        _open_control, bridge, target, context, what=f"connecting to the master at {target}"
    )
    try:
        yield ControlClient(bridge, handle)
    finally:
        with trio.CancelScope(shield=True):
            await bridge.run(_close, handle)


async def _open_control(
    bridge: Bridge, address: Address, tls: ssl.SSLContext | None
) -> CapnpHandle[Any]:
    conn = await connect(address, lambda reason: None, tls=tls)
    try:
        master = conn.bootstrap(_schema.Master)
        response = await _first_answer(master.control(), tls)
        control = _ok(response.result).control
    except BaseException:
        conn.close()
        raise
    return bridge.own((conn, control), f"control connection to {address}")


async def _close(handle: CapnpHandle[tuple[ClientConnection, Any]]) -> None:
    pair = handle.release()
    if pair is not None:
        pair[0].close()


async def _apply(
    handle: CapnpHandle[tuple[ClientConnection, Any]], apply: ApplyRequest
) -> ApplyResult:
    request = handle.get()[1].apply_request()
    fill_apply_request(request, apply)
    response = await request.send()
    return apply_result_from_reader(response.result)


def _wait_ms(wait: float) -> int:
    """Seconds to the wire's waitMs (UInt32; the master caps it lower)."""
    return 0 if wait <= 0 else min(max(1, round(wait * 1000)), 0xFFFF_FFFF)


async def _apply_patch(
    handle: CapnpHandle[tuple[ClientConnection, Any]], patch: PatchRequest
) -> PatchAnswer:
    request = handle.get()[1].applyPatch_request()
    fill_patch_request(request, patch)
    response = await request.send()
    return patch_answer_from_reader(response)


async def _status(
    handle: CapnpHandle[tuple[ClientConnection, Any]], wait_index: int, wait_ms: int
) -> FleetStatus:
    response = await handle.get()[1].status(waitIndex=wait_index, waitMs=wait_ms)
    _raise_error(response)
    return fleet_status_from_reader(response.status)


async def _events(
    handle: CapnpHandle[tuple[ClientConnection, Any]], vm_id: str, limit: int, after_seq: int
) -> tuple[WorkerEvent, ...]:
    response = await handle.get()[1].events(vmId=vm_id, limit=limit, afterSeq=after_seq)
    _raise_error(response)
    return worker_events_from_reader(response.events)


async def _describe_vm(
    handle: CapnpHandle[tuple[ClientConnection, Any]],
    vm_id: str,
    event_limit: int,
    wait_index: int,
    wait_ms: int,
) -> VmDescription:
    response = await handle.get()[1].describeVm(
        vmId=vm_id, eventLimit=event_limit, waitIndex=wait_index, waitMs=wait_ms
    )
    return describe_result_from_reader(response.result)


async def _snapshot(
    handle: CapnpHandle[tuple[ClientConnection, Any]], snapshot: SnapshotRequest
) -> SnapshotInfo:
    request = handle.get()[1].snapshot_request()
    fill_snapshot_request(request.init("request"), snapshot)
    response = await request.send()
    return snapshot_result_from_reader(response.result)


async def _list_snapshots(
    handle: CapnpHandle[tuple[ClientConnection, Any]], vm_id: str
) -> tuple[SnapshotInfo, ...]:
    response = await handle.get()[1].listSnapshots(vmId=vm_id)
    return snapshot_list_from_reader(response.result)


async def _change_worker_mode(
    handle: CapnpHandle[tuple[ClientConnection, Any]],
    worker_id: str,
    action: ModeAction,
    max_unavailable: int,
) -> ModeChange:
    response = await handle.get()[1].changeWorkerMode(
        workerId=worker_id, action=action.value, maxUnavailable=max_unavailable
    )
    return mode_change_from_reader(response.result, worker_id)


async def _move(
    handle: CapnpHandle[tuple[ClientConnection, Any]],
    vm_id: str,
    target: str,
    kind: MoveKind,
    timeout_s: int,
) -> Move:
    response = await handle.get()[1].move(
        vmId=vm_id, target=target, live=kind is MoveKind.LIVE, timeoutS=timeout_s
    )
    return move_from_reader(response.result)


async def _moves(handle: CapnpHandle[tuple[ClientConnection, Any]], vm_id: str) -> tuple[Move, ...]:
    response = await handle.get()[1].moves(vmId=vm_id)
    return move_list_from_reader(response.result)


async def _rollout(
    handle: CapnpHandle[tuple[ClientConnection, Any]], rollout_id: str, action: RolloutAction
) -> RolloutView:
    response = await handle.get()[1].rollout(rolloutId=rollout_id, action=action.value)
    return rollout_result_from_reader(response.result)


# ---------------------------------------------------------------- worker


class _NodeImpl(_schema.Node.Server):  # type: ignore[misc, name-defined]
    """The worker's callback capability: the master pushes through it, and
    forwards snapshot operations (``snapshots``: None on a worker that runs
    no VMs). A refused call is answered as data, like the master's own
    answers."""

    def __init__(
        self, bridge: Bridge, on_push: OnPush, worker_id: str, snapshots: SnapshotCalls | None
    ) -> None:
        self._bridge = bridge
        self._on_push = on_push
        self._worker_id = worker_id
        self._snapshots = snapshots

    async def snapshot_context(self, context: Any) -> None:
        await answer(
            "Node.snapshot",
            context,
            error_arm,
            lambda params: snapshot_request_from_reader(params.request),
            self._snapshot,
            logger=logger,
            who=f"worker {self._worker_id}",
            log_name="the worker's log",
        )

    async def listSnapshots_context(self, context: Any) -> None:
        await answer(
            "Node.listSnapshots",
            context,
            error_arm,
            self._decode_vm_id,
            self._list_snapshots,
            logger=logger,
            who=f"worker {self._worker_id}",
            log_name="the worker's log",
        )

    @staticmethod
    def _decode_vm_id(params: Any) -> str:
        vm_id: str = params.vmId
        if vm_id and (problem := check_vm_id(vm_id)) is not None:
            raise ValidationError(f"vmId: {problem}")
        return vm_id

    def _calls(self) -> SnapshotCalls:
        if self._snapshots is None:
            raise ValidationError(f"worker {self._worker_id} runs no VMs: it has no snapshots")
        return self._snapshots

    async def _snapshot(self, request: SnapshotRequest, results: Any) -> None:
        info = await self._bridge.call_trio(self._calls().snapshot, request)
        fill_snapshot_result(results.result, info)

    async def _list_snapshots(self, vm_id: str, results: Any) -> None:
        infos = await self._bridge.call_trio(self._calls().list_snapshots, vm_id)
        fill_snapshot_list(results.result, infos)

    async def push_context(self, context: Any) -> None:
        await answer(
            "Node.push",
            context,
            error_result,
            self._decode_push,
            self._push,
            logger=logger,
            who=f"worker {self._worker_id}",
            log_name="the worker's log",
        )

    async def pushChanges_context(self, context: Any) -> None:
        await answer(
            "Node.pushChanges",
            context,
            error_result,
            self._decode_push_changes,
            self._push,
            logger=logger,
            who=f"worker {self._worker_id}",
            log_name="the worker's log",
        )

    def _decode_push(self, params: Any) -> Assignment:
        value = assignment_from_reader(params.assignment)
        self._check_ours(value)
        return value

    def _decode_push_changes(self, params: Any) -> AssignmentChanges:
        value = assignment_changes_from_reader(params.changes)
        self._check_ours(value)
        return value

    def _check_ours(self, update: AssignmentUpdate) -> None:
        if update.worker_id != self._worker_id:
            raise ValidationError(
                f"pushed assignment is for worker {update.worker_id!r}, this is {self._worker_id!r}"
            )

    async def _push(self, update: AssignmentUpdate, results: Any) -> None:
        await self._bridge.call_trio(self._on_push, update)


class CapnpMasterDialer:
    """Dials the master for a worker (implements
    ``procurator.worker.link.MasterDialer``)."""

    def __init__(
        self,
        bridge: Bridge,
        address: str | Address,
        *,
        tls: TlsFiles | None = None,
        insecure: bool = False,
        snapshots: SnapshotCalls | None = None,
    ) -> None:
        """``tls``: this worker's certificate, which must name the worker id
        it registers as; ``snapshots``: what serves the master's snapshot
        calls (None: a worker without VMs refuses them). Raises
        ``PermanentError`` at once when the master is not local and there is
        no ``tls`` (nor ``insecure``), or when the TLS files cannot be
        loaded."""
        self._bridge = bridge
        self.address = _address(address)
        self._tls = _tls_for(self.address, tls, insecure, "connecting to the master at")
        self._snapshots = snapshots

    async def connect(self, info: WorkerInfo, on_push: OnPush) -> CapnpMasterSession:
        """Connect and register. Raises ``UnavailableError`` when the master
        cannot be reached, or the master's typed error if it refuses."""
        disconnected = trio.Event()
        handle = await self._bridge.run(
            _register,
            self._bridge,
            self.address,
            self._tls,
            info,
            on_push,
            disconnected,
            self._snapshots,
            what=f"registering with the master at {self.address}",
        )
        return CapnpMasterSession(self._bridge, handle, info.worker_id, disconnected)


class CapnpMasterSession:
    """One registration with the master (implements
    ``procurator.worker.link.MasterSession``)."""

    def __init__(
        self,
        bridge: Bridge,
        handle: CapnpHandle[tuple[ClientConnection, Any]],
        worker_id: str,
        disconnected: trio.Event,
    ) -> None:
        self._bridge = bridge
        self._handle = handle
        self.worker_id = worker_id
        self._disconnected = disconnected
        # What the master holds of this worker's series on this session.
        self._series = ReportedSeries(worker_id)
        # The master answered a report without takesChanges: an older one,
        # which gets every report whole in one call.
        self._whole_only = False

    @property
    def connected(self) -> bool:
        return not self._disconnected.is_set()

    async def wait_disconnected(self) -> None:
        await self._disconnected.wait()

    async def get_assignment(self, known_generation: int) -> Assignment | None:
        """The current assignment, or None when ``known_generation`` is
        still the newest."""
        return await self._bridge.run(
            _get_assignment, self._handle, known_generation, what="getAssignment"
        )

    async def report_status(self, status: WorkerStatus) -> None:
        await self._bridge.run(_report_status, self._handle, status, what="reportStatus")

    async def report_status_changes(self, changes: StatusChanges) -> None:
        await self._bridge.run(
            _report_status_changes, self._handle, changes, what="reportStatusChanges"
        )

    async def report_metrics(
        self, samples: Sequence[MetricSample], *, call_timeout: float | None = None
    ) -> None:
        """Report ``samples`` (every series the worker has now), as a change
        when the master holds this session's last report (module
        docstring). Each call the report makes (one per slice) fails with
        ``trio.TooSlowError`` past ``call_timeout`` seconds (None: never).
        Not to be called twice at once."""
        series = self._series
        report = series.report(samples)
        try:
            try:
                takes_changes = await self._send_sliced(report, call_timeout)
            except PermanentError as exc:
                if report.whole:
                    raise
                # Refused, the master kept what it had (or a change's slices
                # before this one): no base any more.
                logger.info("the master refused a metrics change (%s): reporting whole", exc)
                series.refused()
                report = series.report(samples)
                takes_changes = await self._send_sliced(report, call_timeout)
        except BaseException:
            series.refused()
            raise
        series.delivered(takes_changes=takes_changes)

    async def _send_sliced(self, report: MetricsReport, call_timeout: float | None) -> bool:
        """Send ``report`` as its bounded slices, one call each, in order;
        whether the master takes changes (module docstring)."""
        if self._whole_only:
            return await self._send_metrics(report, call_timeout)
        slices = report_slices(report)
        takes_changes = await self._send_metrics(slices[0], call_timeout)
        if not takes_changes:
            # An older master: it takes whole reports only (and applies its
            # own limits to them), so the whole report in one call, now and
            # from now on.
            self._whole_only = True
            if len(slices) > 1:
                return await self._send_metrics(report, call_timeout)
        for part in slices[1:]:
            takes_changes = await self._send_metrics(part, call_timeout)
        return takes_changes

    async def _send_metrics(self, report: MetricsReport, call_timeout: float | None) -> bool:
        with trio.fail_after(math.inf if call_timeout is None else call_timeout):
            return await self._bridge.run(
                _report_metrics, self._handle, report, what="reportMetrics"
            )

    async def report_events(self, events: Sequence[VmEvent]) -> None:
        await self._bridge.run(_report_events, self._handle, events, what="reportEvents")

    async def report_status_and_events(
        self, changes: StatusChanges, events: Sequence[VmEvent]
    ) -> PermanentError | None:
        """``report_status_changes`` then ``report_events`` in one call.
        Raises as ``report_status_changes`` would (the events were then not
        looked at; ``UnsupportedError`` from an older master, which took
        nothing); otherwise the events' refusal for good, or None (a
        temporary failure of the events raises)."""
        return await self._bridge.run(
            _report_status_and_events, self._handle, changes, events, what="reportStatusAndEvents"
        )

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._bridge.run(_close, self._handle)
        self._disconnected.set()


async def _register(
    bridge: Bridge,
    address: Address,
    tls: ssl.SSLContext | None,
    info: WorkerInfo,
    on_push: OnPush,
    disconnected: trio.Event,
    snapshots: SnapshotCalls | None,
) -> CapnpHandle[Any]:
    conn = await connect(address, lambda reason: bridge.trio_soon(disconnected.set), tls=tls)
    try:
        master = conn.bootstrap(_schema.Master)
        request = master.register_request()
        fill_worker_info(request.init("info"), info)
        request.node = _NodeImpl(bridge, on_push, info.worker_id, snapshots)
        response = await _first_answer(request.send(), tls)
        session = _ok(response.result).session
    except BaseException:
        conn.close()
        raise
    return bridge.own((conn, session), f"session of worker {info.worker_id} at {address}")


def _session(handle: CapnpHandle[tuple[ClientConnection, Any]]) -> Any:
    return handle.get()[1]


async def _get_assignment(
    handle: CapnpHandle[tuple[ClientConnection, Any]], known_generation: int
) -> Assignment | None:
    response = await _session(handle).getAssignment(knownGeneration=known_generation)
    _raise_error(response)
    if not response.changed:
        return None
    return assignment_from_reader(response.assignment)


def _raise_error(results: Any) -> None:
    """Raise the typed error of a method whose results carry an ``error``
    (set only when the call failed)."""
    if results._has("error"):
        error: ProcuratorError = error_from_reader(results.error)
        raise error


def _ok(result: Any) -> Any:
    """``result`` itself, or the typed error of its ``error`` arm raised."""
    if result.which() == "error":
        raise error_from_reader(result.error)
    return result


def _check_report(response: Any) -> None:
    _ok(response.result)


async def _report_status(
    handle: CapnpHandle[tuple[ClientConnection, Any]], status: WorkerStatus
) -> None:
    request = _session(handle).reportStatus_request()
    fill_worker_status(request.init("status"), status)
    _check_report(await request.send())


async def _report_status_changes(
    handle: CapnpHandle[tuple[ClientConnection, Any]], changes: StatusChanges
) -> None:
    request = _session(handle).reportStatusChanges_request()
    fill_status_changes(request.init("changes"), changes)
    _check_report(await request.send())


async def _report_metrics(
    handle: CapnpHandle[tuple[ClientConnection, Any]], report: MetricsReport
) -> bool:
    """Whether the master takes change reports from now on."""
    request = _session(handle).reportMetrics_request()
    fill_metrics(request.init("report"), report)
    response = await request.send()
    _check_report(response)
    return bool(response.takesChanges)


async def _report_events(
    handle: CapnpHandle[tuple[ClientConnection, Any]], events: Sequence[VmEvent]
) -> None:
    request = _session(handle).reportEvents_request()
    fill_events(request.init("events", len(events)), events)
    _check_report(await request.send())


async def _report_status_and_events(
    handle: CapnpHandle[tuple[ClientConnection, Any]],
    changes: StatusChanges,
    events: Sequence[VmEvent],
) -> PermanentError | None:
    request = _session(handle).reportStatusAndEvents_request()
    fill_status_changes(request.init("changes"), changes)
    fill_events(request.init("events", len(events)), events)
    response = await request.send()
    _check_report(response)
    try:
        _ok(response.eventsResult)
    except PermanentError as exc:
        return exc
    return None
