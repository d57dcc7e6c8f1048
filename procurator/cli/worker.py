"""``procurator worker``: its flags, and the ``WorkerConfig`` they make;
``procurator worker cordon|uncordon|drain W``: a worker's mode, set
through a master (docs/SCHEDULING.md).

The worker's flags are here and nowhere else: a new one is added in
``add_parser`` and read in ``worker_config``, which builds the one config
object the composition root (``procurator.app.worker``) reads — how VMs
run goes into its ``RuntimeOptions``, the rest into the config itself.
The mode commands are subcommands of ``worker`` (so ``--id`` is checked
by hand: a daemon needs it, they do not).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import trio

from procurator.app.worker import (
    DEFAULT_STATE_DIR,
    WORKER_METRICS_PORT,
    WorkerConfig,
    worker_main,
)
from procurator.cli.args import (
    add_common,
    add_master_address,
    int_between,
    non_negative,
    positive,
    tls_files,
)
from procurator.cli.connect import control_from_args
from procurator.cli.exits import EXIT_ERROR, EXIT_OK, EXIT_TIMEOUT
from procurator.cli.pipes import run_reader
from procurator.core.drain import MAX_UNAVAILABLE_LIMIT, ModeAction, mode_json
from procurator.core.fence import DEFAULT_FENCE_AFTER
from procurator.core.jail import JailPolicy
from procurator.core.models import WorkerState
from procurator.core.snapshot import SnapshotQuota
from procurator.core.validation import (
    LIMITS,
    check_label_key,
    check_label_value,
    check_overcommit,
)
from procurator.rpc.bridge import open_bridge
from procurator.rpc.clients import ControlClient
from procurator.worker.link import LinkSettings
from procurator.worker.runtime import DRIVERS, RuntimeOptions

__all__ = ["add_parser", "worker_config"]


def add_parser(sub: Any) -> None:
    """Register ``worker`` on the ``procurator`` parser."""
    p = sub.add_parser(
        "worker",
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
            "A worker's mode is set through a master: `procurator worker cordon W`,\n"
            "`uncordon W`, `drain W` (see `procurator worker drain --help`).\n\n"
            "example:\n  procurator worker --id host-a --master 10.0.0.1:7300 "
            f"--state-dir {DEFAULT_STATE_DIR}"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--id", help="this worker's id, e.g. host-a (required to run a worker)")
    add_master_address(p, what="master address, host:port or unix:/path")
    p.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        help=f"where the worker keeps its state (default: {DEFAULT_STATE_DIR})",
    )
    p.add_argument(
        "--resync-interval",
        type=positive,
        default=30.0,
        help="seconds between full pulls of the assignment (default: 30)",
    )
    p.add_argument(
        "--fence-after",
        type=positive,
        default=DEFAULT_FENCE_AFTER,
        metavar="SECONDS",
        help="after this long without an answer from any master, pause the VMs the master "
        'may move elsewhere (on_worker_lost = "reschedule") until a master sends the '
        "assignment again; must stay below 2/3 of the masters' --worker-lease, since "
        f"healing may start that soon (default: {DEFAULT_FENCE_AFTER:g}, for the default "
        "lease of 30)",
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
        help="QEMU acceleration (default: auto: kvm when /dev/kvm opens, the CPU has "
        "hardware virtualization (vmx or svm) and the KVM is not PVM (kvm_pvm: a paravirtual "
        "KVM that runs only guest kernels built for it), else tcg; the worker logs why)",
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
        type=positive,
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
        "--transfer-listen",
        default="",
        metavar="HOST:PORT",
        help="where this worker takes a moved VM's disks from another worker "
        "(a one-time token per move; in TLS with --tls-* (the source must be a "
        "worker of the fleet), else plain TCP: a trusted network; port 0: any "
        "free one); '' (the default): VMs cannot be moved to this worker",
    )
    p.add_argument(
        "--metrics-advertise",
        default="",
        help="exporter URL the master lists for Prometheus service discovery "
        "(default: http://<listen host or this host's name>:<port>/metrics)",
    )
    p.add_argument(
        "--metrics-interval",
        type=positive,
        default=15.0,
        help="seconds between metric polls and reports to the master, and between two reads "
        "of every VM's counters (with cloud-hypervisor one sweep for all VMs, which is "
        "also their health check) (default: 15)",
    )
    p.add_argument(
        "--health-interval",
        type=positive,
        default=15.0,
        metavar="SECONDS",
        help="seconds between a VM's health checks (vm.info / QMP query-status) where the "
        "driver cannot tell a VM's transitions itself (QEMU); a VMM that exits is seen at "
        "once, this bounds how long a hung one goes unnoticed (two missed checks). Each "
        "check is an API call per VM. cloud-hypervisor VMs are checked by the counters "
        "sweep every --metrics-interval instead (default: 15)",
    )
    p.add_argument(
        "--health-budget",
        type=non_negative,
        default=25.0,
        metavar="CHECKS_PER_S",
        help="at most this many health checks a second across all VMs: with more VMs than "
        "--health-interval allows, each VM's interval stretches to VMs / CHECKS_PER_S "
        "(40 s at 1,000 VMs by default), keeping the idle cost flat; 0: no cap (default: 25)",
    )
    p.add_argument(
        "--guest-check-interval",
        type=positive,
        default=2.0,
        metavar="SECONDS",
        help="seconds between two guest health checks of a VM whose check (sent by the master "
        "with a rollout: tcp, http) names no interval (docs/ROLLOUTS.md; default: 2)",
    )
    p.add_argument(
        "--guest-check-timeout",
        type=positive,
        default=2.0,
        metavar="SECONDS",
        help="the most one guest health check may take before it counts as failed (default: 2)",
    )
    _add_placement_arguments(p)
    _add_jail_arguments(p)
    _add_snapshot_arguments(p)
    add_common(p, daemon=True)
    p.set_defaults(handler=functools.partial(_run_worker, p))
    _add_mode_commands(p)


def _run_worker(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.id:
        parser.error("the following arguments are required: --id")
    return worker_main(worker_config(args))


_MODE_HELP = {
    ModeAction.CORDON: (
        "stop placing new VMs on a worker (it keeps its own)",
        "Cordon a worker: the master places no new VM on it; its VMs stay\n"
        "where they are. Durable (in the master's store), idempotent.\n\n"
        "example:\n  procurator worker cordon host-a",
    ),
    ModeAction.UNCORDON: (
        "make a cordoned or draining worker ready again",
        "Uncordon a worker: it takes new VMs again. Ends a drain: VMs moved\n"
        "so far stay where they are, handoffs in flight are called off (the\n"
        "replacement stops, the original keeps running). Idempotent.\n\n"
        "example:\n  procurator worker uncordon host-a",
    ),
    ModeAction.DRAIN: (
        "move a worker's unpinned VMs to other workers",
        "Drain a worker: it is cordoned, and the leading master moves its\n"
        "unpinned VMs ([[vms]]) to other workers, at most --max-unavailable\n"
        "at once. Each move is a handoff: the replacement starts on its new\n"
        "worker, and only once that worker reports it running does the\n"
        "original stop (the VM briefly runs twice). Pinned VMs\n"
        "([workers.W]) stay. A VM that fits on no other worker stops the\n"
        "drain, with the reason in `procurator status`; nothing is lost.\n"
        "The drain is stored: a master restart or failover continues it.\n"
        "When it is done the worker stays cordoned.\n\n"
        "example:\n  procurator worker drain host-a --max-unavailable 2 --wait",
    ),
}


def _add_mode_commands(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(
        dest="mode_action",
        metavar="{cordon,uncordon,drain}",
        title="a worker's mode (through a master; no --id needed)",
    )
    for action, (short, description) in _MODE_HELP.items():
        q = sub.add_parser(
            action.value,
            help=short,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        q.add_argument("worker", help="the worker's id")
        if action is ModeAction.DRAIN:
            q.add_argument(
                "--max-unavailable",
                type=int_between(1, MAX_UNAVAILABLE_LIMIT),
                default=1,
                metavar="N",
                help="at most N of its VMs in handoff at once (default: 1)",
            )
            q.add_argument(
                "--wait",
                action="store_true",
                help="wait until the drain is done (exit 0), stopped by a VM that fits "
                "nowhere or ended by uncordon (exit 1), or --timeout passed (exit 3)",
            )
            q.add_argument(
                "--timeout",
                type=positive,
                default=600.0,
                help="seconds --wait waits (default: 600)",
            )
        q.add_argument("--json", action="store_true", help="machine-readable output")
        add_master_address(q)
        add_common(q, daemon=False)
        q.set_defaults(
            handler=lambda args, action=action: trio.run(
                run_reader, functools.partial(_change_mode, action), args
            )
        )


async def _change_mode(action: ModeAction, args: argparse.Namespace) -> int:
    bound = getattr(args, "max_unavailable", 1)
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


def _label(text: str) -> tuple[str, str]:
    """``KEY=VALUE``: one worker label, checked as the fleet's constraints are."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE, not {text}")
    if (problem := check_label_key(key) or check_label_value(value)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return key, value


def _overcommit(text: str) -> float:
    """A ratio the scheduler accepts (``check_overcommit``): above 0, at most 64."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if check_overcommit(value) is not None:
        raise argparse.ArgumentTypeError(
            f"must be a positive number, at most {LIMITS.max_overcommit:g}, not {text}"
        )
    return value


def _add_placement_arguments(p: argparse.ArgumentParser) -> None:
    """What the master's scheduler knows of this worker (docs/SCHEDULING.md)."""
    p.add_argument(
        "--label",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label unpinned VMs' constraints match, e.g. zone=b or kvm=true "
        "(repeatable, each key once, at most 64)",
    )
    p.add_argument(
        "--memory-overcommit",
        type=_overcommit,
        default=1.0,
        metavar="RATIO",
        help="memory sold per MiB of the host (with --max-memory-mib: of that cap): the "
        "master places unpinned VMs here up to the memory times RATIO, above 0, at "
        "most 64 (default: 1, no overcommit; --cpu-overcommit is the same for vCPUs)",
    )


def _uid_range(text: str) -> tuple[int, int]:
    """``FIRST-LAST``: an inclusive range of uids."""
    first, sep, last = text.partition("-")
    try:
        low, high = int(first), int(last)
    except ValueError:
        low = high = -1
    if not sep or low < 1 or high < low:
        raise argparse.ArgumentTypeError(f"must be FIRST-LAST (1 <= FIRST <= LAST), not {text}")
    return low, high


def _add_jail_arguments(p: argparse.ArgumentParser) -> None:
    """How the worker jails its VMMs (procurator.worker.jail; docs/SECURITY.md)."""
    policy = JailPolicy()
    p.add_argument(
        "--unconfined",
        action="store_true",
        help="run every VMM with this worker's privileges (root), its view of the host and "
        "no resource limits, for debugging only: a guest that escapes its VMM then owns "
        "the host. Logged as a warning, and each VM's events say it",
    )
    p.add_argument(
        "--vmm-uids",
        type=_uid_range,
        default=(policy.uid_first, policy.uid_last),
        metavar="FIRST-LAST",
        help="the uids (each also a gid) VMMs run as, one per VM, kept for the VM's life; "
        "give each worker on a host its own range (default: "
        f"{policy.uid_first}-{policy.uid_last}, the start of systemd's unused range)",
    )
    p.add_argument(
        "--vmm-memory-overhead",
        type=int_between(16, 1 << 20),
        default=policy.memory_overhead_mib,
        metavar="MIB",
        help="memory a VMM may use beyond its guest's: the VM's cgroup gets memory.max = "
        f"guest memory + this, and a VMM past it is OOM-killed (default: "
        f"{policy.memory_overhead_mib})",
    )
    p.add_argument(
        "--cpu-overcommit",
        type=_overcommit,
        default=policy.cpu_overcommit,
        metavar="RATIO",
        help="vCPUs sold per host CPU: a VM's cgroup gets cpu.max of its vCPUs / RATIO CPUs, "
        "and the master places unpinned VMs here up to the host's CPUs times RATIO vCPUs; "
        "above 0, at most 64 (default: 1, a VM never uses more than its vCPUs' worth)",
    )
    p.add_argument(
        "--vmm-pids-max",
        type=int_between(8, 1 << 22),
        default=policy.pids_max,
        metavar="N",
        help=f"tasks (threads included) a VMM's cgroup may hold (default: {policy.pids_max})",
    )
    p.add_argument(
        "--cgroup-parent",
        default=os.environ.get("PROCURATOR_CGROUP_PARENT", policy.cgroup_parent),
        metavar="PATH",
        help="where VM cgroups go: relative to the worker's own cgroup (cgroup v1) or to its "
        "parent (v2), absolute with a leading /; each worker adds a directory of its own "
        f"(default: $PROCURATOR_CGROUP_PARENT or {policy.cgroup_parent})",
    )
    p.add_argument(
        "--vmm-runtime-path",
        action="append",
        default=[],
        metavar="PATH",
        help="a file or directory a jailed VMM needs beyond what the worker finds (its "
        "binary, libraries, data files): what a --vmm-binary wrapper script runs "
        "(repeatable; a program named here brings its libraries)",
    )


def _add_snapshot_arguments(p: argparse.ArgumentParser) -> None:
    """The quotas on this worker's VM snapshots (docs/SNAPSHOTS.md); 0: none."""
    quota = SnapshotQuota()
    count = int_between(0, 1 << 20)
    mib = int_between(0, 1 << 40)
    p.add_argument(
        "--snapshots-per-vm",
        type=count,
        default=quota.max_per_vm,
        metavar="N",
        help=f"snapshots a VM may have here; 0: no limit (default: {quota.max_per_vm})",
    )
    p.add_argument(
        "--snapshot-mib-per-vm",
        type=mib,
        default=quota.max_bytes_per_vm >> 20,
        metavar="MIB",
        help="what a VM's snapshots may take on disk (its memory and writable disks, per "
        f"snapshot); 0: no limit (default: {quota.max_bytes_per_vm >> 20})",
    )
    p.add_argument(
        "--snapshots-per-worker",
        type=count,
        default=quota.max_per_worker,
        metavar="N",
        help=f"snapshots of all VMs here; 0: no limit (default: {quota.max_per_worker})",
    )
    p.add_argument(
        "--snapshot-mib-per-worker",
        type=mib,
        default=quota.max_bytes_per_worker >> 20,
        metavar="MIB",
        help="what all snapshots here may take on disk; 0: no limit "
        f"(default: {quota.max_bytes_per_worker >> 20})",
    )


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
