"""VM changes cross from supervisor threads into trio in batches (issue 31
target 2): a burst of starts makes four or five changes per VM, and each
``run_sync_soon`` of its own was a wake-up of trio (a system call, a
context switch, a loop turn) and a ``publish_events`` of one event.

The worker's own runtime (``ReconcilingHandler``, in process, unconfined,
no network, an empty state dir: no VMM runs) with a publisher that records
what it is given."""

from __future__ import annotations

import sys
from pathlib import Path

import trio
import trio.testing
from publisherhelpers import RecordingPublisher

from procurator.core.models import (
    EventKind,
    Phase,
    PowerState,
    VmEvent,
)
from procurator.worker.runtime import ReconcilingHandler, RuntimeOptions
from procurator.worker.vmrecord import VmObservation


def _handler(state_dir: Path, publisher: RecordingPublisher) -> ReconcilingHandler:
    options = RuntimeOptions(
        driver="cloud-hypervisor",
        vmm_binary=sys.executable,
        network=False,
        jail=None,
        stop_grace=2.0,
    )
    return ReconcilingHandler(
        worker_id="host-a",
        state_dir=state_dir,
        options=options,
        publisher=publisher,
    )


def _observation(vm_id: str) -> VmObservation:
    return VmObservation(vm_id, "h1", Phase.RUNNING, PowerState.RUNNING, PowerState.RUNNING)


async def test_a_burst_of_changes_reaches_trio_as_one_batch_in_order(tmp_path: Path) -> None:
    publisher = RecordingPublisher()
    handler = _handler(tmp_path / "state", publisher)
    events = [VmEvent(f"vm-{i:03d}", EventKind.BOOTED, f"booted {i}") for i in range(50)]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(handler.run)
            # Fifty changes while trio is busy (here: this task, which does
            # not yield until they are all queued), as supervisor threads
            # queue them during a burst of starts, and actuator changes
            # (no event) between them.
            for event in events:
                handler._on_change(_observation(event.vm_id), event)
                handler._in_flight_changed(event.vm_id)
            await trio.testing.wait_all_tasks_blocked()
            assert publisher.event_calls == [events]
            # The next change, with trio idle, goes at once, on its own.
            late = VmEvent("vm-late", EventKind.STOPPED, "stopped")
            await trio.to_thread.run_sync(handler._on_change, _observation("vm-late"), late)
            await trio.testing.wait_all_tasks_blocked()
            assert publisher.event_calls == [events, [late]]
            nursery.cancel_scope.cancel()
    finally:
        handler.close()


async def test_changes_from_many_threads_at_once_all_arrive_each_threads_in_order(
    tmp_path: Path,
) -> None:
    # Supervisor threads queue while a take is pending, while one runs and
    # right after one emptied the queue: none may be lost (a change whose
    # put saw a take pending must ride with a take that has yet to empty
    # the queue) and each thread's changes keep their order.
    publisher = RecordingPublisher()
    handler = _handler(tmp_path / "state", publisher)
    threads, each = 4, 250

    def burst(thread: int) -> None:
        for i in range(each):
            event = VmEvent(f"vm-{thread}", EventKind.BOOTED, str(i))
            handler._on_change(_observation(event.vm_id), event)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(handler.run)
            async with trio.open_nursery() as bursts:
                for thread in range(threads):
                    bursts.start_soon(trio.to_thread.run_sync, burst, thread)
            await trio.testing.wait_all_tasks_blocked()
            got = [event for call in publisher.event_calls for event in call]
            assert len(got) == threads * each
            for thread in range(threads):
                mine = [e.message for e in got if e.vm_id == f"vm-{thread}"]
                assert mine == [str(i) for i in range(each)]
            nursery.cancel_scope.cancel()
    finally:
        handler.close()
