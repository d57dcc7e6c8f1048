"""Status change reports: what turns one status into another, and merging
it back (procurator.core.status)."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from procurator.core.errors import ValidationError
from procurator.core.models import Phase, VmStatus, WorkerStatus
from procurator.core.status import (
    StatusChanges,
    StatusMerger,
    StatusOutbox,
    apply_status_changes,
    status_changes,
)

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


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (StatusChanges("host-b", 1), "of worker 'host-b'"),
        (StatusChanges("host-a", 1, changed=(vm("a"), vm("a"))), "VM 'a' twice"),
        (StatusChanges("host-a", 1, changed=(vm("z"), vm("z"))), "VM 'z' twice"),
        (StatusChanges("host-a", 1, removed=("zz",)), "'zz', which the last status"),
    ],
)
def test_the_merger_refuses_what_does_not_fit_and_merges_on(
    changes: StatusChanges, problem: str
) -> None:
    merger = StatusMerger()
    base = merger.merge(WorkerStatus("host-a", 0, (vm("a"),)), StatusChanges("host-a", 1))
    with pytest.raises(ValidationError, match=problem):
        merger.merge(base, changes)
    assert merger.merge(base, StatusChanges("host-a", 2, changed=(vm("b"),))) == WorkerStatus(
        "host-a", 2, (vm("a"), vm("b"))
    )


@settings(max_examples=300)
@given(
    statuses,
    st.lists(
        st.tuples(statuses, st.sampled_from(["stored", "lost", "whole"])), min_size=1, max_size=8
    ),
)
def test_the_merger_merges_as_apply_status_changes_does(
    first: WorkerStatus, steps: list[tuple[WorkerStatus, str]]
) -> None:
    """The master's way: each report merged into the status the last one
    left, which is not always the one merged last (a write that failed
    leaves the old one; a whole report replaces it)."""
    merger = StatusMerger()
    held = first
    for new, fate in steps:
        if fate == "whole":
            held = new
            continue
        changes = status_changes(held, new)
        merged = merger.merge(held, changes)
        assert merged == apply_status_changes(held, changes)
        if fate == "stored":
            held = merged


# ---------------------------------------------------------------- the outbox


def test_after_the_first_whole_report_only_what_changed_travels() -> None:
    outbox = StatusOutbox("host-a")
    outbox.publish(WorkerStatus("host-a", 1, tuple(vm(f"v{i}") for i in range(1000))))
    first = outbox.take()
    assert isinstance(first, WorkerStatus) and len(first.vms) == 1000
    outbox.delivered()
    assert not outbox.has_news
    outbox.publish_changes(StatusChanges("host-a", 1, changed=(vm("v7", Phase.STARTING),)))
    outbox.publish_changes(StatusChanges("host-a", 2, changed=(vm("v7"), vm("v8", Phase.FAILED))))
    report = outbox.take()
    # v7 went back to what the master holds: only v8 travels.
    assert report == StatusChanges("host-a", 2, changed=(vm("v8", Phase.FAILED),))
    assert not outbox.has_news  # one report in flight at a time
    outbox.delivered()
    outbox.publish_changes(StatusChanges("host-a", 2, removed=("v9",)))
    assert outbox.take() == StatusChanges("host-a", 2, removed=("v9",))


def test_a_refused_whole_status_waits_for_news_and_refused_changes_do_not() -> None:
    outbox = StatusOutbox("host-a")
    outbox.publish(WorkerStatus("host-a", 1, (vm("a"),)))
    outbox.take()
    outbox.refused()
    assert not outbox.has_news  # the same status would be refused again
    outbox.publish_changes(StatusChanges("host-a", 1, changed=(vm("b"),)))
    assert isinstance(outbox.take(), WorkerStatus)
    outbox.delivered()
    outbox.publish_changes(StatusChanges("host-a", 1, changed=(vm("c"),)))
    assert isinstance(outbox.take(), StatusChanges)
    outbox.refused()
    report = outbox.take()
    assert isinstance(report, WorkerStatus) and {v.id for v in report.vms} == {"a", "b", "c"}


_steps = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), statuses),
        st.tuples(
            st.just("changes"),
            st.dictionaries(
                st.sampled_from(IDS),
                st.one_of(st.none(), st.sampled_from([Phase.RUNNING, Phase.FAILED])),
                max_size=3,
            ),
            st.integers(0, 5),
        ),
        st.tuples(
            st.just("send"),
            st.sampled_from(["delivered", "undelivered", "refused", "lost"]),
            st.booleans(),
        ),
        st.tuples(st.just("new-session")),
    ),
    max_size=30,
)


@settings(max_examples=300)
@given(_steps)
@example(  # a VM changes and changes back: the second report must say so
    [
        ("publish", WorkerStatus("host-a", 1, (vm("vm-0"),))),
        ("send", "delivered", False),
        ("changes", {"vm-0": Phase.FAILED}, 1),
        ("send", "delivered", False),
        ("changes", {"vm-0": Phase.RUNNING}, 1),
    ]
)
def test_the_master_ends_up_with_the_whole_status(steps: list[tuple[object, ...]]) -> None:
    """Whatever is published, refused or lost, the status the master holds
    (the last whole report plus the changes merged into it, as the master
    merges them) is the published one once the outbox has no more news."""
    outbox = StatusOutbox("host-a")
    master: WorkerStatus | None = None  # what the master holds of this session
    for step in steps:
        if step[0] == "publish":
            status = step[1]
            assert isinstance(status, WorkerStatus)
            outbox.publish(status)
        elif step[0] == "changes":
            entries, generation = step[1], step[2]
            assert isinstance(entries, dict) and isinstance(generation, int)
            outbox.publish_changes(
                StatusChanges(
                    "host-a",
                    generation,
                    changed=tuple(vm(i, p) for i, p in entries.items() if p is not None),
                    removed=tuple(i for i, p in entries.items() if p is None),
                )
            )
        elif step[0] == "new-session":
            outbox.new_session()
            master = None
        else:
            outcome, whole_only = step[1], step[2]
            report = outbox.take(changes=not whole_only)
            if report is None:
                continue
            if outcome == "refused":
                outbox.refused()
                master = None
            elif outcome in ("lost", "undelivered"):
                # The call broke (or was cancelled before it was sent): the
                # link starts a new session.
                outbox.undelivered()
                outbox.new_session()
                master = None
            elif isinstance(report, WorkerStatus):
                master = report
                outbox.delivered()
            else:
                assert master is not None  # changes only travel against a base
                master = apply_status_changes(master, report)
                outbox.delivered()
    # Drain: deliver everything left.
    while (report := outbox.take()) is not None:
        if isinstance(report, WorkerStatus):
            master = report
        else:
            assert master is not None  # changes only travel against a base
            master = apply_status_changes(master, report)
        outbox.delivered()
    whole = outbox.whole()
    if master is None:
        assert outbox.observed_generation == whole.observed_generation
        return
    assert master.observed_generation == whole.observed_generation
    assert {v.id: v for v in master.vms} == {v.id: v for v in whole.vms}
