"""What one VM start hands to ``on_change``: each call is a hand-off to
the worker's trio thread (issue 31: a wake-up, a system call and a context
switch each), so a start tells each thing once and nothing twice."""

from __future__ import annotations

from vmmhelpers import ManagerFactory, Recorder, definition

from procurator.core.models import EventKind, Phase, PowerState
from procurator.worker.manager import Timeouts, VmSpec


def test_a_start_tells_its_boot_and_running_observation_in_one_change(
    make_manager: ManagerFactory, recorder: Recorder
) -> None:
    manager = make_manager(timeouts=Timeouts(health_interval=3600.0, counters_interval=0))
    obs = manager.ensure(VmSpec(vm_id="vm1", hash="h1", definition=definition()))
    assert obs.phase is Phase.RUNNING and obs.pid is not None

    told = [(o.phase, o.message, e) for o, e in recorder.changes if o.vm_id == "vm1"]
    # starting, created, and the boot: the "booted" event with the settled
    # observation, not the event first and the observation in a second call.
    assert [(phase, e.kind if e else None) for phase, _, e in told] == [
        (Phase.STARTING, None),
        (Phase.STARTING, EventKind.CREATED),
        (Phase.RUNNING, EventKind.BOOTED),
    ]
    _, message, booted = told[-1]
    assert message == obs.message == f"Running (pid {obs.pid})"
    assert booted is not None and booted.message.startswith(f"booted h1 (VMM pid {obs.pid}")
    assert recorder.changes[-1][0] == obs and obs.power is PowerState.RUNNING
    manager.remove("vm1")
