"""Durable desired state of the master: SQLite (stdlib ``sqlite3``, WAL).

What is stored: per worker, its VMs and the generation and op id of the last
apply that changed its assignment; one fleet-wide generation counter; an
append-only log of applies (generation, op id, time, request id) for audit;
the request ids of the newest ``requests_kept`` (1,000) applies that carried
one, with what a replay answers (generation, op id, fleet digest, diffs); and
per worker the VMs removed from it that it has not yet confirmed (or
confirmed lately): what it may still report (``procurator.master.service``
has the rule).

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
- **A request id is recorded in the apply's transaction**: an apply that
  carried one is committed with it or not at all, so a retry finds it exactly
  when the first attempt changed the fleet. Only the newest ``requests_kept``
  are kept (older rows are deleted by the commit that passes the bound); the
  apply log keeps every apply's request id for audit.
- **Removals are recorded in the apply's transaction**: every VM that an
  apply takes off a worker (removed, or moved elsewhere) gets a row
  ``(worker, vm, generation)``, pending until ``acknowledge_removals`` marks
  it confirmed; confirmed rows are deleted once older than the caller's
  grace. A VM removed again later has its row's generation raised and its
  confirmation cleared.
- One master per database: the store holds an exclusive ``flock`` on
  ``<db>.lock`` while open.
- Schema version 2 (request ids, removals); a version 1 database is
  migrated in place when opened. Removals in flight when a version 1 master
  stopped are not known to it (the table starts empty).

Threading: ``sqlite3`` blocks, so every call runs in a worker thread through
``trio.to_thread.run_sync`` with a ``CapacityLimiter(1)``; that limiter also
serializes all use of the one connection (opened with
``check_same_thread=False``). Never call the store from the capnp thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio

from procurator.core.errors import (
    PermanentError,
    ProcuratorError,
    StaleGenerationError,
    UnavailableError,
)
from procurator.core.models import (
    Assignment,
    PowerChange,
    PowerState,
    VmAssignment,
    WorkerDiff,
)

__all__ = ["REQUESTS_KEPT", "AppliedRequest", "FleetStore", "Removal", "StoredFleet"]

T = TypeVar("T")

SCHEMA_VERSION = 2
REQUESTS_KEPT = 1000

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
    workers_changed INTEGER NOT NULL,
    request_id TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    generation INTEGER NOT NULL UNIQUE REFERENCES applies(generation),
    fleet_digest TEXT NOT NULL,
    diffs BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS removals (
    worker_id TEXT NOT NULL,
    vm_id TEXT NOT NULL,
    generation INTEGER NOT NULL,
    acked_unix_ms INTEGER,
    PRIMARY KEY (worker_id, vm_id)
);
"""

# Version 1 had no request ids and no removals.
_MIGRATE_FROM_1 = "ALTER TABLE applies ADD COLUMN request_id TEXT NOT NULL DEFAULT ''"

_POWER = {p.value: p for p in PowerState}


@dataclass(frozen=True, slots=True)
class Removal:
    """A VM an apply took off a worker: by which generation, and when the
    worker confirmed it (unix ms; None while pending)."""

    generation: int
    acked_unix_ms: int | None = None


@dataclass(frozen=True, slots=True)
class StoredFleet:
    """What the store holds: the fleet generation, every worker's assignment
    (workers whose VMs were all removed keep an empty one) and, per worker,
    its recorded removals by VM id."""

    generation: int
    assignments: Mapping[str, Assignment]
    removals: Mapping[str, Mapping[str, Removal]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AppliedRequest:
    """A committed apply that carried a request id: what a replay answers."""

    request_id: str
    generation: int
    op_id: str
    fleet_digest: str
    diffs: tuple[WorkerDiff, ...]


class FleetStore:
    """The master's SQLite store. Open with :meth:`open`, close with
    :meth:`aclose` (or use ``async with``)."""

    def __init__(
        self,
        path: Path,
        connection: sqlite3.Connection,
        lock_fd: int,
        *,
        requests_kept: int = REQUESTS_KEPT,
    ) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = connection
        self._lock_fd = lock_fd
        self._limiter = trio.CapacityLimiter(1)
        self.requests_kept = requests_kept

    # ------------------------------------------------------------ lifecycle

    @classmethod
    async def open(cls, path: Path | str, *, requests_kept: int = REQUESTS_KEPT) -> FleetStore:
        """Open (creating if needed) the database at ``path``. The newest
        ``requests_kept`` request ids are kept for replays."""
        if requests_kept < 1:
            raise ValueError(f"requests_kept must be at least 1, not {requests_kept}")
        db_path = Path(path)
        store = await trio.to_thread.run_sync(cls._open_sync, db_path)
        store.requests_kept = requests_kept
        return store

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
                _migrate(db)
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
        request_id: str = "",
        fleet_digest: str = "",
        diffs: Sequence[WorkerDiff] = (),
    ) -> int:
        """Store the new VM lists of the workers in ``changes`` (all others
        keep theirs) under a new generation, which is returned. ``before``
        holds those workers' lists as stored now (as loaded or last
        committed; a worker missing from it has none): only the rows that
        differ are written, and a store that does not hold ``before`` fails
        the commit rather than being patched wrongly. Every VM in ``before``
        but not in ``changes`` is recorded as removed from its worker by the
        new generation. With a ``request_id``, it is recorded with
        ``fleet_digest`` and ``diffs`` for :meth:`find_request`. Raises
        ``StaleGenerationError`` if the stored generation is no longer
        ``expected_generation``; nothing is changed then, nor on any error
        (a request id already recorded is one: the caller looks it up
        first)."""
        request = (
            (request_id, fleet_digest, _encode_diffs(diffs), self.requests_kept)
            if request_id
            else None
        )

        def run(db: sqlite3.Connection) -> int:
            return _commit(db, expected_generation, changes, before, op_id, unix_ms, request)

        return await self._call(run, f"apply {op_id}")

    async def find_request(self, request_id: str) -> AppliedRequest | None:
        """The committed apply that carried ``request_id``, if it is still
        among the newest ``requests_kept``."""

        def run(db: sqlite3.Connection) -> AppliedRequest | None:
            row = db.execute(
                "SELECT r.generation, a.op_id, r.fleet_digest, r.diffs FROM requests r "
                "JOIN applies a ON a.generation = r.generation WHERE r.request_id = ?",
                (request_id,),
            ).fetchone()
            if row is None:
                return None
            generation, op_id, digest, blob = row
            return AppliedRequest(request_id, generation, op_id, digest, _decode_diffs(blob))

        return await self._call(run, f"find request {request_id}")

    async def acknowledge_removals(
        self, worker_id: str, observed_generation: int, unix_ms: int, forget_before_unix_ms: int
    ) -> None:
        """Mark the pending removals of ``worker_id`` at or below
        ``observed_generation`` confirmed at ``unix_ms``, and delete every
        worker's removals confirmed before ``forget_before_unix_ms``."""

        def run(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "UPDATE removals SET acked_unix_ms = ? WHERE worker_id = ? "
                    "AND generation <= ? AND acked_unix_ms IS NULL",
                    (unix_ms, worker_id, observed_generation),
                )
                db.execute("DELETE FROM removals WHERE acked_unix_ms < ?", (forget_before_unix_ms,))
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise

        await self._call(run, f"confirm removals of worker {worker_id}")


def _check_schema_version(db: sqlite3.Connection, path: Path) -> None:
    (version,) = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if version > SCHEMA_VERSION:
        raise PermanentError(
            f"master database {path} has schema version {version}; this procurator "
            f"knows up to {SCHEMA_VERSION}"
        )


def _migrate(db: sqlite3.Connection) -> None:
    (version,) = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if version == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        if version == 1:
            db.execute(_MIGRATE_FROM_1)
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def _encode_diffs(diffs: Sequence[WorkerDiff]) -> bytes:
    """Diffs as compressed JSON: a replay prints them again. Compressed
    because a big apply names thousands of VM ids."""
    rows = [
        {
            "worker_id": d.worker_id,
            "added": d.added,
            "replaced": d.replaced,
            "removed": d.removed,
            "updated": d.updated,
            "power": [[c.vm_id, c.before.value, c.after.value] for c in d.power_changed],
        }
        for d in diffs
    ]
    return zlib.compress(json.dumps(rows, separators=(",", ":")).encode())


def _decode_diffs(blob: bytes) -> tuple[WorkerDiff, ...]:
    rows = json.loads(zlib.decompress(blob))
    return tuple(
        WorkerDiff(
            worker_id=row["worker_id"],
            added=tuple(row["added"]),
            replaced=tuple(row["replaced"]),
            removed=tuple(row["removed"]),
            updated=tuple(row["updated"]),
            power_changed=tuple(
                PowerChange(vm_id, _POWER[before], _POWER[after])
                for vm_id, before, after in row["power"]
            ),
        )
        for row in rows
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
        removals: dict[str, dict[str, Removal]] = {}
        for worker_id, vm_id, removed_by, acked in db.execute(
            "SELECT worker_id, vm_id, generation, acked_unix_ms FROM removals"
        ):
            removals.setdefault(worker_id, {})[vm_id] = Removal(removed_by, acked)
    finally:
        db.execute("COMMIT")
    return StoredFleet(generation, assignments, removals)


def _row_changes(
    changes: Mapping[str, Sequence[VmAssignment]],
    before: Mapping[str, Sequence[VmAssignment]],
) -> tuple[
    list[tuple[str, str]], list[tuple[str, str, str, str, str, int, int]], list[tuple[str, str]]
]:
    """(vm_id, worker_id) rows to delete, rows to insert, and (worker_id,
    vm_id) of the VMs taken off their worker: a VM removed, replaced or
    otherwise changed is deleted, one added or changed inserted. A one-VM
    change in a 1,000-VM worker writes two rows, not 2,000."""
    deletes: list[tuple[str, str]] = []
    inserts: list[tuple[str, str, str, str, str, int, int]] = []
    removed: list[tuple[str, str]] = []
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
        gone = sorted(old.keys() - new_ids)
        deletes.extend((vm_id, worker_id) for vm_id in gone)
        removed.extend((worker_id, vm_id) for vm_id in gone)
    return deletes, inserts, removed


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
    request: tuple[str, str, bytes, int] | None,
) -> int:
    deletes, inserts, removed = _row_changes(changes, before)
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
        db.executemany(
            "INSERT INTO removals (worker_id, vm_id, generation, acked_unix_ms) "
            "VALUES (?, ?, ?, NULL) ON CONFLICT(worker_id, vm_id) DO UPDATE SET "
            "generation = excluded.generation, acked_unix_ms = NULL",
            [(worker_id, vm_id, generation) for worker_id, vm_id in removed],
        )
        request_id = request[0] if request else ""
        db.execute(
            "INSERT INTO applies (generation, op_id, unix_ms, workers_changed, request_id) "
            "VALUES (?, ?, ?, ?, ?)",
            (generation, op_id, unix_ms, len(changes), request_id),
        )
        if request is not None:
            _record_request(db, generation, *request)
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise
    return generation


def _record_request(
    db: sqlite3.Connection, generation: int, request_id: str, digest: str, diffs: bytes, kept: int
) -> None:
    try:
        db.execute(
            "INSERT INTO requests VALUES (?, ?, ?, ?)", (request_id, generation, digest, diffs)
        )
    except sqlite3.IntegrityError:
        raise ProcuratorError(
            f"request id {request_id} is recorded already; nothing was applied"
        ) from None
    # The bound: the newest ``kept`` request ids (generations only grow).
    db.execute(
        "DELETE FROM requests WHERE generation <= ("
        "SELECT generation FROM requests ORDER BY generation DESC LIMIT 1 OFFSET ?)",
        (kept,),
    )
