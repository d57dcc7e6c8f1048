"""Status change reports: what turns one status into another, and merging
it back (procurator.core.status)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from procurator.core.errors import ValidationError
from procurator.core.models import Phase, VmStatus, WorkerStatus
from procurator.core.status import StatusChanges, apply_status_changes, status_changes

IDS = [f"vm-{i}" for i in range(8)]


def vm(vm_id: str, phase: Phase = Phase.RUNNING, restarts: int = 0) -> VmStatus:
    return VmStatus(vm_id, phase, restarts=restarts)


statuses = st.builds(
    lambda entries, generation: WorkerStatus(
        "host-a",
        generation,
        tuple(vm(i, phase, restarts) for i, (phase, restarts) in entries.items()),
    ),
    st.dictionaries(
        st.sampled_from(IDS),
        st.tuples(
            st.sampled_from([Phase.RUNNING, Phase.STARTING, Phase.FAILED]), st.integers(0, 2)
        ),
    ),
    st.integers(0, 5),
)


@given(statuses, statuses)
def test_merging_the_changes_gives_the_new_status(base: WorkerStatus, new: WorkerStatus) -> None:
    changes = status_changes(base, new)
    merged = apply_status_changes(base, changes)
    assert merged.observed_generation == new.observed_generation
    assert {v.id: v for v in merged.vms} == {v.id: v for v in new.vms}
    assert len(merged.vms) == len(new.vms)
    # Only what differs travels.
    before = {v.id: v for v in base.vms}
    assert {v.id for v in changes.changed} == {v.id for v in new.vms if before.get(v.id) != v}
    assert set(changes.removed) == before.keys() - {v.id for v in new.vms}


def test_unchanged_entries_keep_their_place_and_new_ones_follow() -> None:
    base = WorkerStatus("host-a", 1, (vm("a"), vm("b"), vm("c")))
    changes = StatusChanges("host-a", 2, changed=(vm("d"), vm("b", Phase.FAILED)), removed=("a",))
    merged = apply_status_changes(base, changes)
    assert merged == WorkerStatus("host-a", 2, (vm("b", Phase.FAILED), vm("c"), vm("d")))


def test_no_changes_is_only_the_generation() -> None:
    base = WorkerStatus("host-a", 1, (vm("a"),))
    changes = status_changes(base, WorkerStatus("host-a", 2, (vm("a"),)))
    assert changes == StatusChanges("host-a", 2)
    assert changes.size == 0


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (StatusChanges("host-b", 1), "of worker 'host-b'"),
        (StatusChanges("host-a", 1, changed=(vm("a"), vm("a"))), "VM 'a' twice"),
        (StatusChanges("host-a", 1, removed=("a", "a")), "remove a VM twice"),
        (StatusChanges("host-a", 1, changed=(vm("a"),), removed=("a",)), "change and remove"),
        (StatusChanges("host-a", 1, removed=("zz",)), "'zz', which the last status"),
    ],
)
def test_changes_that_do_not_fit_are_refused(changes: StatusChanges, problem: str) -> None:
    base = WorkerStatus("host-a", 1, (vm("a"),))
    with pytest.raises(ValidationError, match=problem):
        apply_status_changes(base, changes)
