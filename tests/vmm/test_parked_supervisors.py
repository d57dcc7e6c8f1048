"""Supervisors on a few threads (issue 31; procurator.worker.turns): a
start runs the VM's turns on the caller's thread, which waits for their
answer anyway (a removal runs on the pool); a settled VM parks and holds
no thread; a wake (the VMM's exit) resumes it on the pool; a VM whose
turns are parked on a deadline (QEMU-style timed checks, no sweep) is
checked when it comes.
And the record's hand-over rules (VmRecord: park, wake, poke, claim)."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from vmmhelpers import FAST, ApiCalls, ManagerFactory, Recorder, definition, write_faults

from procurator.core.errors import TemporaryError
from procurator.core.models import EventKind, Phase
from procurator.worker.manager import VmSpec
from procurator.worker.vmrecord import VmRecord


def test_a_start_and_a_replacement_run_on_the_callers_thread(
    make_manager: ManagerFactory, recorder: Recorder
) -> None:
    manager = make_manager(timeouts=replace(FAST, counters_interval=3600.0))
    threads: list[int] = []
    watched = recorder.__call__

    def record(obs, event):  # type: ignore[no-untyped-def]
        threads.append(threading.get_ident())
        watched(obs, event)

    manager.on_change = record
    assert manager.ensure(VmSpec("vm1", "h1", definition())).phase is Phase.RUNNING
    assert manager.ensure(VmSpec("vm1", "h2", definition())).phase is Phase.RUNNING
    assert recorder.kinds("vm1")[-1] is EventKind.REPLACED
    assert set(threads) == {threading.get_ident()}, "a turn ran on another thread"
    manager.remove("vm1")
    assert recorder.kinds("vm1")[-1] is EventKind.REMOVED
    assert len(set(threads)) == 2, "the removal did not run on the pool"


def test_an_ensure_past_its_deadline_hands_the_turns_to_the_pool(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    """The caller's deadline passes during its replacement's slow steps:
    it drove them itself until then, returns not done after the step in
    which the deadline passed, and the pool settles the VM without it."""
    manager = make_manager(timeouts=replace(FAST, counters_interval=3600.0))
    manager.ensure(VmSpec("vm1", "h1", definition()))
    told: list[tuple[int, EventKind | None]] = []

    def record(obs, event):  # type: ignore[no-untyped-def]
        told.append((threading.get_ident(), event.kind if event else None))
        recorder(obs, event)

    manager.on_change = record
    manager.timeouts = replace(manager.timeouts, ensure=0.5)
    write_faults(state_dir, "vm1", {"delay": {"vm.boot": 1.5}})
    with pytest.raises(TemporaryError, match=r"not done after 0\.5 s"):
        manager.ensure(VmSpec("vm1", "h2", definition()))
    caller = threading.get_ident()
    assert told and told[0][0] == caller, "the caller did not drive its VM's turns"
    recorder.wait_for(lambda: EventKind.REPLACED in recorder.kinds("vm1"))
    (replaced,) = [who for who, kind in told if kind is EventKind.REPLACED]
    assert replaced != caller, "the replacement settled on the caller's thread"
    assert manager.get_or_raise("vm1").phase is Phase.RUNNING


def test_an_interrupt_in_a_callers_turn_is_the_callers(
    make_manager: ManagerFactory, recorder: Recorder
) -> None:
    """A KeyboardInterrupt that reaches the turns an ``ensure`` drives (a
    main thread's Ctrl-C) goes up to that caller, and the VM's turns go on
    on the pool: it is no failure of the VM's supervisor."""
    manager = make_manager(timeouts=replace(FAST, counters_interval=3600.0))
    caller = threading.get_ident()
    interrupted: list[Phase] = []

    def record(obs, event):  # type: ignore[no-untyped-def]
        if threading.get_ident() == caller and not interrupted:
            interrupted.append(obs.phase)
            raise KeyboardInterrupt
        recorder(obs, event)

    manager.on_change = record
    with pytest.raises(KeyboardInterrupt):
        manager.ensure(VmSpec("vm1", "h1", definition()))
    assert interrupted == [Phase.STARTING]
    recorder.wait_for(lambda: EventKind.BOOTED in recorder.kinds("vm1"))
    vm = manager._vms["vm1"]
    assert not vm.finished and manager.get_or_raise("vm1").phase is Phase.RUNNING
    assert EventKind.FAILED not in recorder.kinds("vm1")


def test_settled_vms_hold_no_thread(make_manager: ManagerFactory, recorder: Recorder) -> None:
    manager = make_manager(timeouts=replace(FAST, counters_interval=3600.0))
    before = threading.active_count()
    for i in range(12):
        manager.ensure(VmSpec(f"vm{i}", "h1", definition()))
    for i in range(12):
        vm = manager._vms[f"vm{i}"]
        recorder.wait_for(lambda vm=vm: vm.swept is not None)  # type: ignore[misc]
        assert vm.parked
    # The sweep's thread, the exit watcher's, the jailer's reader: not one per VM.
    assert threading.active_count() - before <= 3


def test_a_vmm_exit_resumes_a_parked_vm_on_the_pool(
    make_manager: ManagerFactory, recorder: Recorder
) -> None:
    manager = make_manager(timeouts=replace(FAST, counters_interval=3600.0))
    obs = manager.ensure(VmSpec("vm1", "h1", definition()))
    vm = manager._vms["vm1"]
    recorder.wait_for(lambda: vm.swept is not None)
    assert obs.pid is not None
    os.kill(obs.pid, signal.SIGKILL)
    recorder.wait_for(lambda: EventKind.CRASHED in recorder.kinds("vm1"))
    recorder.wait_for(lambda: EventKind.RESTARTED in recorder.kinds("vm1"))
    assert manager.turns.started >= 1  # the restart ran on the pool


def test_timed_checks_run_when_their_deadline_comes(
    make_manager: ManagerFactory, api_calls: ApiCalls
) -> None:
    """No sweep (counters_interval 0): a settled VM parks until its next
    health check, which the pool's clock runs."""
    manager = make_manager(timeouts=replace(FAST, counters_interval=0))
    assert not manager.sweeping
    manager.ensure(VmSpec("vm1", "h1", definition()))
    start = len(api_calls.endpoints())
    deadline = manager.clock() + 30
    while api_calls.endpoints()[start:].count("vm.info") < 3:
        assert manager.clock() < deadline, api_calls.endpoints()[start:]
        threading.Event().wait(FAST.health_interval)
    assert manager._vms["vm1"].obs.phase is Phase.RUNNING


def test_a_record_is_handed_to_one_thread_at_a_time() -> None:
    resumed: list[str] = []
    vm = VmRecord("vm1", "fake")
    assert vm.parked and not vm.claim(), "nothing woke it"
    vm.resume = lambda: resumed.append("pool")
    vm.poke()
    assert vm.claim() and not vm.claim(), "claimed twice"
    vm.wake()  # while this thread drives: read after its turn
    assert resumed == [] and vm.woken
    assert vm.park(None) is None, "parked over a wake"
    park_id = vm.park(5.0)
    assert park_id is not None and vm.parked
    vm.wake()
    assert resumed == ["pool"] and not vm.parked
    assert not vm.unpark(park_id), "a stale deadline took the VM"
    assert vm.park(None) is not None
    vm.poke()
    vm.release()  # poked, never claimed: the pool takes it
    assert resumed == ["pool", "pool"] and not vm.parked
