"""``procurator snapshot create|list|delete|restore``: VM snapshots.

A snapshot is a VM's memory, device state and writable disks at one
instant, kept by the worker that runs the VM (docs/SNAPSHOTS.md). The
master forwards each command to that worker and answers once it is done;
``list`` shows what the workers answer, or what the master recorded of
those that are away.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import trio

from procurator.cli.args import add_common, add_master_address, control_from_args
from procurator.cli.exits import EXIT_OK
from procurator.cli.pipes import run_reader
from procurator.core.snapshot import SnapshotAction, SnapshotInfo, SnapshotRequest
from procurator.rpc.bridge import open_bridge

__all__ = ["add_parser", "snapshot_json"]


def snapshot_json(info: SnapshotInfo) -> dict[str, Any]:
    return {
        "vm": info.vm_id,
        "name": info.name,
        "worker": info.worker_id,
        "hash": info.hash,
        "image": info.image,
        "size_bytes": info.size_bytes,
        "created_unix_ms": info.created_unix_ms,
        "op_id": info.op_id,
        "driver": info.driver,
    }


def _when(unix_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_ms / 1000))


def _size(n: int) -> str:
    return f"{n / (1 << 30):.1f}G" if n >= 1 << 30 else f"{n / (1 << 20):.0f}M"


def print_snapshots(infos: Sequence[SnapshotInfo], out: TextIO) -> None:
    rows = [("VM", "NAME", "WORKER", "HASH", "SIZE", "CREATED", "OP")]
    rows += [
        (
            i.vm_id,
            i.name,
            i.worker_id,
            i.hash[:12],
            _size(i.size_bytes),
            _when(i.created_unix_ms),
            i.op_id,
        )
        for i in infos
    ]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


async def _act(args: argparse.Namespace) -> int:
    action = SnapshotAction(args.action)
    request = SnapshotRequest(action, args.vm, args.name or "", force=getattr(args, "force", False))
    async with open_bridge() as bridge, control_from_args(bridge, args) as client:
        info = await client.snapshot(request)
    if args.json:
        json.dump(snapshot_json(info), sys.stdout)
        print()
        return EXIT_OK
    done = {"create": "created", "delete": "deleted", "restore": "restored"}[args.action]
    print(f"snapshot {info.vm_id}/{info.name} {done} on worker {info.worker_id}")
    if action is SnapshotAction.RESTORE:
        print(
            "note: the guest's clock is as it was when the snapshot was taken, "
            "until the guest corrects it (docs/SNAPSHOTS.md)"
        )
    return EXIT_OK


async def _list(args: argparse.Namespace) -> int:
    async with open_bridge() as bridge, control_from_args(bridge, args) as client:
        infos = await client.list_snapshots(args.vm or "")
    if args.json:
        for info in infos:
            print(json.dumps(snapshot_json(info)))
    else:
        print_snapshots(infos, sys.stdout)
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """Register ``snapshot`` and its four commands."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = sub.add_parser(
        "snapshot",
        description=(
            "Snapshots of a VM's memory, devices and writable disks, kept by the\n"
            "worker that runs it (docs/SNAPSHOTS.md). Names: 1-63 characters of\n"
            "a-z, 0-9 and '-'. A restore loads only a snapshot of the VM's\n"
            "current image hash unless --force; the guest's clock is then behind.\n\n"
            "example:\n  procurator snapshot create web-1 before-upgrade\n"
            "  procurator snapshot list\n  procurator snapshot restore web-1 before-upgrade\n"
            "  procurator snapshot delete web-1 before-upgrade"
        ),
        formatter_class=raw,
    )
    commands = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="machine-readable output")
        add_master_address(p)
        add_common(p, daemon=False)

    p = commands.add_parser(
        "create",
        help="snapshot a running VM (paused meanwhile)",
        description=(
            "Snapshot a running VM: its memory, devices and writable disks. The\n"
            "guest is paused while it is taken, then runs on.\n\n"
            "example:\n  procurator snapshot create web-1 before-upgrade"
        ),
        formatter_class=raw,
    )
    p.add_argument("vm", help="the VM's id")
    p.add_argument("name", nargs="?", help="the snapshot's name (default: its UTC time)")
    common(p)
    p.set_defaults(handler=lambda args: trio.run(_act, args))

    p = commands.add_parser(
        "list",
        help="list snapshots, of one VM or of the fleet",
        description=(
            "List snapshots, oldest first: one VM's, or the fleet's. Workers\n"
            "connected to the master are asked; of the others the master shows\n"
            "what it recorded of them last.\n\n"
            "example:\n  procurator snapshot list\n  procurator snapshot list web-1 --json"
        ),
        formatter_class=raw,
    )
    p.add_argument("vm", nargs="?", help="only this VM's snapshots")
    common(p)
    p.set_defaults(handler=lambda args: trio.run(run_reader, _list, args))

    p = commands.add_parser(
        "delete",
        help="delete a snapshot",
        description="Delete a snapshot.\n\nexample:\n  procurator snapshot delete web-1 old",
        formatter_class=raw,
    )
    p.add_argument("vm", help="the VM's id")
    p.add_argument("name", help="the snapshot's name")
    common(p)
    p.set_defaults(handler=lambda args: trio.run(_act, args))

    p = commands.add_parser(
        "restore",
        help="put a VM back as a snapshot found it",
        description=(
            "Put a VM back as the snapshot found it: disks, memory, devices. Its\n"
            "VMM is replaced; the guest's clock is then behind until it corrects\n"
            "it. Only a snapshot of the VM's current image hash, unless --force.\n\n"
            "example:\n  procurator snapshot restore web-1 before-upgrade"
        ),
        formatter_class=raw,
    )
    p.add_argument("vm", help="the VM's id")
    p.add_argument("name", help="the snapshot's name")
    p.add_argument(
        "--force",
        action="store_true",
        help="restore a snapshot of another image hash of the VM",
    )
    common(p)
    p.set_defaults(handler=lambda args: trio.run(_act, args))
