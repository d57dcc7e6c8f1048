"""``procurator rollout status|pause|resume|promote|undo [ID]``: a
rollout, shown or acted on through a master (docs/ROLLOUTS.md).

Each asks the master once (``Control.rollout``); the master writes an
action over the state it read, and its leader carries it out on its next
step. ID "" (omitted) is the rollout under way, else the newest.
"""

from __future__ import annotations

import argparse
import functools
import json
from typing import Any

import trio

from procurator.cli.connect import control_from_args
from procurator.cli.exits import EXIT_OK
from procurator.cli.pipes import run_reader
from procurator.core.rollout import RolloutAction, RolloutView, VmState
from procurator.rpc.bridge import open_bridge

__all__ = ["format_view", "run", "view_json"]


def run(args: argparse.Namespace) -> int:
    """``procurator rollout ACTION`` (its flags: ``procurator.cli.parsers.rollout``)."""
    return trio.run(run_reader, functools.partial(_act, RolloutAction(args.action)), args)


async def _act(action: RolloutAction, args: argparse.Namespace) -> int:
    async with open_bridge() as bridge, control_from_args(bridge, args) as client:
        shown = await client.rollout(args.id, action)
    print(json.dumps(view_json(shown)) if args.json else format_view(shown))
    return EXIT_OK


def view_json(view: RolloutView) -> dict[str, Any]:
    return {
        "id": view.id,
        "op_id": view.op_id,
        "phase": view.phase,
        "reason": view.reason,
        "paused": view.paused,
        "batches": view.batches,
        "started_unix_ms": view.started_ms,
        "ended_unix_ms": view.ended_ms,
        "prepared_workers": view.prepared_workers,
        "prepare_workers": view.prepare_workers,
        "message": view.message,
        "vms": [
            {
                "id": vm.vm_id,
                "worker": vm.worker_id,
                "state": vm.state,
                "canary": vm.canary,
                "message": vm.message,
                "old_image": vm.old_path,
                "new_image": vm.new_path,
            }
            for vm in view.vms
        ],
    }


def format_view(view: RolloutView) -> str:
    lines = [view.message] if view.message else []
    lines.append(
        f"rollout {view.id} (apply {view.op_id}): {view.phase}"
        + (", paused" if view.paused else "")
        + f", {view.batches} batch(es) started"
    )
    lines.append(f"  prepared {view.prepared_workers}/{view.prepare_workers} workers")
    lines.append(
        "  VMs: "
        + ", ".join(f"{view.count(state)} {state.value}" for state in VmState)
        + f" (of {len(view.vms)})"
    )
    if view.reason:
        lines.append(f"  {view.reason}")
    width = max((len(vm.vm_id) for vm in view.vms), default=0)
    for vm in view.vms:
        mark = " canary" if vm.canary else ""
        why = f": {vm.message}" if vm.message else ""
        lines.append(f"  {vm.vm_id:<{width}}  {vm.worker_id}  {vm.state}{mark}{why}")
    return "\n".join(lines)
