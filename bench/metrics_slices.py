"""Issue 31: does a big metrics report hold the worker's session? A real
master (``procurator master``, its own process and capnp thread) and this
process as the worker (``CapnpMasterSession`` on this process's capnp
thread), over a loopback socket.

``python -m bench.metrics_slices [--rounds N]`` prints:

- the cost of one report in pieces: ``fill_metrics`` (what the worker's
  capnp thread does before the call leaves), ``metrics_from_reader`` (what
  the master's does before it applies) and ``apply_metrics_report``, for a
  2,000-series slice, the 20,000-series change of a one-VM change at 10,000
  VMs (2 moved series a VM) and the 180,000-series whole report a session
  starts with (18 series a VM);
- the round trip of a small call of the same session (``reportEvents`` with
  no event: the worker's capnp thread, the wire, the master's capnp thread
  and its trio thread, and back), alone, and back to back all the while a
  big report is in flight, sent as one call or as bounded slices
  (``report_slices``, 2,000 series a call; and 1,000), the modes
  alternated round by round;
- the latency of a push: a control client in a third process (its own
  capnp thread) applies a one-VM change 10 ms into the big report, the
  time from its sending to the worker's ``on_push`` (one clock, the host's
  wall clock), against the same with no report in flight.

The series are worker-wide ones with a label per VM (the master vets a
VM's series against the VMs assigned; with no fleet here, none is), of the
size a VM's are on the wire.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from procurator.core.errors import UnavailableError
from procurator.core.fleet import parse_fleet
from procurator.core.metrics import (
    MetricSample,
    MetricsReport,
    apply_metrics_report,
    report_slices,
    series_of,
)
from procurator.core.models import WorkerInfo
from procurator.rpc.bridge import TRAVERSAL_LIMIT_WORDS, open_bridge
from procurator.rpc.clients import CapnpMasterDialer, CapnpMasterSession, open_control
from procurator.rpc.convert import fill_metrics, metrics_from_reader
from procurator.rpc.schema import load_schema

VMS = 10_000


def _series(count: int, value: float) -> tuple[MetricSample, ...]:
    return tuple(
        MetricSample(
            f"procurator_worker_bench_series_{n % 18}", value, "", (("vm", f"web-{n // 18:05d}"),)
        )
        for n in range(count)
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f} ms"


def pieces() -> None:
    schema = load_schema()
    held_all = series_of(_series(18 * VMS, 1.0))
    for count in (2_000, 2 * VMS, 18 * VMS):
        report = MetricsReport("host-a", _series(count, 2.0), whole=count == 18 * VMS)
        encode, decode, apply = [], [], []
        for _ in range(5):
            started = time.perf_counter()
            message = schema.MetricsReport.new_message()
            fill_metrics(message, report)
            data = message.to_bytes()
            encode.append(time.perf_counter() - started)
            started = time.perf_counter()
            with schema.MetricsReport.from_bytes(
                data, traversal_limit_in_words=TRAVERSAL_LIMIT_WORDS
            ) as reader:
                decoded = metrics_from_reader(reader)
            decode.append(time.perf_counter() - started)
            held = dict(held_all)
            started = time.perf_counter()
            apply_metrics_report(held, decoded)
            apply.append(time.perf_counter() - started)
        print(
            f"{count:>7} series ({len(data) / 1e6:5.2f} MB): encode {_ms(min(encode))}, "
            f"decode {_ms(min(decode))}, apply {_ms(min(apply))}"
        )


async def _small_calls(session: CapnpMasterSession, until: trio.Event, most: int) -> list[float]:
    """Round trips of back-to-back small calls until ``until`` (or ``most``)."""
    trips: list[float] = []
    while not until.is_set() and len(trips) < most:
        started = trio.current_time()
        await session.report_events([])
        trips.append(trio.current_time() - started)
    return trips


class _Pushes:
    """A control client in a process of its own (``--apply-helper``) whose
    applies make the master push this worker; the pushes' arrival times."""

    def __init__(self, process: trio.Process) -> None:
        self._process = process
        self._lines = b""
        self.arrived: list[float] = []
        self.wake = trio.Event()

    async def on_push(self, update: object) -> None:
        self.arrived.append(time.time())
        self.wake.set()

    async def latency(self) -> float:
        """Apply a change; the time from its sending to its push here."""
        assert self._process.stdin is not None and self._process.stdout is not None
        count = len(self.arrived)
        await self._process.stdin.send_all(b"go\n")
        while b"\n" not in self._lines:
            self._lines += await self._process.stdout.receive_some()
        line, self._lines = self._lines.split(b"\n", 1)
        sent = float(line)
        while len(self.arrived) == count:
            self.wake = trio.Event()
            await self.wake.wait()
        return self.arrived[count] - sent


async def _apply_helper(address: str) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    buffered = b""
    async with open_bridge() as bridge, open_control(bridge, address) as control:
        for index in itertools.count():
            while b"\n" not in buffered:
                data = await stdin.receive_some()
                if not data:
                    return
                buffered += data
            _, buffered = buffered.split(b"\n", 1)
            tag = "ab"[index % 2]
            image = f"/nix/store/{tag * 32}-vm"
            fleet = parse_fleet(
                f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{image}" }} ]\n'
            )
            sent = time.time()
            await control.apply(fleet)
            print(sent, flush=True)


async def _with_report(
    session: CapnpMasterSession,
    send: Callable[[MetricsReport], Awaitable[bool]],
    report: MetricsReport,
    pushes: _Pushes,
) -> tuple[float, list[float], float]:
    done = trio.Event()
    trips: list[float] = []
    took = 0.0
    push = 0.0

    async def big() -> None:
        nonlocal took
        started = trio.current_time()
        await send(report)
        took = trio.current_time() - started
        done.set()

    async def small() -> None:
        trips.extend(await _small_calls(session, done, 10_000))

    async def a_push() -> None:
        nonlocal push
        await trio.sleep(0.01)
        push = await pushes.latency()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(big)
        await trio.sleep(0)
        nursery.start_soon(small)
        nursery.start_soon(a_push)
    return took, trips, push


async def wire(rounds: int) -> None:
    whole = MetricsReport("host-a", _series(18 * VMS, 1.0))
    change = MetricsReport("host-a", _series(2 * VMS, 2.0), whole=False)
    with tempfile.TemporaryDirectory() as tmp:
        port = 17300 + os.getpid() % 1000
        log = Path(tmp, "master.log")
        with log.open("w") as err:
            master = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "procurator",
                    "master",
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--database",
                    str(Path(tmp, "m.db")),
                    "--log-level",
                    "debug",
                    "--log-format",
                    "json",
                ],
                stderr=err,
            )
        helper: trio.Process | None = None
        try:
            async with open_bridge() as bridge:
                dialer = CapnpMasterDialer(bridge, f"127.0.0.1:{port}")
                for _ in range(100):
                    try:
                        session = await dialer.connect(WorkerInfo("host-a"), _no_push)
                        break
                    except UnavailableError:  # the master is starting
                        await trio.sleep(0.1)
                else:
                    raise RuntimeError("the master did not come up")
                await session.aclose()
                helper = await trio.lowlevel.open_process(
                    [
                        sys.executable,
                        "-m",
                        "bench.metrics_slices",
                        "--apply-helper",
                        f"127.0.0.1:{port}",
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
                pushes = _Pushes(helper)
                session = await dialer.connect(WorkerInfo("host-a"), pushes.on_push)
                figures: dict[str, list[float]] = {}
                try:
                    await pushes.latency()  # the first apply, and any push of the registration
                    await trio.sleep(0.5)

                    async def one_call(report: MetricsReport) -> bool:
                        return await session._send_metrics(report, None)

                    async def sliced(report: MetricsReport) -> bool:
                        return await session._send_sliced(report, None)

                    async def by_1000(report: MetricsReport) -> bool:
                        for part in report_slices(report, 1_000):
                            takes_changes = await session._send_metrics(part, None)
                        return takes_changes

                    modes: dict[str, Callable[[MetricsReport], Awaitable[bool]]] = {
                        "one call": one_call,
                        "sliced": sliced,
                        "sliced by 1,000": by_1000,
                    }
                    for index in range(len(modes) * rounds):
                        figures.setdefault("alone", []).extend(
                            await _small_calls(session, trio.Event(), 30)
                        )
                        figures.setdefault("push alone", []).append(await pushes.latency())
                        mode = list(modes)[index % len(modes)]
                        send = modes[mode]
                        for name, report in (("whole 180,000", whole), ("change 20,000", change)):
                            took, trips, push = await _with_report(session, send, report, pushes)
                            figures.setdefault(f"{name} {mode}: report", []).append(took)
                            figures.setdefault(f"{name} {mode}: small call", []).extend(trips)
                            figures.setdefault(f"{name} {mode}: push", []).append(push)
                finally:
                    await session.aclose()
        finally:
            if helper is not None:
                helper.kill()
                await helper.wait()
            master.terminate()
            master.wait()
        base = statistics.median(figures.pop("alone"))
        push_base = statistics.median(figures.pop("push alone"))
        print(f"small call alone: median {_ms(base)}; push alone: median {_ms(push_base)}")
        for name, values in sorted(figures.items()):
            if name.endswith("push"):
                print(
                    f"{name:45}: n {len(values):4}, median {_ms(statistics.median(values))} "
                    f"({statistics.median(values) / push_base:7.1f}x alone), max "
                    f"{_ms(max(values))}"
                )
                continue
            print(
                f"{name:45}: n {len(values):4}, median {_ms(statistics.median(values))} "
                f"({statistics.median(values) / base:7.1f}x alone), max {_ms(max(values))} "
                f"({max(values) / base:7.1f}x)"
            )
        applied = [line for line in log.read_text().splitlines() if "metrics report of" in line]
        print(f"master DEBUG lines: {len(applied)}; last: {applied[-1][:300] if applied else ''}")


async def _no_push(update: object) -> None:
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each mode (alternated)")
    parser.add_argument("--apply-helper", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.apply_helper:
        trio.run(_apply_helper, args.apply_helper)
        return
    print(f"load average: {os.getloadavg()}")
    pieces()
    trio.run(wire, args.rounds)
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
