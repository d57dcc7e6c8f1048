"""The worker daemon: its link to the master and what turns assignments
into VMs.

A worker is its link to the master (``MasterLink``) plus an
``AssignmentHandler`` that turns assignments into VMs: ``run_worker(dialer,
info, ..., handler_factory=...)`` wires the two. The composition root
(``procurator.app.worker``) passes ``procurator.worker.runtime.
ReconcilingHandler`` (VmManager, network, Nix). ``RecordingHandler`` runs
no VM at all: it records every assignment and reports it observed, for
tests of the link and the master that need a real worker but no VMs.

The connection to the master is injected (``MasterDialer``): the worker
package knows no RPC library; the composition root builds a
``procurator.rpc.clients.CapnpMasterDialer`` and passes it in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import trio

from procurator.core.assignments import AssignmentUpdate, apply_assignment_changes
from procurator.core.errors import PermanentError
from procurator.core.metrics import MetricSample
from procurator.core.models import (
    Assignment,
    Phase,
    PreparedImage,
    TransferProgress,
    VmEvent,
    VmStatus,
    WorkerInfo,
    WorkerStatus,
)
from procurator.core.status import StatusChanges
from procurator.durable import make_dirs
from procurator.worker.link import LinkSettings, MasterDialer, MasterLink

__all__ = [
    "AssignmentHandler",
    "HandlerFactory",
    "RecordingHandler",
    "StatusPublisher",
    "run_worker",
]


class StatusPublisher(Protocol):
    """Where a handler reports what it observes (``MasterLink`` is one):
    its whole status, or what changed in it since the last publication, and
    its progress on the images its assignment asks it to prepare."""

    def publish_status(self, status: WorkerStatus) -> None: ...

    def publish_status_changes(self, changes: StatusChanges) -> None: ...

    def publish_prepared(self, prepared: tuple[PreparedImage, ...]) -> None: ...

    def publish_transfers(self, transfers: tuple[TransferProgress, ...]) -> None: ...

    def publish_events(self, events: Sequence[VmEvent]) -> None: ...

    def publish_metrics(self, samples: Sequence[MetricSample]) -> None: ...


class AssignmentHandler(Protocol):
    """The reconciler seam. ``on_assignment`` is called serially with each
    update (a whole assignment, or the changes to the one before) and
    should return quickly (take note, reconcile in its own task); it
    answers False for changes that do not apply to the assignment it holds
    (the link then fetches the whole one). ``run`` is started once before
    the first assignment. ``on_fence(True, seconds)``: no master answered
    for that long, fence (``procurator.core.fence``); ``on_fence(False,
    ...)``: the fence ends, right after the master's whole assignment was
    handed over (serially with ``on_assignment``)."""

    async def on_assignment(self, update: AssignmentUpdate) -> bool: ...

    async def on_fence(self, fenced: bool, silent_for: float) -> None: ...

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...


# Makes the handler once the link (its publisher) exists.
HandlerFactory = Callable[[StatusPublisher], AssignmentHandler]


class RecordingHandler:
    """Runs no VM: records each assignment and reports it as observed with
    every VM ``pending`` (see the module docstring)."""

    def __init__(self, worker_id: str, publisher: StatusPublisher) -> None:
        self._worker_id = worker_id
        self._publisher = publisher
        self.assignments: list[Assignment] = []
        self.fences: list[bool] = []  # each on_fence, in order

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def on_fence(self, fenced: bool, silent_for: float) -> None:
        self.fences.append(fenced)

    async def on_assignment(self, update: AssignmentUpdate) -> bool:
        if isinstance(update, Assignment):
            assignment = update
        elif self.assignments and self.assignments[-1].generation == update.base_generation:
            assignment = apply_assignment_changes(self.assignments[-1], update)
        else:
            return False
        self.assignments.append(assignment)
        self._publisher.publish_status(
            WorkerStatus(
                worker_id=self._worker_id,
                observed_generation=assignment.generation,
                vms=tuple(
                    VmStatus(id=vm.id, phase=Phase.PENDING, op_id=assignment.op_id)
                    for vm in assignment.vms
                ),
            )
        )
        return True


async def run_worker(
    dialer: MasterDialer,
    info: WorkerInfo,
    *,
    state_dir: Path,
    settings: LinkSettings,
    handler_factory: HandlerFactory,
    task_status: trio.TaskStatus[MasterLink] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the worker until cancelled: it registers with ``info`` through
    ``dialer`` and keeps its state in ``state_dir`` (made when missing).
    ``task_status.started`` gets the link (ready at once; it connects in
    the background)."""
    try:
        # Durably: every VM's record lives under it (procurator.durable).
        await trio.to_thread.run_sync(make_dirs, Path(state_dir))
    except OSError as exc:
        raise PermanentError(f"worker state dir {state_dir}: {exc}") from exc
    handler: AssignmentHandler | None = None

    async def deliver(update: AssignmentUpdate) -> bool:
        assert handler is not None  # set before the link starts
        return await handler.on_assignment(update)

    async def fence(fenced: bool, silent_for: float) -> None:
        assert handler is not None
        await handler.on_fence(fenced, silent_for)

    link = MasterLink(dialer, info, deliver, settings=settings, on_fence=fence)
    handler = handler_factory(link)
    async with trio.open_nursery() as nursery:
        await nursery.start(handler.run)
        await nursery.start(link.run)
        task_status.started(link)
