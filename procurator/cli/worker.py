"""``procurator worker`` and ``procurator worker cordon|uncordon|drain W``
(a worker's mode, set through a master: docs/SCHEDULING.md): what they run.

Their flags are ``procurator.cli.parsers.worker``'s (no trio, no Cap'n
Proto: ``--help`` needs neither): a new one is added there and read in
``worker_config`` here, which builds the one config object the
composition root (``procurator.app.worker``) reads — how VMs run goes into
its ``RuntimeOptions``, the rest into the config itself. The mode commands
are subcommands of ``worker`` (so ``--id`` is checked by hand, in the
parser's handler: a daemon needs it, they do not).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import trio

from procurator.app.worker import WorkerConfig, worker_main
from procurator.cli.args import tls_files
from procurator.cli.connect import control_from_args
from procurator.cli.exits import EXIT_ERROR, EXIT_OK, EXIT_TIMEOUT
from procurator.cli.pipes import run_reader
from procurator.core.drain import DEFAULT_MAX_UNAVAILABLE, ModeAction, mode_json
from procurator.core.jail import JailPolicy
from procurator.core.models import WorkerState
from procurator.core.snapshot import SnapshotQuota
from procurator.rpc.bridge import open_bridge
from procurator.rpc.clients import ControlClient
from procurator.worker.link import LinkSettings
from procurator.worker.runtime import RuntimeOptions

__all__ = ["change_mode", "run", "worker_config"]


def run(args: argparse.Namespace) -> int:
    """``procurator worker``: run it with the config its flags make."""
    return worker_main(worker_config(args))


def change_mode(args: argparse.Namespace) -> int:
    """``procurator worker cordon|uncordon|drain W``."""
    action = ModeAction(args.mode_action)
    return trio.run(run_reader, functools.partial(_change_mode, action), args)


async def _change_mode(action: ModeAction, args: argparse.Namespace) -> int:
    bound = getattr(args, "max_unavailable", DEFAULT_MAX_UNAVAILABLE)
    async with open_bridge() as bridge, control_from_args(bridge, args) as client:
        change = await client.change_worker_mode(args.worker, action, bound)
        if args.json:
            print(
                json.dumps(
                    {
                        "changed": change.changed,
                        "message": change.message,
                        "mode": mode_json(change.mode),
                    }
                )
            )
        else:
            print(change.message)
        sys.stdout.flush()
        if action is not ModeAction.DRAIN or not args.wait or change.mode is None:
            return EXIT_OK
        return await _wait_drained(client, args.worker, change.mode.op_id, args.timeout)


async def _wait_drained(client: ControlClient, worker_id: str, op_id: str, timeout: float) -> int:
    """Follow drain ``op_id`` of ``worker_id`` (blocking status reads)
    until it is done, stopped, ended, or ``timeout`` passed."""
    index, shown = 0, ""
    with trio.move_on_after(timeout):
        while True:
            status = await client.status(wait_index=index, wait=min(timeout, 30.0))
            index = status.change_index
            worker = next((w for w in status.workers if w.worker_id == worker_id), None)
            mode = worker.mode if worker is not None else None
            if mode is None or mode.op_id != op_id:
                print(f"drain {op_id} of worker {worker_id} ended (uncordoned)")
                return EXIT_ERROR
            line = f"{mode.moved}/{mode.total} moved"
            if line != shown:
                print(line)
                sys.stdout.flush()
                shown = line
            if mode.blocked:
                print(f"drain {op_id} of worker {worker_id} cannot go on: {mode.blocked}")
                return EXIT_ERROR
            if mode.state is WorkerState.CORDONED:
                print(f"worker {worker_id} drained ({mode.moved} VM(s) moved); it stays cordoned")
                return EXIT_OK
    print(f"drain {op_id} of worker {worker_id}: not done after {timeout:g} s; it goes on")
    return EXIT_TIMEOUT


def _snapshot_quota(args: argparse.Namespace) -> SnapshotQuota:
    return SnapshotQuota(
        max_per_vm=args.snapshots_per_vm,
        max_bytes_per_vm=args.snapshot_mib_per_vm << 20,
        max_per_worker=args.snapshots_per_worker,
        max_bytes_per_worker=args.snapshot_mib_per_worker << 20,
    )


def _jail_policy(args: argparse.Namespace) -> JailPolicy | None:
    if args.unconfined:
        return None
    first, last = args.vmm_uids
    return JailPolicy(
        uid_first=first,
        uid_count=last - first + 1,
        memory_overhead_mib=args.vmm_memory_overhead,
        cpu_overcommit=args.cpu_overcommit,
        pids_max=args.vmm_pids_max,
        cgroup_parent=args.cgroup_parent,
    )


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    """The worker's config from its parsed flags."""
    runtime = RuntimeOptions(
        driver=args.driver,
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
        guest_check_interval=args.guest_check_interval,
        guest_check_timeout=args.guest_check_timeout,
        jail=_jail_policy(args),
        vmm_runtime_paths=tuple(args.vmm_runtime_path),
    )
    return WorkerConfig(
        worker_id=args.id,
        runtime=runtime,
        master=args.master,
        state_dir=Path(args.state_dir),
        link=LinkSettings(resync_interval=args.resync_interval, fence_after=args.fence_after),
        metrics_advertise=args.metrics_advertise,
        tls=tls_files(args),
        insecure=args.insecure,
        log_level=args.log_level,
        log_format=args.log_format,
        labels=tuple(sorted(set(args.label))),
        cpu_overcommit=args.cpu_overcommit,
        memory_overcommit=args.memory_overcommit,
        snapshot_quota=_snapshot_quota(args),
        transfer_listen=args.transfer_listen,
    )
