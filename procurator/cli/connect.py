"""Connecting a command to a master: ``--master`` (one master or several,
comma-separated: docs/HA.md) and the TLS flags that ``procurator.cli.args``
parsed. A client command connects to the first that answers, in the order
given, and says on stderr when it had to skip one (``connect_master``)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

from procurator.app.masters import master_addresses
from procurator.cli.args import tls_files
from procurator.core.errors import UnavailableError
from procurator.rpc.address import Address
from procurator.rpc.bridge import Bridge
from procurator.rpc.clients import ControlClient, open_control

__all__ = ["MasterConnection", "connect_master", "control_from_args"]


@dataclass(frozen=True)
class MasterConnection:
    """A control client and the master it is connected to."""

    client: ControlClient
    address: Address


@contextlib.asynccontextmanager
async def connect_master(
    bridge: Bridge, args: argparse.Namespace
) -> AsyncIterator[MasterConnection]:
    """The first master of --master (in order) that answers; each one
    skipped is said on stderr. ``UnavailableError`` when none does (the
    master's own error when there is one master)."""
    addresses = master_addresses(args.master)
    tls = tls_files(args)
    skipped: list[tuple[Address, UnavailableError]] = []
    async with contextlib.AsyncExitStack() as stack:
        for address in addresses:
            try:
                client = await stack.enter_async_context(
                    open_control(bridge, address, tls=tls, insecure=args.insecure)
                )
            except UnavailableError as exc:
                skipped.append((address, exc))
                continue
            if skipped:
                reasons = "; ".join(f"{a}: {e}" for a, e in skipped)
                print(
                    f"procurator {args.command}: using the master at {address} "
                    f"({len(skipped)} did not answer: {reasons})",
                    file=sys.stderr,
                    flush=True,
                )
            yield MasterConnection(client, address)
            return
    if len(skipped) == 1:
        raise skipped[0][1]
    raise UnavailableError(
        f"none of the {len(skipped)} masters answered: "
        + "; ".join(f"{a}: {e}" for a, e in skipped)
    )


@contextlib.asynccontextmanager
async def control_from_args(
    bridge: Bridge, args: argparse.Namespace
) -> AsyncIterator[ControlClient]:
    """The control client of the first master of --master that answers
    (``connect_master``), with --tls-* and --insecure."""
    async with connect_master(bridge, args) as connection:
        yield connection.client
