"""The embedded store: SQLite (stdlib ``sqlite3``, WAL), one master per file.

The default: ``procurator master`` needs no database server. The semantics
are ``_sql``'s, shared with PostgreSQL; what is SQLite's own:

- **One master per database**: the store holds an exclusive ``flock`` on
  ``<db>.lock`` while open, so ``single_master`` is true and there is
  nobody to notify: ``watch`` only says the database is there.
- **Write transactions are exclusive** (``BEGIN IMMEDIATE``): they take
  turns, so the row locks of ``_sql`` are not needed.
- **Durability by what is written**: applies, removals confirmed, leases
  and imports commit with ``synchronous=FULL`` (an apply the CLI saw
  succeed survives a power cut); status reports, sessions and events with
  ``NORMAL`` (WAL: a power cut may lose the last ones, never half of one,
  and workers send them again).
- Schema versions: 1 (fleet), 2 (request ids, removals: removals in flight
  when a version 1 master stopped are not known), 3 (worker state, events,
  leases), 4-7 (new tables only), 8 (``worker_state.prepared``: a column
  added to a table that exists), 9 (moves: a new table, and
  ``worker_state.transfers``). An older database is migrated in place
  when opened (``migrate``, the default) and refused otherwise; a newer one
  is refused.

Threading: ``sqlite3`` blocks, so every call runs in a worker thread through
``trio.to_thread.run_sync`` with a ``CapacityLimiter(1)``; that limiter also
serializes all use of the one connection (opened with
``check_same_thread=False``). Never call the store from the capnp thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from procurator.core.errors import PermanentError, ProcuratorError
from procurator.master.store import _sql
from procurator.master.store._base import SqlStore
from procurator.master.store.model import (
    REQUESTS_KEPT,
    SCHEMA_VERSION,
    Change,
    StoreUnavailableError,
)
from procurator.master.store.port import OnChange, OnHealth

__all__ = ["SqliteStore"]

T = TypeVar("T")

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
CREATE TABLE IF NOT EXISTS worker_state (
    worker_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    master_id TEXT NOT NULL DEFAULT '',
    session INTEGER NOT NULL DEFAULT 0,
    info TEXT NOT NULL DEFAULT '',
    connected BOOLEAN NOT NULL DEFAULT FALSE,
    since_unix_ms INTEGER NOT NULL DEFAULT 0,
    renewed_unix_ms INTEGER NOT NULL DEFAULT 0,
    expires_unix_ms INTEGER NOT NULL DEFAULT 0,
    observed_generation INTEGER,
    reported_unix_ms INTEGER NOT NULL DEFAULT 0,
    prepared TEXT NOT NULL DEFAULT '',
    transfers TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS vm_status (
    worker_id TEXT NOT NULL,
    vm_id TEXT NOT NULL,
    status TEXT NOT NULL,
    PRIMARY KEY (worker_id, vm_id)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    worker_id TEXT NOT NULL,
    vm_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    op_id TEXT NOT NULL,
    unix_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_vm ON events(vm_id, seq);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    expires_unix_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS unpinned (
    vm_id TEXT PRIMARY KEY,
    rules TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    worker_id TEXT NOT NULL,
    vm_id TEXT NOT NULL,
    name TEXT NOT NULL,
    info TEXT NOT NULL,
    PRIMARY KEY (worker_id, vm_id, name)
);
CREATE TABLE IF NOT EXISTS worker_modes (
    worker_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    op_id TEXT NOT NULL,
    since_unix_ms INTEGER NOT NULL,
    max_unavailable INTEGER NOT NULL,
    moved INTEGER NOT NULL,
    total INTEGER NOT NULL,
    blocked TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS handoffs (
    vm_id TEXT PRIMARY KEY,
    source_worker TEXT NOT NULL,
    target_worker TEXT NOT NULL,
    op_id TEXT NOT NULL,
    generation INTEGER NOT NULL,
    started_unix_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    active BOOLEAN NOT NULL,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS moves (
    op_id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL,
    source_worker TEXT NOT NULL,
    target_worker TEXT NOT NULL,
    kind TEXT NOT NULL,
    phase TEXT NOT NULL,
    power TEXT NOT NULL,
    generation INTEGER NOT NULL,
    started_unix_ms INTEGER NOT NULL,
    updated_unix_ms INTEGER NOT NULL,
    deadline_unix_ms INTEGER NOT NULL,
    reason TEXT NOT NULL,
    active BOOLEAN NOT NULL,
    token TEXT NOT NULL DEFAULT '',
    image TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS moves_under_way ON moves(vm_id) WHERE active;
INSERT OR IGNORE INTO meta VALUES ('generation', 0);
INSERT OR IGNORE INTO meta VALUES ('event_seq', 0);
INSERT OR IGNORE INTO meta VALUES ('strategy', 0);
"""

# Version 1 had no request ids (nor removals: their table is new).
_MIGRATE_FROM_1 = "ALTER TABLE applies ADD COLUMN request_id TEXT NOT NULL DEFAULT ''"

# Version 8 stores each worker's prepared images with its status; a
# worker_state table made before has no column for them.
_MIGRATE_TO_8 = "ALTER TABLE worker_state ADD COLUMN prepared TEXT NOT NULL DEFAULT ''"
# Version 9 adds the moves table (in _SCHEMA) and each worker's transfers
# (a move's disks), written with its status like the prepared images.
_MIGRATE_TO_9 = "ALTER TABLE worker_state ADD COLUMN transfers TEXT NOT NULL DEFAULT ''"

_DIALECT = {
    "now": "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
    "now_us": "CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)",
    "lock": "",
    "share": "",
    "greatest": "max",
    # A worker_state row's next version (procurator.master.store._sql).
    "next_version": "max(worker_state.version + 1, "
    "CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER))",
}


@functools.lru_cache(maxsize=256)
def _dialect(sql: str) -> str:
    return sql.format(**_DIALECT)


class _Tx:
    """``_sql.Tx`` over the connection, inside ``BEGIN`` ... ``COMMIT``."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def run(self, sql: str, params: Sequence[Any] = ()) -> list[_sql.Row]:
        return self._db.execute(_dialect(sql), params).fetchall()

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        if not rows:
            return 0
        return self._db.executemany(_dialect(sql), rows).rowcount

    def count(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._db.execute(_dialect(sql), params).rowcount

    def notify(self, change: Change) -> None:
        """Nobody else reads this file: nothing to tell."""


class SqliteStore(SqlStore):
    """The master's SQLite store. Open with :meth:`open`, close with
    :meth:`aclose` (or use ``async with``)."""

    single_master = True

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
        self._synchronous = ""
        self.requests_kept = requests_kept

    @property
    def name(self) -> str:
        return str(self.path)

    def describe(self) -> str:
        return f"master database {self.path}"

    # ------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls, path: Path | str, *, requests_kept: int = REQUESTS_KEPT, migrate: bool = True
    ) -> SqliteStore:
        """Open (creating if needed) the database at ``path``. The newest
        ``requests_kept`` request ids are kept for replays. An older schema
        is migrated, unless ``migrate`` is False: then it is refused."""
        if requests_kept < 1:
            raise ValueError(f"requests_kept must be at least 1, not {requests_kept}")
        db_path = Path(path)
        store = await trio.to_thread.run_sync(cls._open_sync, db_path, migrate)
        store.requests_kept = requests_kept
        return store

    @classmethod
    def _open_sync(cls, path: Path, migrate: bool) -> SqliteStore:
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
                db.execute("PRAGMA foreign_keys=ON")
                _prepare_schema(db, path, migrate)
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

    async def __aenter__(self) -> SqliteStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------ transactions

    async def _read(self, fn: Callable[[_sql.Tx], T], what: str) -> T:
        return await self._call(fn, what, "BEGIN", None)

    async def _write(self, fn: Callable[[_sql.Tx], T], what: str, *, durable: bool = True) -> T:
        return await self._call(fn, what, "BEGIN IMMEDIATE", "FULL" if durable else "NORMAL")

    async def _call(
        self, fn: Callable[[_sql.Tx], T], what: str, begin: str, synchronous: str | None
    ) -> T:
        def guarded() -> T:
            db = self._db
            if db is None:
                raise StoreUnavailableError(f"master database {self.path} is closed")
            try:
                if synchronous is not None and synchronous != self._synchronous:
                    db.execute(f"PRAGMA synchronous={synchronous}")
                    self._synchronous = synchronous
                db.execute(begin)
                try:
                    result = fn(_Tx(db))
                    db.execute("COMMIT")
                except BaseException:
                    _rollback(db)
                    raise
            except ProcuratorError:
                raise
            except sqlite3.OperationalError as exc:
                # Locked, busy, I/O error, disk full: may pass.
                raise StoreUnavailableError(f"master database {self.path}: {what}: {exc}") from exc
            except sqlite3.Error as exc:
                raise ProcuratorError(f"master database {self.path}: {what}: {exc}") from exc
            return result

        return await trio.to_thread.run_sync(guarded, limiter=self._limiter)

    async def watch(
        self,
        on_change: OnChange,
        on_health: OnHealth,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Nobody else writes this file: nothing ever changes behind the
        master's back."""
        on_health(True, "")
        task_status.started()
        await trio.sleep_forever()


def _prepare_schema(db: sqlite3.Connection, path: Path, migrate: bool) -> None:
    row = None
    with contextlib.suppress(sqlite3.OperationalError):  # no meta table yet
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    version = SCHEMA_VERSION if row is None else int(row[0])
    if version > SCHEMA_VERSION:
        raise PermanentError(
            f"master database {path} has schema version {version}; this procurator "
            f"knows up to {SCHEMA_VERSION}"
        )
    if version < SCHEMA_VERSION and not migrate:
        raise PermanentError(
            f"master database {path} has schema version {version}, this procurator needs "
            f"{SCHEMA_VERSION}: run `procurator master migrate --database {path}`"
        )
    # Idempotent (IF NOT EXISTS, OR IGNORE): a crash half way through is
    # finished by the next open.
    db.executescript(_SCHEMA)
    db.execute("BEGIN IMMEDIATE")
    try:
        if version == 1:
            db.execute(_MIGRATE_FROM_1)
        columns = {row[1] for row in db.execute("PRAGMA table_info(worker_state)")}
        if "prepared" not in columns:
            db.execute(_MIGRATE_TO_8)
        if "transfers" not in columns:
            db.execute(_MIGRATE_TO_9)
        db.execute(
            "INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE "
            "SET value = excluded.value",
            (SCHEMA_VERSION,),
        )
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
