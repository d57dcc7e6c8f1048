"""``python -m bench [--quick] [--vmm tiny|python] [--only NAME ...] [--daemon-logs DIR]``: run
the benchmarks, print one table. See ``bench/__init__.py`` and
docs/BENCHMARKS.md."""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from bench import (
    change,
    confine,
    fanout,
    ha,
    heal,
    idle,
    memcg,
    move,
    placement,
    resync,
    rollout,
    snapshot,
    start,
    wire,
)
from bench._harness import VMM_KINDS, Row, Run, c_compiler

# In this order: start leaves the 1,000-VM fleet that change and idle use.
BENCHMARKS: dict[str, Callable[[Run], list[Row]]] = {
    start.NAME: start.measure,
    change.NAME: change.measure,
    idle.NAME: idle.measure,
    confine.NAME: confine.measure,
    memcg.NAME: memcg.measure,
    resync.NAME: resync.measure,
    wire.NAME: wire.measure,
    placement.NAME: placement.measure,
    snapshot.NAME: snapshot.measure,
    move.NAME: move.measure,
    ha.NAME: ha.measure,
    heal.NAME: heal.measure,
    rollout.NAME: rollout.measure,
    fanout.NAME: fanout.measure,  # last: the heaviest, its load outlasts it
}

# The benchmarks that share the running N-VM fleet (bench.start).
FLEET_USERS = frozenset((start.NAME, change.NAME, idle.NAME))

_COLUMNS = ("bench", "metric", "value", "baseline (same run)", "ratio", "target")


def machine() -> str:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):  # noqa: SIM115 - read once
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()
    return (
        f"{model}, {os.cpu_count()} CPUs, {mem:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}; load average at the end "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def table(rows: list[Row]) -> str:
    cells = [_COLUMNS] + [(r.bench, r.metric, r.value, r.baseline, r.ratio, r.target) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    lines = []
    for index, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if index == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    notes = [f"- {r.bench}: {r.note}" for r in rows if r.note]
    return "\n".join([*lines, "", *notes] if notes else lines)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through Run.close like a Ctrl-C


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--only",
        action="append",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--vmm",
        choices=VMM_KINDS,
        help=(
            "the fake VMM: tiny (bench/tiny_vmm.c, built at run time with cc; 10,000 VMs fit) "
            "or python (bench/lean_vmm.py, ~5 MB each; change then stays at 1,000 VMs); "
            "default: tiny when a C compiler is there"
        ),
    )
    parser.add_argument(
        "--daemon-logs",
        metavar="DIR",
        type=Path,
        help=(
            "masters and workers log at DEBUG as JSON lines (the trace points along a "
            "change, to attribute a slow one) and their logs are copied to DIR at the end "
            "(default: the master logs warnings, the worker at its default level, and their "
            "logs go with the run's directory)"
        ),
    )
    args = parser.parse_args(argv)
    if args.vmm is None:
        args.vmm = "tiny" if c_compiler() is not None else "python"
        if args.vmm == "python":
            print(
                "no C compiler (cc, gcc) for bench/tiny_vmm.c: the fake VMMs are "
                "bench/lean_vmm.py (--vmm python), and change is not measured at 10,000 VMs",
                file=sys.stderr,
            )
    if os.geteuid() != 0:
        print("the benchmarks need root (Nix store, process control)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    chosen = [name for name in BENCHMARKS if not args.only or name in args.only]
    rows: list[Row] = []
    failed = []
    started = time.monotonic()
    with Run(quick=args.quick, vmm=args.vmm, daemon_logs=args.daemon_logs) as run:
        if change.NAME in chosen and idle.NAME in chosen:
            # change grows the fleet it measures at 1,000 VMs: idle takes its
            # window at that size first (then its own after the growth).
            run.shared[change.BEFORE_GROWTH] = idle.window_before_growth
        for name in chosen:
            if name not in FLEET_USERS and "fleet1k" in run.shared:
                # The N-VM fleet's idle load must not weigh on what follows.
                run.log(f"stopping the {run.shared['fleet1k'].n}-VM fleet")
                del run.shared["fleet1k"]
                run.kill_marked()
            try:
                rows.extend(BENCHMARKS[name](run))
            except Exception:
                traceback.print_exc()
                failed.append(name)
                rows.append(Row(name, "FAILED (see the traceback above)", "-"))
    print()
    print(table(rows))
    print()
    print(f"machine: {machine()}")
    print(
        f"run: {'quick' if args.quick else 'full'}, --vmm {args.vmm}, "
        f"{time.monotonic() - started:.0f} s, "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
