"""The master's Cap'n Proto server: ``Master``, ``Control``, ``WorkerSession``.

A thin translation layer. Handlers run on the capnp thread: they convert and
validate the request there (``convert``), await the trio-side
:class:`MasterBackend` through :meth:`Bridge.call_trio` (never blocking the
capnp thread), and build the answer there.

Invariants:

- One connection's garbage, disconnect or failing handler never affects
  another: each accepted stream has its own RPC system, and every handler
  catches what it raises (typed errors go into the answer's ``error`` arm;
  a bug is logged with its traceback and answered as ``internal``).
- A worker's ``Node`` capability stays on the capnp thread; the backend gets
  a :class:`RemoteNode`, which holds only handles. When a connection ends,
  the backend hears ``unregister`` for every session registered over it and
  the connection's capabilities are released.
- Calls on a ``WorkerSession`` are bound to the worker id it was registered
  with; the backend refuses reports for another worker id.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, Protocol, TypeVar

import capnp
import trio

from procurator.core.errors import ProcuratorError, ValidationError
from procurator.core.models import Assignment, Fleet, VmEvent, WorkerInfo, WorkerStatus
from procurator.core.validation import check_vm_id
from procurator.rpc.bridge import (
    TRAVERSAL_LIMIT_WORDS,
    Bridge,
    CapnpHandle,
    start_listener,
)
from procurator.rpc.convert import (
    MAX_EVENTS_PER_REPORT,
    events_from_reader,
    fill_apply_result,
    fill_assignment,
    fill_error,
    fill_fleet_status,
    fill_worker_events,
    fleet_from_reader,
    metrics_from_reader,
    worker_info_from_reader,
    worker_status_from_reader,
)
from procurator.rpc.messages import (
    Address,
    ApplyResult,
    FleetStatus,
    MetricSample,
    WorkerEvent,
)
from procurator.rpc.schema import load_schema

__all__ = ["MasterBackend", "RemoteNode", "serve_master"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_schema = load_schema()


class MasterBackend(Protocol):
    """What the server needs from the master (``MasterService``)."""

    async def apply(
        self, fleet: Fleet, *, expected_generation: int | None = None, dry_run: bool = False
    ) -> ApplyResult: ...

    async def fleet_status(self) -> FleetStatus: ...

    async def recent_events(self, vm_id: str = "", limit: int = 100) -> tuple[WorkerEvent, ...]: ...

    async def register(self, info: WorkerInfo, node: RemoteNode) -> int: ...

    async def unregister(self, token: int) -> None: ...

    async def get_assignment(
        self, token: int, known_generation: int
    ) -> tuple[Assignment, bool]: ...

    async def report_status(self, token: int, status: WorkerStatus) -> None: ...

    async def report_metrics(
        self, token: int, worker_id: str, samples: tuple[MetricSample, ...]
    ) -> None: ...

    async def report_events(self, token: int, events: Sequence[VmEvent]) -> None: ...


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
        await self._bridge.run(
            _push, self._node, assignment, what=f"push to worker {self.worker_id}"
        )

    async def aclose(self) -> None:
        await self._bridge.run(_close_connection, self._connection)

    def __repr__(self) -> str:
        return f"<RemoteNode {self.worker_id} conn #{self._connection_id}>"


async def _push(node: CapnpHandle[Any], assignment: Assignment) -> None:
    request = node.get().push_request()
    fill_assignment(request.init("assignment"), assignment)
    await request.send()


async def _close_connection(connection: CapnpHandle[_Connection]) -> None:
    conn = connection.release()
    if conn is not None:
        conn.close()


async def serve_master(
    bridge: Bridge,
    backend: MasterBackend,
    address: Address,
    *,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ``Master`` bootstrap interface on ``address`` until
    cancelled. ``task_status.started`` gets the bound address (with the real
    port when ``address.port`` is 0)."""
    listener = await bridge.run(_start, bridge, backend, address, what=f"listening on {address}")
    try:
        bound = await bridge.run(_bound_address, listener, address)
        logger.info("master listening on %s", bound)
        task_status.started(bound)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await bridge.run(_stop, listener, address)


# ---------------------------------------------------------------- capnp side


class _Connection:
    """One accepted stream and what was registered over it."""

    def __init__(self, connection_id: int, stream: Any) -> None:
        self.id = connection_id
        self.stream = stream
        self.server: Any = None
        self.tokens: list[int] = []
        self.handles: list[CapnpHandle[Any]] = []
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.server is not None:
            with contextlib.suppress(RuntimeError):
                self.server.close()
        self.stream.close()


class _Listener:
    def __init__(self, bridge: Bridge, backend: MasterBackend) -> None:
        self.bridge = bridge
        self.backend = backend
        self.server: asyncio.Server | None = None
        self.connections: dict[int, _Connection] = {}
        self._ids = itertools.count(1)

    async def on_stream(self, stream: Any) -> None:
        conn = _Connection(next(self._ids), stream)
        self.connections[conn.id] = conn
        logger.debug("connection #%d accepted", conn.id)
        try:
            conn.server = capnp.TwoPartyServer(
                stream,
                bootstrap=_MasterImpl(self, conn),
                traversal_limit_in_words=TRAVERSAL_LIMIT_WORDS,
            )
            await conn.server.on_disconnect()
            logger.debug("connection #%d closed by the peer", conn.id)
        except Exception as exc:  # noqa: BLE001 - garbage, resets: this connection only
            logger.debug("connection #%d ended: %s", conn.id, exc)
        finally:
            self.connections.pop(conn.id, None)
            for handle in conn.handles:
                handle.release()
            conn.close()
            for token in conn.tokens:
                self.bridge.notify_trio(self.backend.unregister, token)


async def _start(bridge: Bridge, backend: MasterBackend, address: Address) -> CapnpHandle[Any]:
    listener = _Listener(bridge, backend)
    if address.unix_path is not None:
        _remove_stale_socket(address.unix_path)
    listener.server = await start_listener(address, listener.on_stream)
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
    if listener.server is not None:
        listener.server.close()
    for conn in list(listener.connections.values()):
        conn.close()
    if listener.server is not None:
        await listener.server.wait_closed()
    if address.unix_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.unix_path)


async def _backend_call(listener: _Listener, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Await a backend method on trio without blocking the capnp thread. If
    the peer goes away meanwhile, pycapnp cancels the handler task, which
    cancels the trio task through ``call_trio``."""
    return await listener.bridge.call_trio(fn, *args)


def _log_bug(method: str, exc: Exception) -> ProcuratorError:
    logger.error("%s failed unexpectedly", method, exc_info=exc)
    return ProcuratorError(f"{method}: internal error ({type(exc).__name__}); see the master's log")


def _raise_for_wire(method: str, exc: Exception) -> NoReturn:
    """For methods whose answer has no error arm: raise what the client will
    see as a remote exception whose last line is ``code: message``."""
    error = exc if isinstance(exc, ProcuratorError) else _log_bug(method, exc)
    raise _WireError(f"{error.code}: {error}") from None


class _WireError(Exception):
    pass


class _MasterImpl(_schema.Master.Server):  # type: ignore[misc, name-defined]
    def __init__(self, listener: _Listener, conn: _Connection) -> None:
        self._listener = listener
        self._conn = conn

    async def register(self, info: Any, node: Any, _context: Any, **_: Any) -> None:
        result = _context.results.result
        listener, conn = self._listener, self._conn
        try:
            worker_info = worker_info_from_reader(info)
            node_handle = listener.bridge.own(node, f"node of worker {worker_info.worker_id}")
            conn_handle = listener.bridge.own(conn, f"connection #{conn.id}")
            conn.handles += [node_handle, conn_handle]
            remote = RemoteNode(
                listener.bridge, node_handle, conn_handle, conn.id, worker_info.worker_id
            )
            token = await _backend_call(listener, listener.backend.register, worker_info, remote)
            if conn.closed:  # the peer left while we registered it
                listener.bridge.notify_trio(listener.backend.unregister, token)
                return
            conn.tokens.append(token)
            result.session = _WorkerSessionImpl(listener, worker_info.worker_id, token)
        except ProcuratorError as exc:
            fill_error(result.init("error"), exc)
        except Exception as exc:  # noqa: BLE001 - a handler must answer
            fill_error(result.init("error"), _log_bug("Master.register", exc))

    async def control(self, _context: Any, **_: Any) -> None:
        _context.results.result.control = _ControlImpl(self._listener)


class _WorkerSessionImpl(_schema.WorkerSession.Server):  # type: ignore[misc, name-defined]
    def __init__(self, listener: _Listener, worker_id: str, token: int) -> None:
        self._listener = listener
        self._worker_id = worker_id
        self._token = token

    async def getAssignment(self, knownGeneration: int, _context: Any, **_: Any) -> None:
        listener = self._listener
        try:
            assignment, changed = await _backend_call(
                listener, listener.backend.get_assignment, self._token, knownGeneration
            )
        except Exception as exc:  # noqa: BLE001 - a handler must answer
            _raise_for_wire("WorkerSession.getAssignment", exc)
        results = _context.results
        fill_assignment(results.init("assignment"), assignment)
        results.changed = changed

    async def _report(
        self, method: str, _context: Any, call: Callable[[], Awaitable[None]]
    ) -> None:
        result = _context.results.result
        try:
            await call()
        except ProcuratorError as exc:
            fill_error(result.init("error"), exc)
        except Exception as exc:  # noqa: BLE001 - a handler must answer
            fill_error(result.init("error"), _log_bug(method, exc))
        else:
            result.ok = None

    async def reportStatus(self, status: Any, _context: Any, **_: Any) -> None:
        listener = self._listener

        async def call() -> None:
            value = worker_status_from_reader(status)
            await _backend_call(listener, listener.backend.report_status, self._token, value)

        await self._report("WorkerSession.reportStatus", _context, call)

    async def reportMetrics(self, report: Any, _context: Any, **_: Any) -> None:
        listener = self._listener

        async def call() -> None:
            worker_id, samples = metrics_from_reader(report)
            await _backend_call(
                listener, listener.backend.report_metrics, self._token, worker_id, samples
            )

        await self._report("WorkerSession.reportMetrics", _context, call)

    async def reportEvents(self, events: Any, _context: Any, **_: Any) -> None:
        listener = self._listener

        async def call() -> None:
            values = events_from_reader(events)
            await _backend_call(listener, listener.backend.report_events, self._token, values)

        await self._report("WorkerSession.reportEvents", _context, call)


class _ControlImpl(_schema.Control.Server):  # type: ignore[misc, name-defined]
    def __init__(self, listener: _Listener) -> None:
        self._listener = listener

    async def apply(
        self,
        fleet: Any,
        expected: Any,
        dryRun: bool,
        _context: Any,
        **_: Any,
    ) -> None:
        listener = self._listener
        result = _context.results.result
        try:
            value = fleet_from_reader(fleet)
            expected_generation = (
                int(expected.generation) if expected.which() == "generation" else None
            )
            outcome = await _backend_call(
                listener, _apply, listener.backend, value, expected_generation, bool(dryRun)
            )
            fill_apply_result(result, outcome)
        except ProcuratorError as exc:
            fill_error(result.init("error"), exc)
        except Exception as exc:  # noqa: BLE001 - a handler must answer
            fill_error(result.init("error"), _log_bug("Control.apply", exc))

    async def status(self, _context: Any, **_: Any) -> None:
        listener = self._listener
        try:
            value = await _backend_call(listener, listener.backend.fleet_status)
        except Exception as exc:  # noqa: BLE001 - a handler must answer
            _raise_for_wire("Control.status", exc)
        fill_fleet_status(_context.results.init("status"), value)

    async def events(self, vmId: str, limit: int, _context: Any, **_: Any) -> None:
        listener = self._listener
        try:
            _check_vm_id_param(vmId)
            count = min(int(limit) or 100, MAX_EVENTS_PER_REPORT)
            values = await _backend_call(listener, listener.backend.recent_events, vmId, count)
        except Exception as exc:  # noqa: BLE001 - a handler must answer
            _raise_for_wire("Control.events", exc)
        fill_worker_events(_context.results.init("events", len(values)), values)


def _check_vm_id_param(vm_id: str) -> None:
    if vm_id and (problem := check_vm_id(vm_id)) is not None:
        raise ValidationError(f"vmId: {problem}")


async def _apply(
    backend: MasterBackend, fleet: Fleet, expected_generation: int | None, dry_run: bool
) -> ApplyResult:
    return await backend.apply(fleet, expected_generation=expected_generation, dry_run=dry_run)
