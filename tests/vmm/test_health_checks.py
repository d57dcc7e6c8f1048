"""Health checks cost one VMM API call each in the steady state, and still
see what the VMM reports: a state change, a hang.

A converged VM's health check is ``vm.counters`` alone while the VMM's event
monitor file shows no transition since the last ``vm.info``; any transition
(here: a third party pausing the VM through its API socket) makes the next
check read the state again, and the supervisor converges back."""

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


def test_a_vmm_that_hangs_on_the_counters_check_is_escalated(
    make_manager: ManagerFactory, state_dir: Path, api_calls: ApiCalls, recorder: Recorder
) -> None:
    timeouts = replace(FAST, api=0.3, power_button_wait=0.5, shutdown_vmm_wait=0.5)
    manager = make_manager(timeouts=timeouts)
    first = manager.ensure(VmSpec("vm1", "h1", definition()))
    _settle(api_calls, recorder, "vm.counters", 2)
    faults = write_faults(state_dir, "vm1", {"hang": ["vm.counters"]})
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
    manager = make_manager(timeouts=replace(FAST, health_checks_per_second=0.02))
    assert manager.health_interval() == FAST.health_interval  # no VM yet
    for vm_id in ("vm1", "vm2"):
        manager.ensure(VmSpec(vm_id, "h1", definition()))
    assert manager.health_interval() == 100.0
    # Each VM's first check after its start may still be under way.
    recorder.wait_for(lambda: api_calls.endpoints().count("vm.counters") >= 2)
    start = len(api_calls.endpoints())
    time.sleep(10 * FAST.health_interval)
    assert api_calls.endpoints()[start:] == []


def test_a_budget_the_fleet_fits_in_leaves_the_interval_alone(
    make_manager: ManagerFactory,
) -> None:
    manager = make_manager(timeouts=replace(FAST, health_checks_per_second=1000.0))
    manager.ensure(VmSpec("vm1", "h1", definition()))
    assert manager.health_interval() == FAST.health_interval
