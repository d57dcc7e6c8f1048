"""The reconcile plan and loop, against a hand-written in-memory actuator.

Pure logic, so trio's MockClock (autojump) drives retries and backoff. The
loop is incremental (a pass handles the VMs marked dirty); the property test
at the end checks that a full pass after incremental ones, on random
sequences of inputs, finds nothing to do and nothing to report.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace

import trio
import trio.testing
from hypothesis import example, given, settings
from hypothesis import strategies as st

from procurator.core.assignments import AssignmentChanges
from procurator.core.backoff import RestartPolicy
from procurator.core.errors import PermanentError, TemporaryError
from procurator.core.models import Assignment, Phase, PowerState, VmAssignment, WorkerStatus
from procurator.core.reconcile import Action, ActionKind, ObservedVm, Reconciler, plan, settled
from procurator.core.status import StatusChanges, apply_status_changes

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
        self.observations = 0  # full ones
        self.observed_some: list[list[str]] = []  # the ids of each partial one

    async def observe(self) -> Mapping[str, ObservedVm]:
        self.observations += 1
        return dict(self.vms)

    async def observe_some(self, vm_ids: Collection[str]) -> Mapping[str, ObservedVm]:
        self.observed_some.append(sorted(vm_ids))
        return {i: self.vms[i] for i in vm_ids if i in self.vms}

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


class Reports(list[WorkerStatus]):
    """The whole status after each report (the reconciler reports what
    changed; merged here as the master merges them, which also checks that
    every change fits the status before it)."""

    def add(self, changes: StatusChanges) -> None:
        base = self[-1] if self else WorkerStatus(changes.worker_id, 0, ())
        self.append(apply_status_changes(base, changes))


async def _start(
    actuator: FakeActuator, nursery: trio.Nursery, **kwargs: object
) -> tuple[Reconciler, Reports]:
    reports = Reports()
    reconciler = Reconciler(actuator=actuator, on_status=reports.add, worker_id="w", **kwargs)  # type: ignore[arg-type]
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


# ---------------------------------------------------------------- incremental


def _changes(
    base: int,
    generation: int,
    upserted: tuple[VmAssignment, ...] = (),
    removed: tuple[str, ...] = (),
) -> AssignmentChanges:
    return AssignmentChanges("w", base, generation, f"op-{generation}", upserted, removed)


async def test_changes_are_handled_by_observing_only_the_vms_they_name() -> None:
    actuator = FakeActuator()
    async with trio.open_nursery() as nursery:
        reconciler, reports = await _start(actuator, nursery)
        reconciler.set_assignment(Assignment("w", 1, tuple(vm(f"v{i}") for i in range(50)), "op-1"))
        await _settle()
        assert reports[-1].observed_generation == 1
        full, actuator.observed_some, actuator.calls = actuator.observations, [], []
        assert reconciler.apply_changes(_changes(1, 2, (vm("v7", "h2"),), ("v9",)))
        await _settle()
        assert sorted(actuator.calls) == [("ensure", "v7"), ("remove", "v9")]
        assert actuator.observations == full  # no full observation
        assert {i for ids in actuator.observed_some for i in ids} == {"v7", "v9"}
        status = {s.id: s for s in reports[-1].vms}
        assert reports[-1].observed_generation == 2
        assert "v9" not in status and status["v7"].observed_hash == "h2"
        assert status["v7"].op_id == "op-2" and status["v8"].op_id == "op-1"
        assert reconciler.assignment == Assignment(
            "w",
            2,
            tuple(vm(f"v{i}", "h2" if i == 7 else "h1") for i in range(50) if i != 9),
            "op-2",
        )
        nursery.cancel_scope.cancel()


async def test_changes_to_another_generation_are_not_taken() -> None:
    actuator = FakeActuator()
    async with trio.open_nursery() as nursery:
        reconciler, reports = await _start(actuator, nursery)
        # Nothing to apply them to before a whole assignment.
        assert not reconciler.apply_changes(_changes(0, 1, (vm("a"),)))
        reconciler.set_assignment(Assignment("w", 3, (vm("a"),)))
        await _settle()
        # A lost update (3 -> 4) makes the next one (4 -> 5) unusable.
        assert not reconciler.apply_changes(_changes(4, 5, (vm("b"),)))
        await _settle()
        assert reconciler.generation == 3
        assert set(actuator.vms) == {"a"}
        assert reports[-1].observed_generation == 3
        nursery.cancel_scope.cancel()


async def test_a_vm_marked_dirty_is_observed_again_without_a_full_pass() -> None:
    actuator = FakeActuator()
    async with trio.open_nursery() as nursery:
        reconciler, reports = await _start(actuator, nursery)
        reconciler.set_assignment(Assignment("w", 1, (vm("a"), vm("b"))))
        await _settle()
        full = actuator.observations
        # The VMM of "b" crash-loops: the VmManager says so for "b" alone.
        actuator.vms["b"] = replace(actuator.vms["b"], phase=Phase.CRASH_LOOP, restarts=5)
        reconciler.mark_dirty("b")
        await _settle()
        assert actuator.observations == full
        assert {s.id: s.phase for s in reports[-1].vms} == {
            "a": Phase.RUNNING,
            "b": Phase.CRASH_LOOP,
        }
        nursery.cancel_scope.cancel()


async def test_the_periodic_full_pass_heals_a_change_nobody_marked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    actuator = FakeActuator()
    async with trio.open_nursery() as nursery:
        reconciler, reports = await _start(actuator, nursery, full_pass_interval=30.0)
        reconciler.set_assignment(Assignment("w", 1, (vm("a"),)))
        await trio.sleep(1)
        del actuator.vms["a"]  # gone, and nothing said so
        reconciler.poke()
        await trio.sleep(1)
        assert actuator.calls == [("ensure", "a")]  # a poke alone observes nothing
        await trio.sleep(30)
        assert actuator.calls == [("ensure", "a"), ("ensure", "a")]
        assert {s.id: s.phase for s in reports[-1].vms} == {"a": Phase.RUNNING}
        nursery.cancel_scope.cancel()


# A property test: whatever happens, in whatever order, a full pass right
# after the incremental ones finds nothing to start and nothing to report.

_IDS = [f"vm-{i}" for i in range(6)]
_observations = st.builds(
    lambda h, phase, power: ObservedVm(id="", hash=h, phase=phase, power=power),
    _hashes,
    st.sampled_from([Phase.RUNNING, Phase.PAUSED, Phase.STOPPED, Phase.CRASH_LOOP, Phase.STARTING]),
    _powers,
)
_updates = st.one_of(
    st.tuples(
        st.just("changes"),
        st.dictionaries(
            st.sampled_from(_IDS),
            st.one_of(st.none(), st.tuples(_hashes, _powers)),
            max_size=4,
        ),
        st.booleans(),  # a new op id
    ),
    st.tuples(
        st.just("whole"), st.dictionaries(st.sampled_from(_IDS), st.tuples(_hashes, _powers))
    ),
)
_ops = st.one_of(
    _updates,
    # An update that arrives while a pass observes (the port may await).
    st.tuples(st.just("mid-pass"), _updates),
    st.tuples(st.just("external"), st.sampled_from(_IDS), st.one_of(st.none(), _observations)),
    st.tuples(st.just("finish"), st.integers(0, 5)),
    # A step's VM reaches its target before the step returns (the VmManager
    # reports "running" from the VM's turns while ensure is still waiting).
    st.tuples(st.just("settle"), st.integers(0, 5)),
    st.tuples(
        st.just("fail"), st.sampled_from(_IDS), st.sampled_from(["temporary", "permanent", "bug"])
    ),
    st.tuples(st.just("time"), st.sampled_from([0.5, 2.0, 40.0])),
)


class GatedActuator(FakeActuator):
    """Every step waits until the test finishes it: steps stay in flight
    across passes, as real ones do."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight: dict[str, trio.Event] = {}
        self.targets: dict[str, ObservedVm | None] = {}  # what each step in flight makes
        self.failing: dict[str, Exception] = {}
        self.while_observing: Callable[[], None] | None = None  # once, mid-observation

    def _observing(self) -> None:
        if self.while_observing is not None:
            run, self.while_observing = self.while_observing, None
            run()

    async def observe(self) -> Mapping[str, ObservedVm]:
        seen = await super().observe()
        self._observing()
        return seen

    async def observe_some(self, vm_ids: Collection[str]) -> Mapping[str, ObservedVm]:
        seen = await super().observe_some(vm_ids)
        self._observing()
        return seen

    async def _gate(self, vm_id: str) -> None:
        gate = self.in_flight[vm_id] = trio.Event()
        try:
            await gate.wait()
        finally:
            del self.in_flight[vm_id]
        if vm_id in self.failing:
            raise self.failing.pop(vm_id)

    async def ensure(self, vm: VmAssignment, op_id: str) -> None:
        self.calls.append(("ensure", vm.id))
        target = self.targets[vm.id] = replace(running(vm), op_id=op_id)
        await self._gate(vm.id)
        self.vms[vm.id] = target

    async def remove(self, vm_id: str, op_id: str) -> None:
        self.calls.append(("remove", vm_id))
        self.targets[vm_id] = None
        await self._gate(vm_id)
        self.vms.pop(vm_id, None)

    def settle(self, vm_id: str) -> None:
        """The step's VM reaches its target, the step still in flight."""
        target = self.targets[vm_id]
        if target is None:
            self.vms.pop(vm_id, None)
        else:
            self.vms[vm_id] = target


@settings(max_examples=300, deadline=None)
@given(st.lists(_ops, max_size=25))
@example(  # a retry falls due: no input marks the VM, the pass must find it
    [
        ("changes", {"vm-0": ("h1", PowerState.RUNNING)}, True),
        ("fail", "vm-0", "temporary"),
        ("finish", 0),
        ("time", 2.0),
    ]
)
@example(  # reported settled while its step runs: settled only once the step ends
    [("changes", {"vm-0": ("h1", PowerState.RUNNING)}, True), ("settle", 0), ("finish", 0)]
)
@example(  # unassigned while its creation runs: observed only once the step ends
    [("whole", {"vm-0": ("h1", PowerState.RUNNING)}), ("whole", {})]
)
@example(  # a new VM arrives while a pass observes: not observed before it runs
    [
        ("changes", {"vm-0": ("h1", PowerState.RUNNING)}, True),
        ("finish", 0),
        ("mid-pass", ("changes", {"vm-1": ("h1", PowerState.RUNNING)}, True)),
    ]
)
def test_incremental_passes_leave_nothing_for_a_full_pass(ops: list[tuple[object, ...]]) -> None:
    def entries(spec: Mapping[str, tuple[str, PowerState]]) -> tuple[VmAssignment, ...]:
        return tuple(vm(i, h, power) for i, (h, power) in sorted(spec.items()))

    async def scenario() -> None:
        actuator = GatedActuator()
        reports = Reports()
        claimed = [0]  # the observed generation reported last

        def on_status(changes: StatusChanges) -> None:
            """Reports, and an oracle: a generation reported observed the
            moment it is has every VM settled (or failed for good), none
            surplus and no step in flight."""
            reports.add(changes)
            if changes.observed_generation <= claimed[0]:
                return
            claimed[0] = changes.observed_generation
            assignment = reconciler.assignment
            assert assignment is not None
            assert changes.observed_generation == assignment.generation
            failed = {v.id for v in reports[-1].vms if v.phase is Phase.FAILED}
            assert not actuator.in_flight, changes
            assert set(actuator.vms) <= {v.id for v in assignment.vms}, changes
            for want in assignment.vms:
                assert settled(want, actuator.vms.get(want.id)) or want.id in failed, want

        reconciler = Reconciler(
            actuator=actuator,
            on_status=on_status,
            worker_id="w",
            retry=RestartPolicy(initial_delay=1.0, max_delay=4.0),
        )
        limiter = trio.CapacityLimiter(100)
        op_number = 0

        async def incremental() -> None:
            for _ in range(3):  # a step that ends marks its VM for the next pass
                await reconciler.run_pass(nursery, limiter)
                await trio.testing.wait_all_tasks_blocked()

        async with trio.open_nursery() as nursery:
            await reconciler.run_pass(nursery, limiter)

            def update(op: tuple[object, ...]) -> None:
                nonlocal op_number
                kind = op[0]
                if kind == "changes":
                    spec, new_op = op[1], op[2]
                    assert isinstance(spec, dict)
                    current = reconciler.assignment or Assignment("w", 0)
                    if reconciler.assignment is None:
                        reconciler.set_assignment(Assignment("w", 1, (), "op-1"))
                        current = Assignment("w", 1, (), "op-1")
                    op_number += int(bool(new_op))
                    have = {v.id for v in current.vms}
                    reconciler.apply_changes(
                        AssignmentChanges(
                            "w",
                            current.generation,
                            current.generation + 1,
                            f"op-x{op_number}" if new_op else current.op_id,
                            entries({i: e for i, e in spec.items() if e is not None}),
                            tuple(i for i, e in sorted(spec.items()) if e is None and i in have),
                        )
                    )
                elif kind == "whole":
                    spec = op[1]
                    assert isinstance(spec, dict)
                    reconciler.set_assignment(
                        Assignment("w", reconciler.generation + 1, entries(spec), "op-whole")
                    )

            for op in ops:
                kind = op[0]
                if kind in ("changes", "whole"):
                    update(op)
                elif kind == "mid-pass":
                    inner = op[1]
                    assert isinstance(inner, tuple)
                    actuator.while_observing = functools.partial(update, inner)
                    reconciler.mark_dirty(_IDS[0])  # so that a pass observes
                elif kind == "external":
                    vm_id, seen = op[1], op[2]
                    assert isinstance(vm_id, str)
                    if seen is None:
                        actuator.vms.pop(vm_id, None)
                    else:
                        assert isinstance(seen, ObservedVm)
                        actuator.vms[vm_id] = replace(seen, id=vm_id)
                    reconciler.mark_dirty(vm_id)  # as the VmManager's on_change does
                elif kind == "finish":
                    index = op[1]
                    assert isinstance(index, int)
                    flights = sorted(actuator.in_flight)
                    if flights:
                        actuator.in_flight[flights[index % len(flights)]].set()
                elif kind == "settle":
                    index = op[1]
                    assert isinstance(index, int)
                    flights = sorted(actuator.in_flight)
                    if flights:
                        vm_id = flights[index % len(flights)]
                        actuator.settle(vm_id)
                        reconciler.mark_dirty(vm_id)  # as the VmManager's on_change does
                elif kind == "fail":
                    vm_id, how = op[1], op[2]
                    assert isinstance(vm_id, str)
                    actuator.failing[vm_id] = {
                        "temporary": TemporaryError("try later"),
                        "permanent": PermanentError("never"),
                        "bug": RuntimeError("boom"),
                    }[str(how)]
                else:
                    seconds = op[1]
                    assert isinstance(seconds, float)
                    clock.jump(seconds)
                await trio.testing.wait_all_tasks_blocked()
                await incremental()
                before = len(reports)
                started = await reconciler.run_pass(nursery, limiter, full=True)
                assert started == 0, (op, actuator.calls)
                assert len(reports) == before, (op, reports[-1])
                assert reports[-1] == reconciler.status
                # And an oracle of its own: every desired VM settled (or
                # failed for good), none with a step in flight, none surplus
                # means the generation is observed.
                assignment = reconciler.assignment
                if assignment is not None:
                    failed = {v.id for v in reports[-1].vms if v.phase is Phase.FAILED}
                    wanted = {v.id: v for v in assignment.vms}
                    if (
                        not actuator.in_flight
                        and set(actuator.vms) <= set(wanted)
                        and all(
                            settled(v, actuator.vms.get(i)) or i in failed
                            for i, v in wanted.items()
                        )
                    ):
                        assert reconciler.observed_generation == assignment.generation, op
            nursery.cancel_scope.cancel()

    clock = trio.testing.MockClock()
    trio.run(scenario, clock=clock)


class SlowObservation(FakeActuator):
    """An actuator whose observations take time (the port allows it: a real
    one may ask a thread or a process), so inputs can arrive mid-pass."""

    def __init__(self) -> None:
        super().__init__()
        self.observing = trio.Event()  # set while an observation waits
        self.release = trio.Event()

    async def _wait(self) -> None:
        self.observing.set()
        await self.release.wait()
        self.observing, self.release = trio.Event(), trio.Event()

    async def observe(self) -> Mapping[str, ObservedVm]:
        seen = dict(self.vms)
        await self._wait()
        self.observations += 1
        return seen

    async def observe_some(self, vm_ids: Collection[str]) -> Mapping[str, ObservedVm]:
        seen = {i: self.vms[i] for i in vm_ids if i in self.vms}
        await self._wait()
        self.observed_some.append(sorted(vm_ids))
        return seen


async def _observing(actuator: SlowObservation) -> None:
    await actuator.observing.wait()


async def test_an_update_taken_mid_pass_is_not_reported_observed_before_it_is_handled() -> None:
    """Changes (or a whole assignment) taken while a pass observes: that
    pass must not count the new generation observed, whose VMs it has not
    looked at."""
    for whole in (False, True):
        actuator = SlowObservation()
        actuator.vms["a"] = running(vm("a"))
        gate = actuator.gates["b"] = trio.Event()  # b's creation waits
        async with trio.open_nursery() as nursery:
            reconciler = Reconciler(actuator=actuator, on_status=lambda _: None, worker_id="w")
            limiter = trio.CapacityLimiter(8)
            reconciler.set_assignment(Assignment("w", 1, (vm("a"),), "op-1"))
            nursery.start_soon(reconciler.run_pass, nursery, limiter)
            await _observing(actuator)
            actuator.release.set()
            await _settle()
            assert reconciler.observed_generation == 1
            # Something about "a" changed: an incremental pass observes it.
            reconciler.mark_dirty("a")
            nursery.start_soon(reconciler.run_pass, nursery, limiter)
            await _observing(actuator)
            if whole:
                reconciler.set_assignment(Assignment("w", 2, (vm("a"), vm("b")), "op-2"))
            else:
                assert reconciler.apply_changes(_changes(1, 2, (vm("b"),)))
            actuator.release.set()
            await _settle()
            assert "b" not in actuator.vms
            assert reconciler.observed_generation == 1, whole
            # The next pass handles "b"; once it runs, 2 is observed.
            nursery.start_soon(reconciler.run_pass, nursery, limiter)
            await _observing(actuator)
            actuator.release.set()
            await _settle()
            assert actuator.calls == [("ensure", "b")]
            gate.set()
            await _settle()
            nursery.start_soon(reconciler.run_pass, nursery, limiter)
            await _observing(actuator)
            actuator.release.set()
            await _settle()
            assert reconciler.observed_generation == 2, whole
            nursery.cancel_scope.cancel()
