"""``procurator apply``: send a fleet file to the master, print what
changes, and with ``--wait`` follow the workers until they converge.

Every apply carries a request id: the master never applies a request
twice, and answers a committed one with that apply's result. So once the
request may have reached the master, a lost connection is retried with the
same id for ``--retry-for`` seconds, and only then reported unknown (exit
6) with the commands that find out or finish it. Given several masters
(``--master a,b,c``: masters of one database, docs/HA.md), a retry goes to
the first that answers, which may be another: the request id is the
database's, so it is still applied once; and ``--wait`` follows the workers
through another master when the one it reads from goes away. Both say so on
stderr. The apply itself is never cut short by its output: it is sent and
answered whatever becomes of stdout; the ``--wait`` that follows is a read,
and ends as soon as the reader of a pipe goes away (exit 141), as every
read does.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import secrets
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import trio

from procurator import logs
from procurator.app.masters import master_addresses
from procurator.cli.connect import MasterConnection, connect_master
from procurator.cli.exits import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_ROLLOUT_FAILED,
    EXIT_TIMEOUT,
    EXIT_UNCONFIRMED,
    EXIT_UNKNOWN,
)
from procurator.cli.pipes import read_until_output_closed
from procurator.cli.status import phase_counts
from procurator.core.control import ApplyResult, FleetStatus
from procurator.core.errors import LimitExceededError, ProcuratorError, UnavailableError
from procurator.core.fleet import parse_fleet
from procurator.core.models import Fleet, Phase, WorkerDiff
from procurator.core.rollout import RolloutView, VmState
from procurator.core.validation import LIMITS
from procurator.rpc.address import Address, default_master_address
from procurator.rpc.bridge import Bridge, open_bridge
from procurator.rpc.clients import ControlClient

__all__ = ["run"]


# ---------------------------------------------------------------- printing


def _diff_lines(diff: WorkerDiff) -> list[str]:
    lines = [f"  worker {diff.worker_id}:"]
    for label, ids in (
        ("added", diff.added),
        ("replaced", diff.replaced),
        ("removed", diff.removed),
        ("updated", diff.updated),
    ):
        if ids:
            lines.append(f"    {label + ':':<10}{', '.join(ids)}")
    for change in diff.power_changed:
        lines.append(
            f"    {'power:':<10}{change.vm_id} {change.before.value} -> {change.after.value}"
        )
    return lines


def _print_apply(result: ApplyResult, source: str, out: TextIO) -> None:
    if result.dry_run:
        if not result.changed:
            print(
                f"{source}: dry run: no changes (fleet at generation {result.generation})", file=out
            )
            return
        print(
            f"{source}: dry run: would change {len(result.diffs)} worker(s) "
            f"(fleet at generation {result.generation}):",
            file=out,
        )
    elif not result.changed:
        print(f"{source}: no changes; the fleet stays at generation {result.generation}", file=out)
        return
    else:
        print(
            f"{source}: applied as generation {result.generation} (op {result.op_id}), "
            f"{len(result.diffs)} worker(s) changed:",
            file=out,
        )
    for diff in result.diffs:
        print("\n".join(_diff_lines(diff)), file=out)
    for line in _placement_lines(result):
        print(line, file=out)
    if result.rollout_id:
        print(
            f"rollout {result.rollout_id}: the replaced VMs switch in health-gated batches "
            f"once prepared (procurator rollout status {result.rollout_id})",
            file=out,
        )


def _placement_lines(result: ApplyResult) -> list[str]:
    """Where the apply puts the unpinned VMs it places or moves, and why:
    ``place: web-7 -> host-c (new)``, ``move: web-3 host-a -> host-b
    (worker lost)``."""
    lines = []
    for vm in result.placed:
        if vm.moved:
            why = f"{vm.reason.value}: {vm.detail}" if vm.detail else vm.reason.value
            lines.append(f"  move: {vm.vm_id} {vm.previous_worker} -> {vm.worker_id} ({why})")
        else:
            lines.append(f"  place: {vm.vm_id} -> {vm.worker_id} ({vm.reason.value})")
    return lines


# ---------------------------------------------------------------- --wait


@dataclass(frozen=True)
class _WaitOutcome:
    code: int
    message: str


@dataclass(frozen=True)
class _Progress:
    outcome: _WaitOutcome | None  # None: wait on
    lines: list[str]  # one per worker of the apply
    waiting_for: list[str]  # the workers waited for, e.g. "host-a (disconnected)"


def _check_progress(status: FleetStatus, result: ApplyResult) -> _Progress:
    """Where the workers of an apply stand. A worker has converged when it
    reports the apply's generation or a later one. A worker that the apply
    left with nothing to run and that is disconnected is not waited for (it
    may have been taken out of service for good): it has not confirmed that
    it stopped its VMs and may still run them, which the outcome says
    (``EXIT_UNCONFIRMED``) once every other worker converged. A worker of the
    apply that the master no longer lists had nothing to run and confirmed
    it (the master lists such a worker until it confirms)."""
    by_id = {w.worker_id: w for w in status.workers}
    lines: list[str] = []
    waiting: list[str] = []
    unconfirmed: list[str] = []
    failed: list[str] = []
    for diff in result.diffs:
        worker = by_id.get(diff.worker_id)
        if worker is None:
            lines.append(f"  {diff.worker_id}: nothing left to run, removals confirmed")
            continue
        observed = worker.status.observed_generation if worker.status else 0
        phases = " ".join(f"{k}={v}" for k, v in phase_counts(worker).items())
        state = "" if worker.connected else " (disconnected)"
        lines.append(
            f"  {diff.worker_id}: observed {observed}/{result.generation}{state}"
            + (f" [{phases}]" if phases else "")
        )
        if worker.status is not None:
            for vm in worker.status.vms:
                if vm.phase is Phase.FAILED and (
                    observed >= result.generation or vm.op_id == result.op_id
                ):
                    failed.append(f"{diff.worker_id}/{vm.id}: {vm.message or 'failed'}")
        if observed >= result.generation:
            continue
        if not worker.connected and worker.vm_count == 0:
            removed = logs.some(diff.removed) if diff.removed else "its VMs"
            unconfirmed.append(
                f"{diff.worker_id}: {removed} (removed by generation {result.generation}); "
                "it may still run them, and stops them when it reconnects"
            )
        else:
            waiting.append(diff.worker_id + state)
    if failed:
        return _Progress(
            _WaitOutcome(EXIT_FAILED, "failed VMs:\n  " + "\n  ".join(failed)), lines, waiting
        )
    if waiting:
        return _Progress(None, lines, waiting)
    if unconfirmed:
        message = (
            f"converged, except {len(unconfirmed)} disconnected worker(s) that generation "
            f"{result.generation} left with nothing to run and that have not confirmed "
            "stopping their VMs:\n  "
            + "\n  ".join(unconfirmed)
            + "\n`procurator status` lists such a worker until it has confirmed."
        )
        return _Progress(_WaitOutcome(EXIT_UNCONFIRMED, message), lines, [])
    return _Progress(
        _WaitOutcome(EXIT_OK, f"all {len(result.diffs)} worker(s) converged"), lines, []
    )


async def _wait_converged(
    bridge: Bridge,
    args: argparse.Namespace,
    connection: MasterConnection,
    result: ApplyResult,
    out: TextIO,
) -> int:
    """Blocking reads: each status is asked for with the change index of
    the one before, so the master answers when a report (or anything else)
    changed it, not on a timer. ``args.interval`` paces the reads only with
    a master that does not block (it answers change index 0). When the
    master goes away, the wait goes on through the first of --master that
    answers (each master's status is the database's). Returns the exit
    code: ``EXIT_OK``, ``EXIT_FAILED``, ``EXIT_UNCONFIRMED`` (see
    ``_check_progress``) or ``EXIT_TIMEOUT`` naming the workers waited for."""
    timeout = args.timeout
    last: list[str] = []
    waiting_for: list[str] = []
    index = 0
    client = connection.client
    deadline = trio.current_time() + timeout
    async with contextlib.AsyncExitStack() as stack:
        with trio.move_on_after(timeout):
            while True:
                wait = deadline - trio.current_time()
                try:
                    status = await client.status(wait_index=index, wait=wait)
                except UnavailableError as exc:
                    print(
                        f"procurator apply: lost the master at {connection.address} while "
                        f"waiting ({exc}); waiting through another master",
                        file=sys.stderr,
                        flush=True,
                    )
                    connection = await _reconnect(bridge, args, stack)
                    client, index = connection.client, 0
                    continue
                progress = _check_progress(status, result)
                if progress.lines != last:
                    print("\n".join(progress.lines), file=out, flush=True)
                    last = progress.lines
                waiting_for = progress.waiting_for
                if (outcome := progress.outcome) is not None:
                    print(outcome.message, file=out if outcome.code == EXIT_OK else sys.stderr)
                    if outcome.code != EXIT_OK or not result.rollout_id:
                        return outcome.code
                    return await _follow_rollout(client, result.rollout_id, deadline, out, args)
                index = status.change_index
                if not index:
                    await trio.sleep(args.interval)
    print(
        f"timed out after {timeout:g}s waiting for generation {result.generation} from "
        + ", ".join(waiting_for),
        file=sys.stderr,
    )
    return EXIT_TIMEOUT


async def _follow_rollout(
    client: ControlClient,
    rollout_id: str,
    deadline: float,
    out: TextIO,
    args: argparse.Namespace,
) -> int:
    """Follow the rollout an apply started until it is over or the
    deadline passed: a line per change of its progress (``prepared N/M
    workers``, each batch). ``EXIT_OK`` when done, ``EXIT_ROLLOUT_FAILED``
    when failed or reverted, ``EXIT_TIMEOUT``. Paced by blocking status
    reads (worker reports move a rollout)."""
    index, last = 0, ""
    with trio.move_on_at(deadline):
        while True:
            shown = await client.rollout(rollout_id)
            line = _rollout_line(shown)
            if line != last:
                print(line, file=out, flush=True)
                last = line
            if shown.phase == "done":
                return EXIT_OK
            if shown.phase in ("failed", "reverted"):
                print(f"rollout {rollout_id} {shown.phase}: {shown.reason}", file=sys.stderr)
                return EXIT_ROLLOUT_FAILED
            status = await client.status(
                wait_index=index, wait=min(5.0, max(0.1, deadline - trio.current_time()))
            )
            index = status.change_index
            if not index:
                await trio.sleep(args.interval)
    print(f"timed out waiting for rollout {rollout_id} ({last})", file=sys.stderr)
    return EXIT_TIMEOUT


def _rollout_line(shown: RolloutView) -> str:
    if shown.phase == "preparing":
        return (
            f"rollout {shown.id}: preparing: prepared "
            f"{shown.prepared_workers}/{shown.prepare_workers} workers"
        )
    counts = ", ".join(f"{shown.count(state)} {state.value}" for state in VmState)
    paused = " (paused)" if shown.paused else ""
    return f"rollout {shown.id}: {shown.phase}{paused}: batch {shown.batches}: {counts}"


async def _reconnect(
    bridge: Bridge, args: argparse.Namespace, stack: contextlib.AsyncExitStack
) -> MasterConnection:
    """A connection to the first master that answers, trying again (with
    doubling pauses) until one does; the caller's timeout bounds it."""
    delay = _RETRY_FIRST_DELAY
    while True:
        try:
            return await stack.enter_async_context(connect_master(bridge, args))
        except UnavailableError:
            await trio.sleep(delay)
            delay = min(2 * delay, _RETRY_MAX_DELAY)


# ---------------------------------------------------------------- the apply


def _load_fleet(path: str) -> Fleet:
    suffix = Path(path).suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ProcuratorError(f"{path}: fleet files must end in .toml or .json")
    limit = LIMITS.max_fleet_file_bytes
    try:
        # At most one byte over the limit is read: a huge (or endless, e.g.
        # a FIFO fed by a runaway generator) file is refused without being
        # held in memory first.
        with open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise LimitExceededError(f"{path}: fleet file is larger than {limit} bytes")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProcuratorError(f"{path}: cannot read: {exc}") from exc
    return parse_fleet(text, fmt=suffix[1:], source=path)


# Pauses between retries of an apply whose answer was lost: doubling.
_RETRY_FIRST_DELAY = 0.25
_RETRY_MAX_DELAY = 4.0


def _new_request_id() -> str:
    return "req-" + secrets.token_hex(10)


def run(args: argparse.Namespace) -> int:
    """``procurator apply`` (its flags: ``procurator.cli.parsers.apply``)."""
    return trio.run(_apply, args)


async def _apply(args: argparse.Namespace) -> int:
    """Send the fleet with a request id (``--request-id``, else a new random
    one). Failing to connect is a plain failure: nothing was sent. Once the
    request may have reached the master, a lost connection makes the outcome
    unknown: the apply is sent again with the same request id, which the
    master never applies twice (a committed one is answered with its result,
    ``replayed``), until an answer comes or ``--retry-for`` seconds pass;
    then the outcome is reported unknown (``EXIT_UNKNOWN``) with the request
    id and how to check it. A dry run is not retried: it changes nothing."""
    fleet = _load_fleet(args.file)
    request_id = args.request_id or _new_request_id()
    async with open_bridge() as bridge:
        lost_since: float | None = None
        delay = _RETRY_FIRST_DELAY
        lost_at: Address | None = None
        while True:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    connection = await stack.enter_async_context(connect_master(bridge, args))
                except UnavailableError as exc:
                    if lost_since is None:
                        raise  # nothing was sent
                    problem = exc
                else:
                    try:
                        result = await connection.client.apply(
                            fleet,
                            expected_generation=args.expect_generation,
                            dry_run=args.dry_run,
                            request_id=request_id,
                            supersede=args.supersede,
                        )
                    except UnavailableError as exc:
                        if args.dry_run:
                            raise
                        problem, lost_at = exc, connection.address
                    else:
                        _print_apply(result, args.file, sys.stdout)
                        if note := _request_note(result, request_id, args, lost_since is not None):
                            print(note, file=sys.stdout)
                        if lost_at is not None and lost_at != connection.address:
                            print(
                                f"request {request_id} answered by the master at "
                                f"{connection.address} (the one at {lost_at} was lost)",
                                file=sys.stderr,
                            )
                        if args.wait and not result.dry_run and result.changed:
                            # A read: it ends when no one reads its output.
                            return await read_until_output_closed(
                                functools.partial(
                                    _wait_converged, bridge, args, connection, result, sys.stdout
                                )
                            )
                        return EXIT_OK
            now = trio.current_time()
            if lost_since is None:
                lost_since = now
                where = f" at {lost_at}" if lost_at is not None else ""
                others = (
                    " (on the first of --master that answers)"
                    if len(master_addresses(args.master)) > 1
                    else ""
                )
                print(
                    f"procurator apply: lost the master{where} after sending request "
                    f"{request_id} ({problem}); retrying with the same request id for up to "
                    f"{args.retry_for:g} s{others}: it is never applied twice",
                    file=sys.stderr,
                    flush=True,
                )
            remaining = lost_since + args.retry_for - now
            if remaining <= 0:
                print(_unknown_outcome(args, request_id, problem), file=sys.stderr)
                return EXIT_UNKNOWN
            await trio.sleep(min(delay, remaining))
            delay = min(2 * delay, _RETRY_MAX_DELAY)


def _request_note(
    result: ApplyResult, request_id: str, args: argparse.Namespace, retried: bool
) -> str:
    """What the request id tells about ``result`` (one line, or "")."""
    if result.replayed:
        return (
            f"request {request_id} had been applied already, as generation {result.generation} "
            f"(op {result.op_id}): the result above is that apply's; nothing was applied again"
        )
    if result.dry_run:
        # Asked with --request-id: "was it applied?" -- no.
        return f"request {request_id} has not been applied" if args.request_id else ""
    if not result.changed:
        return ""
    if retried:
        return f"request {request_id}: the first attempt had not been applied; this retry was"
    return f"request {request_id}"


def _unknown_outcome(args: argparse.Namespace, request_id: str, problem: Exception) -> str:
    again = f"procurator apply {shlex.quote(args.file)} --request-id {request_id}"
    if args.master != default_master_address():
        again += f" --master {shlex.quote(args.master)}"
    return (
        f"procurator apply: the outcome is unknown: the master did not answer request "
        f"{request_id}, nor a retry within {args.retry_for:g} s (last: {problem}). "
        "The fleet may or may not have changed.\n"
        f"  To find out, changing nothing:  {again} --dry-run\n"
        "    (it says whether the request was applied, and as which generation; "
        "`procurator status` shows the fleet's generation)\n"
        f"  To finish it safely:            {again}\n"
        "    (if it was applied, that only prints its result)"
    )
