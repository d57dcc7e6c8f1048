"""The master's database: one port (``port.Store``), two adapters.

- ``SqliteStore`` (``sqlite.py``): the embedded default, one master per
  file, no server to run.
- ``PostgresStore`` (``postgres.py``): several masters on one database,
  which the operator runs replicated (docs/HA.md).

Both run the same SQL (``_sql.py``) and pass the same contract tests. What
the store holds: the desired fleet under its generations (minted inside
the apply's transaction), the apply log with op ids and request ids, the
removals workers have not confirmed, every worker's session and lease, its
latest status (per-VM rows) and recent events, and leader leases. A master
keeps caches of it for speed, nothing a second master could not rebuild
from it (``procurator.master.service``).

Only the adapters import ``sqlite3`` and ``psycopg`` (import contracts in
``pyproject.toml``); :func:`open_store` picks one by the URL.
"""

from __future__ import annotations

from pathlib import Path

from procurator.master.store.model import (
    REQUESTS_KEPT,
    SCHEMA_VERSION,
    AppliedRequest,
    Change,
    ChangeKind,
    Fence,
    FencedError,
    FleetDelta,
    FleetDump,
    LeaseState,
    Registration,
    Removal,
    RemovalAck,
    RequestRecordedError,
    SessionEndedError,
    StatusWrite,
    StatusWritten,
    StoredFleet,
    StoredWorker,
    StoreUnavailableError,
    Versions,
    WorkerDump,
)
from procurator.master.store.port import OnChange, OnHealth, Store
from procurator.master.store.sqlite import SqliteStore

__all__ = [
    "REQUESTS_KEPT",
    "SCHEMA_VERSION",
    "AppliedRequest",
    "Change",
    "ChangeKind",
    "Fence",
    "FencedError",
    "FleetDelta",
    "FleetDump",
    "FleetStore",
    "LeaseState",
    "OnChange",
    "OnHealth",
    "Registration",
    "Removal",
    "RemovalAck",
    "RequestRecordedError",
    "SessionEndedError",
    "SqliteStore",
    "StatusWrite",
    "StatusWritten",
    "Store",
    "StoreUnavailableError",
    "StoredFleet",
    "StoredWorker",
    "Versions",
    "WorkerDump",
    "is_database_url",
    "open_store",
    "sqlite_path",
]

FleetStore = SqliteStore
"""The name of the SQLite store before the port existed (tests use it)."""


def is_database_url(text: str) -> bool:
    """A PostgreSQL URL (else: a SQLite path, or ``sqlite:///path``)."""
    return text.startswith(("postgresql://", "postgres://"))


def sqlite_path(database: str) -> Path | None:
    """The SQLite file ``database`` names (a path, or ``sqlite:///path``);
    None for a PostgreSQL URL."""
    if is_database_url(database):
        return None
    return Path(database.removeprefix("sqlite://"))


async def open_store(
    database: str,
    *,
    application_name: str = "procurator-master",
    pool_size: int = 8,
    requests_kept: int = REQUESTS_KEPT,
    migrate: bool = True,
) -> Store:
    """Open the store ``database`` names: ``postgresql://...`` (or
    ``postgres://``) for PostgreSQL, else a SQLite file (a path, or
    ``sqlite:///path``)."""
    if is_database_url(database):
        # Imported here: a master on SQLite never loads psycopg.
        from procurator.master.store.postgres import PostgresStore  # noqa: PLC0415

        return await PostgresStore.open(
            database,
            application_name=application_name,
            pool_size=pool_size,
            requests_kept=requests_kept,
            migrate=migrate,
        )
    path = sqlite_path(database)
    assert path is not None
    return await SqliteStore.open(path, requests_kept=requests_kept, migrate=migrate)
