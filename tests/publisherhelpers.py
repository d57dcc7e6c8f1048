"""A recording stand-in for the worker's publisher port (what
``ReconcilingHandler`` publishes to the master link), for tests that run a
worker in process."""

from __future__ import annotations

from collections.abc import Sequence

from procurator.core.metrics import MetricSample
from procurator.core.models import PreparedImage, TransferProgress, VmEvent, WorkerStatus
from procurator.core.status import StatusChanges


class RecordingPublisher:
    """Records the VM ids any status or status change names (``named``),
    every event (``events``) and each events call's batch
    (``event_calls``); ignores the rest."""

    def __init__(self) -> None:
        self.named: set[str] = set()
        self.events: list[VmEvent] = []
        self.event_calls: list[list[VmEvent]] = []

    def publish_status(self, status: WorkerStatus) -> None:
        self.named |= {vm.id for vm in status.vms}

    def publish_status_changes(self, changes: StatusChanges) -> None:
        self.named |= {vm.id for vm in changes.changed} | set(changes.removed)

    def publish_prepared(self, prepared: tuple[PreparedImage, ...]) -> None:
        pass

    def publish_transfers(self, transfers: tuple[TransferProgress, ...]) -> None:
        pass

    def publish_events(self, events: Sequence[VmEvent]) -> None:
        self.events.extend(events)
        self.event_calls.append(list(events))

    def publish_metrics(self, samples: Sequence[MetricSample]) -> None:
        pass
