"""The worker daemon: its configuration and its composition.

A worker is its link to the master (``MasterLink``) plus an
``AssignmentHandler`` that turns assignments into VMs: ``run_worker(config,
dialer, handler_factory=...)`` wires the two. The ``procurator worker``
command passes ``procurator.worker.runtime.ReconcilingHandler`` (VmManager,
network, Nix). ``RecordingHandler`` runs no VM at all: it records every
assignment and reports it observed, for tests of the link and the master
that need a real worker process but no VMs.

The connection to the master is injected (``MasterDialer``): the worker
package knows no RPC library; the ``procurator worker`` command builds a
``procurator.rpc.clients.CapnpMasterDialer`` and passes it in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from procurator import __version__
from procurator.core.errors import PermanentError
from procurator.core.models import (
    Assignment,
    Capacity,
    Phase,
    VmEvent,
    VmStatus,
    WorkerInfo,
    WorkerStatus,
)
from procurator.core.validation import check_worker_id
from procurator.rpc.messages import DEFAULT_MASTER_ADDRESS, MetricSample
from procurator.worker.link import LinkSettings, MasterDialer, MasterLink

__all__ = [
    "AssignmentHandler",
    "RecordingHandler",
    "StatusPublisher",
    "WorkerConfig",
    "run_worker",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process is configured with."""

    worker_id: str
    master: str = DEFAULT_MASTER_ADDRESS  # "host:port" or "unix:/path"
    state_dir: Path = Path("/var/lib/procurator/worker")
    resync_interval: float = 30.0
    call_timeout: float = 10.0
    backoff_max: float = 30.0
    driver: str = ""
    metrics_url: str = ""
    capacity: Capacity = field(default_factory=Capacity)

    def __post_init__(self) -> None:
        if (problem := check_worker_id(self.worker_id)) is not None:
            raise PermanentError(f"worker id: {problem}")

    def worker_info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            version=__version__,
            capacity=self.capacity,
            metrics_url=self.metrics_url,
            driver=self.driver,
        )

    def link_settings(self) -> LinkSettings:
        return LinkSettings(
            resync_interval=self.resync_interval,
            call_timeout=self.call_timeout,
            backoff_max=self.backoff_max,
        )


class StatusPublisher(Protocol):
    """Where a handler reports what it observes (``MasterLink`` is one)."""

    def publish_status(self, status: WorkerStatus) -> None: ...

    def publish_events(self, events: Sequence[VmEvent]) -> None: ...

    def publish_metrics(self, samples: Sequence[MetricSample]) -> None: ...


class AssignmentHandler(Protocol):
    """The reconciler seam. ``on_assignment`` is called serially, newest
    assignment only, and should return quickly (take note, reconcile in its
    own task); ``run`` is started once before the first assignment."""

    async def on_assignment(self, assignment: Assignment) -> None: ...

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...


HandlerFactory = Callable[[WorkerConfig, StatusPublisher], AssignmentHandler]


class RecordingHandler:
    """Runs no VM: records each assignment and reports it as observed with
    every VM ``pending`` (see the module docstring)."""

    def __init__(self, config: WorkerConfig, publisher: StatusPublisher) -> None:
        self._worker_id = config.worker_id
        self._publisher = publisher
        self.assignments: list[Assignment] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def on_assignment(self, assignment: Assignment) -> None:
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


async def run_worker(
    config: WorkerConfig,
    dialer: MasterDialer,
    *,
    handler_factory: HandlerFactory,
    task_status: trio.TaskStatus[MasterLink] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the worker until cancelled. ``task_status.started`` gets the link
    (ready at once; it connects in the background)."""
    try:
        await trio.Path(config.state_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermanentError(f"worker state dir {config.state_dir}: {exc}") from exc
    handler: AssignmentHandler | None = None

    async def deliver(assignment: Assignment) -> None:
        assert handler is not None  # set before the link starts
        await handler.on_assignment(assignment)

    link = MasterLink(dialer, config.worker_info(), deliver, settings=config.link_settings())
    handler = handler_factory(config, link)
    logger.info("worker %s starting; master at %s", config.worker_id, config.master)
    async with trio.open_nursery() as nursery:
        await nursery.start(handler.run)
        await nursery.start(link.run)
        task_status.started(link)
