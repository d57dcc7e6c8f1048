"""What several commands parse alike: numbers a command can use, the
masters' addresses, TLS files and logging options. Flags only: no trio,
no Cap'n Proto (a command's ``--help`` imports this; connecting is
``procurator.cli.connect``'s).

``--master`` (else ``$PROCURATOR_MASTER``) names one master or several,
separated by commas (masters sharing one PostgreSQL database: docs/HA.md).

Every numeric flag is checked here, once: a value it cannot use (nan, inf,
a negative or zero interval, a count out of range) is a usage error (exit
2) naming the flag, before anything starts. ``float("nan")`` passes a plain
``value <= 0`` check (every comparison with nan is false) and inf would
make a wait endless, so both are refused explicitly.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from procurator.logs import DEFAULT_LOG_FORMAT, DEFAULT_LOG_LEVEL, LOG_FORMATS, LOG_LEVELS
from procurator.rpc.address import default_master_address
from procurator.rpc.tls import ENV_CA, ENV_CERT, ENV_KEY, TlsFiles

__all__ = [
    "add_common",
    "add_master_address",
    "add_tls_arguments",
    "int_between",
    "non_negative",
    "positive",
    "tls_files",
]


def positive(text: str) -> float:
    """A finite number > 0 (seconds, mostly)."""
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def non_negative(text: str) -> float:
    """A finite number >= 0."""
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text}")
    return value


def int_between(low: int, high: int) -> Callable[[str], int]:
    """An integer from ``low`` to ``high``, both included."""

    def integer(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}..{high}, not {text}")
        return value

    return integer


def add_master_address(p: argparse.ArgumentParser, *, what: str = "master address") -> None:
    """``--master``: where a command (or a worker) finds the masters."""
    default = default_master_address()
    p.add_argument(
        "--master",
        default=default,
        metavar="HOST:PORT[,HOST:PORT...]",
        help=f"{what}; several masters of one database, comma-separated, are tried in "
        f"order (default: $PROCURATOR_MASTER or {default})",
    )


def add_common(p: argparse.ArgumentParser, *, daemon: bool) -> None:
    """``--log-level`` (and, for a daemon, ``--log-format``) and the TLS
    options: what every command that talks to a master takes. ``daemon``
    is also the parsed ``args.daemon`` (procurator.cli: what a daemon
    failed to log is dropped; a command's output is not)."""
    p.set_defaults(daemon=daemon)
    p.add_argument(
        "--log-level",
        default=DEFAULT_LOG_LEVEL,
        choices=LOG_LEVELS,
        help=f"log verbosity (default: {DEFAULT_LOG_LEVEL})",
    )
    if daemon:
        p.add_argument(
            "--log-format",
            default=DEFAULT_LOG_FORMAT,
            choices=LOG_FORMATS,
            help=f"log lines as text or as JSON objects (default: {DEFAULT_LOG_FORMAT})",
        )
    add_tls_arguments(p)


def add_tls_arguments(p: argparse.ArgumentParser) -> None:
    """--tls-cert/--tls-key/--tls-ca/--insecure of every command that
    listens for or dials the master (see docs/SECURITY.md)."""
    tls = p.add_argument_group(
        "TLS",
        "Mutual TLS with certificates from the fleet CA (`procurator certs`). Required "
        "unless the master is on a loopback address or a unix socket.",
    )
    tls.add_argument("--tls-cert", metavar="PEM", help=f"this party's certificate (${ENV_CERT})")
    tls.add_argument("--tls-key", metavar="PEM", help=f"its private key (${ENV_KEY})")
    tls.add_argument("--tls-ca", metavar="PEM", help=f"the fleet CA certificate (${ENV_CA})")
    tls.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext on a non-loopback address: anyone on the network can read "
        "the traffic and act as any worker or operator",
    )


def tls_files(args: argparse.Namespace) -> TlsFiles | None:
    """The TLS files named by --tls-* (or $PROCURATOR_TLS_*), if any."""
    return TlsFiles.from_options(args.tls_cert, args.tls_key, args.tls_ca)
