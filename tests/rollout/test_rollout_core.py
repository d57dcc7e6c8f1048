"""The rollout state machine (procurator.core.rollout): table tests of each
transition, and properties over random worker reports: never more than
max_parallel of a group switching, a revert restores exactly the previous
entries of the touched VMs, no VM is replaced twice."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procurator.core.models import (
    Health,
    HealthCheck,
    HealthKind,
    Phase,
    PreparedImage,
    PrepareState,
    RolloutPolicy,
    VmAssignment,
    VmStatus,
    WorkerStatus,
)
from procurator.core.rollout import (
    Rollout,
    RolloutPhase,
    VmState,
    counts,
    decode,
    encode,
    plan,
    prepared_count,
    promote,
    set_paused,
    step,
    undo,
)

OLD = "/nix/store/" + "a" * 32 + "-web"
NEW = "/nix/store/" + "b" * 32 + "-web"
DEADLINE = 60_000


def entry(vm_id: str, path: str) -> VmAssignment:
    return VmAssignment(vm_id, path.split("/")[3][:32], path)


def start(
    n: int,
    *,
    workers: int = 2,
    policy: RolloutPolicy | None = None,
    groups: Mapping[str, str] | None = None,
) -> tuple[Rollout, dict[str, VmAssignment]]:
    """A rollout of ``n`` VMs from OLD to NEW over ``workers`` workers, and
    what its first generation assigns."""
    policy = policy or RolloutPolicy(max_parallel=2, healthy_deadline_ms=DEADLINE)
    ids = [f"vm-{i:02d}" for i in range(n)]
    where = {vm_id: f"w{i % workers}" for i, vm_id in enumerate(ids)}
    before: dict[str, list[VmAssignment]] = {}
    after: dict[str, list[VmAssignment]] = {}
    for vm_id in ids:
        before.setdefault(where[vm_id], []).append(entry(vm_id, OLD))
        after.setdefault(where[vm_id], []).append(entry(vm_id, NEW))
    rollout, first = plan(
        "r1",
        "op1",
        before,
        after,
        lambda vm_id: (policy, (groups or {}).get(vm_id, "")),
        now_ms=0,
    )
    assert rollout is not None
    assigned = {vm.id: vm for vms in first.values() for vm in vms}
    return rollout, assigned


def prepared(rollout: Rollout, state: PrepareState = PrepareState.READY) -> dict[str, WorkerStatus]:
    return {
        w: WorkerStatus(w, 1, (), tuple(PreparedImage(p, state, "boom") for p in paths))
        for w, paths in rollout.prepare
    }


def reports(
    rollout: Rollout, assigned: Mapping[str, VmAssignment], health: Mapping[str, Health]
) -> dict[str, WorkerStatus]:
    """Every worker reports each VM running what it is assigned, with
    ``health`` for the given ones (pending otherwise)."""
    by_worker: dict[str, list[VmStatus]] = {}
    for vm in rollout.vms:
        current = assigned[vm.vm_id]
        by_worker.setdefault(vm.worker_id, []).append(
            VmStatus(
                vm.vm_id, Phase.RUNNING, current.hash, health=health.get(vm.vm_id, Health.PENDING)
            )
        )
    return {w: WorkerStatus(w, 1, tuple(vms)) for w, vms in by_worker.items()}


def carry_out(assigned: dict[str, VmAssignment], want: Mapping[str, VmAssignment]) -> set[str]:
    """Commit ``want`` like the leader does; the ids whose entry changed."""
    changed = {vm_id for vm_id, e in want.items() if assigned[vm_id] != e}
    assigned.update(want)
    return changed


# ------------------------------------------------------------------ plan


def test_plan_keeps_replaced_vms_on_their_old_entry_and_lists_what_to_prepare() -> None:
    before = {"w0": [entry("a", OLD), entry("gone", OLD)], "w1": [entry("b", OLD)]}
    after = {"w0": [entry("a", NEW), entry("new", NEW)], "w1": [entry("b", OLD)]}
    rollout, first = plan(
        "r1", "op1", before, after, lambda _: (RolloutPolicy(), ""), now_ms=5, generation_before=7
    )
    assert rollout is not None
    assert [vm.vm_id for vm in rollout.vms] == ["a"]
    assert rollout.prepare == (("w0", (NEW,)),)
    assert rollout.generation_before == 7
    # The added VM goes at once, the removed one is gone, the replaced one waits.
    assert first == {"w0": (entry("a", OLD), entry("new", NEW)), "w1": (entry("b", OLD),)}


def test_plan_without_replacements_is_no_rollout() -> None:
    rollout, first = plan(
        "r1", "op1", {"w0": [entry("a", OLD)]}, {"w0": [entry("a", OLD), entry("b", NEW)]},
        lambda _: (RolloutPolicy(), ""), now_ms=0,
    )  # fmt: skip
    assert rollout is None
    assert first == {"w0": (entry("a", OLD), entry("b", NEW))}


def test_a_vm_without_rollout_settings_is_replaced_at_once() -> None:
    rollout, first = plan(
        "r1", "op1", {"w0": [entry("a", OLD), entry("b", OLD)]},
        {"w0": [entry("a", NEW), entry("b", NEW)]},
        lambda vm_id: (RolloutPolicy() if vm_id == "a" else None, ""), now_ms=0,
    )  # fmt: skip
    assert rollout is not None
    assert [vm.vm_id for vm in rollout.vms] == ["a"]
    assert first == {"w0": (entry("a", OLD), entry("b", NEW))}


def test_a_vm_that_moves_and_changes_is_not_gated() -> None:
    rollout, first = plan(
        "r1", "op1", {"w0": [entry("a", OLD)]}, {"w1": [entry("a", NEW)]},
        lambda _: (RolloutPolicy(), ""), now_ms=0,
    )  # fmt: skip
    assert rollout is None
    assert first == {"w1": (entry("a", NEW),)}


def test_canaries_are_the_first_of_each_group_and_never_the_whole_group() -> None:
    policy = RolloutPolicy(canary=2)
    rollout, _ = start(5, policy=policy, groups={"vm-00": "db", "vm-01": "db"})
    marked = {vm.vm_id: (vm.group, vm.canary) for vm in rollout.vms}
    assert marked == {
        "vm-02": ("", True),
        "vm-03": ("", True),
        "vm-04": ("", False),
        "vm-00": ("db", True),  # a group of two keeps one non-canary
        "vm-01": ("db", False),
    }


# ------------------------------------------------------------------ prepare


def test_prepare_waits_then_switches_the_first_batch() -> None:
    rollout, assigned = start(4)
    waiting = step(rollout, assigned, {}, 1000)
    assert waiting.rollout == rollout
    assert waiting.want == {}
    assert waiting.prepare == dict(rollout.prepare)
    ready = step(rollout, assigned, prepared(rollout), 2000)
    assert ready.rollout.phase is RolloutPhase.SWITCHING
    # Kept prepared until the rollout is over (the later batches need them).
    assert ready.prepare == dict(rollout.prepare)
    switching = [vm.vm_id for vm in ready.rollout.vms if vm.state is VmState.SWITCHING]
    assert switching == ["vm-00", "vm-01"]  # max_parallel 2
    assert ready.want == {"vm-00": entry("vm-00", NEW), "vm-01": entry("vm-01", NEW)}
    assert ready.rollout.batches == 1


def test_a_prepare_failure_fails_the_rollout_naming_worker_and_path_and_changes_nothing() -> None:
    rollout, assigned = start(4)
    statuses = prepared(rollout)
    statuses["w1"] = WorkerStatus(
        "w1", 1, (), (PreparedImage(NEW, PrepareState.FAILED, "no such path"),)
    )
    answer = step(rollout, assigned, statuses, 1000)
    assert answer.rollout.phase is RolloutPhase.FAILED
    assert answer.rollout.reason == f"worker w1 cannot prepare {NEW}: no such path"
    assert answer.want == {}
    assert answer.prepare == {}
    assert counts(answer.rollout)[VmState.WAITING] == 4


def test_a_prepare_not_done_within_the_deadline_fails() -> None:
    rollout, assigned = start(4)
    statuses = prepared(rollout)
    statuses["w1"] = WorkerStatus("w1", 1)
    assert step(rollout, assigned, statuses, DEADLINE - 1).rollout.phase is RolloutPhase.PREPARING
    late = step(rollout, assigned, statuses, DEADLINE)
    assert late.rollout.phase is RolloutPhase.FAILED
    assert "1 of 2 workers ready" in late.rollout.reason
    assert prepared_count(rollout, statuses) == 1


# ------------------------------------------------------------------ switching


def switched(n: int = 4, **kwargs: object) -> tuple[Rollout, dict[str, VmAssignment]]:
    rollout, assigned = start(n, **kwargs)  # type: ignore[arg-type]
    answer = step(rollout, assigned, prepared(rollout), 0)
    carry_out(assigned, answer.want)
    return answer.rollout, assigned


def test_a_vm_is_healthy_only_on_its_new_hash_reported_healthy() -> None:
    rollout, assigned = switched()
    # Healthy, but still on the old hash (the worker has not switched yet).
    stale = reports(rollout, {k: entry(k, OLD) for k in assigned}, {"vm-00": Health.HEALTHY})
    assert counts(step(rollout, assigned, stale, 10).rollout)[VmState.HEALTHY] == 0
    fresh = reports(rollout, assigned, {"vm-00": Health.HEALTHY})
    answer = step(rollout, assigned, fresh, 10)
    states = {vm.vm_id: vm.state for vm in answer.rollout.vms}
    assert states["vm-00"] is VmState.HEALTHY
    # vm-00's slot is free: vm-02 starts, vm-01 still switching.
    assert states["vm-01"] is VmState.SWITCHING
    assert states["vm-02"] is VmState.SWITCHING
    assert states["vm-03"] is VmState.WAITING


def test_a_rollout_with_healthy_vms_everywhere_is_done() -> None:
    rollout, assigned = switched()
    for now in range(1, 10):
        answer = step(
            rollout,
            assigned,
            reports(rollout, assigned, {k: Health.HEALTHY for k in assigned}),
            now,
        )
        carry_out(assigned, answer.want)
        rollout = answer.rollout
    assert rollout.phase is RolloutPhase.DONE
    assert assigned == {k: entry(k, NEW) for k in assigned}
    assert rollout.batches == 2


def test_a_vm_not_healthy_in_time_reverts_every_touched_vm_and_only_those() -> None:
    rollout, assigned = switched()
    statuses = reports(rollout, assigned, {"vm-01": Health.UNHEALTHY})
    assert step(rollout, assigned, statuses, DEADLINE - 1).rollout.phase is RolloutPhase.SWITCHING
    answer = step(rollout, assigned, statuses, DEADLINE)
    assert answer.rollout.phase is RolloutPhase.REVERTING
    assert (
        "VM vm-00 on w0: not healthy within 60 s of its switch: health pending"
        in answer.rollout.reason
    )
    assert answer.want == {"vm-00": entry("vm-00", OLD), "vm-01": entry("vm-01", OLD)}
    carry_out(assigned, answer.want)
    done = step(answer.rollout, assigned, statuses, DEADLINE + 1)
    assert done.rollout.phase is RolloutPhase.REVERTED
    assert assigned == {k: entry(k, OLD) for k in assigned}


def test_without_auto_revert_a_failure_stops_and_leaves_the_rest() -> None:
    policy = RolloutPolicy(max_parallel=2, healthy_deadline_ms=DEADLINE, auto_revert=False)
    rollout, assigned = switched(policy=policy)
    statuses = reports(rollout, assigned, {"vm-00": Health.HEALTHY})
    answer = step(rollout, assigned, statuses, DEADLINE)
    assert answer.rollout.phase is RolloutPhase.FAILED
    assert answer.want == {"vm-00": entry("vm-00", NEW), "vm-01": entry("vm-01", NEW)}
    assert {vm.vm_id: vm.state for vm in answer.rollout.vms} == {
        "vm-00": VmState.HEALTHY,
        "vm-01": VmState.FAILED,
        "vm-02": VmState.WAITING,
        "vm-03": VmState.WAITING,
    }
    # Over is over.
    assert step(answer.rollout, assigned, statuses, DEADLINE * 9).rollout == answer.rollout


def test_a_new_image_that_fails_for_good_fails_before_the_deadline() -> None:
    rollout, assigned = switched()
    statuses = reports(rollout, assigned, {})
    vms = list(statuses["w0"].vms)
    vms[0] = replace(vms[0], phase=Phase.CRASH_LOOP, message="exited 1")
    statuses["w0"] = replace(statuses["w0"], vms=tuple(vms))
    answer = step(rollout, assigned, statuses, 1)
    assert answer.rollout.phase is RolloutPhase.REVERTING
    assert answer.rollout.reason == "VM vm-00 on w0: crashLoop: exited 1"


def test_a_switch_not_committed_yet_is_not_judged_and_is_asked_again() -> None:
    """The leader stored the state and died before its commit: the next
    step asks for the same entries, and the deadline waits for them."""
    rollout, assigned = start(4)
    answer = step(rollout, assigned, prepared(rollout), 0)  # nothing carried out
    again = step(answer.rollout, assigned, reports(answer.rollout, assigned, {}), DEADLINE * 2)
    assert again.rollout == answer.rollout
    assert again.want == answer.want


def test_a_status_about_the_vm_from_another_worker_is_not_its() -> None:
    rollout, assigned = switched()
    statuses = reports(rollout, assigned, {})
    statuses["w9"] = WorkerStatus(
        "w9", 1, (VmStatus("vm-00", Phase.RUNNING, assigned["vm-00"].hash, health=Health.HEALTHY),)
    )
    answer = step(rollout, assigned, statuses, 1)
    assert counts(answer.rollout)[VmState.HEALTHY] == 0


# ------------------------------------------------------------------ canaries, pause, undo


def test_canaries_go_first_then_wait_for_promotion() -> None:
    policy = RolloutPolicy(max_parallel=3, healthy_deadline_ms=DEADLINE, canary=1)
    rollout, assigned = switched(6, policy=policy)
    assert [vm.vm_id for vm in rollout.vms if vm.state is VmState.SWITCHING] == ["vm-00"]
    healthy = {k: Health.HEALTHY for k in assigned}
    answer = step(rollout, assigned, reports(rollout, assigned, healthy), 1)
    assert answer.rollout.phase is RolloutPhase.AWAITING_PROMOTION
    assert "procurator rollout promote" in answer.rollout.reason
    # Waiting is stable and switches nothing more.
    again = step(answer.rollout, assigned, reports(rollout, assigned, healthy), 2)
    assert again.rollout == answer.rollout
    assert again.notes == ()
    promoted = step(promote(again.rollout), assigned, reports(rollout, assigned, healthy), 3)
    assert promoted.rollout.phase is RolloutPhase.SWITCHING
    assert [vm.vm_id for vm in promoted.rollout.vms if vm.state is VmState.SWITCHING] == [
        "vm-01", "vm-02", "vm-03",
    ]  # fmt: skip


def test_auto_promote_does_not_wait() -> None:
    policy = RolloutPolicy(
        max_parallel=3, healthy_deadline_ms=DEADLINE, canary=1, auto_promote=True
    )
    rollout, assigned = switched(6, policy=policy)
    answer = step(rollout, assigned, reports(rollout, assigned, {"vm-00": Health.HEALTHY}), 1)
    assert answer.rollout.phase is RolloutPhase.SWITCHING
    assert counts(answer.rollout)[VmState.SWITCHING] == 3


def test_pause_starts_no_batch_but_still_judges_and_reverts() -> None:
    rollout, assigned = switched()
    paused = set_paused(rollout, True)
    answer = step(paused, assigned, reports(rollout, assigned, {"vm-00": Health.HEALTHY}), 1)
    assert counts(answer.rollout) == {
        VmState.WAITING: 2, VmState.SWITCHING: 1, VmState.HEALTHY: 1, VmState.FAILED: 0,
    }  # fmt: skip
    late = step(answer.rollout, assigned, reports(rollout, assigned, {}), DEADLINE)
    assert late.rollout.phase is RolloutPhase.REVERTING
    resumed = step(set_paused(answer.rollout, False), assigned, reports(rollout, assigned, {}), 2)
    assert counts(resumed.rollout)[VmState.SWITCHING] == 2


def test_undo_reverts_the_touched_vms() -> None:
    rollout, assigned = switched()
    answer = step(undo(rollout), assigned, reports(rollout, assigned, {}), 1)
    assert answer.rollout.phase is RolloutPhase.REVERTING
    assert answer.rollout.reason == "undone by an operator"
    assert set(answer.want) == {"vm-00", "vm-01"}
    assert undo(replace(rollout, phase=RolloutPhase.DONE)).phase is RolloutPhase.DONE


def test_groups_have_their_own_limits() -> None:
    groups = {f"vm-{i:02d}": "db" for i in range(3)}
    rollout, _ = switched(6, groups=groups)
    busy: dict[str, int] = {}
    for vm in rollout.vms:
        if vm.state is VmState.SWITCHING:
            busy[vm.group] = busy.get(vm.group, 0) + 1
    assert busy == {"": 2, "db": 2}


# ------------------------------------------------------------------ properties


@st.composite
def scenario(draw: st.DrawFn) -> tuple[Rollout, dict[str, VmAssignment], list[dict[str, Health]]]:
    n = draw(st.integers(1, 12))
    max_parallel = draw(st.integers(1, 4))
    canary = draw(st.integers(0, 2))
    policy = RolloutPolicy(
        max_parallel=max_parallel,
        health=HealthCheck(HealthKind.TCP, 22, min_healthy_ms=1),
        healthy_deadline_ms=draw(st.integers(2, 6)),
        canary=canary,
        auto_revert=draw(st.booleans()),
        auto_promote=draw(st.booleans()),
    )
    groups = {f"vm-{i:02d}": draw(st.sampled_from(["", "a", "b"])) for i in range(n)}
    rollout, assigned = start(n, workers=draw(st.integers(1, 3)), policy=policy, groups=groups)
    rounds = draw(
        st.lists(
            st.dictionaries(
                st.sampled_from(sorted(assigned)),
                st.sampled_from([Health.HEALTHY, Health.PENDING, Health.UNHEALTHY]),
            ),
            min_size=1,
            max_size=30,
        )
    )
    return rollout, assigned, rounds


@settings(max_examples=300, deadline=None)
@given(scenario(), st.data())
def test_properties_hold_over_random_reports(
    case: tuple[Rollout, dict[str, VmAssignment], list[dict[str, Health]]], data: st.DataObject
) -> None:
    rollout, assigned, rounds = case
    before = dict(assigned)
    limits: dict[str, int] = {}
    for vm in rollout.vms:
        limits[vm.group] = min(limits.get(vm.group, 99), vm.policy.max_parallel)
    replaced: dict[str, int] = {}
    states = {vm.vm_id: vm.state for vm in rollout.vms}
    order = list(VmState)
    statuses = prepared(rollout)
    for now, health in enumerate(rounds):
        operator = data.draw(st.sampled_from(["", "", "", "pause", "resume", "promote", "undo"]))
        if operator == "pause":
            rollout = set_paused(rollout, True)
        elif operator == "resume":
            rollout = set_paused(rollout, False)
        elif operator == "promote":
            rollout = promote(rollout)
        elif operator == "undo":
            rollout = undo(rollout)
        statuses.update(reports(rollout, assigned, health))
        for w, status in prepared(rollout).items():
            statuses[w] = replace(statuses[w], prepared=status.prepared)
        answer = step(rollout, assigned, statuses, now)
        rollout = answer.rollout
        # What the store keeps is what was decided.
        assert decode(encode(rollout)) == rollout
        # Half the time the leader "dies" before it commits: the next step
        # must ask again, never something else.
        if data.draw(st.booleans()):
            for vm_id in carry_out(assigned, answer.want):
                if assigned[vm_id].nix_store_path == NEW:
                    replaced[vm_id] = replaced.get(vm_id, 0) + 1
        busy: dict[str, int] = {}
        for vm in rollout.vms:
            # A VM's state only moves forward.
            assert order.index(vm.state) >= order.index(states[vm.vm_id]) or (
                states[vm.vm_id] is VmState.FAILED and vm.state is VmState.FAILED
            )
            assert not (
                states[vm.vm_id] in (VmState.HEALTHY, VmState.FAILED)
                and vm.state is not states[vm.vm_id]
            )
            states[vm.vm_id] = vm.state
            if vm.state is VmState.SWITCHING:
                busy[vm.group] = busy.get(vm.group, 0) + 1
        for group, n in busy.items():
            assert n <= limits[group], (group, n)
        if rollout.phase in (RolloutPhase.REVERTING, RolloutPhase.REVERTED):
            touched = {vm.vm_id for vm in rollout.vms if vm.state is not VmState.WAITING}
            assert dict(answer.want) == {vm_id: before[vm_id] for vm_id in touched}
        if rollout.phase is RolloutPhase.REVERTED:
            assert assigned == before
        if rollout.phase is RolloutPhase.DONE:
            assert all(e.nix_store_path == NEW for e in assigned.values())
    # No VM was switched to its new entry twice.
    assert all(n == 1 for n in replaced.values()), replaced


def test_a_stored_rollout_that_is_not_one_is_refused() -> None:
    rollout, _ = start(2)
    assert decode(encode(rollout)) == rollout
    for text in ('{"v": 2}', '{"v": 1}', '{"v": 1, "policies": [{}]}'):
        with pytest.raises(ValueError, match="rollout"):
            decode(text)
