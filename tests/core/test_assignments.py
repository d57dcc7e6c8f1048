"""Assignment updates: what turns one assignment into another, applying
and composing them (procurator.core.assignments)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from procurator.core.assignments import (
    AssignmentChanges,
    apply_assignment_changes,
    assignment_changes,
    compose,
)
from procurator.core.errors import ValidationError
from procurator.core.models import Assignment, PowerState, VmAssignment

IDS = [f"vm-{i}" for i in range(8)]


def vm(vm_id: str, h: str = "a" * 32, power: PowerState = PowerState.RUNNING) -> VmAssignment:
    return VmAssignment(vm_id, h, f"/nix/store/{h}-{vm_id}", power)


def _assignment(generation: int, entries: dict[str, tuple[str, PowerState]]) -> Assignment:
    return Assignment(
        "host-a",
        generation,
        tuple(vm(i, h * 32, p) for i, (h, p) in entries.items()),
        f"op-{generation}",
    )


entries = st.dictionaries(
    st.sampled_from(IDS), st.tuples(st.sampled_from("abc"), st.sampled_from(list(PowerState)))
)


def _same(a: Assignment, b: Assignment) -> None:
    assert (a.worker_id, a.generation, a.op_id) == (b.worker_id, b.generation, b.op_id)
    assert {v.id: v for v in a.vms} == {v.id: v for v in b.vms}
    assert len(a.vms) == len(b.vms)


@given(entries, entries)
def test_applying_the_changes_gives_the_new_assignment(
    old: dict[str, tuple[str, PowerState]], new: dict[str, tuple[str, PowerState]]
) -> None:
    base, target = _assignment(3, old), _assignment(5, new)
    changes = assignment_changes(base, target)
    _same(apply_assignment_changes(base, changes), target)
    # Only what differs travels.
    before = {v.id: v for v in base.vms}
    assert {v.id for v in changes.upserted} == {v.id for v in target.vms if before.get(v.id) != v}
    assert set(changes.removed) == before.keys() - {v.id for v in target.vms}


@given(entries, entries, entries)
def test_composed_changes_equal_the_two_in_turn(
    a: dict[str, tuple[str, PowerState]],
    b: dict[str, tuple[str, PowerState]],
    c: dict[str, tuple[str, PowerState]],
) -> None:
    first, second, third = _assignment(1, a), _assignment(2, b), _assignment(3, c)
    one, two = assignment_changes(first, second), assignment_changes(second, third)
    both = compose(one, two)
    assert isinstance(both, AssignmentChanges)
    assert (both.base_generation, both.generation) == (1, 3)
    _same(apply_assignment_changes(first, both), third)
    # A whole assignment composed with changes stays whole.
    whole = compose(first, one)
    assert isinstance(whole, Assignment)
    _same(whole, second)


def test_changes_to_another_generation_do_not_apply() -> None:
    base = _assignment(3, {"vm-0": ("a", PowerState.RUNNING)})
    with pytest.raises(ValidationError, match="apply to generation 2, not 3"):
        apply_assignment_changes(base, AssignmentChanges("host-a", 2, 4))
    with pytest.raises(ValueError, match="do not follow generation 3"):
        compose(base, AssignmentChanges("host-a", 2, 4))


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (AssignmentChanges("host-b", 3, 4), "of worker 'host-b'"),
        (AssignmentChanges("host-a", 3, 3), "do not move forward"),
        (AssignmentChanges("host-a", 3, 4, upserted=(vm("x"), vm("x"))), "VM 'x' twice"),
        (AssignmentChanges("host-a", 3, 4, removed=("x", "x")), "remove a VM twice"),
        (
            AssignmentChanges("host-a", 3, 4, upserted=(vm("x"),), removed=("x",)),
            "change and remove",
        ),
    ],
)
def test_changes_that_do_not_fit_are_refused(changes: AssignmentChanges, problem: str) -> None:
    base = _assignment(3, {"vm-0": ("a", PowerState.RUNNING)})
    with pytest.raises(ValidationError, match=problem):
        apply_assignment_changes(base, changes)
