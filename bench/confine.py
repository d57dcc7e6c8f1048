"""Confinement: what jailing every VMM costs a worker's start.

N VMs (1,000; 100 with ``--quick``) on one worker through ``apply``, the
same as ``start``, twice in the same run: once with ``--unconfined`` (every
VMM started by a ``/bin/sh`` hop, as root) and once jailed, the default
(the jailer's fork, namespaces, ``pivot_root``, the VM's uid, a cgroup per
VM with its limits; ``procurator.worker.jail``). The VMM is the run's fake
(``--vmm``: ``bench/tiny_vmm.c`` compiled, or ``bench/lean_vmm.py`` under
``python -S -I``), whose runtime files the jail exposes like any VMM's.
Fresh master, worker and state directory for each; the clock stops when
the master's status shows the worker at the applied generation (every VM
running).

Two figures: the start time jailed against unconfined (ratio), and the CPU
each jailed start adds, from ``/proc``: the worker (its threads and the
children it reaped: the launch shells when unconfined), the jailer (with
the launchers it reaped) and every VMM (whose own CPU time includes the
jail's work between fork and exec, the same process before its exec).
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from bench._harness import (
    Proc,
    Row,
    Run,
    control,
    fake_vmm_pids,
    fleet_of,
    fmt_ratio,
    fmt_s,
    marked_processes,
    wait_connected,
    wait_observed,
)
from bench.start import CONCURRENCY, WORKER_ID, vm_count, worker_args
from procurator.core.jail import JailPolicy
from procurator.worker.jail import remove_worker_cgroups

NAME = "confine"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_with_children(pid: int) -> float:
    """User + system CPU of ``pid`` and of the children it reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / _CLOCK_TICKS


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _start(run: Run, n: int, *, jailed: bool) -> tuple[float, float, float]:
    """(seconds to start ``n`` VMs, CPU of worker + jailer, CPU of the VMMs)."""
    tag = "jailed" if jailed else "unconfined"
    master, port = run.start_master()
    worker = run.procurator(
        f"worker-{tag}",
        *worker_args(run, port, state=f"worker-{tag}", extra=() if jailed else ("--unconfined",)),
    )
    image = run.image("bench-vm-a")
    fleet = fleet_of({WORKER_ID: [(f"vm-{i:05d}", image) for i in range(n)]})

    async def apply() -> float:
        async with control(port) as client:
            await wait_connected(client, [WORKER_ID], timeout=60)
            started = trio.current_time()
            result = await client.apply(fleet)
            seen = await wait_observed(
                client,
                result.generation,
                [WORKER_ID],
                timeout=1800,
                interval=0.1,
                on_poll=worker.check_alive,
            )
            return seen - started

    elapsed = trio.run(apply)
    marked = marked_processes(run.mark)
    # The VMMs: not the worker (its flags name the lean VMM too), not a
    # launching shell that has not exited yet.
    vmms = fake_vmm_pids(run)  # either --vmm; not a launching shell
    jailers = [pid for pid in marked if "_jailer.py" in _cmdline(pid)]
    if len(vmms) != n:
        raise RuntimeError(f"{tag}: {len(vmms)} VMMs run, not {n}")
    control_cpu = _cpu_with_children(worker.pid) + sum(_cpu_with_children(p) for p in jailers)
    vmm_cpu = sum(_cpu(pid) for pid in vmms)
    _teardown(run, master, worker, run.dir / f"worker-{tag}")
    return elapsed, control_cpu, vmm_cpu


def _teardown(run: Run, master: Proc, worker: Proc, state_dir: Path) -> None:
    """Everything of this start goes: processes, then the cgroups the
    worker left to its VMs (the worker's default parent, as it was
    started)."""
    run.stop(worker, master)
    run.kill_marked()
    parent = os.environ.get("PROCURATOR_CGROUP_PARENT", JailPolicy().cgroup_parent)
    remove_worker_cgroups(state_dir, parent)


def measure(run: Run) -> list[Row]:
    n = vm_count(run)
    run.log(f"confine: {n} VMs, --unconfined (concurrency {CONCURRENCY})")
    bare, bare_control, bare_vmms = _start(run, n, jailed=False)
    run.log(f"confine: unconfined took {bare:.2f}s; now jailed")
    jailed, jailed_control, jailed_vmms = _start(run, n, jailed=True)
    run.log(f"confine: jailed took {jailed:.2f}s")
    added = (jailed_control + jailed_vmms - bare_control - bare_vmms) / n
    return [
        Row(
            NAME,
            f"start {n} VMs on 1 worker, every VMM jailed (apply -> observed)",
            f"{fmt_s(jailed)} ({n / jailed:.0f} VM/s)",
            f"{fmt_s(bare)} ({n / bare:.0f} VM/s) --unconfined",
            fmt_ratio(jailed, bare),
            "<= 1.2x",
        ),
        Row(
            NAME,
            "CPU per start the jail adds (worker + jailer + VMM, jailed - unconfined)",
            f"{added * 1000:.1f} ms",
            f"{(bare_control + bare_vmms) / n * 1000:.1f} ms per unconfined start "
            f"(worker {bare_control / n * 1000:.1f}, VMM {bare_vmms / n * 1000:.1f}); jailed: "
            f"worker+jailer {jailed_control / n * 1000:.1f}, VMM {jailed_vmms / n * 1000:.1f}",
            "",
            "",
        ),
    ]
