"""``procurator master``: its flags, and the ``MasterConfig`` they make;
``procurator master migrate / export / import`` for its database.

The master's flags are here and nowhere else; ``master_config`` turns them
into the one config object the composition root
(``procurator.app.master``) reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import trio

from procurator.app.master import (
    DEFAULT_DB,
    MASTER_METRICS_PORT,
    MasterConfig,
    export_fleet,
    import_fleet,
    master_main,
    migrate_database,
)
from procurator.cli.args import add_common, positive, tls_files
from procurator.cli.exits import EXIT_OK
from procurator.core.errors import ProcuratorError
from procurator.master.store import is_database_url
from procurator.master.store.codec import decode_dump, encode_dump
from procurator.rpc.address import DEFAULT_PORT
from procurator.rpc.master_server import DEFAULT_MAX_CONNECTIONS

__all__ = ["add_parser", "master_config"]


def add_parser(sub: Any) -> None:
    """Register ``master`` on the ``procurator`` parser."""
    p = sub.add_parser(
        "master",
        description=(
            "Run the master: it stores the desired fleet in its database, hands out\n"
            "generations, and pushes each worker its assignment.\n\n"
            "The database is a SQLite file (one master), or PostgreSQL: then several\n"
            "masters share it and all serve workers and clients, which are given\n"
            "every master (--master a:7300,b:7300,c:7300; docs/HA.md). Its schema is\n"
            "created or migrated when the master starts.\n\n"
            "commands on the database (each takes --database):\n"
            "  migrate   create or migrate the schema, then exit\n"
            "  export    print the fleet (desired state, generations, apply log,\n"
            "            request ids, removals) as JSON\n"
            "  import    load such a JSON into an empty database\n\n"
            "example:\n"
            "  procurator master --listen 0.0.0.0:7300 --db /var/lib/procurator/master.db\n"
            "  procurator master --listen 0.0.0.0:7300 \\\n"
            "    --database postgresql://procurator@db.example:5432/procurator\n"
            "  procurator master --database /var/lib/procurator/master.db export > fleet.json\n"
            "  procurator master --database postgresql://procurator@db.example/procurator "
            "import fleet.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--listen",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        help=f"host:port or unix:/path to listen on (default: 127.0.0.1:{DEFAULT_PORT})",
    )
    p.add_argument(
        "--database",
        "--db",
        dest="db",
        default=DEFAULT_DB,
        metavar="PATH|URL",
        help="a SQLite file (its directory is made, 0700, when missing), or "
        "postgresql://USER@HOST:PORT/DB for several masters on one database; a password "
        f"goes in ~/.pgpass or $PGPASSFILE, never in the URL (default: {DEFAULT_DB})",
    )
    p.add_argument(
        "--master-id",
        default="",
        metavar="ID",
        help="this master's name in the database and its logs, unique among the masters of "
        "one database (default: the host name and a random suffix)",
    )
    p.add_argument(
        "--worker-lease",
        type=positive,
        default=30.0,
        metavar="SECONDS",
        help="a worker's session outlives its master's last renewal this long; then the "
        "leader marks the worker lost (default: 30)",
    )
    p.add_argument(
        "--leader-lease",
        type=positive,
        default=15.0,
        metavar="SECONDS",
        help="the lease under which one master does what only one may (expiring workers' "
        "leases); a dead leader is replaced within about 4/3 of it (default: 15)",
    )
    p.add_argument(
        "--sync-interval",
        type=positive,
        default=5.0,
        metavar="SECONDS",
        help="how often the master compares its caches with the database, in case a change "
        "notification was lost (default: 5)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="connections served at once; more are refused with limitExceeded "
        f"(default: {DEFAULT_MAX_CONNECTIONS})",
    )
    p.add_argument(
        "--push-timeout",
        type=positive,
        default=10.0,
        help="seconds before a worker that does not take a push is disconnected (default: 10)",
    )
    p.add_argument(
        "--metrics-listen",
        default=f"127.0.0.1:{MASTER_METRICS_PORT}",
        help="host:port for Prometheus /metrics and HTTP service discovery /sd; '' for "
        f"none (default: 127.0.0.1:{MASTER_METRICS_PORT})",
    )
    add_common(p, daemon=True)
    p.set_defaults(handler=lambda args: master_main(master_config(args)))
    _add_database_commands(p)


def _add_database_commands(p: argparse.ArgumentParser) -> None:
    commands = p.add_subparsers(dest="database_command", metavar="{migrate,export,import}")
    raw = argparse.RawDescriptionHelpFormatter

    def database(q: argparse.ArgumentParser) -> None:
        # SUPPRESS: a --database given before the command is kept.
        q.add_argument(
            "--database",
            "--db",
            dest="db",
            default=argparse.SUPPRESS,
            metavar="PATH|URL",
            help=f"the database (default: the master's --database, else {DEFAULT_DB})",
        )
        # It prints and ends: not a daemon (procurator.cli), unlike ``master``.
        q.set_defaults(daemon=False)

    q = commands.add_parser(
        "migrate",
        help="create or migrate the database's schema, then exit",
        description=(
            "Create the database's schema, or migrate it to this release's (versioned,\n"
            "idempotent: running it twice changes nothing), then exit. A master does the\n"
            "same when it starts; run this ahead of a rolling upgrade.\n\n"
            "example:\n  procurator master migrate --database postgresql://procurator@db/procurator"
        ),
        formatter_class=raw,
    )
    database(q)
    q.set_defaults(handler=_migrate)
    q = commands.add_parser(
        "export",
        help="print the fleet in the database as JSON",
        description=(
            "Print the durable part of the database as JSON: the desired fleet, the\n"
            "generations, the apply log, request ids and removals (not sessions,\n"
            "statuses or events: workers report those again). A SQLite database is\n"
            "locked by its running master: stop it first.\n\n"
            "example:\n  procurator master export --database /var/lib/procurator/master.db "
            "> fleet.json"
        ),
        formatter_class=raw,
    )
    database(q)
    q.add_argument("-o", "--output", metavar="FILE", help="write to FILE, not stdout")
    q.set_defaults(handler=_export)
    q = commands.add_parser(
        "import",
        help="load an exported fleet into an empty database",
        description=(
            "Load what `procurator master export` printed into an empty database\n"
            "(its schema is created first). Generations go on from the exported\n"
            "one, so workers keep what they run. To move a fleet from SQLite to\n"
            "PostgreSQL: stop the master, export, import, start the masters on\n"
            "PostgreSQL (docs/HA.md).\n\n"
            "example:\n  procurator master import fleet.json "
            "--database postgresql://procurator@db/procurator"
        ),
        formatter_class=raw,
    )
    q.add_argument("file", help="the JSON export ('-' for stdin)")
    database(q)
    q.set_defaults(handler=_import)


def _migrate(args: argparse.Namespace) -> int:
    name = trio.run(migrate_database, args.db)
    print(f"{name}: schema is up to date")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    dump = trio.run(export_fleet, args.db)
    text = json.dumps(encode_dump(dump), indent=1) + "\n"
    if args.output:
        try:
            Path(args.output).write_text(text)
        except OSError as exc:
            raise ProcuratorError(f"{args.output}: cannot write: {exc}") from exc
    else:
        sys.stdout.write(text)
    print(
        f"exported generation {dump.generation}: {len(dump.workers)} worker(s), "
        f"{sum(len(w.vms) for w in dump.workers)} VM(s), {len(dump.applies)} apply(s)",
        file=sys.stderr,
    )
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    source = "stdin" if args.file == "-" else args.file
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        data = json.loads(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise ProcuratorError(f"{source}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ProcuratorError(f"{source}: not JSON: {exc}") from exc
    dump = decode_dump(data, source)
    name = trio.run(import_fleet, args.db, dump)
    print(
        f"{name}: imported generation {dump.generation}: {len(dump.workers)} worker(s), "
        f"{sum(len(w.vms) for w in dump.workers)} VM(s)"
    )
    return EXIT_OK


def master_config(args: argparse.Namespace) -> MasterConfig:
    """The master's config from its parsed flags."""
    return MasterConfig(
        listen=args.listen,
        db=args.db if is_database_url(args.db) else Path(args.db),
        push_timeout=args.push_timeout,
        metrics_listen=args.metrics_listen,
        tls=tls_files(args),
        insecure=args.insecure,
        max_connections=args.max_connections,
        log_level=args.log_level,
        log_format=args.log_format,
        master_id=args.master_id,
        worker_lease=args.worker_lease,
        leader_lease=args.leader_lease,
        sync_interval=args.sync_interval,
    )
