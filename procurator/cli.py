"""The ``procurator`` command: ``master``, ``worker``, ``apply``, ``status``.

This module is also the composition root: it is the one place that wires
the RPC adapter (``procurator.rpc``) to the master service and to the
worker's link, which know nothing of Cap'n Proto.

Exit codes: 0 success; 1 refused, invalid or unreachable (the message says
which); 2 bad usage; 3 ``apply --wait`` timed out; 4 ``apply --wait`` saw a
failed VM; 5 ``apply --wait``: converged, except disconnected workers that the
apply left with nothing to run and that have not confirmed stopping their VMs
(they may still run them); 6 ``apply``: the outcome is unknown (the master
went away after the request was sent and answered no retry within
``--retry-for``; the message names the request id and how to check); 130
interrupted (Ctrl-C); 141 the reader of the output went away (``procurator
status | head``: quietly, as a tool killed by SIGPIPE; see ``procurator.ops``
and ``main``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import math
import os
import resource
import secrets
import shlex
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import trio

from procurator import __version__, logs, ops, top
from procurator.certs import add_certs_parser
from procurator.core.errors import LimitExceededError, ProcuratorError, UnavailableError
from procurator.core.fleet import parse_fleet
from procurator.core.models import Fleet, Phase, WorkerDiff, WorkerInfo
from procurator.core.validation import LIMITS
from procurator.master.http import run_master_http
from procurator.master.metrics import MasterInstruments, MasterMetrics
from procurator.master.service import MasterService
from procurator.master.store import FleetStore
from procurator.rpc.bridge import open_bridge
from procurator.rpc.clients import CapnpMasterDialer, ControlClient
from procurator.rpc.master_server import DEFAULT_MAX_CONNECTIONS, serve_master
from procurator.rpc.messages import (
    DEFAULT_PORT,
    Address,
    ApplyResult,
    FleetStatus,
    WorkerConnection,
    check_request_id,
    default_master_address,
    parse_address,
)
from procurator.rpc.tls import ENV_CA, ENV_CERT, ENV_KEY, TlsFiles, require_secure, server_context
from procurator.worker.daemon import WorkerConfig, run_worker
from procurator.worker.runtime import DRIVERS, RuntimeOptions, handler_factory, resolve_driver

__all__ = ["MasterConfig", "main", "run_master", "run_worker_process"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_FAILED = 4
EXIT_UNCONFIRMED = 5
EXIT_UNKNOWN = 6
EXIT_INTERRUPTED = 130
EXIT_OUTPUT_CLOSED = ops.EXIT_OUTPUT_CLOSED

_DAEMONS = ("master", "worker")

DEFAULT_DB = "/var/lib/procurator/master.db"
MASTER_METRICS_PORT = 9300
WORKER_METRICS_PORT = 9301


# ---------------------------------------------------------------- daemons


@dataclass(frozen=True)
class MasterConfig:
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"  # "host:port" or "unix:/path"
    db: Path = Path(DEFAULT_DB)
    push_timeout: float = 10.0
    metrics_listen: str = ""  # "host:port" of /metrics and /sd; "" for none
    tls: TlsFiles | None = None  # mutual TLS; required off loopback unless insecure
    insecure: bool = False
    max_connections: int = DEFAULT_MAX_CONNECTIONS


async def run_master(
    config: MasterConfig, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a master until cancelled; ``task_status.started`` gets the bound
    address. A master that would refuse its address (plaintext off loopback
    without ``insecure``) or its TLS files does so before it creates or
    opens anything."""
    address = parse_address(config.listen)
    if config.tls is not None:
        server_context(config.tls)  # PermanentError naming the file that is wrong
    elif not config.insecure:
        require_secure(address, None, insecure=False, what="the master listening on")
    async with open_bridge() as bridge, await FleetStore.open(config.db) as store:
        instruments = MasterInstruments()
        service = MasterService(instruments.store(store), push_timeout=config.push_timeout)
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            if config.metrics_listen:
                await nursery.start(
                    _serve_master_metrics, service, config.metrics_listen, instruments
                )
            serve = functools.partial(
                serve_master,
                tls=config.tls,
                insecure=config.insecure,
                max_connections=config.max_connections,
            )
            bound = await nursery.start(serve, bridge, instruments.backend(service), address)
            task_status.started(bound)


async def _serve_master_metrics(
    service: MasterService,
    listen: str,
    instruments: MasterInstruments,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """/metrics and /sd. The HTTP server's threads read a FleetView that a
    trio task refreshes every second: they never touch trio-owned state."""
    host, port = _host_port(listen)
    latest = [service.fleet_view()]
    metrics = MasterMetrics(lambda: latest[0], instruments=instruments)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(run_master_http, metrics, host, port)
        logger.info("master metrics at %s", server.url("/metrics"))
        task_status.started()
        while True:
            await trio.sleep(1.0)
            latest[0] = service.fleet_view()


def _metrics_url(listen: str) -> str:
    """Where Prometheus finds a worker's exporter, as the master's /sd lists
    it: the listen address, or this host's name when it listens on all."""
    if not listen:
        return ""
    host, port = _host_port(listen)
    if host in ("0.0.0.0", "::"):
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


async def run_worker_process(
    config: WorkerConfig,
    options: RuntimeOptions | None = None,
    *,
    tls: TlsFiles | None = None,
    insecure: bool = False,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a worker (with the Cap'n Proto link) until cancelled. Without
    ``options`` the worker only records assignments (no VMs): tests of the
    link use that. ``tls``: the worker's certificate (it must name
    ``config.worker_id``); needed for a non-loopback master unless
    ``insecure``."""
    async with open_bridge() as bridge:
        dialer = CapnpMasterDialer(bridge, config.master, tls=tls, insecure=insecure)
        factory = handler_factory(options)
        await run_worker(config, dialer, handler_factory=factory, task_status=task_status)


async def _until_signalled(daemon: Any, config: Any) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            nursery.start_soon(daemon, config)
            async for signum in signals:
                logger.info("received %s; shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


# ---------------------------------------------------------------- logging


# JSON lines and text lines carry the same correlation fields (op_id,
# vm_id, worker_id, generation): see procurator.logs.
def _setup_logging(level: str, fmt: str, *, worker_id: str = "") -> None:
    logs.configure(level, fmt, static={"worker_id": worker_id} if worker_id else None)


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


def _format_time(unix_ms: int) -> str:
    if unix_ms <= 0:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_ms / 1000))


def _phases(worker: WorkerConnection) -> dict[str, int]:
    counts: dict[str, int] = {}
    if worker.status is not None:
        for vm in worker.status.vms:
            counts[vm.phase.value] = counts.get(vm.phase.value, 0) + 1
    return dict(sorted(counts.items()))


def _status_json(status: FleetStatus) -> dict[str, Any]:
    return {
        "generation": status.generation,
        "workers": [_worker_json(w) for w in status.workers],
    }


def _worker_json(w: WorkerConnection) -> dict[str, Any]:
    desired = {d.id: d for d in w.desired_vms}
    return {
        "worker_id": w.worker_id,
        "connected": w.connected,
        "since_unix_ms": w.since_unix_ms,
        "desired_generation": w.desired_generation,
        "observed_generation": w.status.observed_generation if w.status else None,
        "last_report_unix_ms": w.last_report_unix_ms,
        "vm_count": w.vm_count,
        "info": _info_json(w.info),
        "phases": _phases(w),
        "vms": [
            ops.status_vm_json(vm, desired.get(vm.id)) for vm in (w.status.vms if w.status else ())
        ],
    }


def _info_json(info: WorkerInfo | None) -> dict[str, Any] | None:
    if info is None:
        return None
    return {
        "version": info.version,
        "driver": info.driver,
        "metrics_url": info.metrics_url,
        "capacity": {
            "vcpus": info.capacity.vcpus,
            "memory_mib": info.capacity.memory_mib,
            "max_vms": info.capacity.max_vms,
        },
    }


def _host(info: WorkerInfo | None) -> str:
    """``qemu 2cpu 23.4GiB`` for the status table."""
    if info is None:
        return "-"
    cap = info.capacity
    return f"{info.driver or '?'} {cap.vcpus}cpu {cap.memory_mib / 1024:.1f}GiB"


def _print_status(status: FleetStatus, out: TextIO) -> None:
    print(f"fleet generation {status.generation}", file=out)
    if not status.workers:
        print("no workers", file=out)
        return
    rows = [("WORKER", "CONNECTION", "HOST", "DESIRED", "OBSERVED", "VMS", "PHASES")]
    for w in status.workers:
        if w.connected:
            connection = f"up since {_format_time(w.since_unix_ms)}"
        elif w.since_unix_ms:
            connection = f"down since {_format_time(w.since_unix_ms)}"
        else:
            connection = "never connected"
        observed = str(w.status.observed_generation) if w.status else "-"
        phases = " ".join(f"{k}={v}" for k, v in _phases(w).items()) or "-"
        rows.append(
            (
                w.worker_id,
                connection,
                _host(w.info),
                str(w.desired_generation),
                observed,
                str(w.vm_count),
                phases,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip(), file=out)
    for w in status.workers:
        # Listed with nothing to run and disconnected: the master keeps it
        # until it confirms the removal of its VMs.
        if not w.connected and w.vm_count == 0:
            print(
                f"{w.worker_id}: nothing left to run, but it has not confirmed stopping its "
                "VMs: it may still run them until it reconnects",
                file=out,
            )
    ops.print_vm_table(status, out)


# ---------------------------------------------------------------- apply --wait


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
        phases = " ".join(f"{k}={v}" for k, v in _phases(worker).items())
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
    client: ControlClient, result: ApplyResult, timeout: float, interval: float, out: TextIO
) -> int:
    """Blocking reads: each status is asked for with the change index of
    the one before, so the master answers when a report (or anything else)
    changed it, not on a timer. ``interval`` paces the reads only with a
    master that does not block (it answers change index 0). Returns the exit
    code: ``EXIT_OK``, ``EXIT_FAILED``, ``EXIT_UNCONFIRMED`` (see
    ``_check_progress``) or ``EXIT_TIMEOUT`` naming the workers waited for."""
    last: list[str] = []
    waiting_for: list[str] = []
    index = 0
    deadline = trio.current_time() + timeout
    with trio.move_on_after(timeout):
        while True:
            wait = deadline - trio.current_time()
            status = await client.status(wait_index=index, wait=wait)
            progress = _check_progress(status, result)
            if progress.lines != last:
                print("\n".join(progress.lines), file=out, flush=True)
                last = progress.lines
            waiting_for = progress.waiting_for
            if (outcome := progress.outcome) is not None:
                print(outcome.message, file=out if outcome.code == EXIT_OK else sys.stderr)
                return outcome.code
            index = status.change_index
            if not index:
                await trio.sleep(interval)
    print(
        f"timed out after {timeout:g}s waiting for generation {result.generation} from "
        + ", ".join(waiting_for),
        file=sys.stderr,
    )
    return EXIT_TIMEOUT


# ---------------------------------------------------------------- commands


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


def _tls_files(args: argparse.Namespace) -> TlsFiles | None:
    """The TLS files named by --tls-* (or $PROCURATOR_TLS_*), if any."""
    return TlsFiles.from_options(args.tls_cert, args.tls_key, args.tls_ca)


_control = ops.control_from_args


# Pauses between retries of an apply whose answer was lost: doubling.
_RETRY_FIRST_DELAY = 0.25
_RETRY_MAX_DELAY = 4.0


def _new_request_id() -> str:
    return "req-" + secrets.token_hex(10)


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
        while True:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    client = await stack.enter_async_context(_control(bridge, args))
                except UnavailableError as exc:
                    if lost_since is None:
                        raise  # nothing was sent
                    problem = exc
                else:
                    try:
                        result = await client.apply(
                            fleet,
                            expected_generation=args.expect_generation,
                            dry_run=args.dry_run,
                            request_id=request_id,
                        )
                    except UnavailableError as exc:
                        if args.dry_run:
                            raise
                        problem = exc
                    else:
                        _print_apply(result, args.file, sys.stdout)
                        if note := _request_note(result, request_id, args, lost_since is not None):
                            print(note, file=sys.stdout)
                        if args.wait and not result.dry_run and result.changed:
                            return await _wait_converged(
                                client, result, args.timeout, args.interval, sys.stdout
                            )
                        return EXIT_OK
            now = trio.current_time()
            if lost_since is None:
                lost_since = now
                print(
                    f"procurator apply: lost the master after sending request {request_id} "
                    f"({problem}); retrying with the same request id for up to "
                    f"{args.retry_for:g} s (the master never applies a request twice)",
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


async def _status(args: argparse.Namespace) -> int:
    async with open_bridge() as bridge, _control(bridge, args) as client:
        status = await client.status()
    if args.json:
        json.dump(_status_json(status), sys.stdout, indent=2)
        print()
    else:
        _print_status(status, sys.stdout)
    return EXIT_OK


def _open_files_for(connections: int) -> None:
    """Every connection is a descriptor: raise the soft limit to the hard
    one (often 1024 -> 524288) and say so when the cap cannot be reached
    anyway (the master would fail on EMFILE before refusing politely)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    spare = 64  # the database, the HTTP server, logs, the bridge
    if connections + spare > soft:
        logger.warning(
            "--max-connections %d is more than the open-file limit allows (%d, %d of them "
            "kept for the rest); raise LimitNOFILE / ulimit -n",
            connections,
            soft,
            spare,
        )


def _master(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level, args.log_format)
    _open_files_for(args.max_connections)
    config = MasterConfig(
        listen=args.listen,
        db=Path(args.db),
        push_timeout=args.push_timeout,
        metrics_listen=args.metrics_listen,
        tls=_tls_files(args),
        insecure=args.insecure,
        max_connections=args.max_connections,
    )
    trio.run(_until_signalled, run_master, config)
    return EXIT_OK


def _worker(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level, args.log_format, worker_id=args.id)
    options = RuntimeOptions(
        driver=resolve_driver(args.driver),
        vmm_binary=args.vmm_binary,
        vmm_args=tuple(args.vmm_arg),
        qemu_accel=args.qemu_accel,
        network=not args.no_network,
        bridge=args.bridge,
        subnet=args.subnet,
        substituters=tuple(args.substituter),
        max_vcpus=args.max_vcpus,
        max_memory_mib=args.max_memory_mib,
        concurrency=args.concurrency,
        stop_grace=args.stop_grace,
        metrics_listen=args.metrics_listen,
        metrics_interval=args.metrics_interval,
        health_interval=args.health_interval,
        health_checks_per_second=args.health_budget,
    )
    config = WorkerConfig(
        worker_id=args.id,
        master=args.master,
        state_dir=Path(args.state_dir),
        resync_interval=args.resync_interval,
        driver=options.driver,
        capacity=options.capacity(),
        metrics_url=args.metrics_advertise or _metrics_url(args.metrics_listen),
    )
    worker = functools.partial(
        run_worker_process, options=options, tls=_tls_files(args), insecure=args.insecure
    )
    trio.run(_until_signalled, worker, config)
    return EXIT_OK


# ---------------------------------------------------------------- parser


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _request_id(text: str) -> str:
    if (problem := check_request_id(text)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text}")
    return value


_EPILOG = f"""\
the master: every client command dials --master HOST:PORT, else
$PROCURATOR_MASTER, else 127.0.0.1:{DEFAULT_PORT}; with mutual TLS from --tls-cert,
--tls-key, --tls-ca, else $PROCURATOR_TLS_CERT, _KEY, _CA (see README.md).

exit status: 0 done; 1 refused, invalid or unreachable; 2 bad usage;
3 apply --wait timed out; 4 apply --wait saw a VM fail; 5 apply --wait
converged except on disconnected workers the apply left with no VMs, which
have not confirmed stopping theirs; 130 interrupted; 141 the reader of the
output went away (procurator events -f | head -n 3): the command ends
quietly, and what it did before printing is whole."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="procurator",
        description="Declarative control plane for microVMs whose images are Nix store paths.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"procurator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter
    master_default = default_master_address()

    def add_common(p: argparse.ArgumentParser, *, daemon: bool) -> None:
        p.add_argument(
            "--log-level",
            default="info",
            choices=["debug", "info", "warning", "error"],
            help="log verbosity (default: info)",
        )
        if daemon:
            p.add_argument(
                "--log-format",
                default="text",
                choices=["text", "json"],
                help="log lines as text or as JSON objects (default: text)",
            )
        add_tls_arguments(p)

    p = sub.add_parser(
        "master",
        help="run the master (desired state, generations, pushes to workers)",
        description=(
            "Run the master: it stores the desired fleet in SQLite, hands out\n"
            "generations, and pushes each worker its assignment.\n\n"
            "example:\n  procurator master --listen 0.0.0.0:7300 --db /var/lib/procurator/master.db"
        ),
        formatter_class=raw,
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
        type=_positive,
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
    p.set_defaults(handler=_master)

    p = sub.add_parser(
        "worker",
        help="run a worker (connects to the master, runs its assigned VMs)",
        description=(
            "Run a worker: it dials the master, registers, receives its\n"
            "assignment and reports what it observes. It keeps running its VMs\n"
            "while the master is away and reconnects on its own.\n\n"
            "power: a VM's desired power (running, paused, stopped) is converged\n"
            "without replacing it: pause/resume through the VMM's API, stop through\n"
            "the stop ladder keeping its disk copies and address. After a resume\n"
            "the guest's clock is NOT resynced: cloud-hypervisor (v53) has no\n"
            "guest-clock API and QEMU runs without a guest agent; the guest lags\n"
            "by the paused time until it corrects itself (NTP/chrony).\n\n"
            "example:\n  procurator worker --id host-a --master 10.0.0.1:7300 "
            "--state-dir /var/lib/procurator/worker"
        ),
        formatter_class=raw,
    )
    p.add_argument("--id", required=True, help="this worker's id, e.g. host-a")
    p.add_argument(
        "--master",
        default=master_default,
        help=f"master address, host:port or unix:/path (default: $PROCURATOR_MASTER or "
        f"{master_default})",
    )
    p.add_argument(
        "--state-dir",
        default="/var/lib/procurator/worker",
        help="where the worker keeps its state (default: /var/lib/procurator/worker)",
    )
    p.add_argument(
        "--resync-interval",
        type=_positive,
        default=30.0,
        help="seconds between full pulls of the assignment (default: 30)",
    )
    p.add_argument(
        "--driver",
        default="auto",
        choices=["auto", *DRIVERS],
        help="VMM to run VMs with; auto: cloud-hypervisor if on PATH, else qemu (default: auto)",
    )
    p.add_argument(
        "--vmm-binary",
        default="",
        metavar="PATH",
        help="the VMM executable, a path taken as is (never split: arguments go in "
        "--vmm-arg); may be a wrapper script that execs the VMM. The worker recognises "
        "its VMMs by a marker in their environment, not by this name "
        "(default: cloud-hypervisor / qemu-system-x86_64 on PATH)",
    )
    p.add_argument(
        "--vmm-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an argument for --vmm-binary, before the driver's own flags (repeatable; "
        "write --vmm-arg=-x for one that starts with '-')",
    )
    p.add_argument(
        "--qemu-accel",
        default="auto",
        choices=["auto", "kvm", "tcg"],
        help="QEMU acceleration (default: auto: kvm when /dev/kvm works, else tcg)",
    )
    p.add_argument("--bridge", default="br-procurator", help="bridge for the VMs' taps")
    p.add_argument(
        "--subnet",
        default="10.120.0.0/24",
        help="IPv4 subnet of the bridge; the bridge is .1, VMs get stable addresses from it",
    )
    p.add_argument("--no-network", action="store_true", help="give VMs no network interface")
    p.add_argument(
        "--substituter",
        action="append",
        default=[],
        help="binary cache to fetch missing images from (repeatable; default: nix.conf's)",
    )
    p.add_argument(
        "--max-vcpus", type=int, default=os.cpu_count() or 1, help="most vCPUs one VM may have"
    )
    p.add_argument(
        "--max-memory-mib",
        type=int,
        default=0,
        help="most memory one VM may have, MiB (default: the host's memory)",
    )
    p.add_argument(
        "--concurrency", type=int, default=8, help="VMs prepared/started at once (default: 8)"
    )
    p.add_argument(
        "--stop-grace",
        type=_positive,
        default=30.0,
        help="seconds a guest gets to power off before it is stopped hard (default: 30)",
    )
    p.add_argument(
        "--metrics-listen",
        default=f"0.0.0.0:{WORKER_METRICS_PORT}",
        help=f"host:port of the Prometheus exporter; '' for none (default: "
        f"0.0.0.0:{WORKER_METRICS_PORT})",
    )
    p.add_argument(
        "--metrics-advertise",
        default="",
        help="exporter URL the master lists for Prometheus service discovery "
        "(default: http://<listen host or this host's name>:<port>/metrics)",
    )
    p.add_argument(
        "--metrics-interval",
        type=_positive,
        default=15.0,
        help="seconds between metric polls and reports to the master (default: 15)",
    )
    p.add_argument(
        "--health-interval",
        type=_positive,
        default=15.0,
        metavar="SECONDS",
        help="seconds between a VM's health checks (vm.info / QMP query-status); a VMM "
        "that exits is seen at once, this bounds how long a hung one goes unnoticed "
        "(two missed checks). Each check is an API call per VM (default: 15)",
    )
    p.add_argument(
        "--health-budget",
        type=_non_negative,
        default=25.0,
        metavar="CHECKS_PER_S",
        help="at most this many health checks a second across all VMs: with more VMs than "
        "--health-interval allows, each VM's interval stretches to VMs / CHECKS_PER_S "
        "(40 s at 1,000 VMs by default), keeping the idle cost flat; 0: no cap (default: 25)",
    )
    add_common(p, daemon=True)
    p.set_defaults(handler=_worker)

    p = sub.add_parser(
        "apply",
        help="apply a fleet file (TOML or JSON) and print what changes",
        description=(
            "Validate a fleet file locally, send it to the master and print the\n"
            "per-worker diff (added / replaced / removed / power / updated).\n"
            "The format follows the extension: .toml or .json (nix eval --json).\n\n"
            "Every apply carries a request id (--request-id, or a random one): the\n"
            "master never applies a request twice, and answers one it committed with\n"
            "that apply's result. When the connection is lost after the request was\n"
            "sent, apply retries with the same id for --retry-for seconds, then says\n"
            "the outcome is unknown and how to check it.\n\n"
            "exit codes: 0 applied (with --wait: converged); 1 refused, invalid or\n"
            "unreachable (the message says which); 3 --wait timed out; 4 --wait saw\n"
            "a failed VM; 5 --wait: converged, except disconnected workers left with\n"
            "nothing to run that have not confirmed stopping their VMs; 6 the outcome\n"
            "is unknown.\n\n"
            "example:\n  procurator apply fleet.toml --wait --timeout 300\n\n"
            "fleet.toml:\n  [workers.host-a]\n"
            '  vms = [ { id = "web-1", image = "/nix/store/<32 chars>-web-vm" } ]'
        ),
        formatter_class=raw,
    )
    p.add_argument("file", help="fleet file, .toml or .json")
    p.add_argument("--dry-run", action="store_true", help="show the diff, store nothing")
    p.add_argument(
        "--expect-generation",
        type=int,
        metavar="N",
        help="refuse unless the fleet is still at generation N (optimistic concurrency)",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait until every affected worker reports the new generation; a disconnected "
        "worker left with nothing to run is not waited for: exit 5 says it has not "
        "confirmed stopping its VMs",
    )
    p.add_argument(
        "--timeout", type=_positive, default=300.0, help="seconds --wait waits (default: 300)"
    )
    p.add_argument("--interval", type=_positive, default=0.5, help=argparse.SUPPRESS)
    p.add_argument(
        "--request-id",
        type=_request_id,
        metavar="ID",
        help="this apply's request id (1-64 of A-Z a-z 0-9 . _ -; default: a random one): "
        "give the id of an earlier apply to learn its outcome or finish it safely",
    )
    p.add_argument(
        "--retry-for",
        type=_non_negative,
        default=30.0,
        metavar="SECONDS",
        help="when the master is lost after the request was sent, retry with the same "
        "request id this long before saying the outcome is unknown (default: 30)",
    )
    p.add_argument(
        "--master",
        default=master_default,
        help=f"master address (default: $PROCURATOR_MASTER or {master_default})",
    )
    add_common(p, daemon=False)
    p.set_defaults(handler=lambda args: trio.run(_apply, args))

    p = sub.add_parser(
        "status",
        help="show each worker's connection, generations and VMs by phase",
        description=(
            "Show the fleet generation and, per worker: connected or since when\n"
            "not, desired vs observed generation, VMs by phase; then, per VM: its\n"
            "phase, desired vs observed power, address and restarts.\n\n"
            "example:\n  procurator status --json"
        ),
        formatter_class=raw,
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--master",
        default=master_default,
        help=f"master address (default: $PROCURATOR_MASTER or {master_default})",
    )
    add_common(p, daemon=False)
    p.set_defaults(handler=lambda args: trio.run(ops.run_reader, _status, args))

    ops.add_commands(
        sub, master_default=master_default, add_common=lambda p: add_common(p, daemon=False)
    )
    top.add_command(
        sub, master_default=master_default, add_common=lambda p: add_common(p, daemon=False)
    )
    add_certs_parser(sub)
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``procurator`` command; returns its exit status.

    In a pipe whose reader went away (``procurator status | head``) a
    command ends quietly with ``EXIT_OUTPUT_CLOSED`` (141), whether the
    failed write came while it ran or at the final flush; a daemon whose log
    reader went away keeps serving and exits with its own status (see
    ``procurator.ops``)."""
    try:
        code = _run(argv)
        # Deliver what is still buffered now, where a reader that went away
        # is handled, not at interpreter exit (a message and status 120).
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except BaseException as exc:
        if not ops.output_closed(_leaves(exc)):
            raise
        ops.discard_output()
        return EXIT_OUTPUT_CLOSED
    return code


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit status of ``--help``, ``--version``
    or a usage error. argparse ignores a failed write of its help (it
    catches OSError); it writes into a buffer here and the help is written
    out afterwards, so a closed pipe shows as it does for any command."""
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            return parser.parse_args(argv)
    except SystemExit as exc:
        if sys.stdout is not None:
            sys.stdout.write(text.getvalue())
        return exc.code if isinstance(exc.code, int) else EXIT_OK


def _run(argv: Sequence[str] | None) -> int:
    parsed = _parse(_build_parser(), argv)
    if isinstance(parsed, int):
        return parsed
    args = parsed
    if args.command in ("apply", "status", "describe", "events"):
        logging.basicConfig(
            level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
        )
    try:
        code = int(args.handler(args))
    except BaseException as exc:
        # Errors may come wrapped in exception groups from a nursery; say
        # what went wrong, without a traceback, when it is one of ours.
        leaves = _leaves(exc)
        if all(isinstance(leaf, ProcuratorError) for leaf in leaves):
            for leaf in leaves:
                print(f"procurator {args.command}: {leaf}", file=sys.stderr)
            return EXIT_ERROR
        if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            return EXIT_INTERRUPTED
        raise
    if args.command in _DAEMONS:
        # A daemon's logs are best effort: one whose log reader went away
        # (``procurator master 2>&1 | head``) kept serving, and its exit
        # status is the service's. What its failed log writes left
        # buffered goes nowhere.
        ops.discard_output()
    return code


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
