"""The reconciler's hands on one worker: image, network, VMM, in that order.

``WorkerActuator`` implements ``procurator.core.reconcile.VmActuator`` by
composing three blocking, thread-safe adapters — ``ImageManager`` (store
path, GC root, confinement, disk copies), ``NetworkManager`` (tap, MAC,
address) and ``VmManager`` (the VMM process) — and running each VM's steps in
a worker thread through ``trio.to_thread.run_sync`` with one capacity
limiter, so at most ``limiter.total_tokens`` threads do blocking work at once.

Every step is idempotent: ``ensure`` of a VM that already matches only
verifies (the tap is there, the image rooted and its disk copies present,
``VmManager.ensure`` sees the same hash and power and returns), and
``remove`` of a VM that is gone is a no-op. So the reconciler may repeat
any step after a crash. A power change goes through the same ``ensure``:
the disk copies of an unchanged image are kept, so a stopped VM starts
again with its disk contents and its address.

Order matters. Ensure is the first half of the worker's launch path (the
VmManager's supervisor does the rest: ``VmSupervisor._launch``): the image
is checked — confinement, then what this worker's VMM driver can run
(``VmmDriver.check``) — before anything is taken on the host for the VM, so
a refused image takes no tap and no address; then the tap and address,
attached to the accepted definition (NIC, kernel ``ip=``); then the
hand-over to the VmManager, as a typed ``VmSpec``. Every failure
before the hand-over frees what this step took (a fresh image root and
disk copies, a tap and address the VM did not have); from the hand-over on
the VM is the VmManager's, observed, and a removal releases everything.
Remove: stop the VMM first, then release the image (its GC root must
outlive the VMM that reads it) and last the tap and the address.

While a VM's step runs, ``observe`` shows it in a transitional phase
(``realising`` while its image is fetched, else ``starting``/``stopping``)
under its *target* hash, so the plan leaves it alone and status tells what
is happening. Each change of that phase calls ``on_change(vm_id)`` (from the
step's thread), for the owner to mark the VM dirty in the reconciler: nothing
else would report it before the step ends, which for a slow image fetch can
be minutes of a status saying "waiting to be created". The step's end is no
such change: ``ensure`` and ``remove`` end the flight on the trio thread once
the step's thread returned, and the reconciler looks at the VM again when
its step ends, so the end rides on the one wake-up of trio that ``to_thread``
makes anyway (a call from the step's thread would wake trio a moment before
it: a hand-off, a system call and a context switch per step). ``observe_some``
observes only the VMs a pass names, so a pass over the VMs one change
touched costs the same on a host of ten VMs and of ten thousand.

A live move's incoming VM (``hold_incoming``, ``drop_incoming``: the move
service's, ``procurator.worker.move_service``) is no VM of the reconciler's
until the switch: its hold and its removal never show in flight, and
``observe`` leaves it out; a removal shown in flight would have the
reconciler remove it a second time and report it to the master.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass

import trio

from procurator.core.confinement import HostSide
from procurator.core.errors import ProcuratorError
from procurator.core.models import Phase, PowerState, VmAssignment
from procurator.core.reconcile import ObservedVm
from procurator.core.vmdef import VmDefinition
from procurator.nix.image import ImageManager, PreparedImage
from procurator.worker.manager import VmManager, VmObservation, VmSpec
from procurator.worker.network import NetworkManager
from procurator.worker.vmrecord import Incoming

__all__ = ["WorkerActuator"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _InFlight:
    hash: str
    phase: Phase
    message: str


class WorkerActuator:
    """See the module docstring. ``network`` None: VMs get no NIC.
    ``incoming_op(vm_id)``: the op id of the move whose received disks
    the VM may take (the transfer to this worker the current assignment
    carries for it: ``MoveTransfers.receiving``; read on the trio thread
    when the step begins), None for none (the default: no moves here)."""

    def __init__(
        self,
        manager: VmManager,
        images: ImageManager,
        network: NetworkManager | None,
        *,
        limiter: trio.CapacityLimiter,
        serial_file: Callable[[str], str],
        on_realise_seconds: Callable[[float], None] | None = None,
        on_change: Callable[[str], None] | None = None,
        incoming_op: Callable[[str], str | None] = lambda vm_id: None,
    ) -> None:
        self._manager = manager
        self._incoming_op = incoming_op
        self._images = images
        self._network = network
        self._limiter = limiter
        self._serial_file = serial_file
        self._on_realise_seconds = on_realise_seconds
        self._on_change = on_change
        # Written from worker threads, read from trio: guarded by a lock
        # (leaf lock: nothing is called while holding it).
        self._lock = threading.Lock()
        self._in_flight: dict[str, _InFlight] = {}
        # VMs being held incoming or dropped (hold_incoming, drop_incoming):
        # no step of the reconciler's, so never shown in flight (it would
        # remove them, and report them to a master that never assigned them).
        self._hidden: set[str] = set()
        # Trio thread only (observe): each VM's last VmObservation and what
        # it was turned into. Observations are immutable and replaced on
        # every change, so an identical object needs no new ObservedVm —
        # and the reconciler's own per-VM caches then hit by identity too.
        self._observed: dict[str, tuple[VmObservation, ObservedVm]] = {}

    # -- VmActuator ---------------------------------------------------------

    async def observe(self) -> Mapping[str, ObservedVm]:
        # VmManager.list() only copies in-memory observations under its map
        # lock: cheap enough to call on the trio thread, and a thread hop per
        # pass would dominate a no-op resync of thousands of VMs.
        last = self._observed
        seen: dict[str, tuple[VmObservation, ObservedVm]] = {}
        observed: dict[str, ObservedVm] = {}
        for o in self._manager.list():
            if o.incoming:
                continue  # held for a live move: not this worker's VM (yet)
            hit = last.get(o.vm_id)
            value = hit[1] if hit is not None and hit[0] is o else _observed(o)
            seen[o.vm_id] = (o, value)
            observed[o.vm_id] = value
        self._observed = seen
        with self._lock:
            in_flight = dict(self._in_flight)
        self._overlay(observed, in_flight)
        return observed

    async def observe_some(self, vm_ids: Collection[str]) -> Mapping[str, ObservedVm]:
        # One VmManager.get per VM: the cost of a pass over the VMs a change
        # touched, whatever the fleet.
        last = self._observed
        get = self._manager.get
        observed: dict[str, ObservedVm] = {}
        for vm_id in vm_ids:
            o = get(vm_id)
            if o is None or o.incoming:
                last.pop(vm_id, None)
                continue
            hit = last.get(vm_id)
            value = hit[1] if hit is not None and hit[0] is o else _observed(o)
            last[vm_id] = (o, value)
            observed[vm_id] = value
        with self._lock:
            flights = self._in_flight
            in_flight = {i: flights[i] for i in vm_ids if i in flights}
        self._overlay(observed, in_flight)
        return observed

    @staticmethod
    def _overlay(observed: dict[str, ObservedVm], in_flight: Mapping[str, _InFlight]) -> None:
        """Show each VM with a step in flight in that step's phase."""
        for vm_id, flight in in_flight.items():
            current = observed.get(vm_id)
            observed[vm_id] = ObservedVm(
                id=vm_id,
                hash=flight.hash,
                phase=flight.phase,
                power=current.power if current else PowerState.STOPPED,
                message=flight.message,
                restarts=current.restarts if current else 0,
                address=current.address if current else "",
            )

    async def ensure(self, vm: VmAssignment, op_id: str) -> None:
        incoming = self._incoming_op(vm.id)  # the assignment this step is for
        try:
            await trio.to_thread.run_sync(
                self._ensure_blocking, vm, op_id, incoming, limiter=self._limiter
            )
        finally:
            self._landed(vm.id)

    async def hold_incoming(self, vm: VmAssignment, op_id: str, incoming: Incoming) -> None:
        """A live move's target side: ``vm`` (as its source's assignment
        has it) made ready as for a start (image, disk copies, tap and
        address) and held in an incoming VMM (``VmSpec.incoming``): not a
        VM of this worker's (``observe`` leaves it out) until an assignment
        names it (the switch's ``ensure``, which lets it run). A failure
        leaves nothing taken (the VM is removed again)."""
        await trio.to_thread.run_sync(
            self._hold_incoming_blocking, vm, op_id, incoming, limiter=self._limiter
        )

    def _hold_incoming_blocking(self, vm: VmAssignment, op_id: str, incoming: Incoming) -> None:
        log.info("VM %s: held incoming for move %s", vm.id, incoming.op_id)
        with self._hiding(vm.id):
            spec = dataclasses.replace(self._launch_spec(vm, op_id, None), incoming=incoming)
            try:
                self._manager.ensure(spec)
            except BaseException:
                self._remove_blocking(vm.id, op_id)
                raise

    async def drop_incoming(self, vm_id: str, op_id: str) -> None:
        """The end of a live move that failed: the VM held incoming here
        for it removed, with all it took, as hidden from the reconciler as
        its hold was. Not ``remove``: that is a step the reconciler sees
        in flight ("removing"), and it would remove the VM a second time
        and report it to a master that never assigned it here."""
        await trio.to_thread.run_sync(
            self._drop_incoming_blocking, vm_id, op_id, limiter=self._limiter
        )

    def _drop_incoming_blocking(self, vm_id: str, op_id: str) -> None:
        with self._hiding(vm_id):
            self._remove_blocking(vm_id, op_id)

    @contextlib.contextmanager
    def _hiding(self, vm_id: str) -> Iterator[None]:
        """Steps on ``vm_id`` meanwhile are not the reconciler's (``_mark``)."""
        with self._lock:
            self._hidden.add(vm_id)
        try:
            yield
        finally:
            with self._lock:
                self._hidden.discard(vm_id)

    async def remove(self, vm_id: str, op_id: str) -> None:
        try:
            await trio.to_thread.run_sync(
                self._remove_blocking, vm_id, op_id, limiter=self._limiter
            )
        finally:
            self._landed(vm_id)

    def _landed(self, vm_id: str) -> None:
        """The end of a reconciler's step, on the trio thread: the VM shows
        as observed again. No ``on_change``: from the step's thread it would
        wake trio a moment before ``to_thread`` wakes it with the step's end,
        and the reconciler looks at the VM again when its step ends
        (``Reconciler._act``), so the flight's end rides on that one wake."""
        with self._lock:
            self._in_flight.pop(vm_id, None)

    # -- blocking steps (worker threads) ------------------------------------

    def _mark(self, vm_id: str, flight: _InFlight | None) -> None:
        with self._lock:
            if vm_id in self._hidden:
                return
            if flight is None:
                self._in_flight.pop(vm_id, None)
            else:
                self._in_flight[vm_id] = flight
        if self._on_change is not None:
            self._on_change(vm_id)  # no lock held: it hands over to trio

    def _ensure_blocking(self, vm: VmAssignment, op_id: str, incoming: str | None) -> None:
        # Log records here carry the vm_id and op_id of the reconciler's
        # action: trio.to_thread.run_sync runs this in a copy of its context.
        # The flight ends on the trio thread (``ensure``: ``_landed``).
        self._mark(vm.id, _InFlight(vm.hash, Phase.STARTING, "preparing the image"))
        log.info(
            "VM %s: ensuring %s, power %s (%s)", vm.id, vm.hash, vm.power.value, vm.nix_store_path
        )
        spec = self._launch_spec(vm, op_id, incoming)
        self._mark(vm.id, _InFlight(vm.hash, Phase.STARTING, "starting the VMM"))
        # The hand-over: from here the VmManager owns the VM (and with it
        # what was taken for it), and a removal releases all of it.
        observation = self._manager.ensure(spec)
        # At debug: the supervisor's events ("booted", "failed") say it
        # at INFO and up, once per VM start, not twice.
        log.debug("VM %s: %s (%s)", vm.id, observation.phase.value, observation.message)
        # Only now that the VM runs this image may older ones go.
        self._images.retire_others(vm.id, vm.nix_store_path)
        log.debug("VM %s: older images retired", vm.id)

    def _launch_spec(self, vm: VmAssignment, op_id: str, incoming: str | None) -> VmSpec:
        """What the VmManager is handed: the image checked (confinement,
        then what this worker's VMM can run) before the tap and address are
        taken; every failure frees what this step took."""
        prepared = self._prepare_image(vm, incoming)
        try:
            # What the driver cannot run is refused before the network is touched.
            self._manager.driver.check(prepared.definition)
            definition, address = self._attach_network(vm, prepared)
        except BaseException:
            self._images.abandon(vm.id, prepared)
            raise
        return VmSpec(
            vm_id=vm.id,
            hash=vm.hash,
            definition=definition,
            power=vm.power,
            op_id=op_id,
            image=vm.nix_store_path,
            address=address,
            reschedule=vm.reschedule,
        )

    def _prepare_image(self, vm: VmAssignment, incoming: str | None) -> PreparedImage:
        """Root, confine and copy the VM's image (undone by the image
        manager itself when it fails); ``incoming``: the move whose
        received disks it may take."""
        host = HostSide(
            serial_file=self._serial_file(vm.id), vcpus=vm.vcpus, memory_mib=vm.memory_mib
        )
        realise_started: list[float] = []

        def on_realise() -> None:
            realise_started.append(time.monotonic())
            self._mark(vm.id, _InFlight(vm.hash, Phase.REALISING, "fetching the image"))

        prepared = self._images.prepare(
            vm.id, vm.nix_store_path, host=host, on_realise=on_realise, incoming_op=incoming
        )
        if realise_started and self._on_realise_seconds is not None:
            self._on_realise_seconds(time.monotonic() - realise_started[0])
        # At debug: each disk copy made has its INFO line (ImageManager).
        log.debug("VM %s: image ready (%d disk copies)", vm.id, len(prepared.disks))
        return prepared

    def _attach_network(
        self, vm: VmAssignment, prepared: PreparedImage
    ) -> tuple[VmDefinition, str]:
        """The VM's definition with its tap and MAC, and its address. A tap
        and address taken here for a VM that had none are released again
        when anything fails before the hand-over to the VmManager."""
        if self._network is None:
            return prepared.definition, ""
        self._mark(vm.id, _InFlight(vm.hash, Phase.STARTING, "preparing the network"))
        fresh = self._network.nic(vm.id) is None
        try:
            nic = self._network.ensure_vm(vm.id)
            definition = self._images.attach_nic(
                prepared, nic=nic.device(), cmdline_extra=nic.kernel_ip_arg()
            )
        except BaseException:
            if fresh:
                self._release_network(vm.id)
            raise
        log.info("VM %s: tap %s, address %s", vm.id, nic.tap, nic.ip)
        return definition, nic.ip

    def _release_network(self, vm_id: str) -> None:
        assert self._network is not None
        try:
            self._network.release_vm(vm_id)
        except ProcuratorError as exc:
            # The step's own error is what the reconciler must see; the tap
            # and address are swept at the next start if this keeps failing.
            log.warning("VM %s: tap and address not released: %s", vm_id, exc)

    def _remove_blocking(self, vm_id: str, op_id: str) -> None:
        # Shown in flight for ``remove``, whose own end ends the flight
        # (``_landed``); a hidden VM's removal (a live move's) shows nothing.
        self._mark(vm_id, _InFlight("", Phase.STOPPING, "removing"))
        log.info("removing VM %s", vm_id, extra={"vm_id": vm_id, "op_id": op_id})
        self._manager.remove(vm_id, op_id=op_id)
        self._images.release(vm_id)
        if self._network is not None:
            self._network.release_vm(vm_id)
        log.info("VM %s removed: image, disk copies and address released", vm_id)


def _observed(o: VmObservation) -> ObservedVm:
    return ObservedVm(
        id=o.vm_id,
        hash=o.observed_hash or o.desired_hash,
        phase=o.phase,
        power=o.power,
        message=o.message,
        restarts=o.restarts,
        address=o.address,
        op_id=o.op_id,
        desired_power=o.desired_power,
    )
