"""The worker's on-disk state: one directory per VM, one flock per VM.

Layout under ``<state_dir>``::

    vms/<vm_id>/vm.json        durable: the spec last applied (what the VM *is*)
    vms/<vm_id>/handles.json   transient: pid, start ticks, API socket, driver
    vms/<vm_id>/jail.json      the VM's uid, from releases before its run
                               directory's owner recorded it (jail.py)
    vms/<vm_id>/run/api.sock   the VMM's socket, event, log and serial files:
        .../run/vmm.log ...    the only part of the VM's directory (with
                               its disk copies) a jailed VMM may write
    locks/<vm_id>.lock         a VM's ownership lock file (flock), when one
                               was taken (``lock``; a claim makes none)
    owner.lock                 the state dir's owner lock (flock): the one
                               process managing its VMs holds it

The records (``vm.json``, ``handles.json``) are the
worker's alone: a VMM that could rewrite them could make the next worker
launch anything, so they live beside ``run/``, never in it. (A VMM started
by a release before ``run/`` keeps its socket where its handle says.)

Why the split: ``vm.json`` says what should exist and survives anything;
``handles.json`` says what *was* true when it was written and is never trusted
without re-checking it against the OS (is that pid alive, with that start
time?). A crash leaves either the old or the new content of each:
``vm.json`` is replaced whole (temporary file, rename) and made durable
(fsync of the file and of the directory, ~7 ms here, and of each
directory made for it into its parent — a new VM's ``vms/<id>`` into
``vms/`` — so the record cannot be lost with its directory:
``procurator.durable``). ``handles.json`` is rewritten in place by one
write of at most a page, which a killed writer leaves whole or untouched
(``write_json_in_place``): it is rewritten three times a start, and a
rename's temporary file is an inode made and one freed each time (issue
31). It carries a check, so that what may still tear it (a power loss, a
copy cut short under memory pressure) reads as unreadable, as does the
empty file a worker killed inside its very first write leaves: nothing in
an unreadable record is trusted, and the next owner looks for a VMM that
nobody recorded. It is never fsynced: it describes processes, and
whatever takes a write out of the page cache before it reaches the disk —
a power loss, a kernel crash — takes those processes with it. A worker
that merely dies (even by SIGKILL) sees every write it made, so skipping
its fsyncs loses nothing and spares two of the three per VM start.

Ownership: a process may touch a VM's directory, and may spawn or signal its
VMM, only while it owns the VM: it holds ``locks/<vm_id>.lock``
(``flock(LOCK_EX)``, ``lock``), or it *claimed* the VM (``claim``) while it
holds the state dir's ``owner.lock`` (``lock_owner``). The VmManager takes
the owner lock without blocking when it starts managing its first VM and
keeps it until it closes (the worker's lifetime), and claims each VM it
manages: so a second worker process on the same state dir is refused
instead of spawning a second VMM, with one descriptor for the whole fleet,
not one per VM (issue 31: a settled VM costs the worker only its VMM's
pidfd, so that 10,000 VMs fit an open-file limit of 20,000). A claim makes
no file (issue 31: a new file is a new inode, tens to hundreds of us of
CPU per VM start on ext4 without a journal): when the VM has a lock file
(a worker of a release before the owner lock — which held VMs by their
own flocks — made it) the claim takes its flock for a moment (a process
that holds it keeps the VM) and writes its pid into it, then lets the
descriptor go; when it has none, no process holds one, since a holder
opens the file before it locks it and unlinks it only while it holds it.
While the owner lock is held no other worker can take the state dir, so
the VM's flock has nothing left to exclude. (A worker of the older
release started beside a newer one on the same state dir is the one case
it no longer refuses: it never takes the owner lock. Never run two
workers on one state dir: they would also share its GC roots, taps and
lock-file sweep.) The kernel drops a lock when its
holder dies (even by SIGKILL), which is what lets a restarted worker
re-adopt the VM. Lock file descriptors are close-on-exec, so a spawned VMM
never inherits (and never extends) a lock.

The lock files live outside the VM directories so that deleting a VM's
directory cannot race a waiter on its lock; removing a VM unlinks its lock
file while holding it, and ``acquire`` re-checks that the file it locked is
still the one at the path (the classic unlink-while-locked race).

A lock file can outlive its VM: it is made before the VM's directory (a new
VM's ``vm.json`` is written under the lock) and unlinked after the directory
is deleted (``remove_vm``), so a process killed in either gap while holding
it by ``lock`` (a worker of the release before claims made no file) leaves
a lock file with no directory. Nothing else would ever look at it — start-up
recovery finds VMs by their directories — so ``sweep_locks`` (called by
``VmManager.recover`` once it has taken its VMs) deletes those, each under
its own flock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import threading
import zlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procurator.core.errors import PermanentError, ProcuratorError, TemporaryError
from procurator.core.validation import check_vm_id
from procurator.durable import fsync_dir, make_dirs
from procurator.worker.vmm.base import VmmHandle, VmmPaths

__all__ = [
    "OWNER_LOCK",
    "HandlesRecord",
    "OwnerLock",
    "StateDir",
    "StateError",
    "StateLockedError",
    "StateWriteError",
    "VmLock",
    "VmLockedError",
    "read_json_checked",
    "write_json_atomic",
    "write_json_in_place",
]

log = logging.getLogger(__name__)

SPEC_FILE = "vm.json"
#: The state dir's owner lock, at its root (not in ``locks/``, whose files
#: are VMs' and swept as such).
OWNER_LOCK = "owner.lock"
HANDLES_FILE = "handles.json"
#: What the VMM writes (its socket, event, log and serial files), apart from
#: the worker's records: a jailed VMM may write here, never beside them.
RUN_DIR = "run"


class StateError(PermanentError):
    """A state file is unreadable or malformed (named in the message)."""


class StateWriteError(TemporaryError):
    """A state file could not be written (disk full, I/O error)."""


class VmLockedError(TemporaryError):
    """Another process owns the VM (holds its flock)."""


class StateLockedError(VmLockedError):
    """Another process owns the state dir (holds its owner lock), and with
    it every VM in it."""


def write_json_atomic(path: Path, data: Mapping[str, Any], *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` as JSON so that a crash at any moment
    leaves either the old or the new file, never a torn one; ``durable``
    also survives a power loss (fsync of the file, of its directory and of
    every directory made for it: ``procurator.durable.make_dirs``)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    # One line (``jq`` shows it indented): ``indent`` would take json's
    # pure-Python encoder, 3-4x the C one's CPU, held under the GIL four
    # times a VM start (vm.json and three handles.json; issue 31).
    payload = json.dumps(data, sort_keys=True).encode() + b"\n"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        try:
            # The directory is there but for a record's first write: its
            # making (and a stat or mkdir to find out) only when the open
            # says it is missing (issue 31: three of a start's four writes
            # are to a directory made already).
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:
            if durable:
                make_dirs(path.parent)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, flags, 0o600)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StateWriteError(f"cannot write {path}: {exc.strerror or exc}") from exc


#: The longest record ``write_json_in_place`` writes in place: one page,
#: which the kernel copies into the file whole or not at all.
IN_PLACE_MAX = 4096
#: The key of an in-place record's check: the CRC-32 of the canonical JSON
#: (sorted keys, one line) of the rest of the record (``read_json_checked``).
CHECK_KEY = "crc32"


def write_json_in_place(path: Path, data: Mapping[str, Any]) -> None:
    """Overwrite ``path`` with ``data`` as JSON where it lies: no new inode
    and none freed, as a rename would (issue 31: on ext4 without a journal
    each inode freed makes every allocation in its block group for minutes
    after scan past it, and a start rewrote ``handles.json`` three times).

    One ``pwrite`` at offset 0 of at most ``IN_PLACE_MAX`` bytes, padded
    with spaces (which JSON ignores) to the file's old length: a writer
    killed at any moment, even by SIGKILL, leaves the old record or the
    new one, since the kernel checks for a fatal signal only between the
    pages of a write, and this one is a page at most. Two rarer ends may
    still tear it: a power loss (sectors written apart), and a copy from
    the writer's memory cut short under memory pressure just as the writer
    is killed (the OOM killer's moment). So the record carries its own
    check (``CHECK_KEY``: its old half and its new half never match it),
    and ``read_json_checked`` reports a torn record as unreadable, which
    its reader trusts nothing of (``procurator.worker.supervisor``'s
    ``_adopt``). Not durable (no fsync). The file's first write creates
    it; a writer killed between the creation and the write leaves it
    empty, unreadable too. A longer record, a short write, a symlink (not
    followed), a FIFO (not waited on) or anything but a regular file with
    one link at ``path``: ``write_json_atomic`` replaces it whole (with the
    check, too)."""
    if CHECK_KEY in data:
        raise ValueError(f"a record written in place may not hold {CHECK_KEY!r}")
    body = json.dumps(data, sort_keys=True).encode()
    checked = {**data, CHECK_KEY: zlib.crc32(body)}
    payload = json.dumps(checked, sort_keys=True).encode() + b"\n"
    if len(payload) > IN_PLACE_MAX:
        write_json_atomic(path, checked, durable=False)
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, flags, 0o600)
    except OSError as exc:
        # ELOOP: a symlink; ENXIO: a FIFO nobody reads.
        if exc.errno not in (errno.ELOOP, errno.ENXIO):
            raise StateWriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
        write_json_atomic(path, checked, durable=False)
        return
    try:
        seen = os.fstat(fd)
        padded = payload.ljust(seen.st_size)
        whole = (
            stat.S_ISREG(seen.st_mode)
            and seen.st_nlink == 1
            and len(padded) <= IN_PLACE_MAX
            and os.pwrite(fd, padded, 0) == len(padded)
        )
    except OSError as exc:
        raise StateWriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if not whole:
        # After a short write the file is torn (and fails its check) until
        # this replaces it; if this fails too, its reader finds it unreadable.
        write_json_atomic(path, checked, durable=False)


def read_json_checked(path: Path) -> dict[str, Any] | None:
    """A record ``write_json_in_place`` wrote, its check removed; None when
    there is none. Raises ``StateError`` when it is unreadable, malformed or
    torn (its check does not match). A record without a check (written by
    a release before it) is taken as it is."""
    data = _read_json(path)
    if data is None or CHECK_KEY not in data:
        return data
    check = data.pop(CHECK_KEY)
    if check != zlib.crc32(json.dumps(data, sort_keys=True).encode()):
        raise StateError(f"{path} is torn: its check does not match its content")
    return data


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StateError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise StateError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


@dataclass(frozen=True, slots=True)
class HandlesRecord:
    """What ``handles.json`` holds.

    ``spawning`` is written *before* a VMM is spawned: if the worker dies
    before it records the handle, the next owner knows to look for a VMM that
    nobody recorded (by its launch marker, ``process.launch_env``). ``hash`` is
    the spec hash the VMM was booted with, so a re-adopted VMM can be compared
    with the desired spec. ``previous`` (in a ``spawning`` record, or in a
    record of no VMM at all, written once the VM's last VMM was gone) is the
    hash the VM's last VMM ran ("" when none ever did): the old guest is gone
    by then, so a worker killed between stopping it and recording the next
    launch leaves only this to tell its next owner that the VM exists and
    its next start replaces it rather than creates it.
    ``owes`` (in a record with a handle) is the event its launch still owes
    (``booted``, ``replaced``, ``restarted``, ``restored``): told once the VM is
    seen settled, then cleared. A worker killed in between leaves it here,
    so the next owner re-adopting the VMM tells that event rather than a
    bare ``readopted`` (a replacement is never lost nor told twice).
    """

    driver: str
    spawning: bool = False
    handle: VmmHandle | None = None
    hash: str = ""
    previous: str = ""
    owes: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "driver": self.driver,
            "spawning": self.spawning,
            "handle": self.handle.to_json() if self.handle is not None else None,
            "hash": self.hash,
            "previous": self.previous,
            "owes": self.owes,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HandlesRecord:
        raw = data.get("handle")
        return cls(
            driver=str(data["driver"]),
            spawning=bool(data.get("spawning", False)),
            handle=VmmHandle.from_json(raw) if isinstance(raw, Mapping) else None,
            hash=str(data.get("hash", "")),
            # Absent in a record written before it: nothing known ran.
            previous=str(data.get("previous", "")),
            owes=str(data.get("owes", "")),
        )


class OwnerLock:
    """The state dir's owner lock (``StateDir.lock_owner``): an exclusive
    flock held until ``release``."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


class VmLock:
    """Ownership of one VM until ``release``: an exclusive flock on its lock
    file (``StateDir.lock``), or a claim under the state dir's owner lock
    (``StateDir.claim``: no descriptor, held while ``owner`` is)."""

    def __init__(
        self, vm_id: str, path: Path, fd: int | None, owner: OwnerLock | None = None
    ) -> None:
        self.vm_id = vm_id
        self.path = path
        self._fd = fd
        self._owner = owner
        self._claimed = owner is not None

    @property
    def held(self) -> bool:
        if self._fd is not None:
            return True
        return self._claimed and self._owner is not None and self._owner.held

    def release(self) -> None:
        self._claimed = False
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def release_and_unlink(self) -> None:
        """Delete the lock file, then release it: a waiter that locked the
        unlinked file notices (``StateDir.lock`` re-checks the inode)."""
        if not self.held:
            raise RuntimeError(f"lock of VM {self.vm_id} is not held")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.release()

    def __enter__(self) -> VmLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class StateDir:
    """Paths and files of one worker's state directory (thread-safe: every
    method works on files only; callers serialise per VM with ``VmLock``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.vms_dir = root / "vms"
        self.locks_dir = root / "locks"

    def prepare(self) -> None:
        make_dirs(self.vms_dir)  # holds the VMs' durable records
        self.locks_dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def check_id(vm_id: str) -> None:
        problem = check_vm_id(vm_id)
        if problem is not None:
            raise PermanentError(f"VM id {problem}")

    def vm_dir(self, vm_id: str) -> Path:
        self.check_id(vm_id)
        return self.vms_dir / vm_id

    def paths(self, vm_id: str) -> VmmPaths:
        vm_dir = self.vm_dir(vm_id)
        run = vm_dir / RUN_DIR
        return VmmPaths(
            vm_dir=vm_dir,
            api_socket=run / "api.sock",
            event_file=run / "events.json",
            log_file=run / "vmm.log",
            serial_file=run / "serial.log",
            run_dir=run,
        )

    def vm_ids(self) -> list[str]:
        """Ids of the VMs that have a directory (sorted); names that are not
        valid VM ids are ignored, they are not ours."""
        try:
            entries = list(self.vms_dir.iterdir())
        except FileNotFoundError:
            return []
        return sorted(p.name for p in entries if p.is_dir() and check_vm_id(p.name) is None)

    def exists(self, vm_id: str) -> bool:
        return self.vm_dir(vm_id).is_dir()

    def lock_ids(self) -> list[str]:
        """Ids of the VMs that have a lock file (sorted); names that are not
        lock files of valid VM ids are ignored."""
        try:
            entries = list(self.locks_dir.iterdir())
        except FileNotFoundError:
            return []
        return sorted(
            p.stem for p in entries if p.suffix == ".lock" and check_vm_id(p.stem) is None
        )

    # -- ownership ---------------------------------------------------------------

    def lock_owner(self) -> OwnerLock:
        """Take the state dir's owner lock without waiting (see the module
        docstring); ``StateLockedError`` names the process holding it when
        another one does."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / OWNER_LOCK
        fd = self._flock(path, f"the state dir {self.root}", StateLockedError)
        assert fd is not None  # made when absent
        return OwnerLock(path, fd)

    def claim(self, vm_id: str, owner: OwnerLock) -> VmLock:
        """Own the VM under ``owner`` (held by the caller), with no
        descriptor kept and no file made: when the VM has a lock file, its
        flock is taken (``VmLockedError`` when another process holds it),
        stamped with this pid and let go; when it has none, no process holds
        one (see the module docstring)."""
        if not owner.held:
            raise RuntimeError(f"claiming VM {vm_id} without the state dir's owner lock")
        self.check_id(vm_id)
        path = self.locks_dir / f"{vm_id}.lock"
        fd = self._flock(path, f"VM {vm_id}", VmLockedError, create=False)
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the flock
        return VmLock(vm_id, path, None, owner)

    def lock(self, vm_id: str) -> VmLock:
        """Take the VM's flock without waiting; ``VmLockedError`` names the
        process holding it when another one does."""
        self.check_id(vm_id)
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        path = self.locks_dir / f"{vm_id}.lock"
        fd = self._flock(path, f"VM {vm_id}", VmLockedError)
        assert fd is not None  # made when absent
        return VmLock(vm_id, path, fd)

    def _flock(
        self, path: Path, what: str, locked: type[VmLockedError], *, create: bool = True
    ) -> int | None:
        """A descriptor holding ``path``'s flock, the file stamped with
        this pid; ``locked`` (naming the holder) when another one holds it.
        Without ``create``, None when there is no such file."""
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        while True:
            try:
                fd = os.open(path, flags, 0o600)
            except FileNotFoundError:
                if create:
                    raise
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StateError(f"cannot lock {path}: {exc.strerror}") from exc
                raise locked(
                    f"{what} is owned by another process ({self._holder(path)}); "
                    f"its lock {path} is held",
                    delay=5.0,
                ) from None
            # The previous owner may have unlinked the file between our open
            # and our flock (removing the VM): then we locked a dead inode.
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                except OSError as exc:
                    # Closing drops the flock: keeping this descriptor would
                    # hold the VM locked against ourselves for good.
                    os.close(fd)
                    raise StateWriteError(
                        f"cannot write lock file {path}: {exc.strerror or exc}"
                    ) from exc
                return fd
            os.close(fd)

    def sweep_locks(self, keep: Collection[str]) -> list[str]:
        """Delete the lock files of VMs that have no directory and are not in
        ``keep`` (see the module docstring: a worker killed just before
        making a VM's directory or just after deleting it); returns their
        ids. Each is taken first, without waiting, and deleted under its
        flock: a lock another process holds, or one whose VM got a directory
        meanwhile, is left alone. Call it once the VMs to ``keep`` are
        locked, before anything may create new VMs."""
        swept: list[str] = []
        for vm_id in self.lock_ids():
            if vm_id in keep or self.exists(vm_id):
                continue
            try:
                lock = self.lock(vm_id)
            except VmLockedError:
                continue  # another process manages it
            except ProcuratorError as exc:  # unreadable, or no space to take it
                log.warning("lock file of VM %s not swept (next start): %s", vm_id, exc)
                continue
            try:
                if self.exists(vm_id):
                    continue
                lock.release_and_unlink()
            except OSError as exc:
                log.warning("lock file of VM %s not swept (next start): %s", vm_id, exc)
                continue
            finally:
                lock.release()
            swept.append(vm_id)
        return swept

    @staticmethod
    def _holder(path: Path) -> str:
        try:
            text = path.read_text().strip()
        except OSError:
            return "unknown pid"
        return f"pid {text}" if text.isdigit() else "unknown pid"

    # -- durable spec ------------------------------------------------------------

    def read_spec(self, vm_id: str) -> dict[str, Any] | None:
        return _read_json(self.vm_dir(vm_id) / SPEC_FILE)

    def write_spec(self, lock: VmLock, data: Mapping[str, Any]) -> None:
        self._check_lock(lock)
        write_json_atomic(self.vm_dir(lock.vm_id) / SPEC_FILE, data)

    # -- transient handles -------------------------------------------------------

    def read_handles(self, vm_id: str) -> HandlesRecord | None:
        data = read_json_checked(self.vm_dir(vm_id) / HANDLES_FILE)
        if data is None:
            return None
        try:
            return HandlesRecord.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{self.vm_dir(vm_id) / HANDLES_FILE} is malformed: {exc!r}") from exc

    def write_handles(self, lock: VmLock, record: HandlesRecord) -> None:
        self._check_lock(lock)
        # In place and not durable: see the module docstring (processes do
        # not survive what an fsync protects against).
        write_json_in_place(self.vm_dir(lock.vm_id) / HANDLES_FILE, record.to_json())

    def clear_handles(self, lock: VmLock) -> None:
        self._check_lock(lock)
        path = self.vm_dir(lock.vm_id) / HANDLES_FILE
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StateWriteError(f"cannot remove {path}: {exc.strerror}") from exc

    # -- removal -----------------------------------------------------------------

    def remove_vm(self, lock: VmLock) -> None:
        """Delete the VM's directory and its lock file, then release the lock.
        The caller has made sure no VMM runs for it."""
        self._check_lock(lock)
        vm_dir = self.vm_dir(lock.vm_id)
        try:
            shutil.rmtree(vm_dir)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StateError(f"cannot remove {vm_dir}: {exc.strerror}") from exc
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(self.vms_dir)
        lock.release_and_unlink()

    @staticmethod
    def _check_lock(lock: VmLock) -> None:
        if not lock.held:
            raise RuntimeError(f"state of VM {lock.vm_id} changed without holding its lock")
