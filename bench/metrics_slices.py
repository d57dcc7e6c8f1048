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
  (``report_slices``), the two alternated round by round.

The series are worker-wide ones with a label per VM (the master vets a
VM's series against the VMs assigned; with no fleet here, none is), of the
size a VM's are on the wire.
"""

from __future__ import annotations

import argparse
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
from procurator.core.metrics import MetricSample, MetricsReport, apply_metrics_report, series_of
from procurator.core.models import WorkerInfo
from procurator.rpc.bridge import TRAVERSAL_LIMIT_WORDS, open_bridge
from procurator.rpc.clients import CapnpMasterDialer, CapnpMasterSession
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


async def _with_report(
    session: CapnpMasterSession,
    send: Callable[[MetricsReport], Awaitable[bool]],
    report: MetricsReport,
) -> tuple[float, list[float]]:
    done = trio.Event()
    trips: list[float] = []
    took = 0.0

    async def big() -> None:
        nonlocal took
        started = trio.current_time()
        await send(report)
        took = trio.current_time() - started
        done.set()

    async def small() -> None:
        trips.extend(await _small_calls(session, done, 10_000))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(big)
        await trio.sleep(0)
        nursery.start_soon(small)
    return took, trips


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
                figures: dict[str, list[float]] = {}
                for index in range(2 * rounds):
                    session = await dialer.connect(WorkerInfo("host-a"), _no_push)
                    try:
                        alone = await _small_calls(session, trio.Event(), 30)
                        figures.setdefault("alone", []).extend(alone)
                        mode = "sliced" if index % 2 else "one call"
                        send = session._send_sliced if index % 2 else session._send_metrics
                        for name, report in (("whole 180,000", whole), ("change 20,000", change)):
                            took, trips = await _with_report(session, send, report)
                            figures.setdefault(f"{name} {mode}: report", []).append(took)
                            figures.setdefault(f"{name} {mode}: small call", []).extend(trips)
                    finally:
                        await session.aclose()
        finally:
            master.terminate()
            master.wait()
        base = statistics.median(figures.pop("alone"))
        print(f"small call alone: median {_ms(base)}")
        for name, values in sorted(figures.items()):
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
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()}")
    pieces()
    trio.run(wire, args.rounds)
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
