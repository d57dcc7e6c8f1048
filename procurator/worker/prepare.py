"""Images prepared ahead of a switch: a rollout's first phase
(``Assignment.prepare``, docs/ROLLOUTS.md).

The master lists store paths a worker will soon run; ``ImagePreparer``
realises each (from the worker's substituters, through the same ``Store``
port the VMs' images use) and roots it, without running anything, and
reports each path's progress (``WorkerStatus.prepared``: pending, ready,
failed with the reason). When the switch comes, the VM's own prepare finds
the path in the store and only roots it beside.

Invariants:

- **A root per path, in its own directory**: ``<state_dir>/prepared/<store
  basename>``, an indirect GC root (apart from the VMs' ``gcroots/<vm id>/``,
  which ``ImageManager`` owns and sweeps).
- **A root lives while the path is wanted**: named by the assignment's
  ``prepare``, or the image of one of its VMs (a path that leaves
  ``prepare`` in the generation that switches VMs to it stays rooted until
  no VM of the assignment names it: the collector never gets a window
  between the prepare root and the VMs' own). Then it is removed. Nothing
  is removed before the first assignment arrives (a worker restarting
  during a master outage keeps what it prepared); after it, roots left by
  an earlier run that nothing wants go.
- **A failure is a state, never fatal**: a path that cannot be realised or
  rooted is ``failed`` with nix's reason (the master stops the rollout,
  naming the worker and path); it is not tried again until it leaves
  ``prepare`` and comes back (or the worker restarts). Nothing else — the
  VMs, the other paths, the worker — depends on it.
- **Bounded**: at most ``concurrency`` nix-store runs at once, each in a
  worker thread (``trio.to_thread.run_sync`` with a ``CapacityLimiter``);
  at most one job per path at a time.
- **Survives a restart**: a restarted worker prepares again what its
  assignment still names; a path whose root is still there is ready after
  one ``nix-store`` run (rooting a path that is present never fetches).

Everything but the jobs' blocking calls runs on the trio thread.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import trio

from procurator.core.assignments import AssignmentUpdate
from procurator.core.errors import NotFoundError, ProcuratorError
from procurator.core.models import Assignment, PreparedImage, PrepareState
from procurator.nix.store import Store

__all__ = ["PREPARED_DIR", "ImagePreparer"]

log = logging.getLogger(__name__)

PREPARED_DIR = "prepared"


class _Job(enum.Enum):
    ROOT = "root"
    DROP = "drop"


class ImagePreparer:
    """See the module docstring. ``on_progress``: the assignment's
    ``prepare`` paths and their state, whenever one changes (the link's
    ``publish_prepared``); ``on_counts``: paths by state (metrics)."""

    def __init__(
        self,
        store: Store,
        state_dir: Path,
        *,
        on_progress: Callable[[tuple[PreparedImage, ...]], None],
        on_counts: Callable[[dict[PrepareState, int]], None] | None = None,
        concurrency: int = 2,
    ) -> None:
        if concurrency < 1:
            raise ValueError("the preparer needs a concurrency of at least 1")
        self._store = store
        self.directory = Path(os.path.abspath(state_dir)) / PREPARED_DIR
        self._on_progress = on_progress
        self._on_counts = on_counts
        self.concurrency = concurrency
        self._assigned = False  # an assignment arrived: what is not wanted may go
        self._wanted: tuple[str, ...] = ()  # the assignment's prepare, in order
        self._images: dict[str, str] = {}  # VM id -> its image
        self._in_use: Counter[str] = Counter()  # image -> VMs naming it
        self._states: dict[str, PreparedImage] = {}  # path -> its progress (wanted ones)
        self._rooted: set[str] = set()  # paths with a root here
        self._busy: set[str] = set()  # paths with a job in flight
        self._reported: tuple[PreparedImage, ...] | None = None
        self._wake = trio.Event()

    # -- inputs (trio thread) ------------------------------------------------

    def take_assignment(self, update: AssignmentUpdate) -> None:
        """Take note of an assignment update the worker took: its whole
        ``prepare`` list, and the images of the VMs it names."""
        if isinstance(update, Assignment):
            self._images = {vm.id: vm.nix_store_path for vm in update.vms}
            self._in_use = Counter(self._images.values())
        else:
            for vm in update.upserted:
                self._unuse(vm.id)
                self._images[vm.id] = vm.nix_store_path
                self._in_use[vm.nix_store_path] += 1
            for vm_id in update.removed:
                self._unuse(vm_id)
        wanted = tuple(dict.fromkeys(update.prepare))
        for path in self._wanted:
            if path not in wanted:
                # Left ``prepare``: forgotten (a failure too: tried afresh
                # should it come back).
                self._states.pop(path, None)
        self._wanted = wanted
        for path in wanted:
            self._states.setdefault(path, PreparedImage(path))
        self._assigned = True
        self._report()
        self._wake.set()

    def _unuse(self, vm_id: str) -> None:
        old = self._images.pop(vm_id, None)
        if old is not None:
            self._in_use[old] -= 1
            if self._in_use[old] <= 0:
                del self._in_use[old]

    @property
    def prepared(self) -> tuple[PreparedImage, ...]:
        """The progress on each path of the assignment's ``prepare``."""
        return tuple(self._states[path] for path in self._wanted)

    def roots(self) -> set[str]:
        """The paths rooted here now."""
        return set(self._rooted)

    # -- the jobs ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Prepare and drop until cancelled (see the module docstring)."""
        self._rooted = await trio.to_thread.run_sync(self._find_roots)
        limiter = trio.CapacityLimiter(self.concurrency)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                for path, job in self._due():
                    self._busy.add(path)
                    nursery.start_soon(self._run_job, path, job, limiter)
                await self._wake.wait()
                self._wake = trio.Event()

    def _due(self) -> list[tuple[str, _Job]]:
        if not self._assigned:
            return []
        jobs = [
            (path, _Job.ROOT)
            for path in self._wanted
            if path not in self._busy and self._states[path].state is PrepareState.PENDING
        ]
        jobs.extend(
            (path, _Job.DROP)
            for path in sorted(self._rooted)
            if path not in self._busy and path not in self._states and path not in self._in_use
        )
        return jobs

    async def _run_job(self, path: str, job: _Job, limiter: trio.CapacityLimiter) -> None:
        try:
            if job is _Job.ROOT:
                problem = await trio.to_thread.run_sync(self._root, path, limiter=limiter)
                if problem is None:
                    self._rooted.add(path)
                self._settle(path, problem)
            else:
                problem = await trio.to_thread.run_sync(self._drop, path, limiter=limiter)
                if problem is None:
                    self._rooted.discard(path)
                else:
                    log.warning("prepared image %s: root not removed: %s", path, problem)
        finally:
            self._busy.discard(path)
            self._wake.set()  # the path may be due again (left prepare meanwhile)

    def _settle(self, path: str, problem: str | None) -> None:
        if path not in self._states:
            return  # it left ``prepare`` meanwhile: dropped next if unused
        if problem is None:
            log.info("prepared image %s: realised and rooted", path)
            self._states[path] = PreparedImage(path, PrepareState.READY)
        else:
            log.warning("prepared image %s: failed: %s", path, problem)
            self._states[path] = PreparedImage(path, PrepareState.FAILED, problem)
        self._report()

    def _report(self) -> None:
        prepared = self.prepared
        if prepared != self._reported:
            self._reported = prepared
            self._on_progress(prepared)
            if self._on_counts is not None:
                counts = dict.fromkeys(PrepareState, 0)
                for image in prepared:
                    counts[image.state] += 1
                self._on_counts(counts)

    # -- blocking (worker threads) --------------------------------------------

    def _link(self, path: str) -> Path:
        return self.directory / os.path.basename(path)

    def _root(self, path: str) -> str | None:
        """Root ``path`` (realising it when missing); what failed, or None."""
        link = self._link(path)
        try:
            try:
                # One nix-store run when the path is there; never fetches.
                self._store.add_root(path, link)
            except NotFoundError:
                log.info("prepared image %s: not in the store; realising it", path)
                self._store.realise(path, root=link)
        except ProcuratorError as exc:
            return exc.message
        except OSError as exc:
            return f"cannot root {path}: {exc.strerror or exc}"
        return None

    def _drop(self, path: str) -> str | None:
        try:
            self._store.remove_root(self._link(path))
        except ProcuratorError as exc:
            return exc.message
        with contextlib.suppress(OSError):
            self.directory.rmdir()  # when it was the last
        return None

    def _find_roots(self) -> set[str]:
        """The paths a (possibly earlier) run rooted here."""
        found: set[str] = set()
        with contextlib.suppress(FileNotFoundError):
            for link in self.directory.iterdir():
                with contextlib.suppress(OSError):
                    found.add(os.readlink(link))
        return found
