"""A VM held incoming for a live move (its incoming VMM waiting for the
source's state) in the worker's exporter: no VM of this worker's yet, as
its status says, so it is in no per-VM series and not counted in
``procurator_worker_vms`` (before, it was counted as ``starting`` there
and exported per VM, beside the source's series of the same VM). The
VmManager's observations as the runtime hands them to the metrics
(``vm_snapshots``), scraped from the exporter's text output."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from procurator.core.metrics import WorkerSnapshot
from procurator.core.models import Phase, PowerState
from procurator.worker.metrics import WorkerMetrics, vm_snapshots
from procurator.worker.vmrecord import VmObservation

NOW = 2_000_000_000.0


def test_an_incoming_vm_is_left_out_of_the_worker_metrics() -> None:
    observations = [
        VmObservation(
            "web-1", "h1", Phase.RUNNING, PowerState.RUNNING, PowerState.RUNNING, pid=101
        ),
        # The target's side of a live move: its VMM runs, the VM does not yet.
        VmObservation(
            "web-2",
            "h2",
            Phase.STARTING,
            PowerState.STOPPED,
            PowerState.RUNNING,
            pid=102,
            incoming="op-7",
        ),
    ]
    counters = {"web-2": {"disk0": {"read_bytes": 7}}}
    metrics = WorkerMetrics(clock=lambda: NOW)
    metrics.update(WorkerSnapshot(vms=tuple(vm_snapshots(observations, counters)), taken_at=NOW))

    samples = [
        sample
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for sample in family.samples
    ]
    by_phase = {s.labels["phase"]: s.value for s in samples if s.name == "procurator_worker_vms"}
    assert by_phase == {phase.value: (1.0 if phase is Phase.RUNNING else 0.0) for phase in Phase}
    assert [s for s in samples if s.labels.get("vm") == "web-2"] == []
    assert any(s.labels.get("vm") == "web-1" for s in samples)
    # The report the master relays says the same.
    reported = {
        dict(s.labels)["phase"]: s.value
        for s in metrics.to_report()
        if s.name == "procurator_worker_vms"
    }
    assert reported == by_phase
    assert not [s for s in metrics.to_report() if s.vm_id == "web-2"]
