"""10. Rollouts (issue 28): what health-gated batches cost against
replacing the same VMs at once, and what the prepare phase costs against
realising the same closures directly.

- **roll**: a ``procurator master`` and 10 ``procurator worker`` processes
  (3 with ``--quick``; the cloud-hypervisor driver on the lean fake VMM,
  ``--no-network``, ``--unconfined``: the jail is ``confine``'s subject),
  1,000 VMs (100) spread evenly, started from image A. Then, in the same
  run, two replacements of every VM, each with a fresh image (added to the
  store before, so neither pays a copy): A -> B with ``[rollout]``
  (``max_parallel = 50``, ``health = "none"``, ``min_healthy_time =
  "100ms"``: the worker reports a VM healthy once it has run that long),
  from ``Control.apply`` until the rollout is ``done`` and every worker
  shows every VM running on B at the newest generation; and B -> C
  without ``[rollout]`` (replaced at once, each worker at its
  ``--concurrency``), from the apply until every VM runs on C. Ratio =
  gated / ungated. The null workers (``bench/null_worker.py``) cannot
  stop a VM, so they cannot be replaced: hence the fake VMM.
- **prepare**: the gated rollout's prepare phase (apply -> the rollout's
  phase seen leaving ``preparing``, polled every 20 ms: every worker
  realised and rooted B and reported it, and the master saw the reports)
  against realising the same closure directly: one ``nix-store --realise
  --add-root`` per worker, all at once, as the workers' prepare runs
  them. B is already in the local store (no substituter here), so both
  measure the round trip and the rooting, not a download.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import trio

from bench._harness import (
    Proc,
    Row,
    Run,
    control,
    fmt_ratio,
    fmt_s,
    wait_connected,
    wait_observed,
)
from bench.start import worker_args
from procurator.core.control import FleetStatus
from procurator.core.fleet import parse_fleet
from procurator.core.models import Phase
from procurator.core.validation import store_path_hash
from procurator.rpc.clients import ControlClient

NAME = "rollout"

MAX_PARALLEL = 50
ROLLOUT = (
    f'[rollout]\nmax_parallel = {MAX_PARALLEL}\nhealth = "none"\n'
    'min_healthy_time = "100ms"\nhealthy_deadline = "5m"\n'
)
TERMINAL = frozenset(("done", "failed", "reverted"))


def sizes(run: Run) -> tuple[int, int]:
    """(VMs, workers)."""
    return (100, 3) if run.quick else (1000, 10)


def worker_ids(n: int) -> list[str]:
    return [f"host-{j:02d}" for j in range(n)]


def fleet_text(image: str, vms: int, workers: Sequence[str], *, gated: bool) -> str:
    per: dict[str, list[str]] = {w: [] for w in workers}
    for i in range(vms):
        per[workers[i % len(workers)]].append(f'{{ id = "vm-{i:05d}", image = "{image}" }}')
    body = "".join(f"[workers.{w}]\nvms = [ {', '.join(entries)} ]\n" for w, entries in per.items())
    return body + (ROLLOUT if gated else "")


def _start_workers(run: Run, port: int, ids: Sequence[str]) -> list[Proc]:
    procs = []
    for wid in ids:
        args = worker_args(run, port, state=f"state-{wid}", extra=("--unconfined",))
        args[args.index("--id") + 1] = wid
        procs.append(run.procurator(wid, *args))
    return procs


def _all_on(image: str, vms: int) -> Callable[[FleetStatus], bool]:
    wanted = store_path_hash(image)

    def check(status: FleetStatus) -> bool:
        return (
            sum(
                v.phase is Phase.RUNNING and v.observed_hash == wanted
                for w in status.workers
                if w.status is not None
                for v in w.status.vms
            )
            == vms
        )

    return check


async def _replace(
    run: Run,
    client: ControlClient,
    image: str,
    vms: int,
    ids: Sequence[str],
    procs: Sequence[Proc],
    *,
    gated: bool,
) -> tuple[float, float | None, int]:
    """(apply -> every VM running on ``image``, apply -> prepared (gated
    only), batches)."""

    def alive() -> None:
        for proc in procs:
            proc.check_alive()

    fleet = parse_fleet(fleet_text(image, vms, ids, gated=gated))
    started = trio.current_time()
    result = await client.apply(fleet)
    prepared: float | None = None
    batches = 0
    if gated:
        assert result.rollout_id, "a gated apply started no rollout"
        with trio.fail_after(600):
            while True:
                shown = await client.rollout(result.rollout_id)
                if prepared is None and shown.phase != "preparing":
                    prepared = trio.current_time() - started
                if shown.phase in TERMINAL:
                    break
                alive()
                await trio.sleep(0.02)
        if shown.phase != "done":
            raise RuntimeError(f"rollout {shown.id} ended {shown.phase}: {shown.reason}")
        batches = shown.batches
    generation = (await client.status()).generation
    done = await wait_observed(
        client, generation, ids, timeout=600, check=_all_on(image, vms), on_poll=alive
    )
    return done - started, prepared, batches


def _realise_directly(run: Run, image: str, workers: int) -> float:
    """One ``nix-store --realise --add-root`` per worker, all at once."""

    def one(j: int) -> None:
        subprocess.run(
            ["nix-store", "--realise", image, "--add-root", str(run.dir / f"direct-{j}")],
            env=run.nix_env,
            check=True,
            capture_output=True,
        )

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(workers)))
    return time.perf_counter() - started


def measure(run: Run) -> list[Row]:
    vms, n_workers = sizes(run)
    ids = worker_ids(n_workers)
    images = [run.image(f"bench-roll-{tag}") for tag in ("a", "b", "c")]
    master, port = run.start_master()
    procs = _start_workers(run, port, ids)

    async def main() -> tuple[float, float, float | None, int, float]:
        async with control(port, timeout=60) as client:
            await wait_connected(client, ids, timeout=120)
            first, _, _ = await _replace(run, client, images[0], vms, ids, procs, gated=False)
            run.log(f"rollout: {vms:,} VMs on {n_workers} workers running in {fmt_s(first)}")
            gated, prepared, batches = await _replace(
                run, client, images[1], vms, ids, procs, gated=True
            )
            run.log(f"rollout: gated A -> B {fmt_s(gated)} ({batches} batches)")
            ungated, _, _ = await _replace(run, client, images[2], vms, ids, procs, gated=False)
            run.log(f"rollout: ungated B -> C {fmt_s(ungated)}")
            return first, gated, prepared, batches, ungated

    try:
        first, gated, prepared, batches, ungated = trio.run(main)
    finally:
        run.stop(master, *procs)
    direct = _realise_directly(run, images[1], n_workers)
    assert prepared is not None
    return [
        Row(
            NAME,
            f"roll {vms:,} VMs on {n_workers} workers, max_parallel {MAX_PARALLEL}, "
            "health none (apply -> all on the new image)",
            fmt_s(gated),
            f"{fmt_s(ungated)} same replacements ungated",
            fmt_ratio(gated, ungated),
            note=(
                f"{batches} batches; min_healthy_time 100 ms; lean fake VMM, --unconfined, "
                f"--no-network; the fleet's first start took {fmt_s(first)}"
            ),
        ),
        Row(
            NAME,
            f"prepare phase of that rollout ({n_workers} workers, apply -> switching)",
            fmt_s(prepared),
            f"{fmt_s(direct)} nix-store --realise --add-root x{n_workers}, at once",
            fmt_ratio(prepared, direct),
            note="the closure is already in the local store: no download in either",
        ),
    ]
