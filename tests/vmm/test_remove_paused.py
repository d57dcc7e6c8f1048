"""Removing a paused VM never runs its guest again (issue 27): a VM the
fence paused may be running on another worker by the time its removal
arrives (healing moved it), so the stop ladder must not resume it to let
it shut down cleanly, as it does for a VM that is stopped or replaced.
Its disks are deleted with it: there is nothing to flush."""

from __future__ import annotations

from vmmhelpers import ApiCalls, ManagerFactory, Recorder, definition

from procurator.core.models import EventKind, Phase, PowerState
from procurator.worker.manager import VmSpec
from procurator.worker.vmm import process


def spec(power: PowerState) -> VmSpec:
    return VmSpec("vm1", "h1", definition(), power=power)


def test_a_paused_vm_is_removed_without_being_resumed(
    make_manager: ManagerFactory, api_calls: ApiCalls, recorder: Recorder
) -> None:
    manager = make_manager()
    manager.ensure(spec(PowerState.RUNNING))
    paused = manager.ensure(spec(PowerState.PAUSED))
    assert paused.phase is Phase.PAUSED and paused.pid is not None
    before = len(api_calls.endpoints())
    manager.remove("vm1")
    calls = api_calls.endpoints()[before:]
    assert "vm.resume" not in calls, calls
    # Not the power button either: a paused guest cannot answer it, and
    # waiting for it would only delay the removal by the stop grace.
    assert "vm.power-button" not in calls, calls
    assert process.pid_start_ticks(paused.pid) is None
    assert calls[-2:] == ["vm.shutdown", "vmm.shutdown"], calls
    assert EventKind.REMOVED in recorder.kinds("vm1")
