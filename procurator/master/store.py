"""Durable desired state of the master: SQLite (stdlib ``sqlite3``, WAL).

What is stored: per worker, its VMs and the generation and op id of the last
apply that changed its assignment; one fleet-wide generation counter; and an
append-only log of applies (generation, op id, time) for audit.

Invariants:

- **Every apply is one transaction** (``BEGIN IMMEDIATE`` ... ``COMMIT``):
  either the whole new fleet is stored with its new generation, or nothing
  changes.
- **Generations are monotonic and never reused**, across restarts too: the
  last minted one is a row of ``meta`` incremented inside the apply's
  transaction, never derived from the assignments (which may all be gone).
- **Optimistic concurrency is checked inside the transaction**: the commit
  names the generation it was computed against and fails with
  ``StaleGenerationError`` if the counter moved, so even two processes on one
  file could not both win.
- VM ids are the primary key of ``vms``: unique across the fleet, as the
  fleet rules say.
- **An apply writes only the rows that change**: the caller passes the
  changed workers' lists as it holds them (``before``, which mirrors the
  store: loaded from it, changed only after a commit) and the new ones; the
  commit checks inside its transaction that the store holds as many VMs for
  each of those workers and finds every row it deletes, and fails (rolled
  back, nothing changed) otherwise.
- One master per database: the store holds an exclusive ``flock`` on
  ``<db>.lock`` while open.

Threading: ``sqlite3`` blocks, so every call runs in a worker thread through
``trio.to_thread.run_sync`` with a ``CapacityLimiter(1)``; that limiter also
serializes all use of the one connection (opened with
``check_same_thread=False``). Never call the store from the capnp thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from procurator.core.errors import (
    PermanentError,
    ProcuratorError,
    StaleGenerationError,
    UnavailableError,
)
from procurator.core.models import Assignment, PowerState, VmAssignment

__all__ = ["FleetStore", "StoredFleet"]

T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    generation INTEGER NOT NULL,
    op_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS vms (
    vm_id TEXT PRIMARY KEY,
    worker_id TEXT NOT NULL REFERENCES workers(worker_id),
    hash TEXT NOT NULL,
    nix_store_path TEXT NOT NULL,
    power TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS vms_by_worker ON vms(worker_id);
CREATE TABLE IF NOT EXISTS applies (
    generation INTEGER PRIMARY KEY,
    op_id TEXT NOT NULL,
    unix_ms INTEGER NOT NULL,
    workers_changed INTEGER NOT NULL
);
"""

_POWER = {p.value: p for p in PowerState}


@dataclass(frozen=True, slots=True)
class StoredFleet:
    """What the store holds: the fleet generation and every worker's
    assignment (workers whose VMs were all removed keep an empty one)."""

    generation: int
    assignments: Mapping[str, Assignment]


class FleetStore:
    """The master's SQLite store. Open with :meth:`open`, close with
    :meth:`aclose` (or use ``async with``)."""

    def __init__(self, path: Path, connection: sqlite3.Connection, lock_fd: int) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = connection
        self._lock_fd = lock_fd
        self._limiter = trio.CapacityLimiter(1)

    # ------------------------------------------------------------ lifecycle

    @classmethod
    async def open(cls, path: Path | str) -> FleetStore:
        """Open (creating if needed) the database at ``path``."""
        db_path = Path(path)
        return await trio.to_thread.run_sync(cls._open_sync, db_path)

    @classmethod
    def _open_sync(cls, path: Path) -> FleetStore:
        if not path.parent.is_dir():
            raise PermanentError(f"master database {path}: directory {path.parent} does not exist")
        lock_path = path.with_name(path.name + ".lock")
        try:
            lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise PermanentError(f"master database {path}: cannot open {lock_path}: {exc}") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise PermanentError(
                f"master database {path} is in use by another master (lock {lock_path})"
            ) from None
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                # FULL: an apply the CLI saw succeed survives a power cut.
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA foreign_keys=ON")
                db.executescript(_SCHEMA)
                db.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                )
                db.execute("INSERT OR IGNORE INTO meta VALUES ('generation', 0)")
                _check_schema_version(db, path)
            except BaseException:
                db.close()
                raise
        except sqlite3.Error as exc:
            os.close(lock_fd)
            raise PermanentError(f"master database {path}: cannot open: {exc}") from exc
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(path, db, lock_fd)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._close_sync, limiter=self._limiter)

    def _close_sync(self) -> None:
        db, self._db = self._db, None
        if db is None:
            return
        try:
            db.close()
        finally:
            os.close(self._lock_fd)

    async def __aenter__(self) -> FleetStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------ operations

    async def _call(self, fn: Callable[[sqlite3.Connection], T], what: str) -> T:
        def guarded() -> T:
            db = self._db
            if db is None:
                raise UnavailableError(f"master database {self.path} is closed")
            try:
                return fn(db)
            except ProcuratorError:
                raise
            except sqlite3.OperationalError as exc:
                # Locked, busy, I/O error, disk full: may pass.
                raise UnavailableError(f"master database {self.path}: {what}: {exc}") from exc
            except sqlite3.Error as exc:
                raise ProcuratorError(f"master database {self.path}: {what}: {exc}") from exc

        return await trio.to_thread.run_sync(guarded, limiter=self._limiter)

    async def load(self) -> StoredFleet:
        """Everything stored, for the master to keep in memory."""
        return await self._call(_load, "load")

    async def commit(
        self,
        *,
        expected_generation: int,
        changes: Mapping[str, Sequence[VmAssignment]],
        before: Mapping[str, Sequence[VmAssignment]],
        op_id: str,
        unix_ms: int,
    ) -> int:
        """Store the new VM lists of the workers in ``changes`` (all others
        keep theirs) under a new generation, which is returned. ``before``
        holds those workers' lists as stored now (as loaded or last
        committed; a worker missing from it has none): only the rows that
        differ are written, and a store that does not hold ``before`` fails
        the commit rather than being patched wrongly. Raises
        ``StaleGenerationError`` if the stored generation is no longer
        ``expected_generation``; nothing is changed then, nor on any error."""

        def run(db: sqlite3.Connection) -> int:
            return _commit(db, expected_generation, changes, before, op_id, unix_ms)

        return await self._call(run, f"apply {op_id}")


def _check_schema_version(db: sqlite3.Connection, path: Path) -> None:
    (version,) = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if version > SCHEMA_VERSION:
        raise PermanentError(
            f"master database {path} has schema version {version}; this procurator "
            f"knows up to {SCHEMA_VERSION}"
        )


def _current_generation(db: sqlite3.Connection, expected: int, op_id: str) -> int:
    (current,) = db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    if current != expected:
        raise StaleGenerationError(
            f"the fleet is at generation {current}, not {expected}; nothing was applied",
            op_id=op_id,
        )
    return int(current)


def _load(db: sqlite3.Connection) -> StoredFleet:
    db.execute("BEGIN")
    try:
        (generation,) = db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        vms: dict[str, list[VmAssignment]] = {}
        for row in db.execute(
            "SELECT worker_id, vm_id, hash, nix_store_path, power, vcpus, memory_mib "
            "FROM vms ORDER BY worker_id, vm_id"
        ):
            worker_id, vm_id, vm_hash, path, power, vcpus, memory = row
            vms.setdefault(worker_id, []).append(
                VmAssignment(vm_id, vm_hash, path, _POWER[power], vcpus, memory)
            )
        assignments = {
            worker_id: Assignment(worker_id, worker_generation, tuple(vms.get(worker_id, ())), op)
            for worker_id, worker_generation, op in db.execute(
                "SELECT worker_id, generation, op_id FROM workers"
            )
        }
    finally:
        db.execute("COMMIT")
    return StoredFleet(generation, assignments)


def _row_changes(
    changes: Mapping[str, Sequence[VmAssignment]],
    before: Mapping[str, Sequence[VmAssignment]],
) -> tuple[list[tuple[str, str]], list[tuple[str, str, str, str, str, int, int]]]:
    """(vm_id, worker_id) rows to delete and rows to insert: a VM removed,
    replaced or otherwise changed is deleted, one added or changed inserted.
    A one-VM change in a 1,000-VM worker writes two rows, not 2,000."""
    deletes: list[tuple[str, str]] = []
    inserts: list[tuple[str, str, str, str, str, int, int]] = []
    for worker_id, vms in changes.items():
        old = {vm.id: vm for vm in before.get(worker_id, ())}
        new_ids = set()
        for vm in vms:
            new_ids.add(vm.id)
            previous = old.get(vm.id)
            if previous == vm:
                continue
            if previous is not None:
                deletes.append((vm.id, worker_id))
            inserts.append(
                (
                    vm.id,
                    worker_id,
                    vm.hash,
                    vm.nix_store_path,
                    vm.power.value,
                    vm.vcpus,
                    vm.memory_mib,
                )
            )
        deletes.extend((vm_id, worker_id) for vm_id in old.keys() - new_ids)
    return deletes, inserts


def _delete_rows(
    db: sqlite3.Connection,
    changes: Mapping[str, Sequence[VmAssignment]],
    before: Mapping[str, Sequence[VmAssignment]],
    deletes: Sequence[tuple[str, str]],
    op_id: str,
) -> None:
    """Delete ``deletes``, after checking that the store holds what the
    caller's ``before`` says: the row delta is only right against that."""
    for worker_id in changes:
        (count,) = db.execute(
            "SELECT count(*) FROM vms WHERE worker_id = ?", (worker_id,)
        ).fetchone()
        if count != len(before.get(worker_id, ())):
            raise ProcuratorError(
                f"apply {op_id}: the store holds {count} VM(s) for worker {worker_id}, "
                f"the master {len(before.get(worker_id, ()))}; nothing was applied"
            )
    # All deletes before any insert, so a VM that moves between two workers
    # in one apply never collides with itself.
    cursor = db.executemany("DELETE FROM vms WHERE vm_id = ? AND worker_id = ?", deletes)
    if deletes and cursor.rowcount != len(deletes):
        raise ProcuratorError(
            f"apply {op_id}: the store does not hold the VMs the master holds "
            f"({cursor.rowcount} of {len(deletes)} to delete found); nothing was applied"
        )


def _commit(
    db: sqlite3.Connection,
    expected_generation: int,
    changes: Mapping[str, Sequence[VmAssignment]],
    before: Mapping[str, Sequence[VmAssignment]],
    op_id: str,
    unix_ms: int,
) -> int:
    deletes, inserts = _row_changes(changes, before)
    db.execute("BEGIN IMMEDIATE")
    try:
        generation = _current_generation(db, expected_generation, op_id) + 1
        db.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (generation,))
        _delete_rows(db, changes, before, deletes, op_id)
        db.executemany(
            "INSERT INTO workers (worker_id, generation, op_id) VALUES (?, ?, ?) "
            "ON CONFLICT(worker_id) DO UPDATE SET generation = excluded.generation, "
            "op_id = excluded.op_id",
            [(w, generation, op_id) for w in changes],
        )
        db.executemany("INSERT INTO vms VALUES (?, ?, ?, ?, ?, ?, ?)", inserts)
        db.execute(
            "INSERT INTO applies VALUES (?, ?, ?, ?)", (generation, op_id, unix_ms, len(changes))
        )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise
    return generation
