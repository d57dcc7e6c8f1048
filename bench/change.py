"""2. Change latency: in the N-VM fleet, one VM's image (so its hash)
changes; time from sending ``apply`` to the master showing the worker's
report of the new observed hash, running, at the new generation.

At two fleet sizes in one run (issue 31, target 1: flat in the fleet):
1,000 VMs (``start``'s fleet), then the same worker grown to 10,000 by one
more apply (100 and 1,000 with ``--quick``). 10,000 VMMs fit only with
the tiny C fake (``--vmm tiny``, the default where ``cc`` exists); with
``--vmm python`` the change is measured at the first size only. The
ratio of the two p50s is the figure, next to the ratio of the floors
measured after each (what the host's load from N idle VMMs does to a
bare replacement).

The apply carries the whole fleet, as ``procurator apply`` does, through one
control client per size: from the second change on, that client remembers
the digests it applied and its first ``applyPatch`` call carries the changed
chunk (one round; ``procurator apply``, a process per apply, lists the
digests first and sends the chunk in a second round, ~1-3 ms more at 1,000
VMs: docs/BENCHMARKS.md, "a one-VM change, second pass"), and it re-encodes
only the chunks whose VMs changed since its last cut (the CLI cuts the
whole fleet every time, ~10 ms at 10,000 VMs: "the apply at 10,000 VMs").
The change's clock starts before the client builds its fleet
(``fleet_of``, 11.6 ms at 10,000 VMs), as a client's own reading of its
file would; that build is its own phase, *read the fleet*, and the
flatness row is given again from the fleet in hand (what grows with the
fleet by the request's nature left out, next to the floor's own move). The master
is asked about the one VM (``describe vm``: the worker's observed generation
and that VM's reported status) with blocking reads: each passes the change
index of the answer before, so the master answers as soon as a report
changes something, and no poll competes with the change for the CPU. (Until
2026-12 this polled: first the whole-fleet ``status``, 25-35 ms per call at
1,000 VMs, then ``describe`` back to back, which kept about one of the two
cores busy and slowed the change it timed by 20-30 ms.) Repeated,
alternating the VM between two images; p50 and p95.

Baselines, same run:

- the bare Cap'n Proto round trip to the same master process —
  ``Master.control()``, a call the master answers on its capnp thread
  without any work — timed on the capnp thread itself (asyncio, no bridge)
  and through the trio bridge;
- the per-replacement floor: what any control plane has to do to replace a
  VM whose image the host does not root yet, done bare — one ``nix-store
  --realise --add-root`` of the image (as the worker runs it), then one
  fake VMM spawned and booted over a raw socket as in ``start``'s bare loop
  (the old VMM's stop is left out: it is a few ms in the worker). Half of
  the changes need that root (the VM goes to an image no other VM of the
  worker runs), the other half find the image rooted already. The VMM
  start is measured twice: jailed with the worker's jail primitives (the
  target's floor: the product jails every VMM) and bare (the floor of the
  rows before 2026-12-07). One floor sample is taken right after each
  change (the change and its floor alternate, so a load that comes and
  goes weighs on both alike: with the floor measured after all the
  changes, the same code gave 1.85x and 0.92x in two runs ten minutes
  apart, the root alone moving 23.6 -> 46.2 ms).

Where a change's time goes (its phases, p50 of each; "where a one-VM
change's time goes" in docs/BENCHMARKS.md): *read the fleet*, the client
building its N-VM fleet; *apply*, from that fleet to the apply's answer
(the client's cut of it, the patch rounds, the master's transaction);
*to running*, from that answer to the time the worker's ``replaced`` event
carries (the push, the worker's pass, rooting the new
image, the old VMM's stop and the new one's start: the floor's part);
*to observed*, from that event to the blocking ``describe`` that shows the
VM running at the new generation (the step's end on the worker, the
status report, the master's store write, the describe's answer). The
event's time is the worker's wall clock in ms, read against this
process's on the same host.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import trio

from bench._harness import Row, Run, control, fmt_s, median, percentile, wait_observed
from bench.start import (
    WORKER_ID,
    OneWorkerFleet,
    bare_jail,
    bare_start,
    fake_config,
    one_worker_fleet,
)
from procurator.core.control import VmDescription
from procurator.core.models import EventKind, Phase
from procurator.core.validation import store_path_hash
from procurator.rpc.address import Address
from procurator.rpc.bridge import Bridge, connect, open_bridge
from procurator.rpc.clients import ControlClient
from procurator.rpc.schema import load_schema
from procurator.worker.vmm.cloud_hypervisor import connection_budget

NAME = "change"
#: ``run.shared`` key of a callable ``(run, fleet) -> list[Row]`` that
#: ``measure`` calls before it grows the fleet past its first size, its rows
#: kept by the callee (``python -m bench`` sets it to idle's window when both
#: run, so that idle is measured at the first size too).
BEFORE_GROWTH = "change.before_growth"


async def _capnp_rtts(address: Address, count: int) -> list[float]:
    """On the capnp thread: ``count`` timed ``Master.control()`` calls."""
    conn = await connect(address, lambda reason: None)
    try:
        master = conn.bootstrap(load_schema().Master)
        await master.control()  # warm up the connection
        times = []
        for _ in range(count):
            started = time.perf_counter()
            await master.control()
            times.append(time.perf_counter() - started)
        return times
    finally:
        conn.close()


async def _bridge_rtt(bridge: Bridge, address: Address, count: int) -> list[float]:
    """From trio: ``count`` bridge crossings, each one ``Master.control()``."""
    holder: dict[str, Any] = {}

    async def open_() -> None:
        conn = await connect(address, lambda reason: None)
        holder["conn"] = conn
        holder["master"] = conn.bootstrap(load_schema().Master)

    async def call() -> None:
        await holder["master"].control()

    async def close() -> None:
        holder.pop("master", None)
        holder.pop("conn").close()

    await bridge.run(open_)
    try:
        await bridge.run(call)
        times = []
        for _ in range(count):
            started = time.perf_counter()
            await bridge.run(call)
            times.append(time.perf_counter() - started)
        return times
    finally:
        await bridge.run(close)


def _settled(desc: VmDescription, generation: int, want: str) -> bool:
    """The assigned worker reported ``generation`` observed, and the VM
    running ``want``."""
    return (
        desc.worker_id == WORKER_ID
        and desc.desired_generation >= generation
        and desc.observed_generation >= desc.desired_generation
        and desc.status is not None
        and desc.status.observed_hash == want
        and desc.status.phase is Phase.RUNNING
    )


async def _wait_settled(
    client: ControlClient, vm_id: str, generation: int, want: str, on_poll: Any
) -> tuple[float, int]:
    """``trio.current_time()`` of the first description that shows it, and
    how many were read. Blocking reads: each ``describe`` passes the change
    index of the one before, so the master answers when a report changed
    something, and nothing polls in between."""
    reads, index = 0, 0
    with trio.fail_after(60):
        while True:
            desc = await client.describe_vm(vm_id, event_limit=0, wait_index=index, wait=10)
            now = trio.current_time()
            reads += 1
            if _settled(desc, generation, want):
                return now, reads
            index = desc.change_index
            on_poll()


def sizes(run: Run) -> tuple[int, ...]:
    """The fleet sizes the change is measured at, in order."""
    small, large = (100, 1000) if run.quick else (1000, 10000)
    return (small, large) if run.vmm == "tiny" else (small,)


def _grow(run: Run, fleet: OneWorkerFleet, n: int) -> float:
    """Apply the fleet with VMs added (image ``a``) until it has ``n``;
    returns the seconds until the worker observed it."""
    for index in range(fleet.n, n):
        fleet.current[f"vm-{index:05d}"] = "a"

    async def apply() -> float:
        async with control(fleet.port) as client:
            started = trio.current_time()
            result = await client.apply(fleet.fleet())
            seen = await wait_observed(
                client,
                result.generation,
                [WORKER_ID],
                timeout=3600,
                interval=1.0,
                on_poll=fleet.worker.check_alive,
            )
            return seen - started

    elapsed = trio.run(apply)
    fleet.n = n
    return elapsed


def open_files(pid: int) -> tuple[int, int]:
    """(descriptors ``pid`` has open, its soft open-file limit)."""
    count = len(os.listdir(f"/proc/{pid}/fd"))
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return count, int(line.split()[3])
    raise RuntimeError(f"no open-file limit in /proc/{pid}/limits")


def _fitting(fleet: OneWorkerFleet, wanted: int, step: int) -> tuple[int, str]:
    """``wanted``, or the largest multiple of ``step`` below it whose
    descriptors fit the worker's open-file limit (90 % of it), with a note
    saying why. Past what it holds now a VM adds its pidfd, and its kept
    API connection while the worker keeps fewer than its budget
    (``connection_budget``: a quarter of the limit; the rest connect per
    call)."""
    count, limit = open_files(fleet.worker.pid)
    budget = connection_budget(limit)

    def need(n: int) -> int:
        return count + (n - fleet.n) + max(0, min(n, budget) - min(fleet.n, budget))

    if need(wanted) <= 0.9 * limit:
        return wanted, ""
    fits = wanted
    while fits > fleet.n and need(fits) > 0.9 * limit:
        fits -= step
    return fits, (
        f"not {wanted}: the worker holds {count:,} descriptors at {fleet.n} VMs "
        f"(a pidfd a VM, an API connection kept for each of the first {budget:,}), "
        f"{wanted} VMs need ~{need(wanted):,}, its open-file limit is {limit:,} "
        "(and this host cannot raise it: no CAP_SYS_RESOURCE; a deployed worker has "
        "LimitNOFILE=1048576, nix/modules/worker.nix)"
    )


def measure(run: Run) -> list[Row]:
    fleet = one_worker_fleet(run)
    rows: list[Row] = []
    # size -> (p50, jailed floor, p50 from the fleet in hand, the client's read of it)
    p50s: dict[int, tuple[float, float, float, float]] = {}
    for wanted in sizes(run):
        size, why = _fitting(fleet, wanted, 100 if run.quick else 1000)
        if why:
            run.log(f"change: {why}")
        if fleet.n < size:
            if (before_growth := run.shared.pop(BEFORE_GROWTH, None)) is not None:
                before_growth(run, fleet)
            run.log(f"change: growing the fleet from {fleet.n} to {size} VMs")
            before, _ = open_files(fleet.worker.pid)
            vms_before = fleet.n
            grown = _grow(run, fleet, size)
            run.log(f"change: {size} VMs observed after {grown:.1f} s")
            after, limit = open_files(fleet.worker.pid)
            files = (
                f"the worker's descriptors {before:,} -> {after:,} "
                f"({(after - before) / (size - vms_before):.2f} per VM added; limit {limit:,})"
            )
            run.log(f"change: {files}")
            rows.append(
                Row(
                    NAME,
                    f"grow the worker's fleet to {size} VMs (one apply -> observed)",
                    fmt_s(grown),
                    note=(
                        f"the fake VMM: {run.vmm}; the fleet stays for idle; {files}. {why}"
                    ).strip(),
                )
            )
        size_rows, p50, floor, in_hand, read = _measure_size(run, fleet)
        rows.extend(size_rows)
        p50s[size] = (p50, floor, in_hand, read)
    if len(p50s) == 2:
        (small, (p50_s, floor_s, hand_s, read_s)), (large, (p50_l, floor_l, hand_l, read_l)) = (
            sorted(p50s.items())
        )
        rows.append(
            Row(
                NAME,
                f"one-VM change p50, {large} VMs against {small}",
                fmt_s(p50_l),
                f"{fmt_s(p50_s)} at {small} VMs",
                f"{p50_l / p50_s:.2f}x",
                "<= 1.2x",
                note=(
                    f"the jailed floor moved {floor_l / floor_s:.2f}x between the two sizes "
                    f"({fmt_s(floor_s)} -> {fmt_s(floor_l)}); ratio of the ratios to the floor "
                    f"{(p50_l / floor_l) / (p50_s / floor_s):.2f}x"
                ),
            )
        )
        rows.append(
            Row(
                NAME,
                "... from the fleet in hand (the client's build of it left out)",
                fmt_s(hand_l),
                f"{fmt_s(hand_s)} at {small} VMs",
                f"{hand_l / hand_s:.2f}x",
                "",
                note=(
                    f"the client's build of its fleet, p50: {fmt_s(read_s)} at {small} VMs, "
                    f"{fmt_s(read_l)} at {large} (what any whole-fleet apply pays before it "
                    "sends: reading the file, O(the fleet)); together with the jailed "
                    f"floor's move ({fmt_s(floor_l - floor_s)}) it is "
                    f"{fmt_s(read_l - read_s + floor_l - floor_s)} of the "
                    f"{fmt_s(p50_l - p50_s)} the p50 grew, where <= 1.2x leaves "
                    f"{fmt_s(0.2 * p50_s)}"
                ),
            )
        )
    return rows


async def _replaced_at(client: ControlClient, vm_id: str, op_id: str) -> float | None:
    """The wall-clock time (s) of the worker's ``replaced`` event of VM
    ``vm_id`` for ``op_id``, None when the master holds none."""
    desc = await client.describe_vm(vm_id, event_limit=10)
    times = [
        e.event.unix_time_ms / 1000
        for e in desc.events
        if e.event.kind is EventKind.REPLACED and e.event.op_id == op_id
    ]
    return max(times, default=None)


class _FloorSampler:
    """One floor sample (root, bare start, jailed start) at a time, taken
    between changes (module docstring), from a worker thread."""

    def __init__(self, run: Run, image: str, tag: str) -> None:
        self.run, self.image, self.tag = run, image, tag
        self.config = fake_config(run)
        self.jail = bare_jail(run, run.dir / f"{tag}-jail")
        self.roots: list[float] = []
        self.starts: list[float] = []
        self.jailed: list[float] = []

    def sample(self) -> None:
        run, index = self.run, len(self.roots)
        link = run.dir / f"{self.tag}-roots" / f"root-{index}"
        link.parent.mkdir(exist_ok=True)
        began = time.perf_counter()
        subprocess.run(
            ["nix-store", "--realise", self.image, "--add-root", str(link)],
            env=run.nix_env,
            check=True,
            capture_output=True,
        )
        self.roots.append(time.perf_counter() - began)
        link.unlink()  # its gcroots/auto entry goes with the run (Run.close)
        self.starts.append(bare_start(run, 1, self.config, tag=f"{self.tag}-{index}"))
        self.jailed.append(
            bare_start(run, 1, self.config, tag=f"{self.tag}-j{index}", jail=self.jail)
        )

    def close(self) -> None:
        self.jail.close()


def _measure_size(run: Run, fleet: OneWorkerFleet) -> tuple[list[Row], float, float, float, float]:
    """The change's rows at the fleet's present size, its p50, the jailed
    per-replacement floor, the p50 from the fleet in hand (built) to
    observed, and the median of the client's build of its fleet."""
    repeats = 5 if run.quick else 20
    vm_id = fleet.vm_ids[0]
    latencies: list[float] = []
    polls: list[float] = []
    describes: list[float] = []
    reads: list[int] = []
    in_hand: list[float] = []  # from the fleet built to observed
    builds: list[float] = []  # the client's build of its fleet, every change
    phases: dict[str, list[float]] = {
        "read the fleet": [],
        "apply": [],
        "to running": [],
        "to observed": [],
    }
    address = Address(host="127.0.0.1", port=fleet.port)
    floors = _FloorSampler(run, fleet.images["b"], f"floor-{fleet.n}")

    async def main() -> tuple[list[float], list[float]]:
        async with control(fleet.port) as client:
            for index in range(repeats):
                image = "b" if fleet.current[vm_id] == "a" else "a"
                fleet.current[vm_id] = image
                want = store_path_hash(fleet.images[image])
                await trio.sleep(0.5)  # let the previous change's reports settle
                wall = time.time()
                started = trio.current_time()
                desired = fleet.fleet()  # the client reading its N-VM fleet file
                built = trio.current_time()
                result = await client.apply(desired)
                answered = trio.current_time()
                seen, count = await _wait_settled(
                    client, vm_id, result.generation, want, fleet.worker.check_alive
                )
                latencies.append(seen - started)
                in_hand.append(seen - built)
                builds.append(built - started)
                reads.append(count)
                replaced = await _replaced_at(client, vm_id, result.op_id)
                if replaced is not None:  # the worker's clock, in ms
                    running = min(max(replaced - wall, answered - started), seen - started)
                    phases["read the fleet"].append(built - started)
                    phases["apply"].append(answered - built)
                    phases["to running"].append(running - (answered - started))
                    phases["to observed"].append(seen - started - running)
                run.log(f"change {index + 1}/{repeats}: {(seen - started) * 1e3:.1f} ms")
                await trio.to_thread.run_sync(floors.sample)
            for _ in range(20):
                began = trio.current_time()
                await client.describe_vm(vm_id, event_limit=0)
                describes.append(trio.current_time() - began)
                began = trio.current_time()
                await client.status()
                polls.append(trio.current_time() - began)
        async with open_bridge() as bridge:
            bare = await bridge.run(_capnp_rtts, address, 200)
            bridged = await _bridge_rtt(bridge, address, 200)
        return bare, bridged

    try:
        bare, bridged = trio.run(main)
    finally:
        floors.close()
    root_s, start_s, jailed_s = median(floors.roots), median(floors.starts), median(floors.jailed)
    floor = root_s + jailed_s
    bare_floor = root_s + start_s
    p50, p95 = median(latencies), percentile(latencies, 95)
    rtt, bridged_rtt = median(bare), median(bridged)
    rows = [
        Row(
            NAME,
            f"one VM replaced in a {fleet.n}-VM fleet: apply -> observed, p50",
            fmt_s(p50),
            f"{fmt_s(rtt)} capnp RTT",
            f"{p50 / rtt:.0f}x RTT",
            "",
            note=(
                f"{repeats} repeats; p95 {fmt_s(p95)}; capnp RTT through the trio bridge "
                f"{fmt_s(bridged_rtt)}; blocking describes, {median(reads):.0f} per change "
                f"(median); one describe of the VM takes {fmt_s(median(describes))}, a status "
                f"of the {fleet.n}-VM fleet {fmt_s(median(polls))}"
            ),
        ),
        Row(NAME, "... p95", fmt_s(p95), f"{fmt_s(rtt)} capnp RTT", f"{p95 / rtt:.0f}x RTT"),
        Row(
            NAME,
            f"... p50 against the per-replacement floor ({fleet.n} VMs)",
            fmt_s(p50),
            f"{fmt_s(floor)} nix-store root + jailed VMM start",
            f"{p50 / floor:.2f}x",
            "<= 1.5x",
            note=(
                f"floor, medians of {repeats}, one after each change: nix-store --realise "
                f"--add-root {fmt_s(root_s)}, one fake-VMM ({run.vmm}) spawn + "
                f"ping/create/boot/info jailed "
                f"{fmt_s(jailed_s)} (Jail.prepare + VmJail.spawn, the jailer warm), bare "
                f"{fmt_s(start_s)}; against root + bare start ({fmt_s(bare_floor)}) the p50 is "
                f"{p50 / bare_floor:.2f}x; half of the changes need the root, half find the "
                "image rooted"
            ),
        ),
    ]
    if phases["apply"]:
        split = ", ".join(f"{name} {fmt_s(median(values))}" for name, values in phases.items())
        rows.append(
            Row(
                NAME,
                f"... where it goes ({fleet.n} VMs), p50 of each phase",
                split,
                f"{fmt_s(floor)} floor",
                "",
                "",
                note=(
                    f"{len(phases['apply'])} of {repeats} changes (those whose replaced event "
                    "the master held); to running holds the floor's work: the root (half of "
                    "the changes) and the start"
                ),
            )
        )
    return rows, p50, floor, median(in_hand), median(builds)
