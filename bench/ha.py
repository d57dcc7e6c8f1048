"""8. Highly available masters (docs/HA.md): what PostgreSQL costs, how fast
workers fail over, and what 100,000 VMs weigh.

A throwaway PostgreSQL 15 cluster (``tests/pgcluster.py``: fsync off, as
the test clusters) and real ``procurator master`` processes.

- **change**: apply -> observed for a one-VM change (a VM paused or
  resumed) on a worker of 100 VMs (20), through one master; PostgreSQL
  against SQLite in the same run (p50 and p95 of 20 changes (5) each). The
  worker is ``bench/null_worker.py`` (the product's worker, null VMM).
- **failover**: three masters on one database, 12 null workers (6 with
  ``--quick``) spread over them (each given all three, starting with a
  different one); ``kill -9`` of the master holding the most workers,
  then the time until every worker it held is registered with another
  master and has observed the fleet's generation (read from the database:
  which master holds each session), 10 times (3) with the master
  restarted between rounds; p50 and p95. Baseline: the same workers'
  first connection, from process start.
- **scale**: one master on PostgreSQL, 1,000 (100) simulated workers (sessions
  opened by this process over real Cap'n Proto connections, each
  registering and reporting a whole status of its VMs) and 100 VMs each;
  the master's resident memory and the database's size, against the same
  on SQLite (memory; file size).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Sequence
from collections.abc import Set as AbstractSet

import psycopg
import trio

from bench._harness import (
    REPO,
    Proc,
    Row,
    Run,
    control,
    fmt_ratio,
    fmt_s,
    free_port,
    percentile,
    rss_bytes,
    wait_connected,
    wait_observed,
)
from procurator.core.models import (
    Assignment,
    Fleet,
    Phase,
    PowerState,
    VmAssignment,
    VmStatus,
    WorkerInfo,
    WorkerStatus,
)
from procurator.core.validation import store_path_hash
from procurator.rpc.bridge import open_bridge
from procurator.rpc.clients import CapnpMasterDialer

NAME = "ha"

# Short leases and intervals, as an operator who wants fast failover sets.
_MASTER_ARGS = ("--worker-lease", "6", "--leader-lease", "6", "--sync-interval", "2")


def _master(
    run: Run, name: str, database: str, *, port: int = 0, args: Sequence[str] = ()
) -> tuple[Proc, int]:
    port = port or free_port()
    proc = run.procurator(
        name,
        "master",
        "--listen",
        f"127.0.0.1:{port}",
        "--database",
        database,
        "--master-id",
        name,
        "--metrics-listen",
        "",
        "--log-level",
        "warning",
        *args,
    )
    return proc, port


def _null_worker(run: Run, worker_id: str, masters: str) -> Proc:
    return run.spawn(
        worker_id,
        [
            sys.executable,
            "-m",
            "bench.null_worker",
            "--id",
            worker_id,
            "--master",
            masters,
            "--state-dir",
            str(run.dir / "ha" / worker_id),
        ],
    )


def _fleet(image: str, vms: dict[str, int], paused: AbstractSet[str] = frozenset()) -> Fleet:
    digest = store_path_hash(image)
    return Fleet(
        tuple(
            (
                worker_id,
                tuple(
                    VmAssignment(
                        f"{worker_id}-{i:05d}",
                        digest,
                        image,
                        PowerState.PAUSED
                        if f"{worker_id}-{i:05d}" in paused
                        else PowerState.RUNNING,
                    )
                    for i in range(count)
                ),
            )
            for worker_id, count in sorted(vms.items())
        )
    )


# ---------------------------------------------------------------- change


def _change(run: Run, image: str, database: str, label: str) -> list[float]:
    vms, changes = (20, 5) if run.quick else (100, 20)
    master, port = _master(run, f"change-{label}", database)
    worker = _null_worker(run, f"chg-{label}", f"127.0.0.1:{port}")

    async def main() -> list[float]:
        async with control(port) as client:
            await wait_connected(client, [worker.name], timeout=120)
            result = await client.apply(_fleet(image, {worker.name: vms}))
            await wait_observed(client, result.generation, [worker.name], timeout=300)
            times = []
            for n in range(changes):
                paused = {f"{worker.name}-{0:05d}"} if n % 2 == 0 else set()
                started = trio.current_time()
                result = await client.apply(_fleet(image, {worker.name: vms}, paused))
                seen = await wait_observed(
                    client, result.generation, [worker.name], timeout=120, interval=0.005
                )
                times.append(seen - started)
                await trio.sleep(0.3)
            return times

    try:
        return trio.run(main)
    finally:
        run.stop(worker, master)


# ---------------------------------------------------------------- failover


def _holders(database: str) -> dict[str, tuple[str, bool, int | None]]:
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT worker_id, master_id, connected, observed_generation FROM worker_state"
        ).fetchall()
    return {w: (m, bool(c), o) for w, m, c, o in rows}


def _failover(run: Run, image: str, database: str) -> tuple[list[float], list[float]]:
    n_workers, kills = (6, 3) if run.quick else (12, 10)
    ports = [free_port() for _ in range(3)]
    masters: list[Proc | None] = [
        _master(run, f"m{i}", database, port=ports[i], args=_MASTER_ARGS)[0] for i in range(3)
    ]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    workers = []
    connect_times = []
    for j in range(n_workers):
        first = j % 3
        order = ",".join(addresses[first:] + addresses[:first])
        started = time.monotonic()
        workers.append(_null_worker(run, f"fo-{j:02d}", order))
        connect_times.append(started)

    async def main() -> tuple[list[float], list[float]]:
        async with control(ports[0]) as client:
            await wait_connected(client, [w.name for w in workers], timeout=300)
            first_connect = [time.monotonic() - t for t in connect_times]
            result = await client.apply(_fleet(image, {w.name: 10 for w in workers}))
            await wait_observed(client, result.generation, [w.name for w in workers], timeout=300)
            generation = result.generation
        times = []
        for round_ in range(kills):
            # The master holding the most workers (failed-over workers
            # gather on the survivors: a fixed turn would soon kill one
            # that holds none).
            holders = _holders(database)
            victim = max(
                range(3), key=lambda i: sum(m == f"m{i}" and c for m, c, _ in holders.values())
            )
            held = [w for w, (m, c, _) in holders.items() if m == f"m{victim}" and c]
            proc = masters[victim]
            assert proc is not None
            killed = time.monotonic()
            proc.popen.kill()
            proc.popen.wait()
            while True:
                now = _holders(database)
                if all(
                    now[w][0] != f"m{victim}" and now[w][1] and now[w][2] == generation
                    for w in held
                ):
                    break
                if time.monotonic() - killed > 120:
                    raise RuntimeError(f"failover round {round_}: not done: {now}")
                await trio.sleep(0.01)
            times.append(time.monotonic() - killed)
            run.log(f"ha: failover {round_}: {len(held)} workers in {times[-1]:.2f}s")
            with contextlib.suppress(ValueError):
                run.procs.remove(proc)
            masters[victim] = _master(
                run, f"m{victim}", database, port=ports[victim], args=_MASTER_ARGS
            )[0]
            async with control(ports[victim]):
                pass  # until it answers
        return times, first_connect

    try:
        return trio.run(main)
    finally:
        run.stop(*workers, *(m for m in masters if m is not None))


# ---------------------------------------------------------------- scale


async def _simulate(port: int, n_workers: int, vms: int, image: str) -> None:
    """Register ``n_workers`` workers and report each one's whole status;
    the sessions stay open until this returns."""
    digest = store_path_hash(image)
    async with open_bridge() as bridge, contextlib.AsyncExitStack() as stack:
        dialer = CapnpMasterDialer(bridge, f"127.0.0.1:{port}")
        limiter = trio.CapacityLimiter(32)

        async def ignore(assignment: Assignment) -> None:
            return None

        async def one(worker_id: str) -> None:
            async with limiter:
                session = await dialer.connect(WorkerInfo(worker_id), ignore)
                stack.push_async_callback(session.aclose)
                assignment = await session.get_assignment(0)
                generation = assignment.generation if assignment else 0
                status = tuple(
                    VmStatus(
                        f"{worker_id}-{i:05d}", Phase.RUNNING, digest, "", 0, "", PowerState.RUNNING
                    )
                    for i in range(vms)
                )
                await session.report_status(WorkerStatus(worker_id, generation, status))

        async with trio.open_nursery() as nursery:
            for j in range(n_workers):
                nursery.start_soon(one, f"sim-{j:04d}")
        async with control(port) as client:
            status = await client.status()
            reported = sum(len(w.status.vms) for w in status.workers if w.status)
            if reported != n_workers * vms:
                raise RuntimeError(f"scale: {reported} VMs reported, not {n_workers * vms}")


def _scale(run: Run, image: str, database: str, label: str) -> tuple[int, int]:
    """(master RSS bytes, database bytes) with the whole fleet reported."""
    n_workers, vms = (100, 100) if run.quick else (1000, 100)
    master, port = _master(run, f"scale-{label}", database)

    async def main() -> int:
        async with control(port, timeout=120) as client:
            result = await client.apply(
                _fleet(image, {f"sim-{j:04d}": vms for j in range(n_workers)})
            )
            run.log(f"ha: scale {label}: {n_workers * vms:,} VMs applied as {result.generation}")
        await _simulate(port, n_workers, vms, image)
        return rss_bytes(master.pid)

    try:
        rss = trio.run(main)
    finally:
        run.stop(master)
    if database.startswith("postgresql://"):
        with psycopg.connect(database) as conn:
            (size,) = conn.execute("SELECT pg_database_size(current_database())").fetchone()  # type: ignore[misc]
    else:
        size = sum(os.path.getsize(p) for p in (database, database + "-wal") if os.path.exists(p))
    return rss, int(size)


# ---------------------------------------------------------------- the rows


def measure(run: Run) -> list[Row]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000 sessions
    image = run.image("bench-ha")
    # The tests' throwaway cluster (tests/pgcluster.py), with its imports.
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    from pgcluster import PgCluster  # noqa: PLC0415

    with PgCluster() as pg:
        sqlite_change = _change(run, image, str(run.dir / "change.db"), "sqlite")
        pg_change = _change(run, image, pg.new_database(), "pg")
        failover, first = _failover(run, image, pg.new_database())
        pg_rss, pg_size = _scale(run, image, pg.new_database(), "pg")
        sqlite_rss, sqlite_size = _scale(run, image, str(run.dir / "scale.db"), "sqlite")
    n_workers = 100 if run.quick else 1000
    total = n_workers * 100
    p50, p95 = percentile(pg_change, 50), percentile(pg_change, 95)
    s50, s95 = percentile(sqlite_change, 50), percentile(sqlite_change, 95)
    return [
        Row(
            NAME,
            "one-VM change, apply -> observed, PostgreSQL (p50)",
            fmt_s(p50),
            f"{fmt_s(s50)} SQLite",
            fmt_ratio(p50, s50),
            note=f"p95 {fmt_s(p95)} PostgreSQL, {fmt_s(s95)} SQLite; {len(pg_change)} changes each",
        ),
        Row(
            NAME,
            "failover: kill -9 of a master -> its workers on another, converged (p50)",
            fmt_s(percentile(failover, 50)),
            f"{fmt_s(percentile(first, 50))} first connection from process start",
            fmt_ratio(percentile(failover, 50), percentile(first, 50)),
            note=f"p95 {fmt_s(percentile(failover, 95))}; {len(failover)} kills, 3 masters, "
            f"--worker-lease 6",
        ),
        Row(
            NAME,
            f"master resident memory, {total:,} VMs on {n_workers:,} workers, PostgreSQL",
            f"{pg_rss / 2**20:.0f} MiB",
            f"{sqlite_rss / 2**20:.0f} MiB SQLite",
            fmt_ratio(pg_rss, sqlite_rss),
        ),
        Row(
            NAME,
            f"database size, {total:,} VMs with their statuses",
            f"{pg_size / 2**20:.0f} MiB PostgreSQL",
            f"{sqlite_size / 2**20:.0f} MiB SQLite",
            fmt_ratio(pg_size, sqlite_size),
        ),
    ]
