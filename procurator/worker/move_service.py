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

Live moves (``DiskTransfer.live``; docs/SNAPSHOTS.md, "Live moves"):

- **Target**, while the transfer names the VM (``incoming``, until the
  switch): the VM is made ready as for a start and held in an incoming
  VMM (``WorkerActuator.hold_incoming``: ``VmSpec.incoming``), listening
  on ports picked on the transfer listener's host, and reported ``ready``
  with them, then ``received`` once its VMM holds the whole state and runs
  the guest (``VmManager.incoming_received``; only a driver in
  ``core.move.TARGET_COMPLETES_LIVE``, cloud-hypervisor: the master
  switches on it, so a source lost after the migration completed does not
  fail the move; a QEMU target never says it); a failure is reported
  ``failed`` and not tried again for the op; a VM ``VmManager.recover``
  dropped (the worker restarted: its VMM stopped, its disk copies kept)
  is reported ``failed`` for its op. Once no transfer of its op is
  assigned (the move failed), the incoming VM (a dropped one too) is
  removed (``IncomingVms.drop_incoming``: once, unseen by the reconciler,
  never in the worker's status); the switch's assignment lets it run (the reconciler's
  ``ensure``), not this service.
- **Source**: the migration runs once per op as a job on the VM's
  supervisor (``VmManager.run_job``): the VM marked durably as migrating
  (``MovedOut``), ``send_migration`` with the move's token, then marked
  migrated (``sent``; its supervisor stops its VMM and holds it until the
  switch removes it) or unmarked (``failed``: the guest runs on here).
  Progress is the driver's bytes. A mark of a migration the worker
  stopped in is reported ``failed``, and cleared once an assignment
  names the VM but no transfer of its op (the move failed: the VM starts
  again here); not before the worker's first assignment, and never for a
  VM no longer assigned here (the switch took it: its removal takes the
  mark, and the VM is not started here in between).
  A live transfer without a peer is the move's ``cancelling``: the
  migration under way is asked to stop (``send_migration``'s ``cancel``;
  the driver undoes it, or, past its point of no return, completes it)
  and reported as it ended, ``sent`` or ``failed``; one not begun yet is
  never begun (``failed``). The verdict is reported while the transfer is
  assigned, whatever its peer now is: the leader waits for it.
  cloud-hypervisor cannot move writable disks live (v53 moves memory and
  device state only; the pre-copy while paused is not built): a VM with
  writable disk copies is refused, ``failed``, and stays.

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
from typing import Protocol

import trio

from procurator.core.assignments import AssignmentChanges, AssignmentUpdate
from procurator.core.errors import ProcuratorError
from procurator.core.models import (
    DiskTransfer,
    Phase,
    PowerState,
    TransferProgress,
    TransferState,
    VmAssignment,
)
from procurator.core.move import TARGET_COMPLETES_LIVE
from procurator.worker.manager import VmManager
from procurator.worker.move_transfer import (
    Expected,
    Progress,
    Receiver,
    SendCut,
    TransferError,
    TransferTls,
    disk_files,
    send_disks,
)
from procurator.worker.supervisor import JobContext
from procurator.worker.vmm.base import Address, VmmError, VmmRejected
from procurator.worker.vmrecord import MOVED_OUT_FILE, UNREADABLE_MARK, Incoming, MovedOut

__all__ = ["INCOMING_DIR", "IncomingVms", "MoveTransfers", "send_disks_in_thread"]

log = logging.getLogger(__name__)

INCOMING_DIR = "incoming"


class IncomingVms(Protocol):
    """Where a live move's target holds its incoming VM (``WorkerActuator``)."""

    async def hold_incoming(self, vm: VmAssignment, op_id: str, incoming: Incoming) -> None: ...

    async def drop_incoming(self, vm_id: str, op_id: str) -> None:
        """Remove ``vm_id``, held incoming for the move ``op_id`` that is
        over, with all it took, unseen by the reconciler: it is no VM of
        this worker's, and must be removed once and never reported."""
        ...


class MoveTransfers:
    """See the module docstring. ``on_progress``: the transfers' progress,
    whole, whenever it changes (the link's ``publish_transfers``);
    ``incoming``: where live moves' incoming VMs are held (None: this
    worker takes no live moves); ``migration_timeout``: seconds a live
    migration may take (``send_migration``'s timeout)."""

    def __init__(
        self,
        manager: VmManager,
        listener: socket.socket,
        state_dir: Path,
        *,
        on_progress: Callable[[tuple[TransferProgress, ...]], None],
        retry: float = 2.0,
        timeout: float = 60.0,
        incoming: IncomingVms | None = None,
        migration_timeout: float = 300.0,
        tls: TransferTls | None = None,
    ) -> None:
        self._manager = manager
        self._tls = tls
        self._incoming = incoming
        self._migration_timeout = migration_timeout
        host = listener.getsockname()[0]
        # Incoming VMMs listen where the receiver does, and are named as
        # other workers reach this host (its name for a wildcard).
        self._bind_host = str(host)
        self._advertised_host = socket.getfqdn() if host in ("0.0.0.0", "::") else str(host)
        # Live moves (trio thread only): each VM's progress, the ops tried
        # (once each), the VMs in a step, the incoming VMs held (vm -> op)
        # and where they listen, the migration marks known (vm -> op).
        self._live: dict[str, TransferProgress] = {}
        self._live_tried: set[tuple[str, str]] = set()
        self._live_busy: set[str] = set()
        self._holding: dict[str, str] = {}
        self._listening: dict[str, tuple[str, str]] = {}
        self._marked: dict[str, str] = {}
        # The migrations running (vm -> op, and the event that cancels it).
        self._cancels: dict[str, tuple[str, threading.Event]] = {}
        self._dropped: dict[str, str] = {}
        self._receiver = Receiver(
            listener,
            incoming_dir(state_dir),
            timeout=timeout,
            on_change=self.receiver_changed,
            tls=tls,
        )
        self._on_progress = on_progress
        self._retry = retry
        self._timeout = timeout
        self._assigned = False
        self._transfers: dict[str, DiskTransfer] = {}
        # The VMs the assignment names (a failed move's mark is cleared
        # only for a VM still assigned here: one the switch took away goes
        # with its removal, never started here again in between).
        self._vms: set[str] = set()
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
        if isinstance(update, AssignmentChanges):
            self._vms = (self._vms | {v.id for v in update.upserted}) - set(update.removed)
        else:
            self._vms = {v.id for v in update.vms}
        for vm_id in list(self._sending):
            sent = self._transfers.get(vm_id)
            if sent is None or sent.receive or sent.op_id != self._sending[vm_id].op_id:
                del self._sending[vm_id]
        self._receiver.expect(
            [
                Expected(t.vm_id, t.op_id, t.token)
                for t in self._transfers.values()
                if t.receive and not t.live
            ]
        )
        for vm_id in list(self._live):
            now = self._transfers.get(vm_id)
            if now is None or not now.live or now.op_id != self._live[vm_id].op_id:
                del self._live[vm_id]
        for vm_id, (op_id, cancel) in self._cancels.items():
            now = self._transfers.get(vm_id)
            if now is not None and now.op_id == op_id and _cancelled(now):
                cancel.set()
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
        # What the manager's recover found: incoming VMs it dropped, and
        # migrations marked (a worker that stopped in one, or after one).
        self._dropped = dict(self._manager.incoming_dropped)
        # Their disk copies are kept (the source may have sent: the
        # guest's only up-to-date disks): removed as a failed move's
        # incoming VM below once no transfer of their op is assigned.
        self._holding.update(self._dropped)
        for obs in self._manager.list():
            if obs.moved_out is not None:
                self._marked[obs.vm_id] = obs.moved_out.op_id
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
        self._step_live(nursery)
        for vm_id, transfer in sorted(self._transfers.items()):
            if transfer.receive or transfer.live or vm_id in self._busy:
                continue
            done = self._sending.get(vm_id)
            if done is not None and done.state is TransferState.SENT:
                continue
            if self._not_before.get(vm_id, 0.0) > now or not self._stopped(vm_id):
                continue
            self._busy.add(vm_id)
            nursery.start_soon(self._send, transfer)

    # -- live moves ----------------------------------------------------------------

    def _step_live(self, nursery: trio.Nursery) -> None:
        for vm_id, transfer in sorted(self._transfers.items()):
            if not transfer.live or vm_id in self._live_busy:
                continue
            key = (vm_id, transfer.op_id)
            obs = self._manager.get(vm_id)
            if transfer.receive:
                if self._dropped.get(vm_id) == transfer.op_id:
                    self._set_live(
                        transfer,
                        TransferState.FAILED,
                        message="the worker restarted during the move: its incoming VMM "
                        "was stopped",
                    )
                elif obs is not None and obs.incoming == transfer.op_id:
                    if obs.phase is Phase.FAILED:
                        self._set_live(transfer, TransferState.FAILED, message=obs.message)
                    elif obs.pid is not None and vm_id in self._listening:
                        memory, disks = self._listening[vm_id]
                        # A target that completes the move itself (cloud-
                        # hypervisor resumed the guest) says so: the master
                        # switches on it, even with the source gone since.
                        state = (
                            TransferState.RECEIVED
                            if self._manager.driver.name in TARGET_COMPLETES_LIVE
                            and self._manager.incoming_received(vm_id, transfer.op_id)
                            else TransferState.READY
                        )
                        self._set_live(transfer, state, memory=memory, disks=disks)
                elif transfer.incoming is not None and key not in self._live_tried:
                    if self._incoming is None:
                        self._set_live(
                            transfer,
                            TransferState.FAILED,
                            message="this worker takes no live moves",
                        )
                    else:
                        self._live_tried.add(key)
                        self._live_busy.add(vm_id)
                        nursery.start_soon(self._hold, transfer, transfer.incoming)
                continue
            moved = obs.moved_out if obs is not None else None
            if moved == MovedOut(transfer.op_id, True):
                self._set_live(transfer, TransferState.SENT)
            elif moved == MovedOut(transfer.op_id, False):
                self._set_live(
                    transfer,
                    TransferState.FAILED,
                    message="the worker stopped during the migration: the VM is held here "
                    "until the move ends",
                )
            elif moved == UNREADABLE_MARK:
                # Sent or not is unknown: never migrated again (its VMM was
                # stopped); held here for the operator.
                self._set_live(
                    transfer,
                    TransferState.FAILED,
                    message=f"the VM's migration mark ({MOVED_OUT_FILE}) is unreadable: it is "
                    "held here, stopped, until an operator removes the mark",
                )
            elif key not in self._live_tried and _cancelled(transfer):
                self._live_tried.add(key)
                self._set_live(
                    transfer,
                    TransferState.FAILED,
                    message="the move was cancelled before the migration began",
                )
            elif key not in self._live_tried and obs is not None:
                self._live_tried.add(key)
                self._live_busy.add(vm_id)
                nursery.start_soon(self._migrate, transfer)
        # The ends of moves that failed: an incoming VM held for one goes,
        # a mark of a migration this worker stopped in is cleared (the VM
        # starts again here). A switched VM is no longer incoming, and a
        # migrated one leaves with the switch: neither is touched. Only an
        # assignment says a move is over: before the first one since the
        # worker started (the master not reached yet), a mark recover
        # found is kept (cleared, the VM would start here while its move
        # could still switch it to the target).
        if not self._assigned:
            return
        for vm_id, op_id in list(self._holding.items()):
            now = self._transfers.get(vm_id)
            if vm_id in self._live_busy or (now is not None and now.op_id == op_id):
                continue
            del self._holding[vm_id]
            obs = self._manager.get(vm_id)
            if obs is not None and obs.incoming == op_id:
                self._live_busy.add(vm_id)
                nursery.start_soon(self._drop_incoming, vm_id, op_id)
        for vm_id, op_id in list(self._marked.items()):
            now = self._transfers.get(vm_id)
            if vm_id in self._live_busy or (now is not None and now.op_id == op_id):
                continue
            obs = self._manager.get(vm_id)
            # Only a mark that says "not sent" is cleared: a sent one goes
            # with the switch's removal, an unreadable one (it may say sent,
            # the move switched by the target's report, and this assignment
            # come from a master that lags) waits for the operator.
            if obs is None or obs.moved_out != MovedOut(op_id, False):
                del self._marked[vm_id]  # removed with the VM, or cleared
                continue
            if vm_id not in self._vms:
                # Not assigned here: the move switched (cloud-hypervisor's
                # target resumed the guest) or an apply took the VM. Held
                # until its removal takes the mark with its directory:
                # cleared first, it would start here meanwhile.
                continue
            del self._marked[vm_id]
            self._live_busy.add(vm_id)
            nursery.start_soon(self._unmark, vm_id, op_id)

    def _set_live(
        self,
        transfer: DiskTransfer,
        state: TransferState,
        *,
        done: int = 0,
        total: int = 0,
        message: str = "",
        memory: str = "",
        disks: str = "",
    ) -> None:
        self._live[transfer.vm_id] = TransferProgress(
            transfer.vm_id, transfer.op_id, state, done, total, message, memory, disks
        )

    async def _hold(self, transfer: DiskTransfer, vm: VmAssignment) -> None:
        assert self._incoming is not None
        vm_id = transfer.vm_id
        try:
            memory = (self._bind_host, _free_port(self._bind_host))
            # QEMU mirrors the disks into an export of its own; cloud-
            # hypervisor takes no disks (its driver refuses an address).
            disks = (
                (self._bind_host, _free_port(self._bind_host))
                if self._manager.driver.name == "qemu"
                else None
            )
            self._listening[vm_id] = (
                self._named(memory),
                self._named(disks) if disks is not None else "",
            )
            self._holding[vm_id] = transfer.op_id
            await self._incoming.hold_incoming(
                vm,
                transfer.op_id,
                Incoming(transfer.op_id, memory, disks, bytes.fromhex(transfer.token)),
            )
        except (ProcuratorError, OSError, ValueError) as exc:
            log.warning("move %s: VM %s not held incoming: %s", transfer.op_id, vm_id, exc)
            obs = self._manager.get(vm_id)
            if obs is None or obs.incoming != transfer.op_id:
                self._holding.pop(vm_id, None)
            # Else the failed hold's own removal failed too (its VMM, cgroup
            # and GC root still taken, the VM hidden from the reconciler):
            # it stays held here, removed as a failed move's once no
            # transfer of its op is assigned.
            if self._transfers.get(vm_id) == transfer:
                self._set_live(transfer, TransferState.FAILED, message=str(exc))
        finally:
            self._live_busy.discard(vm_id)
            self._wake.set()

    def _named(self, address: Address) -> str:
        host = self._advertised_host
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"

    async def _drop_incoming(self, vm_id: str, op_id: str) -> None:
        assert self._incoming is not None
        try:
            await self._incoming.drop_incoming(vm_id, op_id)
            log.info("move %s: VM %s no longer held incoming (the move ended)", op_id, vm_id)
        except ProcuratorError as exc:
            log.warning("move %s: VM %s held incoming not removed: %s", op_id, vm_id, exc)
            self._holding[vm_id] = op_id  # tried again
        finally:
            self._live_busy.discard(vm_id)
            self._wake.set()

    async def _unmark(self, vm_id: str, op_id: str) -> None:
        try:
            await trio.to_thread.run_sync(
                self._manager.run_job, vm_id, f"the end of move {op_id}", _unmark_job(op_id)
            )
            log.info("move %s failed: VM %s starts again here", op_id, vm_id)
        except ProcuratorError as exc:
            log.warning("move %s: VM %s's migration mark not cleared: %s", op_id, vm_id, exc)
            self._marked[vm_id] = op_id  # tried again
        finally:
            self._live_busy.discard(vm_id)
            self._wake.set()

    async def _migrate(self, transfer: DiskTransfer) -> None:
        vm_id = transfer.vm_id
        self._set_live(transfer, TransferState.SENDING)
        self._marked[vm_id] = transfer.op_id
        token = self._token
        assert token is not None
        last = [-1]
        cancel = threading.Event()
        self._cancels[vm_id] = (transfer.op_id, cancel)

        def progress(done: int, total: int) -> None:
            # From the supervisor's turn (the job's): every percent, and the end.
            percent = 100 * done // total if total else 0
            if percent != last[0]:
                last[0] = percent
                token.run_sync_soon(self._migrated_bytes, transfer, done, total)

        try:
            await trio.to_thread.run_sync(
                self._manager.run_job,
                vm_id,
                f"live move {transfer.op_id}",
                _migrate_job(transfer, progress, self._migration_timeout, cancel),
            )
        except ProcuratorError as exc:
            log.warning("move %s: VM %s not migrated: %s", transfer.op_id, vm_id, exc)
            if self._still_assigned(transfer):
                self._set_live(transfer, TransferState.FAILED, message=str(exc))
        else:
            log.info("move %s: VM %s migrated to %s", transfer.op_id, vm_id, transfer.peer)
            if self._still_assigned(transfer):
                self._set_live(transfer, TransferState.SENT, done=1, total=1)
        finally:
            del self._cancels[vm_id]
            self._live_busy.discard(vm_id)
            self._wake.set()

    def _still_assigned(self, transfer: DiskTransfer) -> bool:
        """Whether the assignment still names ``transfer``'s op for its VM
        (its peer may have gone meanwhile: the move is cancelling, and
        waits for this verdict)."""
        now = self._transfers.get(transfer.vm_id)
        return now is not None and (now.op_id, now.live, now.receive) == (
            transfer.op_id,
            transfer.live,
            transfer.receive,
        )

    def _migrated_bytes(self, transfer: DiskTransfer, done: int, total: int) -> None:
        current = self._live.get(transfer.vm_id)
        if current is not None and current.state is TransferState.SENDING:
            self._set_live(transfer, TransferState.SENDING, done=done, total=total)
            self._wake.set()

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
                tls=self._tls,
                tls_target=transfer.peer_tls_worker,
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
            if transfer.live:
                progress.append(
                    self._live.get(vm_id)
                    or TransferProgress(vm_id, transfer.op_id, TransferState.PENDING)
                )
            elif transfer.receive:
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
    tls: TransferTls | None = None,
    tls_target: str = "",
) -> None:
    """``send_disks`` in a worker thread (``tls``, ``tls_target``: as
    there); cancelled, it cuts
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
                tls=tls,
                tls_target=tls_target,
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


def _cancelled(transfer: DiskTransfer) -> bool:
    """Whether ``transfer`` asks its source to stop migrating (a live
    source transfer without a peer: the move is cancelling)."""
    return transfer.live and not transfer.receive and not transfer.peer


def _migrate_job(
    transfer: DiskTransfer,
    progress: Callable[[int, int], None],
    timeout: float,
    cancel: threading.Event,
) -> Callable[[JobContext], None]:
    """A live move's migration, run as a job in the VM's supervisor's
    turns (see the module docstring)."""

    def run(ctx: JobContext) -> None:
        handle = ctx.handle
        if handle is None:
            raise VmmError(f"VM {transfer.vm_id} does not run here: nothing to migrate")
        disks = _address(transfer.disks) if transfer.disks else None
        if disks is None and disk_files(ctx.paths.vm_dir):
            raise VmmRejected(
                f"the {ctx.driver.name} driver cannot move writable disks live (the copy "
                "while paused is not built): move the VM cold"
            )
        ctx.moved_out(MovedOut(transfer.op_id, sent=False))
        try:
            ctx.driver.send_migration(
                handle,
                memory=_address(transfer.peer),
                disks=disks,
                token=bytes.fromhex(transfer.token),
                timeout=timeout,
                progress=progress,
                cancel=cancel,
            )
        except BaseException:
            # The driver undid it: the guest runs on here.
            ctx.moved_out(None)
            ctx.forget_state()
            raise
        ctx.moved_out(MovedOut(transfer.op_id, sent=True))
        # Gone before the move hears "sent": the switch never finds it here.
        ctx.give_up_vmm(f"moved live to its target (move {transfer.op_id})")

    return run


def _unmark_job(op_id: str) -> Callable[[JobContext], None]:
    def run(ctx: JobContext) -> None:
        ctx.moved_out(None)
        log.info("VM %s: move %s over: its migration mark cleared", ctx.vm_id, op_id)

    return run


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return (host.strip("[]"), int(port))


def _free_port(host: str) -> int:
    """A TCP port free on ``host`` now (the kernel's pick, taken back): the
    incoming VMM binds it at once, and a port taken meanwhile fails its
    launch (the move fails, saying so)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
