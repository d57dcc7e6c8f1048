"""``procurator master``: its flags, and the ``MasterConfig`` they make.

The master's flags are here and nowhere else; ``master_config`` turns them
into the one config object the composition root
(``procurator.app.master``) reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from procurator.app.master import (
    DEFAULT_DB,
    MASTER_METRICS_PORT,
    MasterConfig,
    master_main,
)
from procurator.cli.args import add_common, positive, tls_files
from procurator.rpc.address import DEFAULT_PORT
from procurator.rpc.master_server import DEFAULT_MAX_CONNECTIONS

__all__ = ["add_parser", "master_config"]


def add_parser(sub: Any) -> None:
    """Register ``master`` on the ``procurator`` parser."""
    p = sub.add_parser(
        "master",
        help="run the master (desired state, generations, pushes to workers)",
        description=(
            "Run the master: it stores the desired fleet in SQLite, hands out\n"
            "generations, and pushes each worker its assignment.\n\n"
            "example:\n  procurator master --listen 0.0.0.0:7300 --db /var/lib/procurator/master.db"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--listen",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        help=f"host:port or unix:/path to listen on (default: 127.0.0.1:{DEFAULT_PORT})",
    )
    p.add_argument("--db", default=DEFAULT_DB, help=f"SQLite database (default: {DEFAULT_DB})")
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


def master_config(args: argparse.Namespace) -> MasterConfig:
    """The master's config from its parsed flags."""
    return MasterConfig(
        listen=args.listen,
        db=Path(args.db),
        push_timeout=args.push_timeout,
        metrics_listen=args.metrics_listen,
        tls=tls_files(args),
        insecure=args.insecure,
        max_connections=args.max_connections,
        log_level=args.log_level,
        log_format=args.log_format,
    )
