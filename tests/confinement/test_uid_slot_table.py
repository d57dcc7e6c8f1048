"""The jail's uid slot table (``procurator.core.jail.SlotTable``) hands
out the lowest free slot, as a scan of every VM's slots from slot 0 did,
without looking at every VM's slot at each VM's first start (issue 31:
that was a start's cost that grew with the fleet). Checked against that
definition over random sequences of starts, releases and slots read back
from the state dir at a worker's start."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from procurator.core.jail import SlotTable

COUNT = 6

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("start"), st.integers(0, 9)),
        st.tuples(st.just("release"), st.integers(0, 9)),
        st.tuples(st.just("recorded"), st.integers(0, 9), st.integers(0, COUNT - 1)),
    ),
    max_size=60,
)


def _lowest_free(taken: set[int]) -> int | None:
    return min((slot for slot in range(COUNT) if slot not in taken), default=None)


@settings(max_examples=300, deadline=None)
@given(_ops)
def test_the_table_hands_out_the_lowest_free_slot(ops: list[tuple[object, ...]]) -> None:
    table = SlotTable(COUNT)
    model: dict[str, int] = {}
    for op in ops:
        vm_id = f"vm-{op[1]}"
        if op[0] == "start" and table.get(vm_id) is None:
            expected = _lowest_free(set(model.values()))
            assert table.take_free(vm_id) == expected
            if expected is not None:
                model[vm_id] = expected
        elif op[0] == "release":
            table.pop(vm_id)
            model.pop(vm_id, None)
        elif op[0] == "recorded" and vm_id not in model:
            slot = op[2]
            assert isinstance(slot, int)
            free = slot not in model.values()
            assert table.take(vm_id, slot) == free
            if free:
                model[vm_id] = slot
        assert {v: table.get(v) for v in table.vm_ids()} == model
