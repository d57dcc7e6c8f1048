"""The master's composition root: a ``MasterConfig`` in, a master out.

The one place that wires the RPC adapter (``procurator.rpc``: the bridge
and the Cap'n Proto server) to the master's service, store and metrics
(``procurator.master``), which know nothing of Cap'n Proto.

- ``run_master(config)`` runs a master in this process until cancelled
  (the tests run it so); ``task_status.started`` gets the bound address.
- ``master_main(config)`` is the ``procurator master`` process: logging,
  the open-file limit, run until SIGTERM or SIGINT.
- ``migrate_database``, ``export_fleet``, ``import_fleet``: ``procurator
  master migrate / export / import`` (moving a fleet from SQLite to
  PostgreSQL: docs/HA.md).

The database (``MasterConfig.db``) is a SQLite file, or a PostgreSQL URL
for several masters on one database (``procurator.master.store``); its
schema is migrated when the master starts. A SQLite file's directory is
made when it is missing (mode 0700: the database holds the fleet), so the
default ``/var/lib/procurator/master.db`` works on a fresh host; ``export``
reads only what exists.

Before it creates or opens anything, a master refuses what it would
refuse anyway (plaintext off loopback without ``insecure``, TLS files that
do not load, a metrics address that is not ``HOST:PORT``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import trio

from procurator import logs
from procurator.app._process import host_port, raise_open_file_limit, run_until_signalled
from procurator.core.defaults import (
    DEFAULT_DB,
    DEFAULT_LEADER_LEASE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PUSH_TIMEOUT,
    DEFAULT_SYNC_INTERVAL,
    DEFAULT_WORKER_LEASE,
    MASTER_METRICS_PORT,
)
from procurator.core.errors import PermanentError
from procurator.master.http import run_master_http
from procurator.master.metrics import MasterInstruments, MasterMetrics
from procurator.master.service import MasterService, default_master_id
from procurator.master.store import FleetDump, Store, open_store, sqlite_path
from procurator.rpc.address import DEFAULT_MASTER_ADDRESS, Address, parse_address
from procurator.rpc.bridge import open_bridge
from procurator.rpc.master_server import ConnectionDeadlines, serve_master
from procurator.rpc.tls import TlsFiles, require_secure, server_context

__all__ = [
    "DEFAULT_DB",
    "MASTER_METRICS_PORT",
    "MasterConfig",
    "export_fleet",
    "import_fleet",
    "master_main",
    "migrate_database",
    "run_master",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MasterConfig:
    """Everything a master is configured with (``procurator master``'s flags)."""

    # "host:port" or "unix:/path"; by default where clients look for it.
    listen: str = DEFAULT_MASTER_ADDRESS
    # A SQLite file (one master), or postgresql://... (several: docs/HA.md).
    db: Path | str = Path(DEFAULT_DB)
    push_timeout: float = DEFAULT_PUSH_TIMEOUT
    metrics_listen: str = ""  # "host:port" of /metrics and /sd; "" for none
    tls: TlsFiles | None = None  # mutual TLS; required off loopback unless insecure
    insecure: bool = False
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    log_level: str = logs.DEFAULT_LOG_LEVEL  # debug, info, warning, error
    log_format: str = logs.DEFAULT_LOG_FORMAT  # text or json
    # Unique among the masters of one database; "": the host name and a
    # random suffix (procurator.master.service.default_master_id).
    master_id: str = ""
    # A session outlives its master's last renewal so long.
    worker_lease: float = DEFAULT_WORKER_LEASE
    leader_lease: float = DEFAULT_LEADER_LEASE  # procurator.master.leader
    sync_interval: float = DEFAULT_SYNC_INTERVAL  # the periodic comparison with the database


def master_main(config: MasterConfig) -> int:
    """The ``procurator master`` process: logs to stderr, raises the
    open-file limit for ``max_connections``, runs until SIGTERM or SIGINT.
    Returns the exit status (0); errors propagate."""
    logs.configure(config.log_level, config.log_format)
    _open_files_for(config.max_connections)
    run_until_signalled(run_master, config)
    return 0


async def run_master(
    config: MasterConfig, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a master until cancelled; ``task_status.started`` gets the bound
    address. A master that would refuse its address (plaintext off loopback
    without ``insecure``) or its TLS files does so before it creates or
    opens anything."""
    address = parse_address(config.listen)
    if config.tls is not None:
        server_context(config.tls)  # PermanentError naming the file that is wrong
    elif not config.insecure:
        require_secure(address, None, insecure=False, what="the master listening on")
    metrics_at = host_port(config.metrics_listen) if config.metrics_listen else None
    master_id = config.master_id or default_master_id()
    _make_directory(config.db)
    async with open_bridge() as bridge, _opened(config.db, master_id) as store:
        instruments = MasterInstruments()
        service = MasterService(
            instruments.store(store),
            push_timeout=config.push_timeout,
            master_id=master_id,
            worker_lease=config.worker_lease,
            leader_lease=config.leader_lease,
            sync_interval=config.sync_interval,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            if metrics_at is not None:
                await nursery.start(_serve_metrics, service, metrics_at, instruments)
            serve = functools.partial(
                serve_master,
                tls=config.tls,
                insecure=config.insecure,
                max_connections=config.max_connections,
                deadlines=ConnectionDeadlines.for_worker_lease(config.worker_lease),
            )
            bound = await nursery.start(serve, bridge, instruments.backend(service), address)
            task_status.started(bound)


@contextlib.asynccontextmanager
async def _opened(database: Path | str, master_id: str = "") -> AsyncIterator[Store]:
    """The store ``database`` names, open (its schema migrated)."""
    store = await open_store(
        str(database), application_name=f"procurator-master/{master_id or 'tool'}"
    )
    try:
        yield store
    finally:
        await store.aclose()


def _make_directory(database: Path | str) -> None:
    """A SQLite database's directory, made (with its parents) when missing;
    0700, as the database holds the fleet. An existing one is left as it
    is; a PostgreSQL database is the server's business."""
    path = sqlite_path(str(database))
    if path is None or path.parent.is_dir():
        return
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise PermanentError(f"database directory {path.parent}: {exc.strerror or exc}") from exc
    logger.info("made the database directory %s (mode 0700)", path.parent)


async def migrate_database(database: Path | str) -> str:
    """Create or migrate the schema of ``database`` (what a master does when
    it starts); returns the database's name for messages."""
    _make_directory(database)
    async with _opened(database) as store:
        return store.name


async def export_fleet(database: Path | str) -> FleetDump:
    """The durable part of ``database`` (``FleetDump``). A SQLite database
    cannot be read while its master runs (it holds the file's lock)."""
    async with _opened(database) as store:
        return await store.export()


async def import_fleet(database: Path | str, dump: FleetDump) -> str:
    """Load ``dump`` into ``database``, which must be empty; returns its
    name for messages."""
    _make_directory(database)
    async with _opened(database) as store:
        await store.import_dump(dump)
        return store.name


async def _serve_metrics(
    service: MasterService,
    at: tuple[str, int],
    instruments: MasterInstruments,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """/metrics and /sd. The HTTP server's threads read a FleetView that a
    trio task refreshes every second: they never touch trio-owned state."""
    latest = [service.fleet_view()]
    metrics = MasterMetrics(lambda: latest[0], instruments=instruments)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(run_master_http, metrics, *at)
        logger.info("master metrics at %s", server.url("/metrics"))
        task_status.started()
        while True:
            await trio.sleep(1.0)
            latest[0] = service.fleet_view()


def _open_files_for(connections: int) -> None:
    """Every connection is a descriptor: take the hard open-file limit, and
    say so when the cap cannot be reached anyway (the master would fail on
    EMFILE before refusing politely)."""
    soft = raise_open_file_limit()
    spare = 64  # the database, the HTTP server, logs, the bridge
    if connections + spare > soft:
        logger.warning(
            "--max-connections %d is more than the open-file limit allows (%d, %d of them "
            "kept for the rest); raise LimitNOFILE / ulimit -n",
            connections,
            soft,
            spare,
        )
