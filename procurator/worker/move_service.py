"""A worker's part in moves: the disk transfers its assignment names
(``Assignment.transfers``; docs/SNAPSHOTS.md, "Moves").

- **Target** (``receive``): the ``Receiver`` (``procurator.worker.
  move_transfer``) accepts the VM's disks from whoever presents the move's
  token; the set waits in ``<state>/incoming/<vm>/`` until the VM arrives
  in the assignment (the master's switch), when its first prepare takes
  the copies in place of fresh ones (``procurator.nix.image``) — only
  when the set's op id is the one of the transfer the assignment carries
  for the VM (``receiving``; the master keeps the target's transfer in it
  through the switch, until the move is done). A set no transfer of the
  assignment names with its op id is dropped (``Receiver.prune``): a
  move that failed after its set arrived leaves nothing a later placement
  of the VM here could boot from.
- **Source** (not ``receive``): once the VM's VMM is gone (the move
  stopped it: desired power ``stopped``, phase ``stopped``), its writable
  disk copies are sent to the target; a failed send is tried again every
  ``retry`` seconds while the transfer is assigned (the target answers a
  set it holds already at once).

Each side reports its progress (``WorkerStatus.transfers``: pending,
sending with bytes, sent, received, failed with why); the master's leader
switches the VM once the target reports it ``received``.

Invariants: nothing is sent while a VMM of the VM runs; the target never
starts the VM on its own (it is not in its assignment before the switch);
nothing received is kept once no transfer names its op, nor used by
another op's VM. The sends run in
worker threads (``trio.to_thread.run_sync``), one per VM at a time; the
receiver runs in its own threads. Everything else is on the trio thread.

A cancelled send (the worker stops: SIGTERM) ends at once, not when the
disk is through: ``send_disks_in_thread`` cuts its connection
(``SendCut``) and waits only for its thread to return, which it then does
at once; the target sees a broken transfer and keeps nothing of it, and
the source sends again after its restart (the transfer is still assigned).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import trio

from procurator.core.assignments import AssignmentUpdate
from procurator.core.models import (
    DiskTransfer,
    Phase,
    PowerState,
    TransferProgress,
    TransferState,
)
from procurator.worker.manager import VmManager
from procurator.worker.move_transfer import (
    Expected,
    Progress,
    Receiver,
    SendCut,
    TransferError,
    disk_files,
    send_disks,
)

__all__ = ["INCOMING_DIR", "MoveTransfers", "send_disks_in_thread"]

log = logging.getLogger(__name__)

INCOMING_DIR = "incoming"


class MoveTransfers:
    """See the module docstring. ``on_progress``: the transfers' progress,
    whole, whenever it changes (the link's ``publish_transfers``)."""

    def __init__(
        self,
        manager: VmManager,
        listener: socket.socket,
        state_dir: Path,
        *,
        on_progress: Callable[[tuple[TransferProgress, ...]], None],
        retry: float = 2.0,
        timeout: float = 60.0,
    ) -> None:
        self._manager = manager
        self._receiver = Receiver(
            listener, incoming_dir(state_dir), timeout=timeout, on_change=self.receiver_changed
        )
        self._on_progress = on_progress
        self._retry = retry
        self._timeout = timeout
        self._assigned = False
        self._transfers: dict[str, DiskTransfer] = {}
        self._sending: dict[str, TransferProgress] = {}  # vm id -> the source's progress
        self._busy: set[str] = set()
        self._not_before: dict[str, float] = {}
        self._reported: tuple[TransferProgress, ...] | None = None
        self._wake = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None

    # -- inputs (trio thread) ------------------------------------------------

    def take_assignment(self, update: AssignmentUpdate) -> None:
        self._assigned = True
        self._transfers = {t.vm_id: t for t in update.transfers}
        for vm_id in list(self._sending):
            sent = self._transfers.get(vm_id)
            if sent is None or sent.receive or sent.op_id != self._sending[vm_id].op_id:
                del self._sending[vm_id]
        self._receiver.expect(
            [Expected(t.vm_id, t.op_id, t.token) for t in self._transfers.values() if t.receive]
        )
        self._wake.set()

    def receiving(self, vm_id: str) -> str | None:
        """The op id of the transfer to this worker the current assignment
        carries for ``vm_id`` (None: none): the only move whose received
        disks the VM's prepare may take (trio thread)."""
        transfer = self._transfers.get(vm_id)
        return transfer.op_id if transfer is not None and transfer.receive else None

    @property
    def address(self) -> tuple[str, int]:
        """Where the receiver listens."""
        return self._receiver.address

    def vm_changed(self) -> None:
        """A VM changed (a VMM stopped, say): look again (trio thread)."""
        self._wake.set()

    # -- the loop --------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        serving = threading.Thread(target=self._receiver.serve, name="move receiver", daemon=True)
        serving.start()
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    self._wake = trio.Event()
                    self._step(nursery)
                    self._publish()
                    with trio.move_on_after(self._retry / 2):
                        await self._wake.wait()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._receiver.close)
                await trio.to_thread.run_sync(serving.join)

    def _step(self, nursery: trio.Nursery) -> None:
        if self._assigned:
            self._receiver.prune()
        now = trio.current_time()
        for vm_id, transfer in sorted(self._transfers.items()):
            if transfer.receive or vm_id in self._busy:
                continue
            done = self._sending.get(vm_id)
            if done is not None and done.state is TransferState.SENT:
                continue
            if self._not_before.get(vm_id, 0.0) > now or not self._stopped(vm_id):
                continue
            self._busy.add(vm_id)
            nursery.start_soon(self._send, transfer)

    def _stopped(self, vm_id: str) -> bool:
        """Whether the VM is stopped for the move: desired stopped, no VMM."""
        obs = self._manager.get(vm_id)
        return (
            obs is not None
            and obs.desired_power is PowerState.STOPPED
            and obs.pid is None
            and obs.phase is Phase.STOPPED
        )

    async def _send(self, transfer: DiskTransfer) -> None:
        vm_id = transfer.vm_id
        try:
            files = disk_files(self._manager.state.paths(vm_id).vm_dir)
            total = sum(path.stat().st_size for _, path in files)
            self._sending[vm_id] = TransferProgress(
                vm_id, transfer.op_id, TransferState.SENDING, 0, total
            )
            self._publish()
            host, _, port = transfer.peer.rpartition(":")
            address = (host.strip("[]"), int(port))
            await send_disks_in_thread(
                address,
                vm_id=vm_id,
                op_id=transfer.op_id,
                token=transfer.token,
                files=files,
                timeout=self._timeout,
                progress=lambda done, all_: self._progress_soon(transfer, done, all_),
            )
        except (TransferError, OSError, ValueError) as exc:
            log.warning("move %s: VM %s's disks not sent: %s", transfer.op_id, vm_id, exc)
            self._not_before[vm_id] = trio.current_time() + self._retry
            if self._transfers.get(vm_id) == transfer:
                self._sending[vm_id] = TransferProgress(
                    vm_id, transfer.op_id, TransferState.FAILED, message=str(exc)
                )
        else:
            log.info("move %s: VM %s's disks sent to %s", transfer.op_id, vm_id, transfer.peer)
            if self._transfers.get(vm_id) == transfer:
                self._sending[vm_id] = TransferProgress(
                    vm_id, transfer.op_id, TransferState.SENT, total, total
                )
        finally:
            self._busy.discard(vm_id)
            self._wake.set()

    def _progress_soon(self, transfer: DiskTransfer, done: int, total: int) -> None:
        """From the sending thread: note the bytes sent (every 64 MiB and at the end)."""
        if done % (64 << 20) > (1 << 20) and done != total:
            return
        assert self._token is not None
        self._token.run_sync_soon(self._set_progress, transfer, done, total)

    def _set_progress(self, transfer: DiskTransfer, done: int, total: int) -> None:
        current = self._sending.get(transfer.vm_id)
        if current is not None and current.state is TransferState.SENDING:
            self._sending[transfer.vm_id] = TransferProgress(
                transfer.vm_id, transfer.op_id, TransferState.SENDING, done, total
            )
            self._wake.set()

    def receiver_changed(self) -> None:
        """From a receiving thread: a transfer ended (either way)."""
        if self._token is not None:
            self._token.run_sync_soon(self._wake.set)

    def _publish(self) -> None:
        progress = []
        for vm_id, transfer in sorted(self._transfers.items()):
            if transfer.receive:
                if self._receiver.received(vm_id) == transfer.op_id:
                    state, why = TransferState.RECEIVED, ""
                elif why := self._receiver.failure(vm_id):
                    state = TransferState.FAILED
                else:
                    state = TransferState.PENDING
                progress.append(TransferProgress(vm_id, transfer.op_id, state, message=why))
            else:
                progress.append(
                    self._sending.get(vm_id)
                    or TransferProgress(vm_id, transfer.op_id, TransferState.PENDING)
                )
        reported = tuple(progress)
        if reported != self._reported:
            self._reported = reported
            self._on_progress(reported)


async def send_disks_in_thread(
    address: tuple[str, int],
    *,
    vm_id: str,
    op_id: str,
    token: str,
    files: list[tuple[str, Path]],
    timeout: float,
    progress: Progress | None = None,
) -> None:
    """``send_disks`` in a worker thread; cancelled, it cuts
    the connection and returns once the thread has (at once: its blocked
    write fails), instead of waiting for the disks to go through or the
    socket to time out."""
    cut = SendCut()
    entered = threading.Event()
    ended = trio.Event()
    trio_token = trio.lowlevel.current_trio_token()  # `token`: the move's

    def sending() -> None:
        entered.set()
        try:
            send_disks(
                address,
                vm_id=vm_id,
                op_id=op_id,
                token=token,
                files=files,
                timeout=timeout,
                progress=progress,
                cut=cut,
            )
        finally:
            trio_token.run_sync_soon(ended.set)

    try:
        await trio.to_thread.run_sync(sending, abandon_on_cancel=True)
    except trio.Cancelled:
        cut.cut()
        # Cancelled before the thread began (waiting for the thread limiter,
        # say), it never runs, or runs later into the cut and returns before
        # connecting: only a thread in the send is waited for.
        if entered.is_set():
            with trio.CancelScope(shield=True):
                await ended.wait()  # no thread left behind
        raise


def incoming_dir(state_dir: Path) -> Path:
    """Where a target keeps the disks it received (``<state>/incoming``)."""
    return Path(state_dir) / INCOMING_DIR
