"""``procurator master`` and ``procurator master migrate / export /
import`` (its database): what they run. Their flags are
``procurator.cli.parsers.master``'s (no trio, no Cap'n Proto: ``--help``
needs neither); ``master_config`` turns them into the one config object
the composition root (``procurator.app.master``) reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

from procurator.app.master import (
    MasterConfig,
    export_fleet,
    import_fleet,
    master_main,
    migrate_database,
)
from procurator.cli.args import tls_files
from procurator.cli.exits import EXIT_OK
from procurator.core.errors import ProcuratorError
from procurator.master.store import is_database_url
from procurator.master.store.codec import decode_dump, encode_dump

__all__ = ["export", "import_dump", "master_config", "migrate", "run"]


def run(args: argparse.Namespace) -> int:
    """``procurator master``: run it with the config its flags make."""
    return master_main(master_config(args))


def migrate(args: argparse.Namespace) -> int:
    name = trio.run(migrate_database, args.db)
    print(f"{name}: schema is up to date")
    return EXIT_OK


def export(args: argparse.Namespace) -> int:
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


def import_dump(args: argparse.Namespace) -> int:
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
