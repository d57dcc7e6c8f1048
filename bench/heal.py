"""9. Healing (issue 27): how long a killed worker's VMs take to run
elsewhere, and what the workers' heartbeats cost their master.

- **heal**: a ``procurator master`` (``--worker-lease 5``, so several kills
  fit in a run) and two null workers (``bench/null_worker.py``: the
  product's worker, a null VMM driver, no Nix), each with room for all
  the VMs. 1,000 unpinned ``reschedule`` VMs (200 with ``--quick``) are
  applied; binpack puts them all on one worker. Then ``kill -9`` of the
  worker holding them, until the master's status shows every one of them
  running on the other (its observed generation the heal's): 5 kills (2),
  the killed host replaced between kills by a fresh worker of the same
  id (a new state directory: a null worker cannot stop the VMs of its
  last life), so the VMs go back and forth. p50 and
  p95. Baseline, same run: the floor, one lease plus the time as many VMs
  take to start on a worker from an apply (after the kills: as many new
  VMs applied onto the last replacement worker, connected and idle as
  each heal's target was; apply -> all running). What is above the floor
  is the healing duty's interval (up to a third of a lease), placing and
  committing the heal, the push and the report.
- **heartbeats**: a master with the default leases and 1,000 simulated
  workers (100): real Cap'n Proto sessions opened by this process, as in
  ``bench/ha.py``. The master's CPU seconds per second over 20 s (6 s)
  while every session pulls its unchanged assignment every 3 s — what a
  worker's link does with the default ``--fence-after 12``
  (``heartbeat_interval``: a quarter of it), so that a healthy link never
  fences — against the same sessions silent for as long (the master then
  only renews their leases, one statement every lease / 3, and sweeps
  its connections). The bench process runs the 1,000 clients on the same
  cores: its own CPU is in the note.
"""

from __future__ import annotations

import random
import resource
import signal
import sys
import time
from collections.abc import Callable

import trio

from bench._harness import (
    Proc,
    Row,
    Run,
    control,
    cpu_seconds,
    fmt_ratio,
    fmt_s,
    free_port,
    median,
    percentile,
    wait_connected,
    wait_observed,
)
from procurator.core.assignments import AssignmentChanges
from procurator.core.control import FleetStatus
from procurator.core.fence import DEFAULT_FENCE_AFTER, heartbeat_interval
from procurator.core.fleet import parse_fleet
from procurator.core.models import Assignment, Phase, WorkerInfo
from procurator.rpc.bridge import open_bridge
from procurator.rpc.clients import CapnpMasterDialer, CapnpMasterSession

NAME = "heal"

LEASE = 5.0  # --worker-lease and --leader-lease of the heal part
WORKERS = ("host-a", "host-b")
VM_MIB = 64


def _master(run: Run, name: str, *args: str) -> tuple[Proc, int]:
    port = free_port()
    proc = run.procurator(
        name,
        "master",
        "--listen",
        f"127.0.0.1:{port}",
        "--db",
        str(run.dir / f"{name}.db"),
        "--metrics-listen",
        "",
        "--log-level",
        "warning",
        *args,
    )
    return proc, port


def _worker(run: Run, worker_id: str, port: int, vms: int, life: int = 0) -> Proc:
    return run.spawn(
        f"{worker_id}-{life}",
        [
            sys.executable,
            "-m",
            "bench.null_worker",
            "--id",
            worker_id,
            "--master",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(run.dir / "state" / f"{worker_id}-{life}"),
            "--vcpus",
            str(vms),
            "--memory-mib",
            str(vms * VM_MIB),
        ],
    )


def _fleet_text(image: str, vms: int, prefix: str = "vm") -> str:
    return "".join(
        f'[[vms]]\nid = "{prefix}-{i:05d}"\nimage = "{image}"\nvcpus = 1\nmemory_mib = {VM_MIB}\n\n'
        for i in range(vms)
    )


def _running_on(status: FleetStatus, worker_id: str) -> int:
    for w in status.workers:
        if w.worker_id == worker_id and w.status is not None:
            return sum(v.phase is Phase.RUNNING for v in w.status.vms)
    return 0


def _holder(status: FleetStatus) -> str:
    (holder,) = [w.worker_id for w in status.workers if w.desired_vms]
    return holder


# ---------------------------------------------------------------- heal


def _heal(run: Run, image: str) -> tuple[float, list[float], float]:
    """(first apply -> all running, [kill -9 -> all running elsewhere,
    ...], apply -> all running on the last replacement worker)."""
    vms, kills = (200, 2) if run.quick else (1000, 5)
    lease = f"{LEASE:g}"
    master, port = _master(run, "heal-master", "--worker-lease", lease, "--leader-lease", lease)
    workers = {w: _worker(run, w, port, vms) for w in WORKERS}

    def all_running(worker_id: str) -> Callable[[FleetStatus], bool]:
        return lambda status: _running_on(status, worker_id) == vms

    async def main() -> tuple[float, list[float], float]:
        async with control(port, timeout=60) as client:
            await wait_connected(client, WORKERS, timeout=60)
            fleet = parse_fleet(_fleet_text(image, vms))
            started = trio.current_time()
            result = await client.apply(fleet)
            holder = _holder(await client.status())
            done = await wait_observed(
                client, result.generation, [holder], timeout=300, check=all_running(holder)
            )
            start = done - started
            run.log(f"heal: {vms:,} VMs running on {holder} {fmt_s(start)} after the apply")
            heals = []
            for kill in range(kills):
                status = await client.status()
                holder = _holder(status)
                (other,) = [w for w in WORKERS if w != holder]
                master.check_alive()
                killed = trio.current_time()
                workers[holder].popen.send_signal(signal.SIGKILL)
                workers[holder].popen.wait()
                done = await wait_observed(
                    client,
                    status.generation + 1,
                    [other],
                    timeout=LEASE * 10 + 300,
                    check=all_running(other),
                )
                heals.append(done - killed)
                run.log(f"heal: kill {kill + 1}: {vms:,} VMs on {other} {fmt_s(heals[-1])} later")
                # The dead host replaced by a fresh one (a null worker cannot
                # stop the VMs of its last life), connected before the next kill.
                workers[holder] = _worker(run, holder, port, vms, life=kill + 1)
                await wait_connected(client, [holder], timeout=60)
                status = await client.status()
                await wait_observed(client, status.generation, [holder], timeout=300)
            # The floor's start: as many new VMs onto the replacement worker,
            # connected and idle as the heals' targets were.
            both = _fleet_text(image, vms) + _fleet_text(image, vms, prefix="new")
            started = trio.current_time()
            result = await client.apply(parse_fleet(both))
            done = await wait_observed(
                client, result.generation, [holder], timeout=300, check=all_running(holder)
            )
            warm = done - started
            run.log(f"heal: {vms:,} more VMs running on {holder} {fmt_s(warm)} after the apply")
            return start, heals, warm

    try:
        return trio.run(main)
    finally:
        run.stop(master, *workers.values())


# ---------------------------------------------------------------- heartbeats


async def _sessions_cpu(
    run: Run, master: Proc, port: int, n_workers: int, window: float
) -> tuple[float, float, int, float]:
    """(master CPU s/s silent, with heartbeats, heartbeats made, bench
    process CPU s/s with heartbeats) for ``n_workers`` sessions."""
    interval = heartbeat_interval(DEFAULT_FENCE_AFTER)
    rng = random.Random(27)
    pulls = 0
    async with open_bridge() as bridge, trio.open_nursery() as nursery:
        dialer = CapnpMasterDialer(bridge, f"127.0.0.1:{port}")
        limiter = trio.CapacityLimiter(32)
        sessions: list[CapnpMasterSession] = []

        async def ignore(update: Assignment | AssignmentChanges) -> None:
            return None

        async def one(worker_id: str) -> None:
            async with limiter:
                session = await dialer.connect(WorkerInfo(worker_id), ignore)
                sessions.append(session)
                await session.get_assignment(0)

        async with trio.open_nursery() as connecting:
            for j in range(n_workers):
                connecting.start_soon(one, f"sim-{j:04d}")
        run.log(f"heal: {n_workers:,} sessions open")
        try:
            await trio.sleep(1.0)  # let the registrations' writes settle
            before = cpu_seconds(master.pid)
            await trio.sleep(window)
            silent = (cpu_seconds(master.pid) - before) / window

            async def heartbeat(session: CapnpMasterSession, phase: float) -> None:
                nonlocal pulls
                await trio.sleep(phase)
                while True:
                    await session.get_assignment(0)
                    pulls += 1
                    await trio.sleep(interval)

            for session in sessions:
                nursery.start_soon(heartbeat, session, rng.uniform(0, interval))
            await trio.sleep(interval)  # every session is beating
            counted = pulls
            before = cpu_seconds(master.pid)
            me = time.process_time()
            await trio.sleep(window)
            beating = (cpu_seconds(master.pid) - before) / window
            own = (time.process_time() - me) / window
            made = pulls - counted
            nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for session in sessions:
                    await session.aclose()
    return silent, beating, made, own


def _heartbeats(run: Run) -> tuple[int, float, float, int, float, float]:
    n_workers, window = (100, 6.0) if run.quick else (1000, 20.0)
    master, port = _master(run, "beat-master")

    async def main() -> tuple[float, float, int, float]:
        async with control(port, timeout=60):
            pass  # it answers
        return await _sessions_cpu(run, master, port, n_workers, window)

    try:
        silent, beating, made, own = trio.run(main)
    finally:
        run.stop(master)
    return n_workers, window, silent, made, beating, own


# ---------------------------------------------------------------- the rows


def measure(run: Run) -> list[Row]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000 sessions
    image = run.image("bench-heal")
    cold, heals, start = _heal(run, image)
    n_workers, window, silent, made, beating, own = _heartbeats(run)
    vms = 200 if run.quick else 1000
    floor = LEASE + start
    p50, p95 = percentile(heals, 50), percentile(heals, 95)
    rate = made / window
    per_beat = (beating - silent) / rate if rate else 0.0
    return [
        Row(
            NAME,
            f"kill -9 of the worker of {vms:,} VMs -> all running on the other (p50)",
            fmt_s(p50),
            f"{fmt_s(floor)} floor: lease {LEASE:g} s + apply -> running {fmt_s(start)}",
            fmt_ratio(p50, floor),
            note=(
                f"p95 {fmt_s(p95)}, median {fmt_s(median(heals))}; {len(heals)} kills: "
                + ", ".join(fmt_s(h) for h in heals)
                + f"; --worker-lease {LEASE:g} (healing duty every {LEASE / 3:.2f} s); "
                f"null workers (bench/null_worker.py); the floor's start is {vms:,} new VMs "
                f"on the last replacement worker (the fleet's first apply, onto a worker "
                f"that never ran a VM: {fmt_s(cold)})"
            ),
        ),
        Row(
            NAME,
            f"master CPU, {n_workers:,} workers heartbeating (every "
            f"{heartbeat_interval(DEFAULT_FENCE_AFTER):g} s, {rate:,.0f}/s)",
            f"{beating * 100:.1f} % of a core",
            f"{silent * 100:.1f} % silent sessions (lease renewals only)",
            fmt_ratio(beating, silent),
            note=(
                f"{per_beat * 1e6:.0f} µs of master CPU per heartbeat; "
                f"{made:,} heartbeats in {window:g} s; the bench process driving them used "
                f"{own * 100:.0f} % of a core"
            ),
        ),
    ]
