"""``procurator certs init`` and ``procurator certs issue``: the command
around ``procurator.certs`` (the fleet's CA and certificates). Output is
printed only after a certificate and its key are both in place."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from procurator.certs import CA_DAYS, LEAF_DAYS, init_ca, issue
from procurator.cli.exits import EXIT_OK
from procurator.rpc.tls import Role, identity_uri

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    """Add ``certs init`` and ``certs issue`` to the ``procurator`` parser."""
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "certs",
        description=(
            "Make a small private CA and the certificates of a fleet's master,\n"
            "workers and operators (mutual TLS; see docs/SECURITY.md).\n\n"
            "example:\n"
            "  procurator certs init ./pki\n"
            "  procurator certs issue ./pki --master --san master.example.org\n"
            "  procurator certs issue ./pki --worker host-a\n"
            "  procurator certs issue ./pki --control ci"
        ),
        formatter_class=raw,
    )
    certs = p.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    init = certs.add_parser(
        "init",
        help="make a new CA (ca.crt, ca.key) in DIR",
        description="Make a new fleet CA in DIR.\n\nexample:\n  procurator certs init ./pki",
        formatter_class=raw,
    )
    init.add_argument("dir", help="directory for the CA and the certificates")
    init.add_argument("--days", type=int, default=CA_DAYS, help=f"validity (default {CA_DAYS})")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.set_defaults(handler=_run)

    iss = certs.add_parser(
        "issue",
        help="issue a master, worker or control certificate signed by DIR's CA",
        description=(
            "Issue a certificate signed by the CA in DIR; writes <role>-<name>.crt/.key\n"
            "(master.crt/.key for the master).\n\n"
            "example:\n  procurator certs issue ./pki --worker host-a"
        ),
        formatter_class=raw,
    )
    iss.add_argument("dir", help="directory holding ca.crt and ca.key")
    who = iss.add_mutually_exclusive_group(required=True)
    who.add_argument("--worker", metavar="ID", help="a worker's certificate (its worker id)")
    who.add_argument("--control", metavar="NAME", help="an operator's or CI's certificate")
    who.add_argument("--master", action="store_true", help="the master's server certificate")
    iss.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="extra DNS name or IP in the master's certificate (repeatable; master only)",
    )
    iss.add_argument("--days", type=int, default=LEAF_DAYS, help=f"validity (default {LEAF_DAYS})")
    iss.add_argument("--force", action="store_true", help="replace an existing certificate")
    iss.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    """Handler of ``procurator certs ...``; prints what it wrote."""
    directory = Path(args.dir)
    if args.certs_command == "init":
        paths = init_ca(directory, days=args.days, force=args.force)
        print(f"CA written: {paths.cert} (private key {paths.key}: keep it offline)")
        return EXIT_OK
    if args.master:
        role, name = Role.MASTER, ""
    elif args.worker is not None:
        role, name = Role.WORKER, args.worker
    else:
        role, name = Role.CONTROL, args.control
    paths = issue(directory, role, name, extra_sans=args.san, days=args.days, force=args.force)
    print(f"{identity_uri(role, name)}: {paths.cert} (key {paths.key})", file=sys.stdout)
    return EXIT_OK
