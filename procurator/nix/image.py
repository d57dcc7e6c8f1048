"""From a store path to a VM config the VMM can safely be given.

``ImageManager.prepare`` turns (VM id, image store path, what the worker
decided for the VM) into a ``PreparedImage``: the image present and rooted,
its ``vm-config.json`` confined into a typed ``VmDefinition``
(``procurator.core.confinement``), and the VM's writable disk copies in
place. The VM's NIC is attached afterwards (``attach_nic``), once the
image is accepted: a refused image takes no tap and no address. Every step
is idempotent, so a prepare interrupted by a crash is simply called again.

State, all under ``state_dir`` (the worker's):

- ``gcroots/<vm id>/<store basename>``: an indirect GC root per VM and
  image. An image used by several VMs stays rooted until the last of them
  is released; a VM being moved to a new image keeps its old root until the
  new image is fully prepared.
- ``vms/<vm id>/disks/<store basename>/disk<i>.img``: the VM's writable
  copies of the image's writable disks. They live as long as the VM keeps
  that image: a restart reuses them (the guest's writes survive), a new
  image gets fresh copies and the old ones are deleted once the new image is
  prepared. ``vms/<vm id>/`` itself belongs to the VmManager; only
  ``disks/`` is this module's. A copy a move brought to this worker
  (``incoming/<vm id>/<store basename>/disk<i>.img``, written and checked
  by ``procurator.worker.move_transfer``) is renamed into place instead of
  a fresh copy: the guest keeps its writes across workers. Only when the
  set's ``op`` is the ``incoming_op`` the caller passes (the move whose
  transfer the VM's assignment carries): a set an earlier, failed move
  left is never booted from.

Invariants: nothing is ever written into the store (sources are opened
read-only, ``state_dir`` may not lie in the store); a failed prepare leaves
the VM's previous image, root and disks exactly as they were, and removes
whatever it created for the new image; a successful prepare leaves exactly
one root and one disk directory for the VM.

Per image, not per VM: a VM whose image another VM of this worker already
roots is rooted beside that root (no ``nix-store`` run), and the image's
``vm-config.json`` and the host paths it names are read and resolved once
while this manager roots the path (a rooted store path cannot change); each
VM's own confinement (``confine``: its host side, its disk copies) is
checked on every prepare.

Thread safety: calls for *different* VMs may run in parallel threads (they
share nothing but the Nix store, which locks itself). Calls for one VM must
not overlap: the reconciler runs each VM's steps strictly one at a time.
A replacement is prepare (new image) -> start the new VMM (the old one is
stopped then) -> ``retire_others``: until the VM runs the new image, the old
image stays rooted and its disk copies stay, so a worker killed in between
restarts or re-adopts the old VM intact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from procurator import durable
from procurator.core.confinement import (
    Confined,
    DiskCopy,
    HostSide,
    ImageLimits,
    PathKind,
    ResolvedPath,
    attach_nic,
    confine,
    host_paths,
    in_closure,
)
from procurator.core.errors import NotFoundError, TemporaryError, ValidationError
from procurator.core.validation import STORE_DIR, check_store_path, check_vm_id
from procurator.core.vmdef import Nic, VmDefinition
from procurator.nix._disk import clone_or_copy, remove_partials
from procurator.nix.store import Store

__all__ = ["CONFIG_NAME", "ImageManager", "PreparedImage"]

log = logging.getLogger(__name__)

CONFIG_NAME = "vm-config.json"


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """A VM's image, ready to boot once its NIC is attached: ``confined``
    holds the definition (``confinement.confine``), the disk copies it names
    and the image's NIC tunables; ``disks`` are those copies on disk.
    ``fresh``: this prepare rooted the image for the VM (it was not before),
    so ``abandon`` undoes it."""

    store_path: str
    confined: Confined
    disks: tuple[Path, ...]
    fresh: bool

    @property
    def definition(self) -> VmDefinition:
        """The VM without NIC (see ``ImageManager.attach_nic``)."""
        return self.confined.definition


@dataclass(frozen=True, slots=True)
class _ImageRead:
    """What ``prepare`` reads of an image for ``confine``: the parsed
    ``vm-config.json`` (never changed: ``confine`` only reads it) and what
    is really at each host path it names."""

    config: object
    resolved: Mapping[str, ResolvedPath]


class ImageManager:
    """Prepares and releases the images of one worker's VMs."""

    def __init__(
        self,
        store: Store,
        state_dir: Path,
        *,
        limits: ImageLimits,
        allow_reflink: bool = True,
    ) -> None:
        state_dir = Path(os.path.abspath(state_dir))
        if _inside(str(state_dir), STORE_DIR) or _inside(os.path.realpath(state_dir), STORE_DIR):
            raise ValueError(f"the worker's state dir {state_dir} may not lie in the Nix store")
        self._store = store
        self._limits = limits
        self._allow_reflink = allow_reflink
        self._roots_dir = state_dir / "gcroots"
        self._vms_dir = state_dir / "vms"
        # Disk copies a move brought (procurator.worker.move_service).
        self._incoming = state_dir / "incoming"
        # store path -> the roots this manager holds for it, so a VM whose
        # image another VM already roots is rooted beside that one without
        # a nix-store run (Store.add_root_beside). Guarded by _roots_lock,
        # which is also held while a root is removed: a root named as a
        # witness stays until the new root is written. Built on first use.
        self._roots_lock = threading.Lock()
        self._rooted: dict[str, set[Path]] | None = None
        # store path -> its config and resolved host paths, read once for
        # all the VMs of an image (``_read_image``): only while the path is
        # in ``_rooted``, so a path that could change (collected, then
        # fetched or built again) is read afresh. Guarded by _roots_lock.
        self._images: dict[str, _ImageRead] = {}

    # ------------------------------------------------------------------ API

    def prepare(
        self,
        vm_id: str,
        store_path: str,
        *,
        host: HostSide,
        on_realise: Callable[[], None] | None = None,
        incoming_op: str | None = None,
    ) -> PreparedImage:
        """Make ``store_path`` ready to boot as VM ``vm_id``.

        ``incoming_op``: the op id of the move whose received disks the VM
        may take in place of fresh copies (the transfer to this worker its
        assignment carries for the VM; None: none may be taken). A set a
        move of another op left is never used.

        ``on_realise`` is called (in this thread) just before a missing path
        is fetched from the substituters, so the caller can show that phase.
        Raises ``ValidationError`` (bad id, path or config: every problem
        listed), ``NotFoundError``, or ``TemporaryError`` (fetch failed,
        I/O error: retry later).
        """
        _check(check_vm_id(vm_id), "VM id")
        _check(check_store_path(store_path), f"VM {vm_id}: image")
        name = os.path.basename(store_path)
        link = self._roots_dir / vm_id / name
        disk_dir = self._vms_dir / vm_id / "disks" / name
        fresh = not os.path.islink(link)
        try:
            if not self._root_beside(store_path, link):
                try:
                    # One nix-store run in the usual case (the path is there):
                    # rooting fails with NotFoundError, never fetches, if not.
                    self._store.add_root(store_path, link)
                except NotFoundError:
                    log.info("VM %s: %s is not in the store; realising it", vm_id, store_path)
                    if on_realise is not None:
                        on_realise()
                    self._store.realise(store_path, root=link)
                self._note_root(store_path, link)
            closure = self._store.closure(store_path)
            read = self._read_image(vm_id, store_path, closure)
            try:
                confined = confine(
                    read.config,
                    image_dir=store_path,
                    closure=closure,
                    resolved=read.resolved,
                    limits=self._limits,
                    host=host,
                    disk_dir=str(disk_dir),
                )
            except ValidationError as err:
                raise ValidationError(f"VM {vm_id}: {err.message}", details=err.details) from err
            self._keep_image(store_path, read)
            disks = self._ensure_copies(vm_id, disk_dir, confined.copies, incoming_op)
        except BaseException:
            if fresh:  # leave the previous state exactly as it was
                self._forget_after_failure(vm_id, link, disk_dir)
            raise
        return PreparedImage(store_path=store_path, confined=confined, disks=disks, fresh=fresh)

    def attach_nic(self, prepared: PreparedImage, *, nic: Nic, cmdline_extra: str) -> VmDefinition:
        """The VM of ``prepared`` with its NIC and the kernel command line
        additions that go with it (``confinement.attach_nic``, which
        re-checks the command line against this worker's limit). Raises
        ``ValidationError`` when it grows too long."""
        return attach_nic(
            prepared.confined, nic=nic, cmdline_extra=cmdline_extra, limits=self._limits
        )

    def abandon(self, vm_id: str, prepared: PreparedImage) -> None:
        """Undo a ``prepare`` whose VM never got to run it (a later step of
        its launch failed): drop the root and disk copies it made, when it
        made them (``prepared.fresh``); an image the VM had before stays."""
        if not prepared.fresh:
            return
        name = os.path.basename(prepared.store_path)
        disks = self._vms_dir / vm_id / "disks"
        self._forget_after_failure(vm_id, self._roots_dir / vm_id / name, disks / name)
        # The directories the copies needed, when nothing else is in them
        # (a VM the VmManager knows has its vm.json there: it stays).
        for directory in (disks, disks.parent):
            with contextlib.suppress(OSError):
                directory.rmdir()

    def retire_others(self, vm_id: str, store_path: str) -> None:
        """Drop the roots and disk copies of every image of VM ``vm_id``
        but ``store_path``. Call it once the VM runs ``store_path``: until
        then an older image may still be in use by the VM's running VMM
        (``prepare`` of a new image happens before the old VMM stops, so a
        replacement is short), and its GC root must outlive that VMM.
        Idempotent."""
        _check(check_vm_id(vm_id), "VM id")
        self._drop_other_images(vm_id, keep=os.path.basename(store_path))

    def release(self, vm_id: str) -> None:
        """Drop every GC root and disk copy of VM ``vm_id`` (it is removed).
        Idempotent."""
        _check(check_vm_id(vm_id), "VM id")
        self._drop_other_images(vm_id, keep=None)
        try:
            with contextlib.suppress(FileNotFoundError):
                (self._roots_dir / vm_id).rmdir()
            with contextlib.suppress(FileNotFoundError):
                (self._vms_dir / vm_id / "disks").rmdir()
        except OSError as err:
            raise TemporaryError(f"VM {vm_id}: could not release its image: {err}") from err

    def sweep(self, owned: Iterable[str]) -> list[str]:
        """Release the images of every VM that has GC roots (or an empty
        root directory) here but is neither in ``owned`` nor has a directory
        under ``vms/``; returns their ids.

        Why: ``prepare`` roots the image before the VM's directory exists,
        and ``release`` runs after the VmManager deleted it. A worker killed
        in either gap, whose VM is then dropped from the fleet while it is
        down, comes back with roots no VM accounts for: nothing would ever
        release them, and they would pin the image in the store for good.
        A VM that still has a directory belongs to the VmManager (which
        finishes or undoes it); only call this at start, after the manager
        re-adopted its VMs and before any ``prepare`` runs."""
        keep = set(owned)
        swept: list[str] = []
        with contextlib.suppress(FileNotFoundError):
            for root_dir in sorted(self._roots_dir.iterdir()):
                vm_id = root_dir.name
                if vm_id in keep or check_vm_id(vm_id) is not None:
                    continue
                if (self._vms_dir / vm_id).exists():
                    continue
                log.info("VM %s is gone but its image is still rooted: releasing it", vm_id)
                try:
                    self.release(vm_id)
                except TemporaryError as err:
                    # Left for the next start; it pins an image, nothing worse.
                    log.warning("VM %s: %s", vm_id, err)
                    continue
                swept.append(vm_id)
        self._reroot_unrecorded()
        return swept

    def _reroot_unrecorded(self) -> None:
        """Root again, through nix-store, every link Nix has no record of
        (a worker killed inside ``add_root_beside``, between the link and
        the record): such a link roots nothing, and a running VM's image is
        not prepared again."""
        for vm_id, targets in self.roots().items():
            for target in targets:
                link = self._roots_dir / vm_id / os.path.basename(target)
                if self._store.has_root(link):
                    continue
                log.warning("VM %s: %s was not a GC root; rooting it again", vm_id, link)
                try:
                    self._store.add_root(target, link)
                except (NotFoundError, TemporaryError) as err:
                    log.warning("VM %s: could not root %s again: %s", vm_id, target, err)

    def roots(self) -> dict[str, frozenset[str]]:
        """VM id -> the store paths rooted for it: what the state dir holds,
        for the sweep at start (release the VMs no longer assigned). Usually
        one path per VM; two after a crash in the middle of a prepare that
        moved the VM to a new image."""
        found: dict[str, frozenset[str]] = {}
        with contextlib.suppress(FileNotFoundError):
            for vm_dir in sorted(self._roots_dir.iterdir()):
                targets = frozenset(
                    os.readlink(link) for link in vm_dir.iterdir() if link.is_symlink()
                )
                if targets:
                    found[vm_dir.name] = targets
        return found

    # ------------------------------------------------------------- helpers

    def _ensure_copies(
        self,
        vm_id: str,
        disk_dir: Path,
        copies: tuple[DiskCopy, ...],
        incoming_op: str | None,
    ) -> tuple[Path, ...]:
        disks: list[Path] = []
        try:
            if copies:
                # disks/ and disks/<image> may be new: names the copies
                # (the guest's data) depend on after a power loss.
                durable.make_dirs(disk_dir)
                remove_partials(disk_dir)
            for copy in copies:
                target = Path(copy.target)
                disks.append(target)
                if target.is_file():
                    continue  # made by an earlier prepare: keeps the guest's writes
                if incoming_op is not None and self._take_incoming(vm_id, target, incoming_op):
                    continue  # a move's: the guest's writes from its old worker
                started = time.monotonic()
                try:
                    method = clone_or_copy(
                        Path(copy.source), target, allow_reflink=self._allow_reflink
                    )
                except FileExistsError:
                    continue  # a concurrent prepare made it
                log.info(
                    "VM %s: disk%d: %s of %s (%d bytes) in %.3fs",
                    vm_id,
                    copy.index,
                    method,
                    copy.source,
                    os.stat(target).st_size,
                    time.monotonic() - started,
                )
        except OSError as err:
            raise TemporaryError(
                f"VM {vm_id}: could not make its writable disk copies in {disk_dir}: {err}"
            ) from err
        return tuple(disks)

    def _take_incoming(self, vm_id: str, target: Path, op_id: str) -> bool:
        """Put the copy of ``target`` move ``op_id`` sent here in its place
        (``<state>/incoming/<vm>/<store basename>/disk<i>.img``, checked by
        ``procurator.worker.move_transfer``; ``op`` in the set names its
        move); whether there was one."""
        incoming = self._incoming / vm_id
        try:
            if (incoming / "op").read_text().strip() != op_id:
                return False  # another move's set (one that failed): never used
        except FileNotFoundError:
            return False
        source = incoming / target.parent.name / target.name
        try:
            os.rename(source, target)
        except FileNotFoundError:
            return False
        durable.fsync_dir(target.parent)  # its new name: the guest writes into it next
        log.info("VM %s: %s is the disk copy its move brought", vm_id, target.name)
        return True

    def _drop_other_images(self, vm_id: str, *, keep: str | None) -> None:
        """Remove the VM's roots and disks of every image but ``keep``."""
        roots = self._roots_dir / vm_id
        disks = self._vms_dir / vm_id / "disks"
        try:
            for directory in (roots, disks):
                with contextlib.suppress(FileNotFoundError):
                    for entry in directory.iterdir():
                        if entry.name != keep:
                            self._forget(roots / entry.name, disks / entry.name)
        except OSError as err:
            raise TemporaryError(
                f"VM {vm_id}: could not drop the roots and disks of its old images: {err}"
            ) from err

    def _roots_by_path(self) -> dict[str, set[Path]]:
        """The index of roots held here (caller holds ``_roots_lock``)."""
        if self._rooted is None:
            self._rooted = {}
            for vm_id, targets in self.roots().items():
                for target in targets:
                    link = self._roots_dir / vm_id / os.path.basename(target)
                    self._rooted.setdefault(target, set()).add(link)
        return self._rooted

    def _root_beside(self, store_path: str, link: Path) -> bool:
        """Root ``store_path`` at ``link`` beside a root another VM holds for
        it, without nix-store; False when there is none (or it cannot: a
        daemon client may not write Nix's records, then nix-store does)."""
        with self._roots_lock:
            witnesses = self._roots_by_path().get(store_path)
            if not witnesses:
                return False
            # The first witness that roots the path will do (usually the
            # first one): no copy of the set, which holds a root per VM of
            # this image, so a start costs the same in a fleet of 1,000.
            for witness in witnesses:
                if witness != link and self._store.add_root_beside(store_path, link, witness):
                    break
            else:
                return False
            witnesses.add(link)  # after the loop: the set is not changed under it
            return True

    def _read_image(self, vm_id: str, store_path: str, closure: frozenset[str]) -> _ImageRead:
        """The image's config and the host paths it names, resolved: from
        the last VM's prepare while this manager roots the path (a store
        path does not change while it is valid, and a rooted one stays
        valid), else read from the store."""
        with self._roots_lock:
            kept = self._images.get(store_path)
        if kept is not None:
            return kept
        config = _load_config(vm_id, store_path, closure, self._limits.max_config_bytes)
        wanted = host_paths(config, store_path)
        return _ImageRead(config, {path: _resolve(path) for path in set(wanted.values())})

    def _keep_image(self, store_path: str, read: _ImageRead) -> None:
        """Keep ``read`` (an image the confinement accepted) for the next
        VM's prepare, while a root of this manager's holds the path."""
        with self._roots_lock:
            if self._rooted is not None and self._rooted.get(store_path):
                self._images[store_path] = read

    def _note_root(self, store_path: str, link: Path) -> None:
        with self._roots_lock:
            self._roots_by_path().setdefault(store_path, set()).add(link)

    def _forget(self, link: Path, disk_dir: Path) -> None:
        with self._roots_lock:
            # Under the lock: a root another prepare chose as its witness
            # stays until that prepare has written its own.
            try:
                target = os.readlink(link)
            except OSError:
                target = ""
            self._store.remove_root(link)
            if self._rooted is not None and target:
                links = self._rooted.get(target)
                if links is not None:
                    links.discard(link)
                    if not links:  # its last root here: the path may go
                        del self._rooted[target]
                        self._images.pop(target, None)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(disk_dir)

    def _forget_after_failure(self, vm_id: str, link: Path, disk_dir: Path) -> None:
        # The original error is what the caller must see; a failure to clean
        # up is logged, and healed by the next prepare or release of the VM.
        try:
            self._forget(link, disk_dir)
            # The VM's root directory too, if this prepare made it: a VM
            # whose image never became ready may be dropped from the fleet
            # before any VM exists to release it. (Not empty: leave it.)
            with contextlib.suppress(OSError):
                link.parent.rmdir()
        except (OSError, TemporaryError) as err:
            log.warning("VM %s: could not undo a failed prepare (%s): %s", vm_id, link, err)


def _load_config(vm_id: str, store_path: str, closure: frozenset[str], limit: int) -> object:
    path = f"{store_path}/{CONFIG_NAME}"
    where = f"VM {vm_id}: {path}"
    real = os.path.realpath(path)
    if not in_closure(real, closure):
        raise ValidationError(f"{where} resolves to {real}, outside the image's closure")
    try:
        with open(real, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ValidationError(f"{where} is not a regular file")
            if info.st_size > limit:
                raise ValidationError(f"{where} is {info.st_size} bytes; the limit is {limit}")
            data = file.read(limit + 1)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise ValidationError(
            f"VM {vm_id}: the image {store_path} has no {CONFIG_NAME}; an image is a "
            "directory holding a cloud-hypervisor VmConfig as vm-config.json"
        ) from err
    except IsADirectoryError as err:
        raise ValidationError(f"{where} is a directory, not a file") from err
    except OSError as err:
        raise TemporaryError(f"{where}: could not be read: {err}") from err
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:
        # json.JSONDecodeError and UnicodeDecodeError are ValueErrors.
        raise ValidationError(f"{where} is not valid JSON: {err}") from err


def _resolve(path: str) -> ResolvedPath:
    """What is really at ``path``: its symlink-free path, kind and size."""
    real = os.path.realpath(path)
    try:
        info = os.stat(real)
    except (FileNotFoundError, NotADirectoryError):
        return ResolvedPath(real=real, kind=PathKind.MISSING)
    except OSError:  # a symlink loop, or unreadable: not something to boot
        return ResolvedPath(real=real, kind=PathKind.OTHER)
    if stat.S_ISREG(info.st_mode):
        return ResolvedPath(real=real, kind=PathKind.FILE, size=info.st_size)
    if stat.S_ISDIR(info.st_mode):
        return ResolvedPath(real=real, kind=PathKind.DIRECTORY)
    return ResolvedPath(real=real, kind=PathKind.OTHER)


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _check(problem: str | None, what: str) -> None:
    if problem is not None:
        raise ValidationError(f"{what}: {problem}")
