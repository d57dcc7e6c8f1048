"""The worker's exporter shows its supervisors' turn pool (docs/METRICS.md,
``procurator_worker_turn_*``): the runtime (``ReconcilingHandler``, in
process, unconfined, no network, no VMM) wires its ``VmManager``'s pool to
its metrics, read at each scrape."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from publisherhelpers import RecordingPublisher

from procurator.worker.runtime import ReconcilingHandler, RuntimeOptions

WAIT = 30.0  # a hang guard


def _turn_samples(handler: ReconcilingHandler) -> dict[tuple[str, tuple[str, ...]], float]:
    text = handler.metrics.exposition().decode()
    return {
        (sample.name, tuple(sample.labels.values())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "_turn" in sample.name
    }


def test_a_scrape_shows_the_turn_pool_as_it_is(tmp_path: Path) -> None:
    options = RuntimeOptions(
        driver="cloud-hypervisor", vmm_binary=sys.executable, network=False, jail=None
    )
    handler = ReconcilingHandler(
        worker_id="host-a",
        state_dir=tmp_path / "state",
        options=options,
        publisher=RecordingPublisher(),
    )
    release, running = threading.Event(), threading.Event()
    try:
        assert _turn_samples(handler) == {
            ("procurator_worker_turn_threads", ("busy",)): 0.0,
            ("procurator_worker_turn_threads", ("idle",)): 0.0,
            ("procurator_worker_turns_waiting", ()): 0.0,
            ("procurator_worker_turn_wait_seconds", ()): 0.0,
            ("procurator_worker_turn_stalls_total", ()): 0.0,
        }

        def turn() -> None:
            running.set()
            release.wait(WAIT)

        handler.manager.turns.submit(turn)
        assert running.wait(WAIT)
        samples = _turn_samples(handler)
        assert samples[("procurator_worker_turn_threads", ("busy",))] == 1.0
    finally:
        release.set()
        handler.close()
