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

from procurator.cli.connect import control_from_args
from procurator.cli.exits import EXIT_OK
from procurator.cli.pipes import run_reader
from procurator.core.snapshot import SnapshotAction, SnapshotInfo, SnapshotRequest
from procurator.rpc.bridge import open_bridge

__all__ = ["run", "snapshot_json"]


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


def run(args: argparse.Namespace) -> int:
    """``procurator snapshot ACTION`` (its flags: ``procurator.cli.parsers``):
    ``list`` is a read, stopped when the reader of its output goes away."""
    if args.action == "list":
        return trio.run(run_reader, _list, args)
    return trio.run(_act, args)


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
