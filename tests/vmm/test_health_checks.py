"""Health checks cost one VMM API call each in the steady state, and still
see what the VMM reports: a state change, a hang.

With cloud-hypervisor (state marks) and counters to read, the manager's
sweep checks every settled VM: one ``vm.counters`` call per counters
interval, on one thread, while the VM's supervisor waits with no timeout.
The VMM's event monitor file unchanged since the supervisor's last
``vm.info`` means an unchanged state; any transition (here: a third party
pausing the VM through its API socket) or a VMM that does not answer makes
the supervisor read the state itself, and it converges back or escalates.
Without counters, each supervisor checks its VMM on its own timer."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from vmmhelpers import (
    FAST,
    ApiCalls,
    ManagerFactory,
    Recorder,
    api_client,
    definition,
    write_faults,
)

from procurator.core.models import EventKind, Phase
from procurator.worker.manager import VmSpec

API = "http://localhost/api/v1"


def _settle(api_calls: ApiCalls, recorder: Recorder, endpoint: str, count: int) -> list[str]:
    """Wait until ``endpoint`` was called ``count`` more times; return every
    endpoint called meanwhile."""
    start = len(api_calls.endpoints())
    recorder.wait_for(lambda: api_calls.endpoints()[start:].count(endpoint) >= count)
    return api_calls.endpoints()[start:]


def test_a_settled_vm_is_checked_with_one_counters_call(
    make_manager: ManagerFactory, api_calls: ApiCalls, recorder: Recorder
) -> None:
    manager = make_manager()
    obs = manager.ensure(VmSpec("vm1", "h1", definition()))
    assert obs.phase is Phase.RUNNING
    _settle(api_calls, recorder, "vm.counters", 1)  # the first check read the state too
    window = _settle(api_calls, recorder, "vm.counters", 10)
    assert set(window) == {"vm.counters"}, window
    assert manager.counters()["vm1"], "the counters call's answer is kept"


def test_a_start_reads_the_vms_state_once(
    make_manager: ManagerFactory, api_calls: ApiCalls, recorder: Recorder
) -> None:
    """The launch's ``vm.info``, which confirms the boot, is the new VMM's
    first health check too (``VmmHandle.confirmed``): the start asks it
    once, and the state mark read with it lets the sweep's next checks be
    counters calls alone."""
    manager = make_manager()
    before = len(api_calls.endpoints())
    assert manager.ensure(VmSpec("vm1", "h1", definition())).phase is Phase.RUNNING
    # The sweep may already have read the settled VM's counters.
    started = [e for e in api_calls.endpoints()[before:] if e != "vm.counters"]
    assert started[started.index("vm.create") :] == ["vm.create", "vm.boot", "vm.info"], started
    window = _settle(api_calls, recorder, "vm.counters", 3)
    assert set(window) == {"vm.counters"}, window


def test_without_counters_every_check_reads_the_state(
    make_manager: ManagerFactory, api_calls: ApiCalls, recorder: Recorder
) -> None:
    manager = make_manager(timeouts=replace(FAST, counters_interval=0))
    manager.ensure(VmSpec("vm1", "h1", definition()))
    window = _settle(api_calls, recorder, "vm.info", 10)
    assert set(window) == {"vm.info"}, window


def test_a_state_change_the_vmm_reports_is_seen_and_undone(
    make_manager: ManagerFactory, state_dir: Path, api_calls: ApiCalls, recorder: Recorder
) -> None:
    manager = make_manager()
    obs = manager.ensure(VmSpec("vm1", "h1", definition()))
    _settle(api_calls, recorder, "vm.counters", 2)  # checks are counters-only now
    with api_client(str(state_dir / "vms" / "vm1" / "run" / "api.sock")) as client:
        assert client.put(f"{API}/vm.pause").status_code == 204  # behind the worker's back
        window = _settle(api_calls, recorder, "vm.resume", 1)
        assert window.index("vm.info") < window.index("vm.resume"), window
        recorder.wait_for(lambda: client.get(f"{API}/vm.info").json()["state"] == "Running")
    # Reported once the supervisor read the state it resumed the VM to.
    recorder.wait_for(lambda: EventKind.RESUMED in recorder.kinds("vm1"))
    after = manager.get("vm1")
    assert after is not None and after.pid == obs.pid and after.phase is Phase.RUNNING


def test_a_vmm_that_stops_answering_the_sweep_is_escalated(
    make_manager: ManagerFactory, state_dir: Path, api_calls: ApiCalls, recorder: Recorder
) -> None:
    """The sweep's counters call goes unanswered: the supervisor checks
    the state itself, gets no answer ``hung_after`` times and restarts the
    VM. (A VMM that answers ``vm.info`` but not ``vm.counters`` is not
    hung: its counters go stale, the VM is left alone.)"""
    timeouts = replace(FAST, api=0.3, power_button_wait=0.5, shutdown_vmm_wait=0.5)
    manager = make_manager(timeouts=timeouts)
    first = manager.ensure(VmSpec("vm1", "h1", definition()))
    _settle(api_calls, recorder, "vm.counters", 2)
    faults = write_faults(state_dir, "vm1", {"hang": ["*"]})
    recorder.wait_for(lambda: EventKind.CRASHED in recorder.kinds("vm1"))
    faults.unlink()
    crashed = next(e for e in recorder.events("vm1") if e.kind is EventKind.CRASHED)
    assert "did not answer its health check 2 times in a row (hung)" in crashed.message
    recorder.wait_for(
        lambda: (
            (o := manager.get("vm1")) is not None
            and o.phase is Phase.RUNNING
            and o.pid not in (None, first.pid)
        )
    )


def test_the_check_budget_stretches_every_vms_interval(
    make_manager: ManagerFactory, api_calls: ApiCalls, recorder: Recorder
) -> None:
    """With more VMs than the budget allows checking at health_interval,
    each VM waits VMs / budget between checks: here 2 VMs at 0.02 checks a
    second, 100 s, where health_interval alone would check every 0.1 s."""
    timeouts = replace(FAST, health_checks_per_second=0.02, counters_interval=0)
    manager = make_manager(timeouts=timeouts)
    assert not manager.sweeping  # no counters: the supervisors check on their own
    assert manager.health_interval() == FAST.health_interval  # no VM yet
    for vm_id in ("vm1", "vm2"):
        manager.ensure(VmSpec(vm_id, "h1", definition()))
    assert manager.health_interval() == 100.0
    # Each VM's first check is its launch's own vm.info.
    recorder.wait_for(lambda: api_calls.endpoints().count("vm.info") >= 2)
    start = len(api_calls.endpoints())
    time.sleep(10 * FAST.health_interval)
    assert api_calls.endpoints()[start:] == []


def test_a_budget_the_fleet_fits_in_leaves_the_interval_alone(
    make_manager: ManagerFactory,
) -> None:
    manager = make_manager(timeouts=replace(FAST, health_checks_per_second=1000.0))
    manager.ensure(VmSpec("vm1", "h1", definition()))
    assert manager.health_interval() == FAST.health_interval


def test_an_idle_supervisor_sleeps_and_the_sweep_checks_it(
    make_manager: ManagerFactory, api_calls: ApiCalls, recorder: Recorder
) -> None:
    """A settled VM's supervisor makes no call and runs no turn for 10
    health intervals, parked on no thread; each sweep is one
    ``vm.counters`` call. (Before the sweep, each supervisor made a check
    every health interval.)"""
    manager = make_manager(timeouts=replace(FAST, counters_interval=3600.0))
    assert manager.sweeping
    manager.ensure(VmSpec("vm1", "h1", definition()))
    vm = manager._vms["vm1"]
    recorder.wait_for(lambda: vm.swept is not None)  # its idle wait began
    assert vm.drive is not None
    supervisor = vm.drive.__self__  # type: ignore[attr-defined]  # a bound method
    turns, start = supervisor.turns_run, len(api_calls.endpoints())
    time.sleep(10 * FAST.health_interval)
    assert api_calls.endpoints()[start:] == []
    assert supervisor.turns_run == turns, "the idle supervisor woke"
    assert vm.parked
    for _ in range(3):
        manager.sweep()
    assert api_calls.endpoints()[start:] == ["vm.counters"] * 3
    assert manager.counters()["vm1"], "the sweep keeps what it read"
    assert vm.swept is not None, "an answering VMM stays the sweep's"


def test_a_transition_is_seen_through_the_event_file_by_one_sweep(
    make_manager: ManagerFactory, state_dir: Path, api_calls: ApiCalls, recorder: Recorder
) -> None:
    """A pause behind the worker's back moves the VMM's event file: the
    next sweep makes no counters call for it but has the supervisor read
    the state, which then resumes the VM."""
    manager = make_manager(timeouts=replace(FAST, counters_interval=3600.0))
    manager.ensure(VmSpec("vm1", "h1", definition()))
    vm = manager._vms["vm1"]
    recorder.wait_for(lambda: vm.swept is not None)
    with api_client(str(state_dir / "vms" / "vm1" / "run" / "api.sock")) as client:
        assert client.put(f"{API}/vm.pause").status_code == 204
        start = len(api_calls.endpoints())
        manager.sweep()
        window = _settle(api_calls, recorder, "vm.resume", 1)
        assert window[:2] == ["vm.info", "vm.resume"], window
        recorder.wait_for(lambda: client.get(f"{API}/vm.info").json()["state"] == "Running")
    recorder.wait_for(lambda: EventKind.RESUMED in recorder.kinds("vm1"))
    assert "vm.counters" not in api_calls.endpoints()[start:]


def test_a_hung_vmm_does_not_keep_the_sweep_from_the_others(
    make_manager: ManagerFactory, state_dir: Path, api_calls: ApiCalls, recorder: Recorder
) -> None:
    """One sweep over a VMM that answers nothing and one that answers:
    the first is handed to its supervisor (which escalates it), the
    second's counters are read all the same."""
    timeouts = replace(
        FAST, api=0.3, counters_interval=3600.0, power_button_wait=0.5, shutdown_vmm_wait=0.5
    )
    manager = make_manager(timeouts=timeouts)
    for vm_id in ("vm1", "vm2"):
        manager.ensure(VmSpec(vm_id, "h1", definition()))
    hung, fine = manager._vms["vm1"], manager._vms["vm2"]
    recorder.wait_for(lambda: hung.swept is not None and fine.swept is not None)
    with fine.cond:
        fine.counters = {}
    faults = write_faults(state_dir, "vm1", {"hang": ["*"]})
    try:
        start = api_calls.count()
        manager.sweep()
        with api_calls.lock:
            swept = [ok for endpoint, _, ok in api_calls.calls[start:] if endpoint == "vm.counters"]
        assert sorted(swept) == [False, True], swept  # vm1 did not answer, vm2 did
        assert manager.counters().get("vm2"), "the answering VMM's counters were kept"
        recorder.wait_for(lambda: EventKind.CRASHED in recorder.kinds("vm1"))
    finally:
        faults.unlink()
    assert EventKind.CRASHED not in recorder.kinds("vm2")
