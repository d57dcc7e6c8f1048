"""Highly available masters, as processes: three masters on one PostgreSQL
database, workers spread across them, the CLI given every master.

- an apply on one master reaches the workers of the others, and ``status``
  on any master shows the same fleet; two clients expecting the same
  generation through two masters: exactly one wins;
- ``kill -9`` of a master at random moments, mid-apply and between
  applies, ``PROCURATOR_HA_KILLS`` times (20): every worker reconnects
  elsewhere, no generation is lost, duplicated or skipped, no request is
  applied twice, no VM that stays desired restarts, and ``apply --wait``
  completes through a surviving master.

Seeded (``PROCURATOR_HA_SEED``), so a failure can be replayed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from halab import HaLab, applied_generation
from pgcluster import PgCluster

SEED = int(os.environ.get("PROCURATOR_HA_SEED", "26"))
KILLS = int(os.environ.get("PROCURATOR_HA_KILLS", "20"))

Fleet = dict[str, dict[str, str]]


def config(cmdline: str) -> dict[str, Any]:
    return {
        "payload": {"kernel": "vmlinux", "cmdline": cmdline},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
    }


@pytest.fixture
def lab(tmp_path: Path, nix_env: dict[str, str], pg_url: str) -> Iterator[HaLab]:
    lab = HaLab(tmp_path, nix_env, pg_url, masters=3, workers=3)
    try:
        lab.start()
        yield lab
    finally:
        lab.close()


def applies(database: str) -> list[tuple[int, str, str]]:
    """(generation, op id, request id) of every apply the store logged."""
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT generation, op_id, request_id FROM applies ORDER BY generation"
        ).fetchall()
    return [(int(g), op, req) for g, op, req in rows]


def test_every_master_serves_the_same_fleet(lab: HaLab, add_image: Callable[..., str]) -> None:
    image = add_image("ha-web", config("console=ttyS0 ha"))
    fleet: Fleet = {w: {f"vm-{w[-1]}": image} for w in lab.worker_ids}
    # Applied through master 0; every worker (spread over the three) runs it.
    result = lab.apply(fleet, "--wait", "--timeout", "60", masters=[0])
    assert result.returncode == 0, result.stdout + result.stderr
    generation = applied_generation(result.stdout)
    lab.wait_for("convergence", lambda: lab.converged(fleet, generation))
    # Each master's own view: the others learn a worker's status from the
    # database (NOTIFY, or the sync's backstop), a moment after its holder.
    expected = [(w, True, generation, 1) for w in lab.worker_ids]

    def view(index: int) -> list[tuple[str, bool, int, int]] | None:
        status = lab.status(masters=[index])
        if status is None:
            return None
        return [
            (w["worker_id"], w["connected"], w["observed_generation"], len(w["vms"]))
            for w in status["workers"]
        ]

    lab.wait_for("every master's view", lambda: all(view(i) == expected for i in range(3)))
    # The workers are spread: each master holds some of the sessions.
    with psycopg.connect(lab.database) as conn:
        holders = dict(conn.execute("SELECT worker_id, master_id FROM worker_state").fetchall())
    assert set(holders.values()) == {"m0", "m1", "m2"}, holders

    # Two clients expecting the same generation, through two masters.
    tries = [
        lab.apply_async(
            {**fleet, "host-0": {"vm-0": image, "extra": image}},
            "--expect-generation",
            str(generation),
            first=first,
        )
        for first in (1, 2)
    ]
    outcomes = []
    for attempt in tries:
        output, _ = attempt.communicate(timeout=120)
        outcomes.append((attempt.returncode, output))
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 1], outcomes
    (refused,) = [out for code, out in outcomes if code == 1]
    assert f"expected generation {generation}, but the fleet is at generation" in refused
    assert [g for g, _, _ in applies(lab.database)] == [generation, generation + 1]


def test_kill9_masters_at_random_moments(lab: HaLab, add_image: Callable[..., str]) -> None:
    rng = random.Random(SEED)
    images = [add_image(f"ha-v{i}", config(f"console=ttyS0 v{i}")) for i in range(2)]
    # Two VMs per worker stay as they are; one VM somewhere changes image
    # each time (it is replaced: that one restarts by design).
    stable: Fleet = {w: {f"{w}-a": images[0], f"{w}-b": images[0]} for w in lab.worker_ids}
    churn = {w: 0 for w in lab.worker_ids}

    def desired() -> Fleet:
        return {w: {**stable[w], f"{w}-c": images[churn[w]]} for w in lab.worker_ids}

    first = lab.apply(desired(), "--wait", "--timeout", "60")
    assert first.returncode == 0, first.stdout + first.stderr
    generation = applied_generation(first.stdout)
    lab.wait_for("convergence", lambda: lab.converged(desired(), generation))
    pids = lab.vmm_pids_by_worker()
    stable_pids = {(w, vm): pids[w][vm] for w in lab.worker_ids for vm in stable[w]}
    answered: list[int] = [generation]
    mid_apply = 0
    for iteration in range(KILLS):
        victim = rng.randrange(len(lab.addresses))
        churn[rng.choice(lab.worker_ids)] ^= 1
        fleet = desired()
        apply = lab.apply_async(fleet, "--wait", "--timeout", "120", first=victim)
        during = rng.random() < 0.6
        if during:
            mid_apply += 1
            time.sleep(rng.uniform(0.0, 1.2))
            lab.kill_master(victim)
        try:
            output, _ = apply.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            apply.kill()
            raise
        assert apply.returncode == 0, f"iteration {iteration}:\n{output}\n{lab.logs()}"
        generation = applied_generation(output)
        answered.append(generation)
        if not during:
            lab.kill_master(victim)
        assert not _restarted(lab, stable_pids), f"iteration {iteration}: a stable VM restarted"
        lab.start_master(victim)
        lab.wait_for(
            f"iteration {iteration}: every worker reconnected and converged on {generation}",
            lambda g=generation, f=fleet: lab.converged(f, g),  # type: ignore[misc]
        )
        for worker_id, proc in lab.workers.items():
            assert proc.alive, f"{worker_id} died:\n{proc.log.read_text()[-3000:]}"
    # No generation lost, duplicated or skipped; no request applied twice.
    logged = applies(lab.database)
    generations = [g for g, _, _ in logged]
    assert generations == list(range(1, len(generations) + 1)), logged
    requests = [r for _, _, r in logged if r]
    assert len(requests) == len(set(requests)), logged
    assert set(answered) <= set(generations)
    assert answered == sorted(answered)
    assert not _restarted(lab, stable_pids)
    print(f"FIGURES kills={KILLS} mid_apply={mid_apply} generations={len(generations)}")


def _restarted(lab: HaLab, stable_pids: dict[tuple[str, str], int]) -> list[str]:
    now = lab.vmm_pids_by_worker()
    return [
        f"{w}/{vm}: {pid} -> {now.get(w, {}).get(vm)}"
        for (w, vm), pid in stable_pids.items()
        if now.get(w, {}).get(vm) != pid
    ]


def test_the_database_stopped_mid_apply(
    tmp_path: Path, nix_env: dict[str, str], add_image: Callable[..., str]
) -> None:
    """``pg_ctl stop -m immediate`` at random moments of an apply, then
    started again: the apply committed whole or not at all; the masters
    serve again without a restart; the workers' VMs were never touched."""
    rng = random.Random(SEED + 1)
    images = [add_image(f"pg-v{i}", config(f"console=ttyS0 p{i}")) for i in range(2)]
    with PgCluster() as pg:
        lab = HaLab(tmp_path, nix_env, pg.new_database(), masters=2, workers=2)
        try:
            lab.start()
            stable: Fleet = {w: {f"{w}-a": images[0]} for w in lab.worker_ids}
            result = lab.apply(stable, "--wait", "--timeout", "60")
            assert result.returncode == 0, result.stdout + result.stderr
            lab.wait_for("convergence", lambda: lab.converged(stable, 1))
            pids = lab.vmm_pids_by_worker()
            before: Fleet = stable
            masters = [p.popen.pid for p in lab.masters if p is not None]
            committed = 0
            for round_ in range(3):
                after: Fleet = {
                    w: {**stable[w], f"{w}-n{round_}": images[round_ % 2]} for w in lab.worker_ids
                }
                apply = lab.apply_async(after, "--retry-for", "0")
                time.sleep(rng.uniform(0.0, 0.8))
                pg.stop("immediate")
                output, _ = apply.communicate(timeout=120)
                # While the database is away: reads fail, naming it; VMs run
                # (the stable ones as they were; the round's own VM exists
                # if the apply committed, and is the workers' to start).
                lab.wait_for(
                    "status to be refused, naming the database",
                    lambda: (
                        "database postgresql://procurator@127.0.0.1" in lab.cli("status").stderr
                    ),
                )
                assert _stable_pids(lab, stable) == _stable_pids(lab, stable, pids)
                pg.start()
                lab.wait_for("the masters to serve again", lambda: lab.status() is not None)
                assert [p.popen.pid for p in lab.masters if p is not None] == masters
                same_before = _holds(lab, before)
                same_after = _holds(lab, after)
                assert same_before != same_after, (round_, output)  # whole or nothing
                committed += same_after
                if same_before:
                    again = lab.apply(after)
                    assert again.returncode == 0, again.stdout + again.stderr
                generation = applied_generation(lab.apply(after, "--dry-run").stdout)
                lab.wait_for("convergence", lambda g=generation, f=after: lab.converged(f, g))  # type: ignore[misc]
                now = lab.vmm_pids_by_worker()
                assert _stable_pids(lab, stable, now) == _stable_pids(lab, stable, pids)
                pids, before = now, after
            print(f"FIGURES database stops=3 applies committed before the stop={committed}")
        finally:
            if not pg.running:
                pg.start()  # so that the VMs are removed through the product
            lab.close()


def _stable_pids(
    lab: HaLab, stable: Fleet, pids: dict[str, dict[str, int]] | None = None
) -> dict[tuple[str, str], int | None]:
    """The VMM pid of each VM of ``stable`` (now, or in ``pids``)."""
    seen = pids if pids is not None else lab.vmm_pids_by_worker()
    return {(w, vm): seen.get(w, {}).get(vm) for w in stable for vm in stable[w]}


def _holds(lab: HaLab, fleet: Fleet) -> bool:
    """Does the store hold exactly ``fleet``? (a dry run changes nothing)"""
    result = lab.apply(fleet, "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    return "no changes" in result.stdout


def test_a_paused_leader_cannot_write_after_it_resumes(
    tmp_path: Path, nix_env: dict[str, str], pg_url: str
) -> None:
    """Master m0 leads and starts a duty (expiring leases); the duty's write
    is held by a lock, m0 is frozen (SIGSTOP) past its lease, another
    holder takes the lease, m0 resumes: its write is refused (fenced),
    nothing it would have written is in the store."""
    from procurator.master.store import open_store  # noqa: PLC0415

    lab = HaLab(tmp_path, nix_env, pg_url, masters=1, workers=0)
    try:
        lab.start_master(0)
        lab.wait_for("m0 to lead", lambda: _lease(pg_url)[0] == "m0")
        with psycopg.connect(pg_url) as hold:
            # A worker whose lease is long over, and the table locked: m0's
            # duty finds it and waits for the lock to write.
            hold.execute("LOCK TABLE worker_state IN ACCESS EXCLUSIVE MODE")
            hold.execute(
                "INSERT INTO worker_state (worker_id, version, master_id, session, info, "
                "connected, since_unix_ms, renewed_unix_ms, expires_unix_ms) "
                "VALUES ('ghost', 1, 'gone', 1, '', TRUE, 1, 1, 1)"
            )
            lab.wait_for("m0's duty to wait on the lock", lambda: _waiting(pg_url, "m0"))
            lab.signal_master(0, signal.SIGSTOP)
            try:
                lab.wait_for("m0's lease to run out", lambda: not _lease(pg_url)[2])
                # Another master takes the lead (the store's own call).
                import trio  # noqa: PLC0415

                async def take() -> int | None:
                    store = await open_store(pg_url)
                    try:
                        return await store.acquire_lease("leader", "other", lease_ms=600_000)
                    finally:
                        await store.aclose()

                epoch = trio.run(take)
                assert epoch is not None and epoch >= 2
                hold.commit()  # the lock goes: m0's statement runs, uncommitted
            finally:
                lab.signal_master(0, signal.SIGCONT)
        lab.wait_for(
            "m0 to hear it is fenced",
            lambda: "nothing was written" in (lab.dir / "master-0.log").read_text(),
        )
        with psycopg.connect(pg_url) as conn:
            connected = conn.execute(
                "SELECT connected FROM worker_state WHERE worker_id = 'ghost'"
            ).fetchone()
        assert connected == (True,), "the fenced leader's write landed"
        assert _lease(pg_url)[0] == "other"
        log = (lab.dir / "master-0.log").read_text()
        assert "no longer the leader" in log
    finally:
        lab.close()


def _lease(url: str) -> tuple[str, int, bool]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT holder, epoch, expires_unix_ms > (extract(epoch from clock_timestamp()) "
            "* 1000)::bigint FROM leases WHERE name = 'leader'"
        ).fetchone()
    return (row[0], int(row[1]), bool(row[2])) if row else ("", 0, False)


def _waiting(url: str, master_id: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND wait_event_type = 'Lock' AND query LIKE 'UPDATE worker_state SET connected%%'",
            (f"procurator-master/{master_id}",),
        ).fetchone()
    return bool(row and row[0])
