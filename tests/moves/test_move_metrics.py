"""Moves in the master's exporter (issue 30): the moves under way by phase,
each one's time in its phase (on the leader only), and the moves ended by
outcome, scraped from
an in-process master (real SQLite store, its ports decorated as the
composition root does) driving the simulated workers of
test_move_master.py."""

from __future__ import annotations

import time
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families
from test_move_master import IMAGE, LEASE, lab, wait_over

from procurator.core.move import Move, MovePhase
from procurator.master.metrics import MasterInstruments, MasterMetrics
from procurator.master.service import MasterService
from procurator.master.store import FleetStore
from procurator.master.store.model import FencedError

NOW = 2_000_000_000.0  # the exporter's clock, Unix time


def scrape(metrics: MasterMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every move sample of one scrape: (name, sorted labels) -> value."""
    text = metrics.exposition().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "move" in sample.name
    }


def under_way(**phases: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        ("procurator_master_moves", (("phase", p),)): float(phases.get(p, 0))
        for p in (
            "pending",
            "preparing",
            "stopping",
            "transferring",
            "migrating",
            "cancelling",
            "switching",
        )
    }


def ended(done: int, failed: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        ("procurator_master_moves_ended_total", (("outcome", "done"),)): float(done),
        ("procurator_master_moves_ended_total", (("outcome", "failed"),)): float(failed),
    }


async def wait_phase(service: MasterService, vm_id: str, phase: MovePhase) -> Move:
    with trio.fail_after(10):  # a hang guard
        while (move := (await service.moves(vm_id))[0]).phase is not phase:
            await trio.sleep(0.02)
    return move


async def test_moves_are_exported_while_under_way_and_counted_once_over(tmp_path: Path) -> None:
    instruments = MasterInstruments()
    async with (
        await FleetStore.open(tmp_path / "m.db") as store,
        trio.open_nursery() as nursery,
    ):
        service = MasterService(
            instruments.store(store),
            push_timeout=1.0,
            worker_lease=LEASE,
            leader_lease=LEASE,
            wall_clock=time.time,
        )
        await nursery.start(service.run)
        metrics = MasterMetrics(service.fleet_view, clock=lambda: NOW, instruments=instruments)
        runs, a, b = await lab(service, nursery)
        # Nothing moves yet: every phase and outcome at 0, no move's age.
        assert scrape(metrics) == {**under_way(), **ended(0, 0)}

        # The disks never arrive on host-b: the move stays transferring.
        b.receiving = False
        await service.move("web-1", "host-b")
        transferring = await wait_phase(service, "web-1", MovePhase.TRANSFERRING)
        # Shown once the duty's pass that stepped it is over.
        with trio.fail_after(10):
            while (
                scrape(metrics).get(("procurator_master_moves", (("phase", "transferring"),))) != 1
            ):
                await trio.sleep(0.02)
        age = (
            "procurator_master_move_phase_age_seconds",
            (
                ("phase", "transferring"),
                ("source", "host-a"),
                ("target", "host-b"),
                ("vm", "web-1"),
            ),
        )
        assert scrape(metrics) == {
            **under_way(transferring=1),
            age: NOW - transferring.updated_unix_ms / 1000,
            **ended(0, 0),
        }

        # A master that loses the lead shows no move from then on (the
        # leader that follows shows them); leading again, it shows it again.
        fence = service.leadership.fence
        assert fence is not None
        service.leadership.fenced(fence, FencedError("another master leads (the test)"))
        assert service.fleet_view().moves == ()
        assert scrape(metrics) == {**under_way(), **ended(0, 0)}
        with trio.fail_after(10):
            while (
                scrape(metrics).get(("procurator_master_moves", (("phase", "transferring"),))) != 1
            ):
                await trio.sleep(0.02)
        assert service.leadership.fence not in (None, fence)

        # The disks arrive: the move ends done, counted once.
        b.receiving = True
        await b.take_again()
        assert (await wait_over(service, "web-1")).phase is MovePhase.DONE
        with trio.fail_after(10):
            while scrape(metrics) != {**under_way(), **ended(1, 0)}:
                await trio.sleep(0.02)

        # Back to host-a, whose image fails to prepare: failed, counted.
        a.bad_images.add(IMAGE)
        await service.move("web-1", "host-a")
        assert (await wait_over(service, "web-1")).phase is MovePhase.FAILED
        with trio.fail_after(10):
            while scrape(metrics) != {**under_way(), **ended(1, 1)}:
                await trio.sleep(0.02)
        assert runs.twice == []
        nursery.cancel_scope.cancel()
