"""A worker simulated in process for live moves (tests/moves): what the
master's side of live moves is tested against."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "master"))

from masterhelpers import FakeNode

from procurator.core.errors import UnavailableError
from procurator.core.models import (
    Assignment,
    Capacity,
    DiskTransfer,
    Phase,
    PowerState,
    PreparedImage,
    PrepareState,
    TransferProgress,
    TransferState,
    VmStatus,
    WorkerInfo,
    WorkerStatus,
)
from procurator.master.service import MasterService

__all__ = ["LiveSim"]


class LiveSim:
    """A worker simulated in process for live moves: it runs the VMs its
    assignment desires running, a live move's target holds the VM
    incoming (``ready``, not running) until its switch, a live move's
    source reports its migration ``sending`` (the test reports the rest)."""

    def __init__(
        self,
        service: MasterService,
        worker_id: str,
        *,
        sends: str = "",
        live_moves: bool = True,
    ) -> None:
        self.service = service
        self.worker_id = worker_id
        # As a source: "" reports its migration sending (the test reports
        # the rest), "sent" or "failed" at once.
        self.sends = sends
        self.live_moves = live_moves
        self.node = FakeNode()
        self.token = 0
        self.running: set[str] = set()
        self.sent: list[DiskTransfer] = []  # every live transfer it was sent

    async def start(self, nursery: trio.Nursery) -> None:
        info = WorkerInfo(
            self.worker_id,
            "1.0",
            Capacity(4, 4096, 0),
            driver="cloud-hypervisor",
            transfer_address="127.0.0.1:7400",
            live_moves=self.live_moves,
        )
        self.token = await self.service.register(info, self.node)
        assignment, _ = await self.service.get_assignment(self.token, 0)
        await self._take(assignment)
        nursery.start_soon(self._follow)

    async def _follow(self) -> None:
        seen = len(self.node.pushed)
        while True:
            while len(self.node.pushed) == seen:
                await trio.sleep(0.01)
            seen = len(self.node.pushed)
            await self._take(self.node.pushed[-1])

    async def _take(self, assignment: Assignment) -> None:
        self.running = {v.id for v in assignment.vms if v.power is PowerState.RUNNING}
        self.sent.extend(t for t in assignment.transfers if t not in self.sent)
        progress = tuple(
            TransferProgress(t.vm_id, t.op_id, TransferState.READY, memory="127.0.0.1:7401")
            if t.receive
            else self._sending(t)
            for t in assignment.transfers
            if t.live and (t.incoming is not None or not t.receive)
        )
        status = WorkerStatus(
            self.worker_id,
            assignment.generation,
            tuple(
                VmStatus(v.id, Phase.RUNNING, v.hash, observed_power=v.power)
                for v in assignment.vms
                if v.id in self.running
            ),
            tuple(PreparedImage(p, PrepareState.READY) for p in assignment.prepare),
            progress,
        )
        with contextlib.suppress(UnavailableError):
            await self.service.report_status(self.token, status)

    def _sending(self, t: DiskTransfer) -> TransferProgress:
        if self.sends == "sent":
            self.running.discard(t.vm_id)  # its guest stopped for good
            return TransferProgress(t.vm_id, t.op_id, TransferState.SENT, 4, 4)
        if self.sends == "failed":
            return TransferProgress(t.vm_id, t.op_id, TransferState.FAILED, message="refused")
        return TransferProgress(t.vm_id, t.op_id, TransferState.SENDING, 1, 4)
