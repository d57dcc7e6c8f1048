"""The reconciling worker: VmManager, network, images and the reconciler,
wired to the master link.

``ReconcilingHandler`` is the ``AssignmentHandler`` the ``procurator worker``
command runs (``procurator.app.worker`` makes it from ``RuntimeOptions``).
Start-up order matters and is the crash-safety story of the worker:

1. ``VmManager.recover()``: re-adopt every VMM still running from the state
   dir (never spawn twice), restart dead ones that were desired running —
   but not a dead ``reschedule`` one: the master may have moved it while
   this worker was away, so it stays ``pending`` until an assignment names
   it (a ``wait`` VM is never moved: restarting it at once is safe, and
   shortens its outage).
2. Network: make sure the bridge exists, then sweep taps carrying our prefix
   that no VM owns — only now, after re-adoption, is "owned" known. The
   same for the cgroups of VMs nothing owns (``Jail.sweep``: what still runs
   in one is killed). Then release the GC roots of VMs nothing owns
   (``ImageManager.sweep``).
3. Start the reconciler. It acts only once the first assignment arrived (a
   push or the link's pull), so a worker restarted while the master is away
   keeps its VMs as they are. Beside it, the preparer
   (``procurator.worker.prepare``: the images a rollout's prepare phase
   names, rooted under ``prepared/``; it too drops nothing before the first
   assignment), a move's disk transfers (``procurator.worker.move_service``,
   with ``--transfer-listen``) and the guest health checks.

Events reach the master from two sources: the VmManager (what happened to a
VMM: created, booted, crashed...) and the reconciler (a step that failed for
good before any VMM ran, e.g. a bad image). Both carry the op id of the
assignment that caused the work. Not the events of a VM held incoming for
a live move (``VmObservation.incoming``): it is no VM of this worker's
until the switch, the master refuses events that name it (and with them
every other event of their report), and its move's progress tells the
master how it went; the supervisor has logged them.

Guest health checks (``procurator.worker.health.HealthMonitor``): every
assignment update the reconciler takes goes to the monitor too (each VM's
check), and every status change the reconciler publishes passes through
it on the way to the link (each entry gets its health); the monitor's own
task checks the guests and publishes health transitions through the same
link. A changed check never reaches the actuator: the reconciler plans by
hash.

Threads: the manager calls ``on_change`` from the threads that drive its
supervisors' turns (an ensure's own step thread, or the manager's pool); it is
handed to trio with the trio token (``run_sync_soon``), which marks the VM
dirty in the reconciler (a crash or an exit is a reason to look at it again:
the reconciler's passes handle the VMs marked, see ``procurator.core.
reconcile``) and forwards the event to the master. The actuator's
``on_change`` (a step in flight changed phase) marks its VM the same way.
Nothing else crosses threads here. The changes cross in batches
(``_Handoff``): a change queued while an earlier one waits for trio rides
with it, so a burst of starts (four or five changes each) wakes trio once
per batch, not once per change, and the events go to the master in one
``publish_events`` (issue 31: every wake-up is a system call, a context
switch and a trio loop turn). Order is kept: the changes of a batch are
handled in the order they were queued.

The collector (``procurator.worker.heap``): each metrics poll shows the
fleet's ``(vm_id, pid)`` marks to ``LongLivedHeap.settle``, which freezes
every object alive for CPython's cyclic collector once the fleet holds
still (after the start-up's re-adoption, after a burst of starts) and
again after churn, so the collector's full collections stop walking the
~200,000 objects of a 1,000-VM worker every two minutes; ``close``
unfreezes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import trio

from procurator.core.assignments import AssignmentChanges, AssignmentUpdate
from procurator.core.confinement import ImageLimits
from procurator.core.defaults import (
    DEFAULT_BRIDGE,
    DEFAULT_CONCURRENCY,
    DEFAULT_GUEST_CHECK_INTERVAL,
    DEFAULT_GUEST_CHECK_TIMEOUT,
    DEFAULT_HEALTH_CHECKS_PER_SECOND,
    DEFAULT_HEALTH_INTERVAL,
    DEFAULT_METRICS_INTERVAL,
    DEFAULT_STOP_GRACE,
    DEFAULT_SUBNET,
)
from procurator.core.defaults import VMM_DRIVERS as DRIVERS
from procurator.core.errors import PermanentError, ProcuratorError
from procurator.core.fence import FENCE_POWER, fence_message, fences
from procurator.core.jail import JailPolicy
from procurator.core.metrics import VmSnapshot
from procurator.core.models import Capacity, EventKind, VmEvent
from procurator.core.reconcile import Reconciler
from procurator.core.status import StatusChanges
from procurator.logs import some
from procurator.nix.image import ImageManager
from procurator.nix.store import NixStore
from procurator.worker import cgroups
from procurator.worker.actuator import WorkerActuator
from procurator.worker.daemon import StatusPublisher
from procurator.worker.health import GuestProber, HealthMonitor
from procurator.worker.heap import LongLivedHeap
from procurator.worker.jail import Jail, instance_name, missing_privileges
from procurator.worker.manager import Timeouts, VmManager, VmObservation
from procurator.worker.metrics import WorkerMetrics, vm_snapshots
from procurator.worker.move_service import MoveTransfers
from procurator.worker.move_transfer import TransferTls
from procurator.worker.network import NetworkConfig, NetworkManager
from procurator.worker.prepare import PREPARED_DIR, ImagePreparer
from procurator.worker.vmm import process
from procurator.worker.vmm.base import VmmDriver
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver, connection_budget
from procurator.worker.vmm.qemu import QemuDriver
from procurator.worker.vmrecord import VmSpec

__all__ = ["DRIVERS", "ReconcilingHandler", "RuntimeOptions", "make_driver", "resolve_driver"]

log = logging.getLogger(__name__)

_ACCELS: dict[str, Literal["kvm", "tcg", "auto"]] = {"kvm": "kvm", "tcg": "tcg", "auto": "auto"}


@dataclass(frozen=True)
class RuntimeOptions:
    """How the worker runs VMs (the ``procurator worker`` flags)."""

    driver: str = "auto"  # cloud-hypervisor, qemu, or auto (first found)
    # The VMM executable: a path (or a name on PATH), never split like a
    # shell line; "" for the driver's usual command. ``vmm_args`` follow it
    # (before the driver's own flags).
    vmm_binary: str = ""
    vmm_args: tuple[str, ...] = ()
    qemu_accel: str = "auto"  # kvm, tcg, auto
    network: bool = True
    bridge: str = DEFAULT_BRIDGE
    subnet: str = DEFAULT_SUBNET
    manage_bridge: bool = True
    substituters: tuple[str, ...] = ()
    max_vcpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_memory_mib: int = 0  # 0: the host's memory
    concurrency: int = DEFAULT_CONCURRENCY
    stop_grace: float = DEFAULT_STOP_GRACE  # seconds the guest gets to power off
    metrics_listen: str = ""  # host:port of the Prometheus exporter; "" for none
    metrics_interval: float = DEFAULT_METRICS_INTERVAL  # seconds between metric polls and reports
    # Seconds between a VM's vm.info health checks where the driver has no
    # state marks (QEMU; cloud-hypervisor's VMs are checked by the manager's
    # counters sweep every metrics_interval: VmManager.sweep). A VMM that
    # exits is seen at once (pidfd); this only bounds how long a hung API
    # goes unnoticed (two missed checks). Every check is an API call: at a
    # thousand VMs a 5 s interval is 200 calls a second.
    health_interval: float = DEFAULT_HEALTH_INTERVAL
    # At most this many health checks a second across all VMs: past
    # health_interval * this many VMs (375 by default), each VM's interval
    # stretches to VMs / this (40 s at 1,000 VMs), so the idle cost of the
    # checks stays flat. 0: no cap.
    health_checks_per_second: float = DEFAULT_HEALTH_CHECKS_PER_SECOND
    # Guest health checks (VmAssignment.health, procurator.worker.health):
    # seconds between two checks of a VM when its check names no interval,
    # and the most one check may take.
    guest_check_interval: float = DEFAULT_GUEST_CHECK_INTERVAL
    guest_check_timeout: float = DEFAULT_GUEST_CHECK_TIMEOUT
    # How VMMs are jailed (procurator.worker.jail): their uid range, limits
    # and cgroup parent. None: --unconfined, every VMM runs as the worker
    # (root) with its view of the host and no limits; for debugging only.
    jail: JailPolicy | None = field(default_factory=JailPolicy)
    # What a jailed VMM needs to see beyond what its driver finds (what a
    # --vmm-binary wrapper script runs).
    vmm_runtime_paths: tuple[str, ...] = ()

    def capacity(self) -> Capacity:
        """What this host offers, as the worker tells the master: its CPUs
        and memory (``max_memory_mib`` when set). No VM-count limit of its
        own (``max_vms`` 0): the master's per-worker limit applies."""
        return Capacity(
            vcpus=os.cpu_count() or 1,
            memory_mib=self.max_memory_mib or _host_memory_mib(),
            max_vms=0,
        )


def resolve_driver(name: str) -> str:
    """``auto``: cloud-hypervisor if it is on PATH, else QEMU."""
    if name != "auto":
        if name not in DRIVERS:
            raise ValueError(f"unknown VMM driver {name!r} (choose from {', '.join(DRIVERS)})")
        return name
    return "cloud-hypervisor" if shutil.which("cloud-hypervisor") else "qemu"


def make_driver(
    options: RuntimeOptions, *, on_api_call: Callable[[str, float, bool], None] | None = None
) -> VmmDriver:
    name = resolve_driver(options.driver)
    if name == "cloud-hypervisor":
        return CloudHypervisorDriver(
            options.vmm_binary or "cloud-hypervisor",
            args=options.vmm_args,
            on_api_call=on_api_call,
            runtime_paths=options.vmm_runtime_paths,
            kept_connections=connection_budget(),
        )
    accel = _ACCELS.get(options.qemu_accel)
    if accel is None:
        raise ValueError(f"unknown QEMU acceleration {options.qemu_accel!r} (kvm, tcg or auto)")
    return QemuDriver(
        binary=options.vmm_binary or "qemu-system-x86_64",
        args=options.vmm_args,
        accel=accel,
        runtime_paths=options.vmm_runtime_paths,
    )


def _make_jail(policy: JailPolicy | None, state_dir: Path, netns: str | None) -> Jail | None:
    """The worker's jail, or None (``--unconfined``: said loudly). A worker
    without the privileges to jail is refused at start, naming them."""
    if policy is None:
        log.warning(
            "--unconfined: every VMM runs with this worker's privileges (root), sees the "
            "whole host and has no resource limits; a guest that escapes its VMM owns "
            "this host. For debugging only."
        )
        return None
    missing = missing_privileges()
    if missing:
        raise PermanentError(
            "this worker cannot jail its VMMs: it lacks " + ", ".join(missing),
            details=(
                "run the worker as root (or with those capabilities), or pass --unconfined "
                "to run VMMs with the worker's privileges (for debugging only)",
            ),
        )
    jail = Jail(
        policy,
        state_dir,
        cgroups=cgroups.detect(policy.cgroup_parent, instance_name(state_dir)),
        netns=netns,
    )
    log.info("jailing every VMM: %s", jail.describe())
    return jail


def _host_memory_mib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 1024


@dataclass(frozen=True, slots=True)
class _Change:
    """A VM's change, from the thread that saw it to trio."""

    vm_id: str
    event: VmEvent | None
    in_flight: bool  # a step in flight changed phase (the actuator), not the VM


class _Handoff:
    """Changes from other threads into trio, in batches (module docstring).

    ``put`` (any thread) queues a change and, when the queue was empty,
    schedules one ``_take`` in trio; a change put while that take is
    pending joins its batch. ``_take`` empties the queue and hands the
    batch to ``deliver``, in the order the changes were put. Changes put
    before ``open`` (the handler not running yet: ``recover`` reads every
    VM anyway) or after trio ended are dropped, as one ``run_sync_soon``
    each dropped them before. ``_lock`` is a leaf: held for a list
    operation, never across a call into trio or ``deliver``."""

    def __init__(self, deliver: Callable[[list[_Change]], None]) -> None:
        self._deliver = deliver
        self._lock = threading.Lock()
        self._queued: list[_Change] = []
        self._token: trio.lowlevel.TrioToken | None = None

    def open(self, token: trio.lowlevel.TrioToken) -> None:
        """Deliver into the trio run of ``token`` from now on."""
        with self._lock:
            self._token = token
            self._queued = []

    def put(self, change: _Change) -> None:
        with self._lock:
            token = self._token
            if token is None:
                return
            self._queued.append(change)
            if len(self._queued) > 1:
                return  # a take is pending: this change rides with it
        try:
            token.run_sync_soon(self._take)
        except trio.RunFinishedError:
            with self._lock:
                self._queued = []  # nobody will take them

    def _take(self) -> None:
        with self._lock:
            batch, self._queued = self._queued, []
        if batch:
            self._deliver(batch)


class ReconcilingHandler:
    """Turns assignments into running VMs on this host."""

    def __init__(
        self,
        *,
        worker_id: str,
        state_dir: Path,
        options: RuntimeOptions,
        publisher: StatusPublisher,
        driver: VmmDriver | None = None,
        netns: str | None = None,
        transfer_listener: socket.socket | None = None,
        transfer_tls: TransferTls | None = None,
        heap: LongLivedHeap | None = None,
    ) -> None:
        self.worker_id = worker_id
        # Freezes the long-lived objects for the cyclic collector once the
        # fleet holds still (procurator.worker.heap); fed by the metrics poll.
        self.heap = heap if heap is not None else LongLivedHeap()
        self.state_dir = Path(state_dir)
        self.options = options
        self._publisher = publisher
        self.metrics = WorkerMetrics()
        self.driver = (
            driver
            if driver is not None
            else make_driver(options, on_api_call=self.metrics.observe_api_call)
        )
        self._handoff = _Handoff(self._changed_in_trio)
        timeouts = Timeouts(
            power_button_wait=options.stop_grace,
            health_interval=options.health_interval,
            health_checks_per_second=options.health_checks_per_second,
            # Counters are only read by the metrics poller: fresher is waste.
            counters_interval=options.metrics_interval,
        )
        self.jail = _make_jail(options.jail, self.state_dir, netns)
        self.manager = VmManager(
            self.state_dir,
            self.driver,
            timeouts=timeouts,
            on_change=self._on_change,
            jail=self.jail,
        )
        self.metrics.watch_turns(self.manager.turns.stats)
        self.network = (
            NetworkManager(
                NetworkConfig(
                    bridge=options.bridge,
                    subnet=options.subnet,
                    manage_bridge=options.manage_bridge,
                    netns=netns,
                ),
                self.state_dir,
            )
            if options.network
            else None
        )
        nix_env = (
            {"NIX_CONF_DIR": os.environ["NIX_CONF_DIR"]} if "NIX_CONF_DIR" in os.environ else None
        )
        store = NixStore(substituters=options.substituters, extra_env=nix_env)
        self.images = ImageManager(
            store,
            self.state_dir,
            limits=ImageLimits(
                max_vcpus=options.max_vcpus,
                max_memory_mib=options.max_memory_mib or _host_memory_mib(),
            ),
        )
        self.actuator = WorkerActuator(
            self.manager,
            self.images,
            self.network,
            limiter=trio.CapacityLimiter(options.concurrency),
            serial_file=lambda vm_id: str(self.manager.state.paths(vm_id).serial_file),
            on_realise_seconds=self.metrics.observe_realise,
            on_change=self._in_flight_changed,
            incoming_op=self._incoming_op,
        )
        if self.network is not None and netns is not None:
            # The guests are reached from the network's namespace.
            prober = GuestProber(self.network.guest_socket, in_thread=True)
        else:
            prober = GuestProber()
        # The images a rollout's prepare phase names, through the same store.
        self.preparer = ImagePreparer(
            store,
            self.state_dir,
            on_progress=publisher.publish_prepared,
            on_counts=self.metrics.set_prepared,
        )
        # A move's disk transfers (procurator.worker.move_service): only a
        # worker with a transfer address (--transfer-listen) takes part.
        self.transfers = (
            MoveTransfers(
                self.manager,
                transfer_listener,
                self.state_dir,
                on_progress=publisher.publish_transfers,
                tls=transfer_tls,
                # Live moves' incoming VMs are made as the reconciler's are.
                incoming=self.actuator,
            )
            if transfer_listener is not None
            else None
        )
        self.health = HealthMonitor(
            worker_id,
            publisher.publish_status_changes,
            prober,
            interval=options.guest_check_interval,
            timeout=options.guest_check_timeout,
            on_check=self.metrics.count_health_check,
            on_counts=self.metrics.set_vms_by_health,
            on_error=self.metrics.count_health_monitor_error,
            state_file=self.state_dir / "health.json",
        )
        # The pauses of a worker fenced before it holds an assignment
        # (_fence_recovered), as many at once as the reconciler's actions.
        self._fence_limiter = trio.CapacityLimiter(options.concurrency)
        self.reconciler = Reconciler(
            actuator=self.actuator,
            on_status=self._publish_status,
            worker_id=worker_id,
            concurrency=options.concurrency,
            on_pass=self.metrics.observe_reconcile_pass,
            on_failure=self.metrics.count_error,
            on_event=self._publish_event,
        )
        log.info("worker %s uses the %s VMM driver", worker_id, self.driver.name)

    def _incoming_op(self, vm_id: str) -> str | None:
        """The move whose received disks VM ``vm_id`` may take here."""
        return self.transfers.receiving(vm_id) if self.transfers is not None else None

    # -- AssignmentHandler --------------------------------------------------

    async def on_assignment(self, update: AssignmentUpdate) -> bool:
        if isinstance(update, AssignmentChanges):
            if not self.reconciler.apply_changes(update):
                return False
            self.health.take_assignment(update)
            self.preparer.take_assignment(update)
            if self.transfers is not None:
                self.transfers.take_assignment(update)
            return True
        if self.reconciler.set_assignment(update):
            self.health.take_assignment(update)
            self.preparer.take_assignment(update)
            if self.transfers is not None:
                self.transfers.take_assignment(update)
            log.info(
                "assignment generation %d: %d VMs",
                update.generation,
                len(update.vms),
                extra={"op_id": update.op_id, "generation": update.generation},
            )
        return True

    async def on_fence(self, fenced: bool, silent_for: float) -> None:
        if fenced and self.reconciler.assignment is None:
            # Started while no master answers: no assignment says which
            # VMs are reschedule ones, their vm.json does.
            ids = await self._fence_recovered(fence_message(silent_for))
            log.warning(
                "fenced after %.1f s without a master, holding no assignment: %d re-adopted "
                "reschedule VM(s) paused: %s",
                silent_for,
                len(ids),
                some(ids),
            )
        elif fenced:
            ids = self.reconciler.fence(fence_message(silent_for))
            log.warning(
                "fenced after %.1f s without a master: %d reschedule VM(s) paused: %s",
                silent_for,
                len(ids),
                some(ids),
            )
        else:
            ids = self.reconciler.unfence()
            log.info("the fence ends: %d VM(s) as the master assigns them: %s", len(ids), some(ids))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._handoff.open(trio.lowlevel.current_trio_token())
        try:
            if self.network is not None:
                # Before recover(): a VMM it restarts (after a host reboot,
                # say) must find its tap on the bridge, or the VMM would make
                # an unbridged tap of its own and run without network.
                await trio.to_thread.run_sync(self._ensure_known_taps)
            recovered = await trio.to_thread.run_sync(self.manager.recover)
            if recovered:
                log.info("re-adopted %d VMs: %s", len(recovered), some(o.vm_id for o in recovered))
            if self.network is not None:
                owned = {o.vm_id for o in self.manager.list()}
                swept = await trio.to_thread.run_sync(self.network.sweep, owned)
                if swept:
                    log.info("removed taps nothing owns: %s", some(swept))
            if self.jail is not None:
                # After re-adoption, like the taps: the cgroups of VMs this
                # worker no longer has (and whatever still runs in them).
                owned = {o.vm_id for o in self.manager.list()}
                emptied = await trio.to_thread.run_sync(self.jail.sweep, owned)
                if emptied:
                    log.info("removed the cgroups of VMs nothing owns: %s", some(emptied))
            # Roots of VMs a crash left half-made or half-removed (see
            # ImageManager.sweep); before the reconciler prepares anything.
            # A nix-store the last worker left rooting an image would make
            # its root after the sweep: end it first.
            await trio.to_thread.run_sync(self._end_orphaned_helpers)
            owned = {o.vm_id for o in self.manager.list()}
            await trio.to_thread.run_sync(self._retire_replaced_images)
            released = await trio.to_thread.run_sync(self.images.sweep, owned)
            if released:
                log.info("released the images of VMs nothing owns: %s", some(released))
            async with trio.open_nursery() as nursery:
                await nursery.start(self.preparer.run)
                if self.transfers is not None:
                    await nursery.start(self.transfers.run)
                await nursery.start(self.health.run)
                await nursery.start(self.reconciler.run)
                await nursery.start(self._run_metrics)
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    # Shutting down: threads blocked in ensure()/remove()
                    # (up to Timeouts.ensure, an ensure that drives its
                    # VM's turns one step more) must return before the nursery
                    # can end; closing the manager first makes them (one
                    # that drives its VM's turns after its current step).
                    self.manager.begin_close()
        finally:
            # The VMs keep running: the next worker re-adopts them.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.close)

    async def _fence_recovered(self, message: str) -> list[str]:
        """The fence of a worker that holds no assignment (restarted while
        cut off): each re-adopted VM whose ``vm.json`` says ``reschedule``
        and desired running is paused (``fences``), with a ``paused``
        event saying ``message``. Returns once they are paused: the link
        delivers nothing before this returns, so the whole assignment that
        ends the fence comes after, and the reconciler then converges each
        VM to it (a VM still assigned resumes, one moved away is removed).
        A VM with no VMM is left alone: recovery holds a dead ``reschedule``
        VM, nothing runs to pause, and the pause (``assigned=False``) starts
        nothing."""
        specs = await trio.to_thread.run_sync(self.manager.specs)
        running = {o.vm_id for o in self.manager.list() if o.pid is not None}
        fenced = [
            dataclasses.replace(spec, power=FENCE_POWER)
            for spec in specs
            if spec.vm_id in running and fences(spec.reschedule, spec.power)
        ]
        paused: list[str] = []

        async def pause(spec: VmSpec) -> None:
            try:
                await trio.to_thread.run_sync(
                    functools.partial(self.manager.ensure, spec, assigned=False),
                    limiter=self._fence_limiter,
                )
            except ProcuratorError as exc:
                log.warning("VM %s: not paused by the fence: %s", spec.vm_id, exc)
                return
            paused.append(spec.vm_id)
            self._publish_event(
                VmEvent(
                    spec.vm_id,
                    EventKind.PAUSED,
                    message,
                    spec.op_id,
                    unix_time_ms=int(time.time() * 1000),
                )
            )

        async with trio.open_nursery() as nursery:
            for spec in fenced:
                nursery.start_soon(pause, spec)
        return sorted(paused)

    def _publish_event(self, event: VmEvent) -> None:
        self._publisher.publish_events([event])

    def _retire_replaced_images(self) -> None:
        """A worker killed between starting a VM's new image and retiring
        the old one left both rooted: keep only what each VM runs."""
        for observation in self.manager.list():
            store_path = observation.image
            if store_path and observation.observed_hash == observation.desired_hash:
                try:
                    self.images.retire_others(observation.vm_id, store_path)
                except ProcuratorError as exc:
                    log.warning("VM %s: old images not released: %s", observation.vm_id, exc)

    def _ensure_known_taps(self) -> None:
        """The bridge, and the tap of every VM the state dir knows."""
        assert self.network is not None
        self.network.ensure_bridge()
        for vm_id in self.manager.state.vm_ids():
            try:
                self.network.ensure_vm(vm_id)
            except ProcuratorError as exc:
                # The VM's own ensure will fail with the same reason and
                # report it; the others go on.
                log.warning("VM %s: cannot prepare its tap before recovery: %s", vm_id, exc)

    def _end_orphaned_helpers(self) -> None:
        for roots in (self.state_dir / "gcroots", self.state_dir / PREPARED_DIR):
            for pid, ticks in process.find_by_argument_under(roots, programs=("nix-store",)):
                log.warning("killing pid %s, left by the last worker: it still roots an image", pid)
                process.terminate(pid, ticks, grace=0.0)

    def _publish_status(self, changes: StatusChanges) -> None:
        log.debug(
            "status: generation %d, %d VM(s) changed",
            changes.observed_generation,
            len(changes.changed),
        )
        self.metrics.set_observed_generation(changes.observed_generation)
        self._publisher.publish_status_changes(self.health.overlay(changes))

    async def _run_metrics(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Poll VM figures, serve them to Prometheus, relay them to the
        master (latest wins: the link drops a report the master is slow to
        take rather than queueing it)."""
        interval = self.options.metrics_interval
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(self.metrics.run_poller, self._vm_snapshots, interval=interval)
            )
            if self.options.metrics_listen:
                host, _, port = self.options.metrics_listen.rpartition(":")
                server = await nursery.start(self.metrics.run_http, host.strip("[]"), int(port))
                log.info("worker metrics at %s", server.url("/metrics"))
            task_status.started()
            while True:
                self._publisher.publish_metrics(self.metrics.to_report())
                await trio.sleep(interval)

    def _vm_snapshots(self) -> list[VmSnapshot]:
        """The metrics source: in-memory observations and the counters the
        supervisors polled (thread-safe, no VMM calls). Runs on the poll's
        thread, once a poll: it also shows the fleet to the long-lived heap,
        which freezes it for the collector when due (procurator.worker.heap;
        a refreeze's full collection, ~0.1 s at 1,000 VMs, delays this poll)."""
        counters = self.manager.counters()
        observations = self.manager.list()
        self.heap.settle((o.vm_id, o.pid) for o in observations)
        return vm_snapshots(observations, counters)

    def close(self) -> None:
        try:
            self.manager.close()
            if self.jail is not None:
                self.jail.close()
            if self.network is not None:
                self.network.close()
        finally:
            self.heap.release()  # gc.freeze is process-wide: undo it

    # -- from supervisors' turns (step threads, the manager's pool) ----------

    def _on_change(self, observation: VmObservation, event: VmEvent | None) -> None:
        if observation.incoming:
            event = None  # not this worker's VM yet: see the module docstring
        self._handoff.put(_Change(observation.vm_id, event, in_flight=False))

    def _in_flight_changed(self, vm_id: str) -> None:
        """A VM's step in flight changed phase (``WorkerActuator``): a
        pass reports it."""
        self._handoff.put(_Change(vm_id, None, in_flight=True))

    def _changed_in_trio(self, changes: list[_Change]) -> None:
        """A batch of changes, in the order they were queued."""
        events = []
        vm_gone = False
        for change in changes:
            self.reconciler.mark_dirty(change.vm_id)
            vm_gone = vm_gone or not change.in_flight
            if change.event is not None:
                events.append(change.event)
        if vm_gone and self.transfers is not None:
            self.transfers.vm_changed()  # a VMM gone may let a move's disks go
        if events:
            self._publisher.publish_events(events)
