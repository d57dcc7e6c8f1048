"""The reconcile plan and loop, against a hand-written in-memory actuator.

Pure logic, so trio's MockClock (autojump) drives retries and backoff.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from procurator.core.backoff import RestartPolicy
from procurator.core.errors import PermanentError, TemporaryError
from procurator.core.models import Assignment, Phase, PowerState, VmAssignment, WorkerStatus
from procurator.core.reconcile import Action, ActionKind, ObservedVm, Reconciler, plan, settled

_PHASE_OF = {
    PowerState.RUNNING: Phase.RUNNING,
    PowerState.PAUSED: Phase.PAUSED,
    PowerState.STOPPED: Phase.STOPPED,
}


def vm(vm_id: str, h: str = "h1", power: PowerState = PowerState.RUNNING) -> VmAssignment:
    return VmAssignment(
        id=vm_id, hash=h, nix_store_path=f"/nix/store/{'a' * 32}-{vm_id}", power=power
    )


def running(v: VmAssignment) -> ObservedVm:
    return ObservedVm(id=v.id, hash=v.hash, phase=_PHASE_OF[v.power], power=v.power)


class FakeActuator:
    """In-memory VMs. ``fail`` maps vm id -> exception to raise on ensure."""

    def __init__(self) -> None:
        self.vms: dict[str, ObservedVm] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, Exception] = {}
        self.gates: dict[str, trio.Event] = {}
        self.observations = 0

    async def observe(self) -> Mapping[str, ObservedVm]:
        self.observations += 1
        return dict(self.vms)

    async def ensure(self, vm: VmAssignment, op_id: str) -> None:
        self.calls.append(("ensure", vm.id))
        if vm.id in self.gates:
            await self.gates[vm.id].wait()
        if vm.id in self.fail:
            raise self.fail[vm.id]
        self.vms[vm.id] = replace(running(vm), op_id=op_id)

    async def remove(self, vm_id: str, op_id: str) -> None:
        self.calls.append(("remove", vm_id))
        self.vms.pop(vm_id, None)


# ---------------------------------------------------------------- plan


def test_plan_creates_replaces_removes_and_leaves_unchanged_alone() -> None:
    desired = {
        v.id: v
        for v in [vm("new"), vm("same"), vm("changed", "h2"), vm("paused", power=PowerState.PAUSED)]
    }
    observed = {
        "same": running(vm("same")),
        "changed": running(vm("changed", "h1")),
        "paused": running(vm("paused")),
        "gone": running(vm("gone")),
    }
    actions = {(a.kind, a.vm_id) for a in plan(desired, observed)}
    assert actions == {
        (ActionKind.CREATE, "new"),
        (ActionKind.REPLACE, "changed"),
        (ActionKind.SET_POWER, "paused"),
        (ActionKind.REMOVE, "gone"),
    }


def test_plan_leaves_crashing_and_transitioning_vms_to_the_manager() -> None:
    want = vm("a")
    for phase in (Phase.CRASH_LOOP, Phase.FAILED, Phase.STARTING, Phase.STOPPING):
        observed = {"a": ObservedVm(id="a", hash="h1", phase=phase, power=PowerState.STOPPED)}
        assert plan({"a": want}, observed) == []


def test_plan_stops_a_crash_looping_vm_when_asked() -> None:
    want = vm("a", power=PowerState.STOPPED)
    looping = ObservedVm(
        id="a",
        hash="h1",
        phase=Phase.CRASH_LOOP,
        power=PowerState.STOPPED,
        desired_power=PowerState.RUNNING,
    )
    assert plan({"a": want}, {"a": looping}) == [Action(ActionKind.SET_POWER, "a", want)]
    assert not settled(want, looping)
    # Once the manager converges to the new power, nothing is left to do.
    stopping = ObservedVm(
        id="a",
        hash="h1",
        phase=Phase.CRASH_LOOP,
        power=PowerState.STOPPED,
        desired_power=PowerState.STOPPED,
    )
    assert plan({"a": want}, {"a": stopping}) == []
    assert settled(want, stopping)


_ids = st.sampled_from([f"vm-{i}" for i in range(12)])
_hashes = st.sampled_from(["h1", "h2", "h3"])
_powers = st.sampled_from(list(PowerState))
_phases = st.sampled_from([Phase.RUNNING, Phase.PAUSED, Phase.STOPPED, Phase.CRASH_LOOP])


@st.composite
def worlds(draw: st.DrawFn) -> tuple[dict[str, VmAssignment], dict[str, ObservedVm]]:
    desired = {i: vm(i, draw(_hashes), draw(_powers)) for i in draw(st.sets(_ids, max_size=12))}
    observed = {}
    for i in draw(st.sets(_ids, max_size=12)):
        power = draw(_powers)
        phase = draw(_phases)
        observed[i] = ObservedVm(id=i, hash=draw(_hashes), phase=phase, power=power)
    return desired, observed


def _apply(
    action_kind: ActionKind, vm_id: str, want: VmAssignment | None, world: dict[str, ObservedVm]
) -> None:
    if action_kind is ActionKind.REMOVE:
        del world[vm_id]
    else:
        assert want is not None
        world[vm_id] = running(want)


@settings(max_examples=300, deadline=None)
@given(worlds())
def test_plan_converges_to_a_fixed_point_without_touching_unchanged_vms(
    world: tuple[dict[str, VmAssignment], dict[str, ObservedVm]],
) -> None:
    desired, observed = world
    untouchable = {i for i, want in desired.items() if settled(want, observed.get(i))}
    state = dict(observed)
    for _ in range(3):
        actions = plan(desired, state)
        if not actions:
            break
        for action in actions:
            assert action.vm_id not in untouchable, action
            _apply(action.kind, action.vm_id, action.desired, state)
    assert plan(desired, state) == []
    assert set(state) == set(desired)
    for i, want in desired.items():
        assert settled(want, state[i])
        if i in untouchable:
            assert state[i] == observed[i]  # never restarted, replaced or removed


# ---------------------------------------------------------------- loop


async def _start(
    actuator: FakeActuator, nursery: trio.Nursery, **kwargs: object
) -> tuple[Reconciler, list[WorkerStatus]]:
    reports: list[WorkerStatus] = []
    reconciler = Reconciler(actuator=actuator, on_status=reports.append, worker_id="w", **kwargs)  # type: ignore[arg-type]
    await nursery.start(reconciler.run)
    return reconciler, reports


async def _settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_nothing_is_removed_before_the_first_assignment() -> None:
    actuator = FakeActuator()
    actuator.vms["old"] = running(vm("old"))
    async with trio.open_nursery() as nursery:
        reconciler, reports = await _start(actuator, nursery)
        reconciler.poke()
        await _settle()
        assert actuator.calls == []
        assert [(s.id, s.phase) for s in reports[-1].vms] == [("old", Phase.RUNNING)]
        reconciler.set_assignment(Assignment("w", 1, ()))
        await _settle()
        assert actuator.calls == [("remove", "old")]
        nursery.cancel_scope.cancel()


async def test_converges_and_reports_observed_generation() -> None:
    actuator = FakeActuator()
    async with trio.open_nursery() as nursery:
        reconciler, reports = await _start(actuator, nursery)
        reconciler.set_assignment(Assignment("w", 3, (vm("a"), vm("b")), op_id="op-1"))
        await _settle()
        assert set(actuator.vms) == {"a", "b"}
        assert reports[-1].observed_generation == 3
        assert {s.phase for s in reports[-1].vms} == {Phase.RUNNING}
        assert {s.op_id for s in reports[-1].vms} == {"op-1"}
        # An older generation arriving late (push/pull race) is ignored.
        assert not reconciler.set_assignment(Assignment("w", 2, ()))
        await _settle()
        assert set(actuator.vms) == {"a", "b"}
        nursery.cancel_scope.cancel()


async def test_a_settled_vm_names_the_operation_that_last_acted_on_it() -> None:
    actuator = FakeActuator()
    async with trio.open_nursery() as nursery:
        reconciler, reports = await _start(actuator, nursery)
        reconciler.set_assignment(Assignment("w", 1, (vm("a"), vm("b")), op_id="op-1"))
        await _settle()
        before = {s.id: s for s in reports[-1].vms}
        actuator.gates["a"] = trio.Event()
        reconciler.set_assignment(Assignment("w", 2, (vm("a", "h2"), vm("b")), op_id="op-2"))
        await _settle()
        # While the replacement runs, its VM names the apply it waits for;
        # the VM the apply left alone keeps its own op id and its entry: the
        # very status object (the new assignment's equal entry hits the memo,
        # so a one-VM change does not recompute every VM's status first).
        waiting = {s.id: s for s in reports[-1].vms}
        assert (waiting["a"].op_id, waiting["a"].phase) == ("op-2", Phase.PENDING)
        assert waiting["b"] is before["b"] and waiting["b"].op_id == "op-1"
        actuator.gates.pop("a").set()
        await _settle()
        assert reports[-1].observed_generation == 2
        assert {s.id: s.op_id for s in reports[-1].vms} == {"a": "op-2", "b": "op-1"}
        nursery.cancel_scope.cancel()


async def test_hash_change_replaces_exactly_one_vm() -> None:
    actuator = FakeActuator()
    async with trio.open_nursery() as nursery:
        reconciler, _ = await _start(actuator, nursery)
        reconciler.set_assignment(Assignment("w", 1, tuple(vm(f"v{i}") for i in range(5))))
        await _settle()
        actuator.calls.clear()
        new = tuple(vm(f"v{i}", "h2" if i == 3 else "h1") for i in range(5))
        reconciler.set_assignment(Assignment("w", 2, new))
        await _settle()
        assert actuator.calls == [("ensure", "v3")]
        assert actuator.vms["v3"].hash == "h2"
        nursery.cancel_scope.cancel()


async def test_a_slow_vm_does_not_block_the_others() -> None:
    actuator = FakeActuator()
    actuator.gates["slow"] = trio.Event()
    async with trio.open_nursery() as nursery:
        reconciler, reports = await _start(actuator, nursery, concurrency=2)
        reconciler.set_assignment(Assignment("w", 1, (vm("slow"), vm("a"), vm("b"), vm("c"))))
        await _settle()
        assert set(actuator.vms) == {"a", "b", "c"}
        assert reports[-1].observed_generation == 0  # "slow" is not there yet
        # Strictly serial per VM: more pokes do not start a second ensure.
        reconciler.poke()
        await _settle()
        assert actuator.calls.count(("ensure", "slow")) == 1
        actuator.gates.pop("slow").set()
        await _settle()
        assert reports[-1].observed_generation == 1
        nursery.cancel_scope.cancel()


async def test_temporary_failures_retry_with_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    actuator = FakeActuator()
    actuator.fail["a"] = TemporaryError("VMM not answering")
    async with trio.open_nursery() as nursery:
        reconciler, reports = await _start(
            actuator, nursery, retry=RestartPolicy(initial_delay=1.0, max_delay=8.0)
        )
        reconciler.set_assignment(Assignment("w", 1, (vm("a"),)))
        start = trio.current_time()
        await trio.sleep(20)
        attempts = actuator.calls.count(("ensure", "a"))
        # 1 s, 2 s, 4 s, 8 s, 8 s ... after the first attempt at t=0.
        assert 4 <= attempts <= 6, attempts
        assert "retrying after: VMM not answering" in reports[-1].vms[0].message
        assert reports[-1].observed_generation == 0
        del actuator.fail["a"]
        await trio.sleep(10)
        assert reports[-1].vms[0].phase is Phase.RUNNING
        assert reports[-1].observed_generation == 1
        assert trio.current_time() - start >= 30
        nursery.cancel_scope.cancel()


async def test_permanent_failure_is_reported_and_not_retried_until_desired_changes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    actuator = FakeActuator()
    actuator.fail["bad"] = PermanentError("vm-config.json names /etc/shadow")
    async with trio.open_nursery() as nursery:
        reconciler, reports = await _start(actuator, nursery)
        reconciler.set_assignment(Assignment("w", 1, (vm("bad"), vm("good"))))
        await trio.sleep(600)
        assert actuator.calls.count(("ensure", "bad")) == 1
        status = {s.id: s for s in reports[-1].vms}
        assert status["bad"].phase is Phase.FAILED
        assert "/etc/shadow" in status["bad"].message
        assert status["good"].phase is Phase.RUNNING
        # Settled counts permanent failures: the generation is observed.
        assert reports[-1].observed_generation == 1
        # A new image for the failed VM is a fresh start.
        del actuator.fail["bad"]
        reconciler.set_assignment(Assignment("w", 2, (vm("bad", "h2"), vm("good"))))
        await trio.sleep(1)
        assert actuator.vms["bad"].hash == "h2"
        assert reports[-1].observed_generation == 2
        nursery.cancel_scope.cancel()


async def test_unexpected_errors_do_not_stop_the_loop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    actuator = FakeActuator()
    actuator.fail["buggy"] = RuntimeError("boom")
    async with trio.open_nursery() as nursery:
        reconciler, reports = await _start(actuator, nursery)
        reconciler.set_assignment(Assignment("w", 1, (vm("buggy"), vm("fine"))))
        await trio.sleep(5)
        assert "fine" in actuator.vms
        assert "internal error" in {s.id: s for s in reports[-1].vms}["buggy"].message
        nursery.cancel_scope.cancel()


async def test_status_is_only_reported_when_it_changes() -> None:
    actuator = FakeActuator()
    async with trio.open_nursery() as nursery:
        reconciler, reports = await _start(actuator, nursery)
        reconciler.set_assignment(Assignment("w", 1, (vm("a"),)))
        await _settle()
        count = len(reports)
        for _ in range(10):
            reconciler.poke()
            await _settle()
        assert len(reports) == count
        assert actuator.calls == [("ensure", "a")]
        nursery.cancel_scope.cancel()
