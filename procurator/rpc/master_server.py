"""The master's Cap'n Proto server: ``Master``, ``Control``, ``WorkerSession``.

A thin translation layer. Handlers run on the capnp thread: they convert and
validate the request there (``convert``), await the trio-side
:class:`MasterBackend` through :meth:`Bridge.call_trio` (never blocking the
capnp thread), and build the answer there.

Invariants:

- **Errors are data.** Every handler is served by ``answer.answer``: a typed
  error goes into the answer's error (arm or result) with its code, message
  and op id; a request that does not decode is ``invalid`` naming the field
  (one WARNING line); a bug is ``internal`` with a short message, its
  traceback only in the master's log. Nothing we raise reaches pycapnp,
  which would send the traceback to the client.
- One connection's garbage, disconnect or failing handler never affects
  another: each accepted stream has its own RPC system.
- **Every connection ends, and ends once.** :meth:`_Listener.end` releases a
  connection (its slot, its capabilities, its worker sessions, its socket),
  whoever notices first:

  * Cap'n Proto's ``on_disconnect`` (the peer closed, or sent garbage);
  * the supervision sweep (every ``ConnectionDeadlines.sweep_interval``):
    the socket reports a hang-up or an error (``poll`` for ``POLLRDHUP``,
    ``POLLHUP``, ``POLLERR``: the peer closed, reset, or TCP keepalive gave
    up on it), or the transport is closing;
  * its deadline: a connection with no worker registered over it and no
    call in flight is closed ``first_call`` seconds after it was accepted
    if it never started a call, else ``idle`` seconds after its last call
    ended. A half-sent message is no call, so it is held that long at most.
    A connection a worker registered over is long-lived (quiet between
    resyncs, whose interval the worker chooses): no deadline, but TCP
    keepalive (``keepalive_*``, and a user timeout as long for data left
    unacknowledged) makes a vanished peer's socket fail, which the sweep
    sees. ``procurator master`` times them by its worker lease
    (``ConnectionDeadlines.for_worker_lease``: a partitioned worker's
    connection ends within about 2/3 of a lease, so healing is not held
    up by it);
  * the master stopping, or the service closing a worker's connection.

  The sweep exists because neither of the first two signals is reliable
  alone with pycapnp 2.2: its asyncio stream keeps the transport's reading
  paused whenever Cap'n Proto is not reading, and after Cap'n Proto aborts
  a connection (garbage, a message over the limits) it never reads again, so
  asyncio never sees the peer's FIN or RST; and the first ``on_disconnect()``
  future of a connection occasionally never completes although Cap'n Proto
  has let go of the connection (a later ``on_disconnect()`` completes at
  once). Before, the master waited for that one future alone: about one
  abusive connection in 200 to 1,000 kept its slot and socket until restart
  (tests/faults/test_wire_garbage.py).
- A worker's ``Node`` capability stays on the capnp thread; the backend gets
  a :class:`RemoteNode`, which holds only handles. When a connection ends,
  the backend hears ``unregister`` for every session registered over it and
  the connection's capabilities are released.
- Calls on a ``WorkerSession`` are bound to the worker id it was registered
  with; the backend refuses reports for another worker id.
- Over TLS (``serve_master(tls=...)``) every connection has the identity of
  its client certificate (``procurator.rpc.tls``): ``register`` is answered
  ``unauthorized`` unless the certificate is that very worker's, ``control``
  unless it is a control certificate. So a worker can pull and report only
  for itself, and only operators can apply. Without TLS (loopback, unix
  socket, or ``insecure``) every caller is trusted.
- At most ``max_connections`` connections are served at once. One more is
  answered ``limitExceeded`` on whatever it calls and closed after
  ``_REFUSE_GRACE`` seconds (a bounded number of those at a time; beyond
  that, closed at once), so an overloaded master says so instead of
  dropping connections silently. A connection registers at most
  ``MAX_SESSIONS_PER_CONNECTION`` workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import select
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import capnp
import trio

from procurator.core.assignments import AssignmentChanges
from procurator.core.control import (
    ApplyRequest,
    ApplyResult,
    FleetStatus,
    VmDescription,
    WorkerEvent,
)
from procurator.core.defaults import DEFAULT_MAX_CONNECTIONS
from procurator.core.drain import (
    DEFAULT_MAX_UNAVAILABLE,
    ModeAction,
    ModeChange,
    check_max_unavailable,
)
from procurator.core.errors import (
    LimitExceededError,
    ProcuratorError,
    UnauthorizedError,
    ValidationError,
)
from procurator.core.fleetpatch import FleetPatch, PatchAnswer, PatchRequest
from procurator.core.metrics import MetricsReport
from procurator.core.models import Assignment, Fleet, VmEvent, WorkerInfo, WorkerStatus
from procurator.core.move import DEFAULT_MOVE_TIMEOUT_S, MAX_MOVE_TIMEOUT_S, Move, MoveKind
from procurator.core.rollout import RolloutAction, RolloutView
from procurator.core.snapshot import SnapshotInfo, SnapshotRequest
from procurator.core.status import StatusChanges
from procurator.core.validation import check_rollout_id, check_vm_id, check_worker_id
from procurator.logs import log_context, new_op_id
from procurator.rpc.address import Address
from procurator.rpc.answer import ErrorBuilder, answer, error_arm, error_result, refuse
from procurator.rpc.bridge import (
    TRAVERSAL_LIMIT_WORDS,
    Bridge,
    CapnpHandle,
    start_listener,
)
from procurator.rpc.convert import (
    MAX_EVENTS_PER_REPORT,
    READ_ERRORS,
    apply_request_from_reader,
    error_from_reader,
    events_from_reader,
    fill_apply_result,
    fill_assignment,
    fill_assignment_changes,
    fill_describe_result,
    fill_error,
    fill_fleet_status,
    fill_mode_change,
    fill_move_list,
    fill_move_result,
    fill_patch_answer,
    fill_rollout_result,
    fill_snapshot_list,
    fill_snapshot_request,
    fill_snapshot_result,
    fill_worker_events,
    malformed_error,
    metrics_from_reader,
    patch_request_from_reader,
    snapshot_list_from_reader,
    snapshot_request_from_reader,
    snapshot_result_from_reader,
    status_changes_from_reader,
    worker_info_from_reader,
    worker_status_from_reader,
)
from procurator.rpc.schema import load_schema
from procurator.rpc.tls import (
    PeerIdentity,
    Role,
    TlsFiles,
    authorize_control,
    authorize_register,
    peer_identity,
    require_secure,
    server_context,
)

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "MAX_SESSIONS_PER_CONNECTION",
    "ConnectionDeadlines",
    "MasterBackend",
    "RemoteNode",
    "serve_master",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_schema = load_schema()

MAX_SESSIONS_PER_CONNECTION = 8
# How long a connection over the cap is kept to hear why it is refused, and
# how many such connections may wait at once (beyond that: closed at once).
_REFUSE_GRACE = 2.0
_MAX_REFUSING = 64
# A refused connection may only ask "register" or "control": tiny messages.
_REFUSED_TRAVERSAL_LIMIT_WORDS = 64 * 1024
# Over TLS, connections per certificate identity (a worker id, a control
# name; every certificate without a usable identity counts as one): a
# stolen key cannot take every slot of the cap.
MAX_CONNECTIONS_PER_PEER = 16
# A blocking read (Control.status / describeVm with waitIndex) waits at most
# this long, whatever the client asks: a client waiting longer asks again.
MAX_WAIT_MS = 600_000

_LOG_NAME = "the master's log"


@dataclass(frozen=True, slots=True)
class ConnectionDeadlines:
    """When the master gives up on a connection (see the module docstring).
    The defaults are the ones ``schema/procurator.capnp`` promises."""

    first_call: float = 10.0
    """A connection with no worker registered over it must start its first
    call within this many seconds of being accepted (after TLS)."""
    idle: float = 60.0
    """... and, once a call ended, start another within this many seconds,
    unless one is still in flight."""
    sweep_interval: float = 1.0
    """How often connections are checked for a gone peer and deadlines."""
    keepalive_idle: int = 60
    """TCP keepalive: seconds of silence before the first probe ..."""
    keepalive_interval: int = 10
    """... seconds between probes ..."""
    keepalive_count: int = 6
    """... and unanswered probes before the socket fails: a vanished peer's
    connection ends within ``idle + interval * count`` seconds (2 minutes)."""

    @classmethod
    def for_worker_lease(cls, worker_lease: float) -> ConnectionDeadlines:
        """The defaults, with keepalive probing a silent worker soon enough
        that a partitioned worker's connection ends within about 2/3 of
        ``worker_lease`` (first probe after a third of it, three probes a
        ninth apart; whole seconds, at least 1; never later than the
        defaults). Its session ends with the connection, and the leader
        declares the worker lost one lease after that: with the defaults'
        2 minutes instead, a partition would delay healing by them, as no
        call reaches the master over a dead link and nothing else ends the
        session. A worker whose process hangs while its host answers
        keepalives keeps its session: it cannot fence, so its VMs must not
        be healed elsewhere either."""
        default = cls()
        idle = min(default.keepalive_idle, max(1, int(worker_lease / 3)))
        interval = min(default.keepalive_interval, max(1, int(worker_lease / 9)))
        return cls(keepalive_idle=idle, keepalive_interval=interval, keepalive_count=3)

    @property
    def keepalive_timeout(self) -> int:
        """Seconds of silence after which a peer is given up on."""
        return self.keepalive_idle + self.keepalive_interval * self.keepalive_count

    def __post_init__(self) -> None:
        for name in ("first_call", "idle", "sweep_interval"):
            if not getattr(self, name) > 0:
                raise ValidationError(f"{name} must be a positive number of seconds")
        for name in ("keepalive_idle", "keepalive_interval", "keepalive_count"):
            if getattr(self, name) < 1:
                raise ValidationError(f"{name} must be at least 1")


class MasterBackend(Protocol):
    """What the server needs from the master (``MasterService``)."""

    async def apply(
        self,
        fleet: Fleet,
        *,
        expected_generation: int | None = None,
        dry_run: bool = False,
        op_id: str = "",
        request_id: str = "",
        supersede: bool = False,
    ) -> ApplyResult: ...

    async def apply_patch(
        self,
        patch: FleetPatch,
        *,
        expected_generation: int | None = None,
        dry_run: bool = False,
        op_id: str = "",
        request_id: str = "",
        supersede: bool = False,
    ) -> PatchAnswer: ...

    async def fleet_status(self) -> FleetStatus: ...

    async def wait_change(self, index: int, timeout: float) -> int: ...

    async def describe_vm(self, vm_id: str, event_limit: int = 20) -> VmDescription: ...

    async def recent_events(
        self, vm_id: str = "", limit: int = 100, after_seq: int = 0
    ) -> tuple[WorkerEvent, ...]: ...

    async def snapshot(self, request: SnapshotRequest) -> SnapshotInfo: ...

    async def list_snapshots(self, vm_id: str = "") -> tuple[SnapshotInfo, ...]: ...

    async def change_worker_mode(
        self,
        worker_id: str,
        action: ModeAction,
        max_unavailable: int = DEFAULT_MAX_UNAVAILABLE,
    ) -> ModeChange: ...

    async def rollout(self, rollout_id: str, action: RolloutAction) -> RolloutView: ...

    async def move(
        self, vm_id: str, target: str, *, kind: MoveKind = ..., timeout_s: int = ...
    ) -> Move: ...

    async def moves(self, vm_id: str = "") -> tuple[Move, ...]: ...

    async def register(self, info: WorkerInfo, node: RemoteNode) -> int: ...

    async def unregister(self, token: int) -> None: ...

    async def get_assignment(
        self, token: int, known_generation: int
    ) -> tuple[Assignment, bool]: ...

    async def report_status(self, token: int, status: WorkerStatus) -> None: ...

    async def report_status_changes(self, token: int, changes: StatusChanges) -> None: ...

    async def report_metrics(self, token: int, report: MetricsReport) -> None: ...

    async def report_events(self, token: int, events: Sequence[VmEvent]) -> None: ...

    async def report_status_and_events(
        self, token: int, changes: StatusChanges, events: Sequence[VmEvent]
    ) -> ProcuratorError | None:
        """The two reports in one call: raises as ``report_status_changes``
        (the events then not looked at), answers the events' error."""
        ...


# ---------------------------------------------------------------- trio side


class RemoteNode:
    """A connected worker's ``Node``, as the trio side sees it."""

    def __init__(
        self,
        bridge: Bridge,
        node: CapnpHandle[Any],
        connection: CapnpHandle[_Connection],
        connection_id: int,
        worker_id: str,
    ) -> None:
        self._bridge = bridge
        self._node = node
        self._connection = connection
        self._connection_id = connection_id
        self.worker_id = worker_id

    @property
    def connection_id(self) -> int:
        return self._connection_id

    async def push(self, assignment: Assignment) -> None:
        """Raises the worker's typed error if it refuses the assignment,
        ``UnavailableError`` if it cannot be reached."""
        await self._bridge.run(
            _push, self._node, assignment, what=f"push to worker {self.worker_id}"
        )

    async def push_changes(self, changes: AssignmentChanges) -> None:
        """Deliver what changed since the generation the worker was last
        given; as ``push``, and ``UnsupportedError`` if the worker does not
        take changes (an older worker)."""
        await self._bridge.run(
            _push_changes, self._node, changes, what=f"push to worker {self.worker_id}"
        )

    async def snapshot(self, request: SnapshotRequest) -> SnapshotInfo:
        """The worker's answer to ``request``: raises its typed error,
        ``UnavailableError`` if it cannot be reached."""
        return await self._bridge.run(
            _node_snapshot, self._node, request, what=f"snapshot on worker {self.worker_id}"
        )

    async def list_snapshots(self, vm_id: str = "") -> tuple[SnapshotInfo, ...]:
        return await self._bridge.run(
            _node_list_snapshots,
            self._node,
            vm_id,
            what=f"list snapshots of worker {self.worker_id}",
        )

    async def aclose(self) -> None:
        await self._bridge.run(_close_connection, self._connection)

    def __repr__(self) -> str:
        return f"<RemoteNode {self.worker_id} conn #{self._connection_id}>"


async def _push(node: CapnpHandle[Any], assignment: Assignment) -> None:
    request = node.get().push_request()
    fill_assignment(request.init("assignment"), assignment)
    response = await request.send()
    if response._has("error"):
        raise error_from_reader(response.error)


async def _push_changes(node: CapnpHandle[Any], changes: AssignmentChanges) -> None:
    request = node.get().pushChanges_request()
    fill_assignment_changes(request.init("changes"), changes)
    response = await request.send()
    if response._has("error"):
        raise error_from_reader(response.error)


async def _node_snapshot(node: CapnpHandle[Any], snapshot: SnapshotRequest) -> SnapshotInfo:
    request = node.get().snapshot_request()
    fill_snapshot_request(request.init("request"), snapshot)
    response = await request.send()
    return snapshot_result_from_reader(response.result)


async def _node_list_snapshots(node: CapnpHandle[Any], vm_id: str) -> tuple[SnapshotInfo, ...]:
    response = await node.get().listSnapshots(vmId=vm_id)
    return snapshot_list_from_reader(response.result)


async def _close_connection(connection: CapnpHandle[_Connection]) -> None:
    conn = connection.release()
    if conn is not None:
        conn.listener.end(conn, "closed by the master")


async def serve_master(
    bridge: Bridge,
    backend: MasterBackend,
    address: Address,
    *,
    tls: TlsFiles | None = None,
    insecure: bool = False,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    deadlines: ConnectionDeadlines = ConnectionDeadlines(),
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ``Master`` bootstrap interface on ``address`` until
    cancelled. ``task_status.started`` gets the bound address (with the real
    port when ``address.port`` is 0).

    With ``tls`` every client must present a certificate of the fleet CA
    and is authorized by it (see the module docstring). Without it,
    ``address`` must be loopback or a unix socket unless ``insecure``
    (``procurator.rpc.tls.require_secure``); raises ``PermanentError``
    otherwise, or when the TLS files cannot be loaded. ``deadlines``: when
    connections are given up on (the defaults are the schema's promise).
    """
    if max_connections < 1:
        raise ValidationError(f"max_connections must be at least 1, not {max_connections}")
    require_secure(address, tls, insecure=insecure, what="the master listening on")
    context = server_context(tls) if tls is not None else None
    listener = await bridge.run(
        _start,
        bridge,
        backend,
        address,
        context,
        max_connections,
        deadlines,
        what=f"listening on {address}",
    )
    try:
        bound = await bridge.run(_bound_address, listener, address)
        logger.info(
            "master listening on %s (%s, at most %d connections)",
            bound,
            "mutual TLS" if context is not None else "plaintext",
            max_connections,
        )
        task_status.started(bound)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await bridge.run(_stop, listener, address)


# ---------------------------------------------------------------- capnp side


class _Connection:
    """One accepted stream, what was registered over it, and how busy it is
    (for its deadline)."""

    def __init__(
        self,
        listener: _Listener,
        connection_id: int,
        stream: Any,
        transport: asyncio.Transport,
        *,
        over_tls: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.listener = listener
        self.id = connection_id
        self.stream = stream
        self.transport = transport
        self.over_tls = over_tls
        self.server: Any = None
        self.tokens: list[int] = []
        self.handles: list[CapnpHandle[Any]] = []
        self.closed = False
        self.ended: asyncio.Future[None] = loop.create_future()
        # Who the client certificate says the peer is (None: plaintext), or
        # why it names nobody.
        self.peer: PeerIdentity | None = None
        self.peer_problem: str | None = None
        # Deadline bookkeeping (loop time).
        self.accepted_at = loop.time()
        self.calls_in_flight = 0
        self.last_call_ended: float | None = None

    def identity(self) -> PeerIdentity | None:
        """The peer's identity; raises ``UnauthorizedError`` if its
        certificate names none."""
        if self.peer_problem is not None:
            raise UnauthorizedError(self.peer_problem)
        return self.peer

    def __str__(self) -> str:
        return f"connection #{self.id}" + (f" ({self.peer})" if self.peer is not None else "")

    def call_started(self) -> None:
        self.calls_in_flight += 1

    def call_ended(self) -> None:
        self.calls_in_flight -= 1
        self.last_call_ended = asyncio.get_running_loop().time()

    def expiry(self, deadlines: ConnectionDeadlines) -> tuple[float, str] | None:
        """(loop time, why) when this connection is to be closed for being
        idle; None while a worker is registered over it or a call is in
        flight."""
        if self.tokens or self.calls_in_flight:
            return None
        if self.last_call_ended is None:
            return (
                self.accepted_at + deadlines.first_call,
                f"no call within {deadlines.first_call:g} s of connecting",
            )
        return (
            self.last_call_ended + deadlines.idle,
            f"no call for {deadlines.idle:g} s and no worker registered",
        )

    def fileno(self) -> int:
        """The socket's descriptor; -1 once it is closed."""
        sock = self.transport.get_extra_info("socket")
        return -1 if sock is None else int(sock.fileno())

    def close(self) -> None:
        """Close the RPC system and the socket (use :meth:`_Listener.end`,
        which also releases what the connection holds)."""
        if self.closed:
            return
        self.closed = True
        if self.server is not None:
            with contextlib.suppress(RuntimeError):
                self.server.close()
        if self.over_tls:
            # Not a graceful TLS close, which would wait for the peer (and,
            # when the master stops, never finish): the peer is gone, or we
            # are done with it.
            self.transport.abort()
        self.stream.close()


_HUNG_UP = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL


def _hung_up(connections: Iterable[_Connection]) -> set[int]:
    """Ids of the connections whose peer closed or reset its end, or whose
    socket failed (TCP keepalive gave up): one ``poll`` for all of them,
    which looks at the sockets without reading them (asyncio's own reading
    is paused whenever Cap'n Proto is not reading)."""
    poller = select.poll()
    ids: dict[int, int] = {}
    for conn in connections:
        fd = conn.fileno()
        if fd >= 0:
            poller.register(fd, select.POLLRDHUP)
            ids[fd] = conn.id
    return {ids[fd] for fd, events in poller.poll(0) if events & _HUNG_UP and fd in ids}


def _keep_alive(transport: asyncio.Transport, deadlines: ConnectionDeadlines) -> None:
    """Turn on TCP keepalive for a TCP connection (a no-op for unix
    sockets), so that a peer that vanished without a FIN or RST (power
    loss, a partition) makes the socket fail."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, deadlines.keepalive_idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, deadlines.keepalive_interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, deadlines.keepalive_count)
    # Keepalive probes only a connection with nothing unacknowledged: data
    # sent into a partition (an answer, a push) would be retransmitted for
    # about 15 minutes instead. The user timeout gives up on it as soon.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, deadlines.keepalive_timeout * 1000)


class _Listener:
    def __init__(
        self,
        bridge: Bridge,
        backend: MasterBackend,
        *,
        max_connections: int,
        deadlines: ConnectionDeadlines,
    ) -> None:
        self.bridge = bridge
        self.backend = backend
        self.max_connections = max_connections
        self.deadlines = deadlines
        self.server: asyncio.Server | None = None
        self.sweeper: asyncio.Task[None] | None = None
        self.connections: dict[int, _Connection] = {}
        self.refusing: set[Any] = set()  # streams over the cap, being told so
        self.refused_total = 0
        self._ids = itertools.count(1)

    async def on_stream(self, stream: Any, transport: asyncio.Transport, over_tls: bool) -> None:
        if len(self.connections) >= self.max_connections:
            await self._refuse(
                stream,
                transport,
                over_tls,
                f"the master serves at most {self.max_connections} connections at once; "
                "try again later",
            )
            return
        conn = _Connection(self, next(self._ids), stream, transport, over_tls=over_tls)
        if over_tls:
            try:
                conn.peer = peer_identity(transport.get_extra_info("peercert"))
            except UnauthorizedError as exc:
                conn.peer_problem = exc.message
            key = _peer_key(conn)
            same = sum(1 for c in self.connections.values() if _peer_key(c) == key)
            if same >= MAX_CONNECTIONS_PER_PEER:
                await self._refuse(
                    stream,
                    transport,
                    over_tls,
                    f"{key} already has {same} connections open, the most one "
                    "certificate identity may have; close some and try again",
                )
                return
        self.connections[conn.id] = conn
        logger.debug("%s accepted", conn)
        disconnected: asyncio.Future[None] | None = None
        try:
            _keep_alive(transport, self.deadlines)
            conn.server = capnp.TwoPartyServer(
                stream,
                bootstrap=_MasterImpl(self, conn),
                traversal_limit_in_words=_traversal_limit(conn),
            )
            disconnected = conn.server.on_disconnect()
            disconnected.add_done_callback(functools.partial(self._disconnected, conn))
            await conn.ended
        except Exception as exc:  # noqa: BLE001 - this connection only
            self.end(conn, f"could not be served: {exc}")
        finally:
            if disconnected is not None:
                disconnected.cancel()  # drops pycapnp's promise if it is still pending
            self.end(conn, "the master is stopping")  # cancelled: the capnp thread stops

    def _disconnected(self, conn: _Connection, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        self.end(conn, "closed by the peer" if exc is None else f"ended: {exc}")

    def end(self, conn: _Connection, why: str) -> None:
        """Release ``conn`` (idempotent; capnp thread): out of the cap, its
        capabilities dropped, its RPC system and socket closed, the backend
        told of every worker session registered over it."""
        if conn.closed:
            return
        self.connections.pop(conn.id, None)
        for handle in conn.handles:
            handle.release()
        conn.close()
        for token in conn.tokens:
            self.bridge.notify_trio(self.backend.unregister, token)
        if not conn.ended.done():
            conn.ended.set_result(None)
        logger.debug("%s closed: %s", conn, why)

    async def sweep_forever(self) -> None:
        """End connections whose peer is gone or whose deadline passed, every
        ``sweep_interval`` seconds, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.deadlines.sweep_interval)
            try:
                self.sweep(loop.time())
            except Exception:  # a sweep that fails must not end supervision
                logger.exception("the connection sweep failed")

    def sweep(self, now: float) -> None:
        connections = list(self.connections.values())
        hung_up = _hung_up(connections)
        for conn in connections:
            if conn.id in hung_up:
                self.end(conn, "the peer closed or reset its end, or stopped answering")
            elif conn.transport.is_closing():
                self.end(conn, "the connection closed")
            elif (expiry := conn.expiry(self.deadlines)) is not None and now >= expiry[0]:
                self.end(conn, expiry[1])

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await a backend method on trio without blocking the capnp thread.
        If the peer goes away meanwhile, pycapnp cancels the handler task,
        which cancels the trio task through ``call_trio``."""
        return await self.bridge.call_trio(fn, *args)

    async def _refuse(
        self, stream: Any, transport: asyncio.Transport, over_tls: bool, why: str
    ) -> None:
        """Tell a connection over a cap why, then close it."""
        self.refused_total += 1
        if self.refused_total == 1 or self.refused_total % 100 == 0:
            logger.warning(
                "refusing a connection: %s (%d connections open, %d refused so far)",
                why,
                len(self.connections),
                self.refused_total,
            )
        if len(self.refusing) >= _MAX_REFUSING:
            if over_tls:
                transport.abort()
            stream.close()
            return
        self.refusing.add(stream)
        error = LimitExceededError(why)
        server: Any = None
        try:
            server = capnp.TwoPartyServer(
                stream,
                bootstrap=_RefusingMaster(error),
                traversal_limit_in_words=_REFUSED_TRAVERSAL_LIMIT_WORDS,
            )
            # Bounded whatever pycapnp does: the grace is the most it is kept.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.on_disconnect(), _REFUSE_GRACE)
        except Exception as exc:  # noqa: BLE001 - this connection only
            logger.debug("refused connection ended: %s", exc)
        finally:
            self.refusing.discard(stream)
            if server is not None:
                with contextlib.suppress(RuntimeError):
                    server.close()
            if over_tls:
                transport.abort()
            stream.close()


def _peer_key(conn: _Connection) -> str:
    """Whose connection this is, for the per-identity cap (TLS only)."""
    return str(conn.peer) if conn.peer is not None else "a certificate without a usable identity"


def _traversal_limit(conn: _Connection) -> int:
    """The largest message this peer may send. A certificate that can do
    nothing here (no usable identity, or the master's own) is only told so:
    a registration's worth. (A worker keeps the full limit: a metrics report
    of 200,000 samples, ~25 words each, is within a factor of three of it.)"""
    if conn.over_tls and (conn.peer is None or conn.peer.role is Role.MASTER):
        return _REFUSED_TRAVERSAL_LIMIT_WORDS
    return TRAVERSAL_LIMIT_WORDS


async def _start(
    bridge: Bridge,
    backend: MasterBackend,
    address: Address,
    context: ssl.SSLContext | None,
    max_connections: int,
    deadlines: ConnectionDeadlines,
) -> CapnpHandle[Any]:
    listener = _Listener(bridge, backend, max_connections=max_connections, deadlines=deadlines)
    if address.unix_path is not None:
        _remove_stale_socket(address.unix_path)
    listener.server = await start_listener(address, listener.on_stream, tls=context)
    listener.sweeper = asyncio.get_running_loop().create_task(listener.sweep_forever())
    return bridge.own(listener, f"master listener {address}")


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ValidationError(f"cannot listen on unix:{path}: it exists and is not a socket")
    os.unlink(path)


async def _bound_address(handle: CapnpHandle[_Listener], address: Address) -> Address:
    server = handle.get().server
    if address.unix_path is not None or server is None:
        return address
    host, port = server.sockets[0].getsockname()[:2]
    return Address(host=str(host), port=int(port))


async def _stop(handle: CapnpHandle[_Listener], address: Address) -> None:
    listener = handle.release()
    if listener is None:
        return
    if listener.sweeper is not None:
        listener.sweeper.cancel()
    if listener.server is not None:
        listener.server.close()
    for conn in list(listener.connections.values()):
        listener.end(conn, "the master is stopping")
    for stream in list(listener.refusing):
        stream.close()
    if listener.server is not None:
        await listener.server.wait_closed()
    if address.unix_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.unix_path)


# ---------------------------------------------------------------- the interfaces
# Each method is a pycapnp ``<name>_context`` handler (pycapnp then leaves the
# parameters to us) served by ``_answer``: ``decode`` reads the parameters,
# ``serve`` does the work and fills the results (see procurator.rpc.answer).


async def _answer(
    conn: _Connection,
    method: str,
    context: Any,
    error_builder: ErrorBuilder,
    decode: Callable[[Any], T],
    serve: Callable[[T, Any], Awaitable[None]],
    *,
    op_id: str = "",
) -> None:
    conn.call_started()
    try:
        await answer(
            method,
            context,
            error_builder,
            decode,
            serve,
            logger=logger,
            who=conn,
            op_id=op_id,
            log_name=_LOG_NAME,
        )
    finally:
        conn.call_ended()


def _no_params(params: Any) -> None:
    return None


class _MasterImpl(_schema.Master.Server):  # type: ignore[misc, name-defined]
    def __init__(self, listener: _Listener, conn: _Connection) -> None:
        self._listener = listener
        self._conn = conn

    async def register_context(self, context: Any) -> None:
        await _answer(
            self._conn, "Master.register", context, error_arm, _decode_register, self._register
        )

    async def _register(self, request: tuple[WorkerInfo, Any], results: Any) -> None:
        listener, conn = self._listener, self._conn
        worker_info, node = request
        _admit_registration(conn, worker_info.worker_id)
        node_handle = listener.bridge.own(node, f"node of worker {worker_info.worker_id}")
        conn_handle = listener.bridge.own(conn, f"connection #{conn.id}")
        conn.handles += [node_handle, conn_handle]
        remote = RemoteNode(
            listener.bridge, node_handle, conn_handle, conn.id, worker_info.worker_id
        )
        token = await listener.call(listener.backend.register, worker_info, remote)
        if conn.closed:  # the peer left while we registered it
            listener.bridge.notify_trio(listener.backend.unregister, token)
            return
        conn.tokens.append(token)
        results.result.session = _WorkerSessionImpl(listener, conn, worker_info.worker_id, token)

    async def control_context(self, context: Any) -> None:
        await _answer(self._conn, "Master.control", context, error_arm, _no_params, self._control)

    async def _control(self, _: None, results: Any) -> None:
        authorize_control(self._conn.identity())
        results.result.control = _ControlImpl(self._listener, self._conn)


def _decode_register(params: Any) -> tuple[WorkerInfo, Any]:
    return worker_info_from_reader(params.info), params.node


def _admit_registration(conn: _Connection, worker_id: str) -> None:
    """Raise unless ``conn`` may register ``worker_id`` (its certificate,
    and the per-connection cap)."""
    authorize_register(conn.identity(), worker_id)
    if len(conn.tokens) >= MAX_SESSIONS_PER_CONNECTION:
        raise LimitExceededError(
            f"a connection may register at most {MAX_SESSIONS_PER_CONNECTION} times; open a new one"
        )


class _RefusingMaster(_schema.Master.Server):  # type: ignore[misc, name-defined]
    """The bootstrap of a connection over the cap: every answer is ``error``
    (the parameters are not even read)."""

    def __init__(self, error: ProcuratorError) -> None:
        self._error = error

    async def register_context(self, context: Any) -> None:
        fill_error(error_arm(context.results), self._error)

    async def control_context(self, context: Any) -> None:
        fill_error(error_arm(context.results), self._error)


class _WorkerSessionImpl(_schema.WorkerSession.Server):  # type: ignore[misc, name-defined]
    def __init__(self, listener: _Listener, conn: _Connection, worker_id: str, token: int) -> None:
        self._listener = listener
        self._conn = conn
        self._worker_id = worker_id
        self._token = token

    async def getAssignment_context(self, context: Any) -> None:
        await _answer(
            self._conn,
            "WorkerSession.getAssignment",
            context,
            error_result,
            _decode_known_generation,
            self._get_assignment,
        )

    async def _get_assignment(self, known_generation: int, results: Any) -> None:
        listener = self._listener
        assignment, changed = await listener.call(
            listener.backend.get_assignment, self._token, known_generation
        )
        fill_assignment(results.init("assignment"), assignment)
        results.changed = changed

    async def reportStatus_context(self, context: Any) -> None:
        await self._report(
            "WorkerSession.reportStatus",
            context,
            lambda params: worker_status_from_reader(params.status),
            self._listener.backend.report_status,
        )

    async def reportStatusChanges_context(self, context: Any) -> None:
        await self._report(
            "WorkerSession.reportStatusChanges",
            context,
            lambda params: status_changes_from_reader(params.changes),
            self._listener.backend.report_status_changes,
        )

    async def reportMetrics_context(self, context: Any) -> None:
        async def serve(report: MetricsReport, results: Any) -> None:
            await self._listener.call(self._listener.backend.report_metrics, self._token, report)
            results.result.ok = None
            # This master applies changes against the session's last report
            # (an older one leaves it false: its worker keeps reporting whole).
            results.takesChanges = True

        await _answer(
            self._conn,
            "WorkerSession.reportMetrics",
            context,
            error_arm,
            lambda params: metrics_from_reader(params.report),
            serve,
        )

    async def reportEvents_context(self, context: Any) -> None:
        await self._report(
            "WorkerSession.reportEvents",
            context,
            lambda params: events_from_reader(params.events),
            self._listener.backend.report_events,
        )

    async def reportStatusAndEvents_context(self, context: Any) -> None:
        async def serve(request: tuple[StatusChanges, _Events], results: Any) -> None:
            changes, events = request
            unreadable = events if isinstance(events, _Unreadable) else None
            listener = self._listener
            refused = await listener.call(
                listener.backend.report_status_and_events,
                self._token,
                changes,
                () if isinstance(events, _Unreadable) else events,
            )
            results.result.ok = None
            if unreadable is not None:
                refused = unreadable.error  # none stored; the status taken all the same
            if refused is None:
                results.eventsResult.ok = None
            else:
                refuse(
                    results.eventsResult.init("error"),
                    refused,
                    "reportStatusAndEvents's events",
                    logger=logger,
                    who=self._conn,
                    malformed=unreadable is not None and unreadable.malformed,
                )

        await _answer(
            self._conn,
            "WorkerSession.reportStatusAndEvents",
            context,
            error_arm,
            _decode_status_and_events,
            serve,
        )

    async def _report(
        self,
        method: str,
        context: Any,
        decode: Callable[[Any], T],
        report: Callable[[int, T], Awaitable[None]],
    ) -> None:
        async def serve(value: T, results: Any) -> None:
            await self._listener.call(report, self._token, value)
            results.result.ok = None

        await _answer(self._conn, method, context, error_arm, decode, serve)


@dataclass(frozen=True, slots=True)
class _Unreadable:
    """Why a combined report's events cannot be taken as sent; ``malformed``:
    they do not decode (``convert.malformed_error``), else they break a rule."""

    error: ProcuratorError
    malformed: bool


_Events = tuple[VmEvent, ...] | _Unreadable


def _decode_status_and_events(params: Any) -> tuple[StatusChanges, _Events]:
    """The status changes (raising: the call's answer) and the events, or
    why they cannot be read (their own answer: one bad event costs the
    events, not the status)."""
    changes = status_changes_from_reader(params.changes)
    try:
        return changes, events_from_reader(params.events)
    except READ_ERRORS as exc:
        return changes, _Unreadable(malformed_error(params, exc), malformed=True)
    except ProcuratorError as exc:
        return changes, _Unreadable(exc, malformed=False)


def _decode_known_generation(params: Any) -> int:
    return int(params.knownGeneration)


@dataclass(frozen=True, slots=True)
class _Wait:
    """A blocking read's parameters: wait while the change index is
    ``index``, at most ``ms`` milliseconds (see ``Control.status``)."""

    index: int
    ms: int


def _decode_wait(params: Any) -> _Wait:
    return _Wait(int(params.waitIndex), int(params.waitMs))


@dataclass(frozen=True, slots=True)
class _EventsRequest:
    vm_id: str
    limit: int
    after_seq: int


def _decode_events(params: Any) -> _EventsRequest:
    vm_id: str = params.vmId
    _check_vm_id_param(vm_id)
    limit = min(int(params.limit) or 100, MAX_EVENTS_PER_REPORT)
    return _EventsRequest(vm_id, limit, int(params.afterSeq))


@dataclass(frozen=True, slots=True)
class _DescribeRequest:
    vm_id: str
    event_limit: int
    wait: _Wait


def _decode_describe(params: Any) -> _DescribeRequest:
    vm_id: str = params.vmId
    _check_vm_id_param(vm_id, required=True)
    return _DescribeRequest(
        vm_id, min(int(params.eventLimit) or 20, MAX_EVENTS_PER_REPORT), _decode_wait(params)
    )


class _ControlImpl(_schema.Control.Server):  # type: ignore[misc, name-defined]
    def __init__(self, listener: _Listener, conn: _Connection) -> None:
        self._listener = listener
        self._conn = conn

    async def apply_context(self, context: Any) -> None:
        # The operation begins here, so that even a fleet refused while it is
        # read from the wire is answered (and logged) with its op id.
        op_id = new_op_id()
        with log_context(op_id=op_id):
            await _answer(
                self._conn,
                "Control.apply",
                context,
                error_arm,
                apply_request_from_reader,
                functools.partial(self._apply, op_id),
                op_id=op_id,
            )

    async def _apply(self, op_id: str, request: ApplyRequest, results: Any) -> None:
        listener = self._listener
        outcome = await listener.call(_apply, listener.backend, request, op_id)
        fill_apply_result(results.result, outcome)

    async def applyPatch_context(self, context: Any) -> None:
        op_id = new_op_id()
        with log_context(op_id=op_id):
            await _answer(
                self._conn,
                "Control.applyPatch",
                context,
                error_arm,
                patch_request_from_reader,
                functools.partial(self._apply_patch, op_id),
                op_id=op_id,
            )

    async def _apply_patch(self, op_id: str, request: PatchRequest, results: Any) -> None:
        listener = self._listener
        answer = await listener.call(_apply_patch, listener.backend, request, op_id)
        fill_patch_answer(results, answer)

    async def status_context(self, context: Any) -> None:
        await _answer(
            self._conn, "Control.status", context, error_result, _decode_wait, self._status
        )

    async def _status(self, wait: _Wait, results: Any) -> None:
        listener = self._listener
        value = await listener.call(
            _after_change, listener.backend, wait, listener.backend.fleet_status
        )
        fill_fleet_status(results.init("status"), value)

    async def events_context(self, context: Any) -> None:
        await _answer(
            self._conn, "Control.events", context, error_result, _decode_events, self._events
        )

    async def _events(self, request: _EventsRequest, results: Any) -> None:
        listener = self._listener
        if request.after_seq:
            values = await listener.call(
                listener.backend.recent_events, request.vm_id, request.limit, request.after_seq
            )
        else:
            values = await listener.call(
                listener.backend.recent_events, request.vm_id, request.limit
            )
        fill_worker_events(results.init("events", len(values)), values)

    async def describeVm_context(self, context: Any) -> None:
        await _answer(
            self._conn,
            "Control.describeVm",
            context,
            error_arm,
            _decode_describe,
            self._describe_vm,
        )

    async def _describe_vm(self, request: _DescribeRequest, results: Any) -> None:
        listener = self._listener
        value = await listener.call(
            _after_change,
            listener.backend,
            request.wait,
            listener.backend.describe_vm,
            request.vm_id,
            request.event_limit,
        )
        fill_describe_result(results.result, value)

    async def snapshot_context(self, context: Any) -> None:
        # An operation of its own, as an apply is: the worker's logs, its
        # events and the answer carry this op id.
        op_id = new_op_id()
        with log_context(op_id=op_id):
            await _answer(
                self._conn,
                "Control.snapshot",
                context,
                error_arm,
                lambda params: dataclasses.replace(
                    snapshot_request_from_reader(params.request), op_id=op_id
                ),
                self._snapshot,
                op_id=op_id,
            )

    async def _snapshot(self, request: SnapshotRequest, results: Any) -> None:
        listener = self._listener
        info = await listener.call(listener.backend.snapshot, request)
        fill_snapshot_result(results.result, info)

    async def listSnapshots_context(self, context: Any) -> None:
        await _answer(
            self._conn,
            "Control.listSnapshots",
            context,
            error_arm,
            _decode_vm_id,
            self._list_snapshots,
        )

    async def _list_snapshots(self, vm_id: str, results: Any) -> None:
        listener = self._listener
        infos = await listener.call(listener.backend.list_snapshots, vm_id)
        fill_snapshot_list(results.result, infos)

    async def changeWorkerMode_context(self, context: Any) -> None:
        await _answer(
            self._conn,
            "Control.changeWorkerMode",
            context,
            error_arm,
            _decode_mode_request,
            self._change_worker_mode,
        )

    async def _change_worker_mode(self, request: tuple[str, ModeAction, int], results: Any) -> None:
        listener = self._listener
        change = await listener.call(listener.backend.change_worker_mode, *request)
        fill_mode_change(results.result, change)

    async def rollout_context(self, context: Any) -> None:
        await _answer(
            self._conn,
            "Control.rollout",
            context,
            error_arm,
            _decode_rollout_request,
            self._rollout,
        )

    async def _rollout(self, request: tuple[str, RolloutAction], results: Any) -> None:
        listener = self._listener
        value = await listener.call(listener.backend.rollout, *request)
        fill_rollout_result(results.result, value)

    async def move_context(self, context: Any) -> None:
        await _answer(
            self._conn, "Control.move", context, error_arm, _decode_move_request, self._move
        )

    async def _move(self, request: tuple[str, str, MoveKind, int], results: Any) -> None:
        listener = self._listener
        vm_id, target, kind, timeout_s = request
        move = await listener.call(
            functools.partial(listener.backend.move, kind=kind, timeout_s=timeout_s),
            vm_id,
            target,
        )
        fill_move_result(results.result, move)

    async def moves_context(self, context: Any) -> None:
        await _answer(self._conn, "Control.moves", context, error_arm, _decode_vm_id, self._moves)

    async def _moves(self, vm_id: str, results: Any) -> None:
        listener = self._listener
        moves = await listener.call(listener.backend.moves, vm_id)
        fill_move_list(results.result, moves)


def _decode_move_request(params: Any) -> tuple[str, str, MoveKind, int]:
    vm_id: str = params.vmId
    _check_vm_id_param(vm_id, required=True)
    target: str = params.target
    if (problem := check_worker_id(target)) is not None:
        raise ValidationError(f"target: {problem}")
    timeout_s = params.timeoutS or DEFAULT_MOVE_TIMEOUT_S
    if timeout_s > MAX_MOVE_TIMEOUT_S:
        raise ValidationError(f"timeoutS: at most {MAX_MOVE_TIMEOUT_S} s, not {timeout_s}")
    return vm_id, target, MoveKind.LIVE if params.live else MoveKind.COLD, timeout_s


def _decode_rollout_request(params: Any) -> tuple[str, RolloutAction]:
    rollout_id: str = params.rolloutId
    if (problem := check_rollout_id(rollout_id)) is not None:
        raise ValidationError(f"rolloutId: {problem}")
    try:
        action = RolloutAction(params.action)
    except ValueError:
        choices = ", ".join(a.value for a in RolloutAction)
        raise ValidationError(
            f"action: must be one of {choices}, not {params.action[:32]!r}"
        ) from None
    return rollout_id, action


def _decode_mode_request(params: Any) -> tuple[str, ModeAction, int]:
    worker_id: str = params.workerId
    if (problem := check_worker_id(worker_id)) is not None:
        raise ValidationError(f"workerId: {problem}")
    try:
        action = ModeAction(params.action)
    except ValueError:
        raise ValidationError(
            f"action: must be cordon, uncordon or drain, not {params.action[:32]!r}"
        ) from None
    bound = params.maxUnavailable or DEFAULT_MAX_UNAVAILABLE
    if action is ModeAction.DRAIN and (problem := check_max_unavailable(bound)) is not None:
        raise ValidationError(f"maxUnavailable: {problem}")
    return worker_id, action, bound


def _decode_vm_id(params: Any) -> str:
    vm_id: str = params.vmId
    _check_vm_id_param(vm_id)
    return vm_id


def _check_vm_id_param(vm_id: str, *, required: bool = False) -> None:
    if required and not vm_id:
        raise ValidationError("vmId: a VM id is required")
    if vm_id and (problem := check_vm_id(vm_id)) is not None:
        raise ValidationError(f"vmId: {problem}")


async def _after_change(
    backend: MasterBackend,
    wait: _Wait,
    fn: Callable[..., Awaitable[T]],
    *args: Any,
) -> T:
    """``await fn(*args)``, after waiting for the change index to leave
    ``wait.index`` when both it and ``wait.ms`` are non-zero. One trio task
    for both, so the answer reads the state right after the change."""
    if wait.index and wait.ms:
        await backend.wait_change(wait.index, min(wait.ms, MAX_WAIT_MS) / 1000)
    return await fn(*args)


async def _apply_patch(backend: MasterBackend, request: PatchRequest, op_id: str) -> PatchAnswer:
    with log_context(op_id=op_id):
        return await backend.apply_patch(
            request.patch,
            expected_generation=request.expected_generation,
            dry_run=request.dry_run,
            op_id=op_id,
            request_id=request.request_id,
            supersede=request.supersede,
        )


async def _apply(backend: MasterBackend, request: ApplyRequest, op_id: str) -> ApplyResult:
    # Runs as a trio task: the op id must be set in its own context.
    with log_context(op_id=op_id):
        return await backend.apply(
            request.fleet,
            expected_generation=request.expected_generation,
            dry_run=request.dry_run,
            op_id=op_id,
            request_id=request.request_id,
            supersede=request.supersede,
        )
