"""Guest health checks on a worker: run each VM's ``HealthCheck`` against
its guest and report ``VmStatus.health`` transitions (docs/ROLLOUTS.md).

``HealthMonitor`` sits between the reconciler and the link: every status
change the reconciler publishes passes through ``overlay``, which takes
note of the guest that runs (``procurator.core.health.incarnation``) and
sets the entry's ``health``; every assignment update passes through
``take_assignment``, which takes note of each VM's check. Its ``run`` task
checks the guests and publishes a VM's entry again (change-only, through
the same publisher) when its health or the message of a failure changes.
The judging and the timing are pure (``procurator.core.health``).

Invariants:

- **A changed check never touches the VM**: the reconciler plans by hash
  (``procurator.core.reconcile.plan``), and a check is no part of the hash;
  here a new check is judged afresh (its VM goes back to ``pending``).
- **One task, no thread per VM**: the checks' timers are one heap in one
  trio task (``run``), which starts each due check in its nursery under a
  ``CapacityLimiter`` (``concurrency`` checks at once); a VM has at most
  one check in flight (the next is due an interval after it ends), and
  every check runs under its own timeout (``timeout``). So a thousand VMs cost a heap
  and the checks that are due, never a thread or a sleeping task each.
- **Results are about one guest**: a check started against an incarnation
  (or a check) that has changed by the time it ends is dropped; a new
  incarnation is judged from ``pending`` (a restart or a replacement
  resets health).
- **A healthy guest stays healthy across a worker restart** (with a
  ``state_file``): while a VM is healthy, its guest (incarnation), its
  check and when its passing streak began (wall clock) are kept in
  ``<state dir>/health.json``. A restarted worker that finds the very same
  guest (a re-adopted VMM: same hash, restart count, address) under the
  very same check judges it ``healthy`` from the start, and checks it at
  once: one failure makes it unhealthy as always. Anything else is judged
  from ``pending``. A record is used once, at the first observation after
  the start; a VM that stops being healthy loses it.
- **A broken check takes down nothing but its own result**: a check task
  runs in the monitor's nursery, which runs in the worker's, so an
  exception escaping it (a bug: a prober's, a hook's, the judging's; once,
  3bc14d4, an assertion) would stop every check and the worker. Each task
  catches what it raises (``_check_broke``): the error is logged with the
  VM id and counted (``procurator_worker_health_monitor_errors_total``),
  the VM reads ``pending`` (not known; never ``healthy``) with the failure
  as its message, and it is checked again an interval later.
- Everything here runs on the trio thread (the reconciler's publications,
  the link's updates, the checks); the state file is written from a worker
  thread, one write at a time, the latest content winning.

``GuestProber`` is the I/O: a TCP connect, or an HTTP/1.0 GET whose status
line must carry the expected code, to the guest's address on the worker's
bridge. When the worker keeps its network in a namespace, the socket is
made there (``socket_factory``: ``NetworkManager.guest_socket``), so the
checks reach the guests the way their taps do.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import math
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import astuple, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import trio

from procurator.core.assignments import AssignmentUpdate
from procurator.core.errors import ProcuratorError
from procurator.core.health import (
    HealthState,
    Incarnation,
    check_interval,
    incarnation,
    judge,
    next_check,
)
from procurator.core.models import Assignment, Health, HealthCheck, HealthKind, VmStatus
from procurator.core.status import StatusChanges
from procurator.worker.state import write_json_atomic

__all__ = ["GuestProber", "HealthMonitor", "Prober", "SocketFactory"]

log = logging.getLogger(__name__)

_MAX_STATUS_LINE = 4096
_NOTABLE = frozenset({"healthy", "unhealthy"})  # transitions logged at INFO


class Prober(Protocol):
    """Runs one check against a guest: None when it passed, else what failed.
    It may take as long as it likes: the monitor times it out."""

    async def probe(self, check: HealthCheck, address: str) -> str | None: ...


# Makes a TCP socket (blocking call: it may hop to the netlink thread).
SocketFactory = Callable[[], socket.socket]


def _plain_socket() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


class GuestProber:
    """TCP and HTTP checks over real sockets (see the module docstring).
    ``socket_factory`` runs in a worker thread when ``in_thread`` (it
    enters a namespace), else inline."""

    def __init__(
        self, socket_factory: SocketFactory = _plain_socket, *, in_thread: bool = False
    ) -> None:
        self._socket_factory = socket_factory
        self._in_thread = in_thread

    async def probe(self, check: HealthCheck, address: str) -> str | None:
        if check.kind is HealthKind.NONE:
            return None
        where = f"{check.kind.value} {address}:{check.port}"
        if not address:
            return f"{check.kind.value} check: the VM has no network address"
        try:
            stream = await self._connect(address, check.port)
        except OSError as exc:
            return f"{where}: {exc.strerror or exc}"
        except ProcuratorError as exc:  # no socket in the guests' namespace
            return f"{where}: {exc.message}"
        async with stream:
            if check.kind is HealthKind.TCP:
                return None
            return await self._http(stream, check, address)

    async def _connect(self, address: str, port: int) -> trio.SocketStream:
        if self._in_thread:
            raw = await trio.to_thread.run_sync(self._socket_factory)
        else:
            raw = self._socket_factory()
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            await sock.connect((address, port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    @staticmethod
    async def _http(stream: trio.SocketStream, check: HealthCheck, address: str) -> str | None:
        host = f"{address}:{check.port}"
        where = f"http {host}{check.path}"
        # Quoted: a non-ASCII path (the fleet file allows one) goes out
        # percent-encoded, and no path can break the request line.
        path = urllib.parse.quote(check.path, safe="/?&=:;%+,@!$'()*~-._[]")
        request = (
            f"GET {path} HTTP/1.0\r\nHost: {host}\r\n"
            "User-Agent: procurator-health\r\nConnection: close\r\n\r\n"
        )
        received = b""
        try:
            await stream.send_all(request.encode("ascii"))
            while b"\n" not in received and len(received) < _MAX_STATUS_LINE:
                chunk = await stream.receive_some(_MAX_STATUS_LINE)
                if not chunk:
                    break
                received += chunk
        except (OSError, trio.BrokenResourceError) as exc:
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
            text = getattr(cause, "strerror", None) or str(cause or exc)
            return f"{where}: {text}"
        line = received.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            shown = line[:80] if line else "nothing"
            return f"{where}: not an HTTP answer (got {shown!r})"
        status = int(parts[1])
        if status != check.expect:
            return f"{where}: status {status}, expected {check.expect}"
        return None


@dataclass(slots=True)
class _Vm:
    """One VM as the monitor knows it (trio thread only)."""

    check: HealthCheck | None = None
    base: VmStatus | None = None  # the reconciler's last status of it
    published: VmStatus | None = None  # what went out last (overlaid)
    guest: Incarnation | None = None
    state: HealthState | None = None  # None: not judged (no check, or no guest)
    ticket: int = 0  # bumped on every (re)schedule and reset: stale timers and results
    probing: bool = False

    @property
    def health(self) -> Health:
        return self.state.health if self.state is not None else Health.UNCHECKED


class HealthMonitor:
    """See the module docstring. ``publish``: where health transitions go
    (the link's ``publish_status_changes``); ``on_check(kind, passed)`` and
    ``on_counts(counts)``, ``on_error()``: metrics hooks (checks made; VMs by
    health; checks that broke)."""

    def __init__(
        self,
        worker_id: str,
        publish: Callable[[StatusChanges], None],
        prober: Prober,
        *,
        interval: float = 2.0,
        timeout: float = 2.0,
        concurrency: int = 32,
        on_check: Callable[[str, bool], None] | None = None,
        on_counts: Callable[[dict[Health, int]], None] | None = None,
        on_error: Callable[[], None] | None = None,
        state_file: Path | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if interval <= 0 or timeout <= 0 or concurrency < 1:
            raise ValueError("health checks need a positive interval, timeout and concurrency")
        self.worker_id = worker_id
        self._publish = publish
        self._prober = prober
        self.interval = interval
        self.timeout = timeout
        self.concurrency = concurrency
        self._on_check = on_check
        self._on_counts = on_counts
        self._on_error = on_error
        self._vms: dict[str, _Vm] = {}
        self._generation = 0  # the observed generation the reconciler published last
        self._heap: list[tuple[float, int, str]] = []  # (due, ticket, vm id)
        self._tickets = itertools.count(1)
        self._wake = trio.Event()
        self._counts: dict[Health, int] = dict.fromkeys(Health, 0)
        self.checks = 0  # checks made (for tests and tools)
        self.errors = 0  # checks that broke (see _check_broke)
        # Healthy VMs as kept in the state file (see the module docstring):
        # what this run keeps, and what the last run kept (used once each).
        self.state_file = state_file
        self._wall_clock = wall_clock
        self._kept: dict[str, dict[str, Any]] = {}
        self._restored: dict[str, dict[str, Any]] = {}
        self._save = trio.Event()
        self._batch: list[VmStatus] | None = None  # entries held for one report

    # -- inputs (trio thread) ------------------------------------------------

    def take_assignment(self, update: AssignmentUpdate) -> None:
        """Take note of the checks of an assignment update the reconciler
        took (a whole assignment, or its changes)."""
        # The entries this changes go out as one report, not one per VM.
        batch: list[VmStatus] = []
        self._batch = batch
        try:
            if isinstance(update, Assignment):
                checks = {vm.id: vm.health for vm in update.vms}
                for vm_id in [
                    i for i, vm in self._vms.items() if i not in checks and vm.check is not None
                ]:
                    self._set_check(vm_id, None)
                for vm_id, check in checks.items():
                    self._set_check(vm_id, check)
            else:
                for entry in update.upserted:
                    self._set_check(entry.id, entry.health)
                for vm_id in update.removed:
                    self._set_check(vm_id, None)
        finally:
            self._batch = None
        if batch:
            self._publish(StatusChanges(self.worker_id, self._generation, tuple(batch), ()))

    def overlay(self, changes: StatusChanges) -> StatusChanges:
        """``changes`` as the reconciler published them, each entry with
        its health (and, unhealthy, the failure as its message)."""
        self._generation = changes.observed_generation
        entries = []
        for status in changes.changed:
            vm = self._vms.get(status.id)
            if vm is None:
                vm = self._vms[status.id] = _Vm()
                self._counts[Health.UNCHECKED] += 1
            vm.base = status
            self._observe_guest(status.id, vm)
            vm.published = self._shown(vm)
            entries.append(vm.published)
        for vm_id in changes.removed:
            vm = self._vms.get(vm_id)
            if vm is None:
                continue
            vm.base = vm.published = None
            self._observe_guest(vm_id, vm)
            if vm.check is None:
                self._forget(vm_id)
        self._counted()
        return replace(changes, changed=tuple(entries))

    def health(self, vm_id: str) -> Health:
        vm = self._vms.get(vm_id)
        return Health.UNCHECKED if vm is None else vm.health

    def counts(self) -> dict[Health, int]:
        """VMs by health now (every VM the monitor knows)."""
        return dict(self._counts)

    # -- the checks ----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check the guests until cancelled (see the module docstring)."""
        if self.state_file is not None:
            self._restored = await trio.to_thread.run_sync(_read_kept, self.state_file)
        limiter = trio.CapacityLimiter(self.concurrency)
        async with trio.open_nursery() as nursery:
            if self.state_file is not None:
                nursery.start_soon(self._keep, self.state_file)
            task_status.started()
            while True:
                now = trio.current_time()
                heap = self._heap
                while heap and heap[0][0] <= now:
                    _, ticket, vm_id = heapq.heappop(heap)
                    vm = self._vms.get(vm_id)
                    if vm is None or vm.ticket != ticket or vm.probing:
                        continue  # a stale timer
                    if vm.check is None or vm.guest is None:
                        continue
                    vm.probing = True
                    # The check and the guest as they are now: the task
                    # starts later, and an assignment or a status may take
                    # either away before it does (its ticket then moves,
                    # and its result is dropped).
                    nursery.start_soon(self._probe, vm_id, vm, ticket, vm.check, vm.guest, limiter)
                deadline = heap[0][0] if heap else math.inf
                with trio.move_on_at(deadline):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _probe(
        self,
        vm_id: str,
        vm: _Vm,
        ticket: int,
        check: HealthCheck,
        guest: Incarnation,
        limiter: trio.CapacityLimiter,
    ) -> None:
        """One check of one guest, isolated (see the module docstring): an
        exception escaping it would take down the monitor's nursery, and the
        worker with it."""
        try:
            await self._check(vm_id, vm, ticket, check, guest, limiter)
        except Exception as exc:  # noqa: BLE001 - a bug, this VM only: see _check_broke
            self._check_broke(vm_id, vm, ticket, check, exc)

    async def _check(
        self,
        vm_id: str,
        vm: _Vm,
        ticket: int,
        check: HealthCheck,
        guest: Incarnation,
        limiter: trio.CapacityLimiter,
    ) -> None:
        timeout = self.timeout
        problem: str | None = None
        try:
            async with limiter:
                with trio.move_on_after(timeout) as scope:
                    problem = await self._prober.probe(check, guest.address)
                if scope.cancelled_caught:
                    problem = (
                        f"{check.kind.value} {guest.address}:{check.port}: "
                        f"no answer within {timeout:g} s"
                    )
        finally:
            vm.probing = False
        self.checks += 1
        if self._on_check is not None:
            self._on_check(check.kind.value, problem is None)
        if self._vms.get(vm_id) is not vm or vm.state is None:
            return
        now = trio.current_time()
        if vm.ticket != ticket:
            # The check or the guest changed meanwhile: this result is about
            # neither. The reset's timer may have come due (and been
            # skipped) while this check ran: check the new one now.
            self._schedule(vm_id, vm, now)
            return
        before = vm.health
        vm.state = judge(vm.state, check, problem, now)
        self._recount(vm_id, vm, before)
        if vm.state.health is Health.UNHEALTHY:
            log.info("VM %s: unhealthy: %s", vm_id, problem)
        self._schedule(vm_id, vm, next_check(vm.state, check, now, self.interval))
        self._changed(vm_id, vm)

    def _check_broke(
        self, vm_id: str, vm: _Vm, ticket: int, check: HealthCheck, exc: Exception
    ) -> None:
        """A check raised what no check should (a bug in a prober, a hook
        or the judging): log it with the VM, count it, and judge the VM
        afresh (``pending``, the failure as its message: its health is not
        known, and a rollout waits for it as for a booting guest), then
        check it again an interval later. The other VMs' checks go on."""
        self.errors += 1
        log.error(
            "VM %s: its %s health check broke (a bug in the worker): %r",
            vm_id,
            check.kind.value,
            exc,
            exc_info=exc,
        )
        if self._on_error is not None:
            self._on_error()
        if self._vms.get(vm_id) is not vm or vm.state is None:
            return
        now = trio.current_time()
        if vm.ticket != ticket:
            self._schedule(vm_id, vm, now)  # about another check or guest: as in _check
            return
        before = vm.health
        vm.state = HealthState(Health.PENDING, f"health not known: the check broke ({exc!r})")
        self._recount(vm_id, vm, before)
        self._schedule(vm_id, vm, now + check_interval(check, self.interval))
        self._changed(vm_id, vm)

    # -- bookkeeping ----------------------------------------------------------

    def _set_check(self, vm_id: str, check: HealthCheck | None) -> None:
        vm = self._vms.get(vm_id)
        if vm is None:
            if check is None:
                return
            vm = self._vms[vm_id] = _Vm()
            self._counts[Health.UNCHECKED] += 1
        if vm.check == check:
            return
        vm.check = check
        self._reset(vm_id, vm)
        if vm.base is None and check is None:
            self._forget(vm_id)
        else:
            self._changed(vm_id, vm)
        self._counted()

    def _observe_guest(self, vm_id: str, vm: _Vm) -> None:
        guest = incarnation(vm.base) if vm.base is not None else None
        if guest != vm.guest:
            vm.guest = guest
            self._reset(vm_id, vm)

    def _reset(self, vm_id: str, vm: _Vm) -> None:
        """Judge the VM afresh: its check or its guest changed (or, the
        first time after a start, restore it as it was kept)."""
        before = vm.health
        vm.ticket = next(self._tickets)
        vm.state = None
        if vm.check is not None and vm.guest is not None:
            vm.state = self._restore(vm_id, vm.check, vm.guest) or HealthState()
            self._restored.pop(vm_id, None)  # used once: the first judgement
        self._recount(vm_id, vm, before)
        if vm.state is not None:
            self._schedule(vm_id, vm, trio.current_time())

    def _restore(self, vm_id: str, check: HealthCheck, guest: Incarnation) -> HealthState | None:
        kept = self._restored.get(vm_id)
        if kept is None or kept.get("guest") != list(astuple(guest)):
            return None
        if kept.get("check") != _check_row(check):
            return None
        since = kept.get("since")
        if not isinstance(since, int | float):
            return None
        streak = max(0.0, self._wall_clock() - since)
        log.info("VM %s: healthy before this worker started, for %.0f s", vm_id, streak)
        return HealthState(Health.HEALTHY, "", trio.current_time() - streak)

    def _schedule(self, vm_id: str, vm: _Vm, due: float) -> None:
        vm.ticket = next(self._tickets)
        heapq.heappush(self._heap, (due, vm.ticket, vm_id))
        self._wake.set()

    def _shown(self, vm: _Vm) -> VmStatus:
        base = vm.base
        assert base is not None
        state = vm.state
        if state is None:
            return base  # the reconciler's entries are unchecked
        message = state.message or base.message  # a failure, or why health is not known
        return replace(base, health=state.health, message=message)

    def _changed(self, vm_id: str, vm: _Vm) -> None:
        """Publish the VM's entry if what it shows changed."""
        if vm.base is None:
            return
        shown = self._shown(vm)
        if shown != vm.published:
            before = vm.published.health if vm.published is not None else Health.UNCHECKED
            vm.published = shown
            if shown.health is not before:
                level = logging.INFO if shown.health.value in _NOTABLE else logging.DEBUG
                log.log(level, "VM %s: health %s", vm_id, shown.health.value)
            if self._batch is not None:
                self._batch.append(shown)
            else:
                self._publish(StatusChanges(self.worker_id, self._generation, (shown,), ()))
            self._counted()

    def _forget(self, vm_id: str) -> None:
        vm = self._vms.pop(vm_id)
        self._counts[vm.health] -= 1
        vm.ticket = next(self._tickets)  # its timers and results are stale
        if self._kept.pop(vm_id, None) is not None:
            self._save.set()

    def _recount(self, vm_id: str, vm: _Vm, before: Health) -> None:
        """The VM's health was ``before``: count it anew, and keep (or drop)
        it in the state file when it turned (or stopped being) healthy."""
        after = vm.health
        self._counts[before] -= 1
        self._counts[after] += 1
        if after is Health.HEALTHY and before is not Health.HEALTHY:
            assert vm.state is not None and vm.check is not None and vm.guest is not None
            assert vm.state.passing_since is not None
            streak = trio.current_time() - vm.state.passing_since
            self._kept[vm_id] = {
                "guest": list(astuple(vm.guest)),
                "check": _check_row(vm.check),
                "since": self._wall_clock() - streak,
            }
            self._save.set()
        elif before is Health.HEALTHY and after is not Health.HEALTHY:
            self._kept.pop(vm_id, None)
            self._save.set()

    async def _keep(self, path: Path) -> None:
        """Write what is kept whenever it changes (one write at a time)."""
        while True:
            await self._save.wait()
            self._save = trio.Event()
            data = {"version": 1, "healthy": dict(self._kept)}
            try:
                await trio.to_thread.run_sync(write_json_atomic, path, data)
            except ProcuratorError as exc:
                # Only a restart's memory is lost: the VMs are checked again.
                log.warning("health of the VMs not kept: %s", exc)

    def _counted(self) -> None:
        if self._on_counts is not None:
            self._on_counts(dict(self._counts))


def _check_row(check: HealthCheck) -> list[Any]:
    return [check.kind.value, *astuple(check)[1:]]


def _read_kept(path: Path) -> dict[str, dict[str, Any]]:
    """What a previous run kept (nothing when the file is missing or not
    what this release writes: the VMs are judged afresh)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("%s: not read (%s); every VM is judged afresh", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("version") != 1:
        return {}
    healthy = data.get("healthy")
    if not isinstance(healthy, dict):
        return {}
    return {vm_id: entry for vm_id, entry in healthy.items() if isinstance(entry, dict)}
