"""A worker that starts on a host whose VMMs died (a reboot; the worker and
its VMMs killed) before its first assignment (issue 27): ``VmManager.recover``
restarts a dead ``wait`` VM at once, but holds a dead ``reschedule`` one —
the master may have moved it meanwhile — until an assignment names it
(``ensure`` with ``assigned=True``). The fence's own pause
(``assigned=False``) lifts nothing. Real fake-VMM processes, no master: the
manager is what a worker runs before any assignment arrives.

Before the hold, ``recover`` started both, and a moved VM ran twice until
the assignment removed it."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

from vmmhelpers import ManagerFactory, Recorder, definition, vmm_pids_under

from procurator.core.models import Phase, PowerState
from procurator.worker.manager import VmObservation, VmSpec
from procurator.worker.vmm import process

RESCHEDULE = VmSpec("r", "h1", definition(), reschedule=True)  # on_worker_lost = "reschedule"
WAIT = VmSpec("w", "h1", definition())  # "wait" (and pinned VMs)


def _vmms(state_dir: Path, vm_id: str) -> list[int]:
    """Pids of the fake VMMs serving the VM's API socket, found by their
    command line (not by the product's own mechanism)."""
    return sorted(vmm_pids_under(state_dir / "vms" / vm_id / "run" / "api.sock"))


def _kill(pid: int | None) -> None:
    assert pid is not None
    ticks = process.pid_start_ticks(pid)
    assert ticks is not None
    os.kill(pid, signal.SIGKILL)
    assert process.wait_exit(pid, ticks, 10.0)


def test_recovery_restarts_a_dead_wait_vm_and_holds_a_dead_reschedule_vm_until_assigned(
    make_manager: ManagerFactory, state_dir: Path
) -> None:
    first = make_manager()
    pids = {spec.vm_id: first.ensure(spec).pid for spec in (RESCHEDULE, WAIT)}
    first.close()
    for pid in pids.values():  # the host rebooted: every VMM is gone
        _kill(pid)

    second = make_manager()
    recovered = {o.vm_id: o for o in second.recover()}

    wait = recovered["w"]
    assert (wait.phase, wait.power) == (Phase.RUNNING, PowerState.RUNNING)
    assert wait.pid is not None and wait.pid != pids["w"]
    held = recovered["r"]
    assert (held.phase, held.power, held.pid) == (Phase.PENDING, PowerState.STOPPED, None)
    assert held.desired_power is PowerState.RUNNING  # still desired: vm.json is kept
    assert "reschedule" in held.message and "assignment" in held.message
    assert _vmms(state_dir, "r") == []

    # The fence of a worker holding no assignment pauses what runs; it
    # starts nothing it holds.
    paused = second.ensure(dataclasses.replace(RESCHEDULE, power=PowerState.PAUSED), assigned=False)
    assert (paused.phase, paused.pid) == (Phase.PENDING, None)
    assert _vmms(state_dir, "r") == []

    # The first assignment names it, unchanged: now it starts.
    started = second.ensure(RESCHEDULE)
    assert (started.phase, started.power) == (Phase.RUNNING, PowerState.RUNNING)
    assert started.pid is not None and _vmms(state_dir, "r") == [started.pid]


def test_a_live_reschedule_vm_is_readopted_but_not_restarted_until_assigned(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    first = make_manager()
    pid = first.ensure(RESCHEDULE).pid
    first.close()

    second = make_manager()
    [readopted] = second.recover()
    # A VMM that still runs is re-adopted as before (stopping it is the
    # fence's business, if no master answers).
    assert (readopted.phase, readopted.pid) == (Phase.RUNNING, pid)

    _kill(pid)  # it crashes before any assignment arrived
    recorder.wait_for(lambda: _held(second.get("r")))
    assert _vmms(state_dir, "r") == []

    started = second.ensure(RESCHEDULE)
    assert started.phase is Phase.RUNNING and started.pid not in (None, pid)


def _held(obs: VmObservation | None) -> bool:
    return obs is not None and obs.phase is Phase.PENDING and "reschedule" in obs.message


def test_a_held_vm_the_assignment_no_longer_names_is_removed_without_running(
    make_manager: ManagerFactory, state_dir: Path
) -> None:
    first = make_manager()
    pid = first.ensure(RESCHEDULE).pid
    first.close()
    _kill(pid)

    second = make_manager()
    [held] = second.recover()
    assert (held.phase, held.pid) == (Phase.PENDING, None)
    second.remove("r", op_id="op-moved")  # the master moved it: not in the assignment
    assert second.get("r") is None and not (state_dir / "vms" / "r").exists()
    assert _vmms(state_dir, "r") == []
