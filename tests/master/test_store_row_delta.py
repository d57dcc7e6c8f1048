"""The store's row delta of a commit (``_sql._row_changes``): the rows to
delete and insert are those a comparison of every VM by value gives,
whatever objects the two lists share and wherever they sit (the master's
lists share the entries a change leaves alone; the delta sets those
aside by identity)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from procurator.core.models import PowerState, VmAssignment
from procurator.master.store._sql import _row_changes

_IMAGES = [f"/nix/store/{c * 32}-vm" for c in "ab"]


def _by_value(
    changes: Mapping[str, Sequence[VmAssignment]], before: Mapping[str, Sequence[VmAssignment]]
) -> tuple[list[tuple[str, str]], list[tuple[object, ...]], list[tuple[str, str]]]:
    """The delta by a comparison of every VM (what it must equal)."""
    deletes: list[tuple[str, str]] = []
    inserts: list[tuple[object, ...]] = []
    removed: list[tuple[str, str]] = []
    for worker_id, vms in changes.items():
        old = {vm.id: vm for vm in before.get(worker_id, ())}
        for vm in vms:
            previous = old.get(vm.id)
            if previous == vm:
                continue
            if previous is not None:
                deletes.append((vm.id, worker_id))
            row = (vm.id, worker_id, vm.hash, vm.nix_store_path, vm.power.value)
            inserts.append((*row, vm.vcpus, vm.memory_mib))
        gone = sorted(old.keys() - {vm.id for vm in vms})
        deletes.extend((vm_id, worker_id) for vm_id in gone)
        removed.extend((worker_id, vm_id) for vm_id in gone)
    return deletes, inserts, removed


def _vm(vm_id: str, image: int, power: PowerState) -> VmAssignment:
    return VmAssignment(vm_id, _IMAGES[image][11:43], _IMAGES[image], power)


@st.composite
def lists(draw: st.DrawFn) -> tuple[tuple[VmAssignment, ...], tuple[VmAssignment, ...]]:
    """A worker's VMs before, and after: each kept as the very object, an
    equal copy, changed, or dropped; some added; in either order."""
    ids = draw(st.lists(st.sampled_from([f"vm-{i}" for i in range(12)]), unique=True))
    before = [_vm(i, draw(st.integers(0, 1)), draw(st.sampled_from(list(PowerState)))) for i in ids]
    after: list[VmAssignment] = []
    for vm in before:
        fate = draw(st.sampled_from(["same", "same", "copy", "image", "power", "drop"]))
        if fate == "same":
            after.append(vm)
        elif fate == "copy":
            after.append(VmAssignment(vm.id, vm.hash, vm.nix_store_path, vm.power))
        elif fate == "image":
            after.append(_vm(vm.id, 1 - _IMAGES.index(vm.nix_store_path), vm.power))
        elif fate == "power":
            after.append(_vm(vm.id, _IMAGES.index(vm.nix_store_path), PowerState.STOPPED))
    for i in draw(st.lists(st.sampled_from([f"vm-{i}" for i in range(12, 16)]), unique=True)):
        after.insert(draw(st.integers(0, len(after))), _vm(i, 0, PowerState.RUNNING))
    if draw(st.booleans()):
        after.sort(key=lambda vm: vm.id)
    return tuple(before), tuple(after)


@settings(max_examples=300, deadline=None)
@given(lists(), lists())
def test_the_row_delta_is_the_delta_by_value(
    a: tuple[tuple[VmAssignment, ...], tuple[VmAssignment, ...]],
    b: tuple[tuple[VmAssignment, ...], tuple[VmAssignment, ...]],
) -> None:
    before = {"w-a": a[0], "w-b": b[0]}
    changes = {"w-a": a[1], "w-b": b[1], "w-new": b[1]}
    assert _row_changes(changes, before) == _by_value(changes, before)
