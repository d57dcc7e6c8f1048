"""What the fence tests share (tests/placement/test_fence_*.py): an
in-memory ``VmActuator`` whose VMs take their desired entry at once."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from procurator.core.models import Phase, PowerState, VmAssignment
from procurator.core.reconcile import ObservedVm

_PHASE = {
    PowerState.RUNNING: Phase.RUNNING,
    PowerState.PAUSED: Phase.PAUSED,
    PowerState.STOPPED: Phase.STOPPED,
}


class Actuator:
    """In-memory VMs that take the desired entry at once."""

    def __init__(self) -> None:
        self.vms: dict[str, ObservedVm] = {}

    async def observe(self) -> Mapping[str, ObservedVm]:
        return dict(self.vms)

    async def observe_some(self, vm_ids: Collection[str]) -> Mapping[str, ObservedVm]:
        return {i: self.vms[i] for i in vm_ids if i in self.vms}

    async def ensure(self, want: VmAssignment, op_id: str) -> None:
        self.vms[want.id] = ObservedVm(
            id=want.id, hash=want.hash, phase=_PHASE[want.power], power=want.power, op_id=op_id
        )

    async def remove(self, vm_id: str, op_id: str) -> None:
        self.vms.pop(vm_id, None)

    def powers(self) -> dict[str, PowerState]:
        return {i: v.power for i, v in sorted(self.vms.items())}
