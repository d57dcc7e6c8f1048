"""The highly available store: PostgreSQL through psycopg 3, for several
masters on one database (docs/HA.md).

The semantics are ``_sql``'s, shared with SQLite; what is PostgreSQL's own:

- **Transactions**: writes run at READ COMMITTED and take row locks in the
  order ``_sql`` documents (``FOR UPDATE`` on the generation row makes the
  applies of all masters take turns; ``FOR SHARE`` on the lease row fences
  a singleton duty's write); reads run at REPEATABLE READ, READ ONLY (one
  snapshot). A serialization failure or deadlock runs the transaction
  again (up to ``_ATTEMPTS`` times).
- **Durability by what is written**: applies, confirmed removals, leases
  and imports commit with the server's ``synchronous_commit``; status
  reports, sessions and events with ``synchronous_commit = off`` (a crash
  of the database may lose the last ones, never half of one; workers send
  them again).
- **Notifications**: every write says what it changed with ``NOTIFY
  procurator, '<change>'`` (``model.Change``), delivered to every
  listening master when it commits; ``watch`` listens on a connection of
  its own, read without a thread (``trio.lowlevel.wait_readable`` on its
  socket), and says ``RESYNC`` after every reconnect, because what was
  notified meanwhile is lost. A lost notification delays a change, never
  loses it: the service compares versions periodically too.
- **Connections**: a ``psycopg_pool.ConnectionPool`` (``pool_size``, each
  checked before use, so one broken by a database restart is replaced, not
  failed on); every blocking call runs in a worker thread through
  ``trio.to_thread.run_sync`` with a ``CapacityLimiter`` of the pool's
  size. ``application_name`` names the master in ``pg_stat_activity``.
  Statements time out after ``statement_timeout`` (30 s), a transaction
  left idle (its master paused) is ended after 60 s.
- **Errors**: a database that cannot be reached (refused, gone, shutting
  down, no free connection within ``connect_timeout``) is
  ``UnavailableError`` naming it (as ``name``: a URL without password);
  anything else psycopg raises is ``ProcuratorError``.
- **Schema**: versioned migrations (``_MIGRATIONS``) run in one
  transaction under an advisory lock when a store opens (``migrate``, the
  default) or by ``procurator master migrate``; masters starting together
  migrate once. A newer schema is refused, an older one without
  ``migrate`` too.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg.conninfo
import psycopg_pool
import trio

from procurator.core.backoff import RestartPolicy
from procurator.core.errors import PermanentError, ProcuratorError
from procurator.master.store import _sql
from procurator.master.store._base import SqlStore
from procurator.master.store.model import (
    REQUESTS_KEPT,
    SCHEMA_VERSION,
    Change,
    ChangeKind,
    StoreUnavailableError,
)
from procurator.master.store.port import OnChange, OnHealth

__all__ = ["CHANNEL", "PostgresStore", "display_url"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

CHANNEL = "procurator"
_ATTEMPTS = 3
# pg_advisory_xact_lock key of migrations: "procurat" in ASCII.
_MIGRATION_LOCK = 0x70726F6375726174

_SCHEMA_V3 = """
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    generation BIGINT NOT NULL,
    op_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS workers_by_generation ON workers(generation);
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
    generation BIGINT PRIMARY KEY,
    op_id TEXT NOT NULL,
    unix_ms BIGINT NOT NULL,
    workers_changed INTEGER NOT NULL,
    request_id TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    generation BIGINT NOT NULL UNIQUE REFERENCES applies(generation),
    fleet_digest TEXT NOT NULL,
    diffs BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS removals (
    worker_id TEXT NOT NULL,
    vm_id TEXT NOT NULL,
    generation BIGINT NOT NULL,
    acked_unix_ms BIGINT,
    PRIMARY KEY (worker_id, vm_id)
);
CREATE TABLE IF NOT EXISTS worker_state (
    worker_id TEXT PRIMARY KEY,
    version BIGINT NOT NULL,
    master_id TEXT NOT NULL DEFAULT '',
    session BIGINT NOT NULL DEFAULT 0,
    info TEXT NOT NULL DEFAULT '',
    connected BOOLEAN NOT NULL DEFAULT FALSE,
    since_unix_ms BIGINT NOT NULL DEFAULT 0,
    renewed_unix_ms BIGINT NOT NULL DEFAULT 0,
    expires_unix_ms BIGINT NOT NULL DEFAULT 0,
    observed_generation BIGINT,
    reported_unix_ms BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS worker_state_by_master ON worker_state(master_id) WHERE connected;
CREATE TABLE IF NOT EXISTS vm_status (
    worker_id TEXT NOT NULL,
    vm_id TEXT NOT NULL,
    status TEXT NOT NULL,
    PRIMARY KEY (worker_id, vm_id)
);
CREATE TABLE IF NOT EXISTS events (
    seq BIGINT PRIMARY KEY,
    worker_id TEXT NOT NULL,
    vm_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    op_id TEXT NOT NULL,
    unix_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_vm ON events(vm_id, seq);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    expires_unix_ms BIGINT NOT NULL
);
INSERT INTO meta VALUES ('generation', 0) ON CONFLICT (key) DO NOTHING;
INSERT INTO meta VALUES ('event_seq', 0) ON CONFLICT (key) DO NOTHING;
"""

# 4: the unpinned VMs' placement rules and the strategy (PlacementRecord).
_SCHEMA_V4 = """
CREATE TABLE IF NOT EXISTS unpinned (
    vm_id TEXT PRIMARY KEY,
    rules TEXT NOT NULL
);
INSERT INTO meta VALUES ('strategy', 0) ON CONFLICT (key) DO NOTHING;
"""

# 5: the snapshots workers last reported (docs/SNAPSHOTS.md).
_SCHEMA_V5 = """
CREATE TABLE IF NOT EXISTS snapshots (
    worker_id TEXT NOT NULL,
    vm_id TEXT NOT NULL,
    name TEXT NOT NULL,
    info TEXT NOT NULL,
    PRIMARY KEY (worker_id, vm_id, name)
);
"""

# 6: workers' modes (cordon, drain and its progress) and handoffs
# (procurator.core.drain).
_SCHEMA_V6 = """
CREATE TABLE IF NOT EXISTS worker_modes (
    worker_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    op_id TEXT NOT NULL,
    since_unix_ms BIGINT NOT NULL,
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
    generation BIGINT NOT NULL,
    started_unix_ms BIGINT NOT NULL
);
"""

# 7: rollouts (procurator.core.rollout), one JSON document each.
_SCHEMA_V7 = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL UNIQUE,
    active BOOLEAN NOT NULL,
    state TEXT NOT NULL
);
"""

# 8: each worker's prepared images (WorkerStatus.prepared), written with its
# status ("": none, as an older row reads).
_SCHEMA_V8 = """
ALTER TABLE worker_state ADD COLUMN IF NOT EXISTS prepared TEXT NOT NULL DEFAULT '';
"""

# 9: moves (procurator.core.move), one row each; at most one under way
# per VM; each worker's transfers (a move's disks), written with its status.
_SCHEMA_V9 = """
CREATE TABLE IF NOT EXISTS moves (
    op_id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL,
    source_worker TEXT NOT NULL,
    target_worker TEXT NOT NULL,
    kind TEXT NOT NULL,
    phase TEXT NOT NULL,
    power TEXT NOT NULL,
    generation BIGINT NOT NULL,
    started_unix_ms BIGINT NOT NULL,
    updated_unix_ms BIGINT NOT NULL,
    deadline_unix_ms BIGINT NOT NULL,
    reason TEXT NOT NULL,
    active BOOLEAN NOT NULL,
    token TEXT NOT NULL DEFAULT '',
    image TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS moves_under_way ON moves(vm_id) WHERE active;
ALTER TABLE worker_state ADD COLUMN IF NOT EXISTS transfers TEXT NOT NULL DEFAULT '';
"""

# (version, what brings the schema from the one before to it). PostgreSQL
# stores start at 3, the version of SQLite's schema with the same tables.
_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (3, _SCHEMA_V3),
    (4, _SCHEMA_V4),
    (5, _SCHEMA_V5),
    (6, _SCHEMA_V6),
    (7, _SCHEMA_V7),
    (8, _SCHEMA_V8),
    (9, _SCHEMA_V9),
)

_DIALECT = {
    "now": "(extract(epoch from clock_timestamp()) * 1000)::bigint",
    "now_us": "(extract(epoch from clock_timestamp()) * 1000000)::bigint",
    "lock": "FOR UPDATE",
    "share": "FOR SHARE",
    "greatest": "greatest",
    # A worker_state row's next version (procurator.master.store._sql).
    "next_version": "greatest(worker_state.version + 1, "
    "(extract(epoch from clock_timestamp()) * 1000000)::bigint)",
}

_UNAVAILABLE: tuple[type[Exception], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg_pool.PoolTimeout,
    psycopg_pool.PoolClosed,
)
_RETRIED: tuple[type[Exception], ...] = (
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
)


def display_url(url: str) -> str:
    """``url`` as messages show it: user, host, port and database, never a
    password or other parameters."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    user = params.get("user")
    host = params.get("host") or "localhost"
    port = params.get("port") or 5432
    return f"postgresql://{f'{user}@' if user else ''}{host}:{port}/{params.get('dbname', '')}"


@functools.lru_cache(maxsize=256)
def _dialect(sql: str) -> str:
    return sql.format(**_DIALECT).replace("?", "%s")


class _Tx:
    """``_sql.Tx`` on one pooled connection inside ``transaction()``.
    Notifications are sent together before the commit."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self.changes: list[str] = []

    def run(self, sql: str, params: Sequence[Any] = ()) -> list[_sql.Row]:
        cursor = self._conn.execute(_dialect(sql), params)
        return cursor.fetchall() if cursor.description is not None else []

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        if not rows:
            return 0
        with self._conn.cursor() as cursor:
            cursor.executemany(_dialect(sql), rows)
            return cursor.rowcount

    def count(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(_dialect(sql), params).rowcount

    def notify(self, change: Change) -> None:
        payload = change.payload()
        if payload not in self.changes:
            self.changes.append(payload)

    def send_notifications(self) -> None:
        if self.changes:
            self._conn.execute(
                "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p", (CHANNEL, self.changes)
            )


class PostgresStore(SqlStore):
    """Open with :meth:`open`, close with :meth:`aclose` (or ``async with``)."""

    single_master = False

    def __init__(
        self,
        url: str,
        pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]],
        kwargs: dict[str, Any],
        *,
        pool_size: int,
        requests_kept: int = REQUESTS_KEPT,
        reconnect: RestartPolicy | None = None,
    ) -> None:
        self._url = url
        self._kwargs = kwargs
        self._pool = pool
        self._limiter = trio.CapacityLimiter(pool_size)
        self._display = display_url(url)
        self.requests_kept = requests_kept
        self._reconnect = reconnect or RestartPolicy(
            initial_delay=0.2, multiplier=2.0, max_delay=5.0, jitter=0.2
        )

    @property
    def name(self) -> str:
        return self._display

    def describe(self) -> str:
        return f"database {self._display}"

    # ------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        application_name: str = "procurator-master",
        pool_size: int = 8,
        requests_kept: int = REQUESTS_KEPT,
        migrate: bool = True,
        connect_timeout: float = 5.0,
        statement_timeout: float = 30.0,
    ) -> PostgresStore:
        """Connect (checking the schema, migrating it unless ``migrate`` is
        False) and open the pool."""
        if requests_kept < 1:
            raise ValueError(f"requests_kept must be at least 1, not {requests_kept}")
        if pool_size < 2:
            raise ValueError(f"pool_size must be at least 2, not {pool_size}")
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "application_name": application_name[:63],
            "connect_timeout": max(1, round(connect_timeout)),
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "options": f"-c statement_timeout={round(statement_timeout * 1000)} "
            "-c idle_in_transaction_session_timeout=60000",
        }
        display = display_url(url)
        await trio.to_thread.run_sync(_prepare_schema, url, kwargs, display, migrate)
        pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = psycopg_pool.ConnectionPool(
            url,
            kwargs=kwargs,
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=connect_timeout,
            check=psycopg_pool.ConnectionPool.check_connection,
            reconnect_timeout=float("inf"),
            name=f"procurator {display}",
        )
        try:
            await trio.to_thread.run_sync(
                functools.partial(pool.open, wait=True, timeout=connect_timeout + 1)
            )
        except psycopg_pool.PoolTimeout as exc:
            await trio.to_thread.run_sync(pool.close)
            raise StoreUnavailableError(f"database {display} is unavailable: {exc}") from exc
        return cls(url, pool, kwargs, pool_size=pool_size, requests_kept=requests_kept)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._pool.close)

    async def __aenter__(self) -> PostgresStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------ transactions

    async def _read(self, fn: Callable[[_sql.Tx], T], what: str) -> T:
        return await self._call(fn, what, read=True, durable=True)

    async def _write(self, fn: Callable[[_sql.Tx], T], what: str, *, durable: bool = True) -> T:
        return await self._call(fn, what, read=False, durable=durable)

    async def _call(self, fn: Callable[[_sql.Tx], T], what: str, *, read: bool, durable: bool) -> T:
        def attempt() -> T:
            with self._pool.connection() as conn:
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ if read else None
                conn.read_only = True if read else None
                with conn.transaction():
                    if not durable:
                        conn.execute("SET LOCAL synchronous_commit = off")
                    tx = _Tx(conn)
                    result = fn(tx)
                    tx.send_notifications()
                return result

        def guarded() -> T:
            for left in reversed(range(_ATTEMPTS)):
                try:
                    return attempt()
                except ProcuratorError:
                    raise
                except _RETRIED as exc:
                    if not left:
                        raise StoreUnavailableError(
                            f"database {self._display}: {what}: {_first_line(exc)} "
                            f"({_ATTEMPTS} attempts); nothing was changed"
                        ) from exc
                except _UNAVAILABLE as exc:
                    raise StoreUnavailableError(
                        f"database {self._display} is unavailable: {what}: {_first_line(exc)}"
                    ) from exc
                except psycopg.Error as exc:
                    raise ProcuratorError(
                        f"database {self._display}: {what}: {_first_line(exc)}"
                    ) from exc
            raise AssertionError("unreachable")

        return await trio.to_thread.run_sync(guarded, limiter=self._limiter)

    # ------------------------------------------------------------ notifications

    async def watch(
        self,
        on_change: OnChange,
        on_health: OnHealth,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        failures = 0
        started = False
        while True:
            try:
                conn = await trio.to_thread.run_sync(self._listen)
            except psycopg.Error as exc:
                failures += 1
                on_health(False, f"database {self._display} is unavailable: {_first_line(exc)}")
            else:
                failures = 0
                try:
                    on_health(True, "")
                    on_change(Change(ChangeKind.RESYNC))
                    if not started:
                        started = True
                        task_status.started()
                    await _pump(conn, on_change)
                except psycopg.Error as exc:
                    failures = 1
                    on_health(False, f"database {self._display} is unavailable: {_first_line(exc)}")
                finally:
                    conn.close()
            if not started:
                started = True
                task_status.started()
            await trio.sleep(self._reconnect.delay(max(failures, 1), draw=random.random()))

    def _listen(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._url, **self._kwargs)
        try:
            conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            conn.close()
            raise
        return conn


async def _pump(conn: psycopg.Connection[Any], on_change: OnChange) -> None:
    """Hand every notification to ``on_change`` until the connection
    breaks (``psycopg.OperationalError``)."""
    pgconn = conn.pgconn
    while True:
        await trio.lowlevel.wait_readable(pgconn.socket)
        pgconn.consume_input()
        while (notification := pgconn.notifies()) is not None:
            change = Change.parse(notification.extra.decode(errors="replace"))
            if change is not None:
                on_change(change)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _prepare_schema(url: str, kwargs: dict[str, Any], display: str, migrate: bool) -> None:
    """Check the schema version and migrate (see the module docstring)."""
    try:
        with psycopg.connect(url, **kwargs) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)"
            )
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise PermanentError(
                    f"database {display} has schema version {version}; this procurator knows "
                    f"up to {SCHEMA_VERSION}"
                )
            if version < SCHEMA_VERSION and not migrate:
                raise PermanentError(
                    f"database {display} has schema version {version}, this procurator needs "
                    f"{SCHEMA_VERSION}: run `procurator master migrate --database URL`"
                )
            for target, script in _MIGRATIONS:
                if target > version:
                    conn.execute(script.encode())
                    logger.info("database %s: schema migrated to version %d", display, target)
            conn.execute(
                "INSERT INTO meta VALUES ('schema_version', %s) ON CONFLICT (key) DO UPDATE "
                "SET value = excluded.value",
                (SCHEMA_VERSION,),
            )
    except ProcuratorError:
        raise
    except _UNAVAILABLE as exc:
        raise StoreUnavailableError(
            f"database {display} is unavailable: {_first_line(exc)}"
        ) from exc
    except psycopg.Error as exc:
        raise PermanentError(f"database {display}: cannot prepare: {_first_line(exc)}") from exc
