"""The client commands' and the daemons' (master, worker) parsers: their flags, help and
examples, and the function each one runs, named ``"module:function"`` and imported when the
command runs. ``procurator status --help`` (any of these commands'
``--help``, or a usage error) so imports neither trio nor Cap'n Proto nor
the module that runs the command: a client's help is instant, and needs
nothing of the wire. ``procurator.cli.COMMANDS`` names the function here
that adds each command's parser.

The flags' types and the shared flags are ``procurator.cli.args``'s (no
trio, no capnp either); the daemons' defaults are read where their code
reads them too (``procurator.core.defaults``, a few core modules), never
written here again (tests/ops/test_flag_defaults.py); what a command does is in its own module
(``status``, ``ops``, ``top``, ``rollout``, ``snapshot``, ``apply``,
``move``, ``master``, ``worker``).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
from collections.abc import Callable
from typing import Any

from procurator.cli.args import add_common, add_master_address, int_between, non_negative, positive
from procurator.core.defaults import (
    DEFAULT_BRIDGE,
    DEFAULT_CONCURRENCY,
    DEFAULT_DB,
    DEFAULT_GUEST_CHECK_INTERVAL,
    DEFAULT_GUEST_CHECK_TIMEOUT,
    DEFAULT_HEALTH_CHECKS_PER_SECOND,
    DEFAULT_HEALTH_INTERVAL,
    DEFAULT_LEADER_LEASE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_METRICS_INTERVAL,
    DEFAULT_OVERCOMMIT,
    DEFAULT_PUSH_TIMEOUT,
    DEFAULT_RESYNC_INTERVAL,
    DEFAULT_STATE_DIR,
    DEFAULT_STOP_GRACE,
    DEFAULT_SUBNET,
    DEFAULT_SYNC_INTERVAL,
    DEFAULT_WORKER_LEASE,
    MASTER_METRICS_PORT,
    VMM_DRIVERS,
    WORKER_METRICS_PORT,
)
from procurator.core.drain import DEFAULT_MAX_UNAVAILABLE, MAX_UNAVAILABLE_LIMIT, ModeAction
from procurator.core.fence import DEFAULT_FENCE_AFTER
from procurator.core.jail import JailPolicy
from procurator.core.move import DEFAULT_MOVE_TIMEOUT_S, MAX_MOVE_TIMEOUT_S
from procurator.core.rollout import RolloutAction
from procurator.core.snapshot import SnapshotQuota
from procurator.core.validation import (
    LIMITS,
    check_label_key,
    check_label_value,
    check_overcommit,
    check_request_id,
)
from procurator.rpc.address import DEFAULT_MASTER_ADDRESS

__all__ = [
    "DESCRIBE_EVENTS",
    "apply",
    "describe_and_events",
    "master",
    "move_and_moves",
    "rollout",
    "snapshot",
    "status",
    "top",
    "worker",
]

DESCRIBE_EVENTS = 20  # a VM's recent events ``describe`` shows by default

_count = int_between(1, 10_000)

_ROLLOUT_HELP = {
    RolloutAction.STATUS: "show a rollout: phase, prepare progress, batches, each VM",
    RolloutAction.PAUSE: "start no new batch (VMs in flight are still judged, and revert)",
    RolloutAction.RESUME: "start batches again after a pause",
    RolloutAction.PROMOTE: "let the VMs after healthy canaries follow",
    RolloutAction.UNDO: "revert: the VMs it touched go back to their previous images",
}


def _runs(target: str) -> Callable[[argparse.Namespace], int]:
    """The handler of a command that ``target`` (``"module:function"``,
    given the parsed arguments, returning the exit status) runs: its module
    is imported when the command runs, not when its parser is built."""
    module, _, name = target.partition(":")

    def handler(args: argparse.Namespace) -> int:
        run: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), name)
        return run(args)

    return handler


def _request_id(text: str) -> str:
    if (problem := check_request_id(text)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def apply(sub: Any) -> None:
    """``procurator apply``."""
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "apply",
        description=(
            "Validate a fleet file locally, send it to the master and print the\n"
            "per-worker diff (added / replaced / removed / power / updated).\n"
            "The format follows the extension: .toml or .json (nix eval --json).\n"
            "Only the parts of the file the master does not hold already (a worker's\n"
            "VMs, the rest of the file) travel, named by digest; the master applies\n"
            "the whole file all the same (a master too old for that gets it whole).\n\n"
            "Every apply carries a request id (--request-id, or a random one): the\n"
            "master never applies a request twice, and answers one it committed with\n"
            "that apply's result. When the connection is lost after the request was\n"
            "sent, apply retries with the same id for --retry-for seconds, then says\n"
            "the outcome is unknown and how to check it.\n\n"
            "exit codes: 0 applied (with --wait: converged); 1 refused, invalid or\n"
            "unreachable (the message says which); 3 --wait timed out; 4 --wait saw\n"
            "a failed VM; 5 --wait: converged, except disconnected workers left with\n"
            "nothing to run that have not confirmed stopping their VMs; 6 the outcome\n"
            "is unknown; 7 --wait: the rollout the apply started failed or was\n"
            "reverted.\n\n"
            "A fleet with [rollout] replaces changed VMs by a rollout: the workers\n"
            "prepare the new images first, then the VMs switch in health-gated\n"
            "batches (docs/ROLLOUTS.md); apply prints its id, and --wait follows it\n"
            "(prepared N/M workers, each batch) to its end. While one is under way\n"
            "an apply is refused unless --supersede.\n\n"
            "VMs under [workers.W] are pinned there; VMs in the top-level [[vms]]\n"
            "list are placed by the master on workers with room and matching labels,\n"
            "and keep their worker on later applies (docs/SCHEDULING.md). The diff\n"
            "(and --dry-run) shows where they go; a fleet some VM fits nowhere in is\n"
            "refused whole, naming each such VM and what it lacks.\n\n"
            "example:\n  procurator apply fleet.toml --wait --timeout 300\n\n"
            "fleet.toml:\n  [workers.host-a]\n"
            '  vms = [ { id = "web-1", image = "/nix/store/<32 chars>-web-vm" } ]\n\n'
            "  [[vms]]\n"
            '  id = "web-2"\n'
            '  image = "/nix/store/<32 chars>-web-vm"\n'
            "  vcpus = 2\n"
            "  memory_mib = 2048\n"
            '  constraints = { zone = "b" }'
        ),
        formatter_class=raw,
    )
    p.add_argument("file", help="fleet file, .toml or .json")
    p.add_argument("--dry-run", action="store_true", help="show the diff, store nothing")
    p.add_argument(
        "--supersede",
        action="store_true",
        help="apply even while a rollout is under way: it ends failed, superseded "
        "(without this an apply during a rollout is refused; docs/ROLLOUTS.md)",
    )
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
        "--timeout", type=positive, default=300.0, help="seconds --wait waits (default: 300)"
    )
    p.add_argument("--interval", type=positive, default=0.5, help=argparse.SUPPRESS)
    p.add_argument(
        "--request-id",
        type=_request_id,
        metavar="ID",
        help="this apply's request id (1-64 of A-Z a-z 0-9 . _ -; default: a random one): "
        "give the id of an earlier apply to learn its outcome or finish it safely",
    )
    p.add_argument(
        "--retry-for",
        type=non_negative,
        default=30.0,
        metavar="SECONDS",
        help="when the master is lost after the request was sent, retry with the same "
        "request id this long before saying the outcome is unknown (default: 30)",
    )
    add_master_address(p)
    add_common(p, daemon=False)
    p.set_defaults(handler=_runs("procurator.cli.apply:run"))


def status(sub: Any) -> None:
    """``procurator status``."""
    p = sub.add_parser(
        "status",
        description=(
            "Show the fleet generation and, per worker: its state (ready; lost:\n"
            "its lease expired; cordoned: takes no new VMs; draining N/M: its\n"
            "unpinned VMs moving elsewhere), when its lease was last renewed,\n"
            "connected or since when away, desired vs observed generation, VMs\n"
            "by phase, a drain's progress, the moves under way to and from it\n"
            "(count and phases: a move counts on both its workers until it\n"
            "switches); then, per VM: its phase, desired vs observed power,\n"
            "address and restarts.\n\n"
            "example:\n  procurator status --json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_master_address(p)
    add_common(p, daemon=False)
    p.set_defaults(handler=_runs("procurator.cli.status:run"))


def describe_and_events(sub: Any) -> None:
    """``procurator describe`` and ``procurator events``."""
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "describe",
        description=(
            "vm: everything the master knows about one VM: desired vs observed\n"
            "hash, generation, power and phase; its worker and address; restarts;\n"
            "the last error; its move under way or its last one (phase, source ->\n"
            "target, op id, why it failed); its recent events with their operation ids.\n\n"
            "worker: one worker's state, driver, labels and capacity, and its room\n"
            "as placement counts it: for vCPUs, memory and VMs, used/total and\n"
            "free, where used is its VMs and those moving to it (a move under way,\n"
            "not yet switched) and total what it offers placement (capacity times\n"
            "overcommit; its VM limit, else the master's); the moves holding room.\n\n"
            "example:\n  procurator describe vm web-1\n  procurator describe vm web-1 --json\n"
            "  procurator describe worker host-a"
        ),
        formatter_class=raw,
    )
    p.add_argument("kind", choices=["vm", "worker"], help="what to describe (vm, worker)")
    p.add_argument("id", help="the VM's or the worker's id")
    p.add_argument(
        "--events",
        type=_count,
        default=DESCRIBE_EVENTS,
        help=f"how many of a VM's recent events to show (default: {DESCRIBE_EVENTS})",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_master_address(p)
    add_common(p, daemon=False)
    p.set_defaults(handler=_runs("procurator.cli.ops:run_describe"))

    p = sub.add_parser(
        "events",
        description=(
            "Print recent VM events the workers reported (created, booted,\n"
            "crashed, restarted, replaced, stopped, paused, resumed, failed,\n"
            "readopted, removed), oldest first, each with its operation id.\n"
            "The master keeps a bounded recent history (per VM and overall).\n"
            "--follow keeps polling the master for new events (every --interval\n"
            "seconds) until interrupted.\n\n"
            "example:\n  procurator events --vm web-1 --follow\n  procurator events --json"
        ),
        formatter_class=raw,
    )
    p.add_argument("--vm", default="", metavar="ID", help="only this VM's events")
    p.add_argument(
        "--limit",
        type=_count,
        default=100,
        help="how many recent events to print first (default: 100)",
    )
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument(
        "--interval",
        type=positive,
        default=1.0,
        help="seconds between polls with --follow (default: 1)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    add_master_address(p)
    add_common(p, daemon=False)
    p.set_defaults(handler=_runs("procurator.cli.ops:run_events"))


def top(sub: Any) -> None:
    """``procurator top``."""
    p = sub.add_parser(
        "top",
        description=(
            "A live view of the fleet: each worker's connection, desired vs\n"
            "observed generation and VMs by phase, the fleet's convergence and\n"
            "its recent events. On a terminal it refreshes in place as the fleet\n"
            "changes (the master answers a blocking read when it does); piped,\n"
            "it prints a plain, timestamped line for each change instead.\n"
            "Quit with Ctrl-C.\n\n"
            "example:\n  procurator top\n  procurator top --plain | tee fleet.log"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--interval",
        type=positive,
        default=1.0,
        help="at most one read of the master per this many seconds (default: 1)",
    )
    p.add_argument(
        "--wait",
        type=positive,
        default=5.0,
        help="refresh at least this often (seconds) when nothing changes, so ages move "
        "(default: 5)",
    )
    p.add_argument(
        "--events",
        type=int_between(0, 1000),
        default=10,
        help="recent events to show (default: 10)",
    )
    p.add_argument("--plain", action="store_true", help="plain lines even on a terminal")
    p.add_argument("--once", action="store_true", help="show the fleet once and exit")
    add_master_address(p)
    add_common(p, daemon=False)
    p.set_defaults(handler=_runs("procurator.cli.top:run"))


def rollout(sub: Any) -> None:
    """``procurator rollout`` and its five commands."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = sub.add_parser(
        "rollout",
        description=(
            "A rollout replaces the VMs an apply changes in health-gated batches\n"
            "(a fleet with [rollout]; docs/ROLLOUTS.md). ID: the rollout's id, as\n"
            "apply prints it; omitted: the one under way, else the newest.\n\n"
            "example:\n  procurator rollout status\n  procurator rollout promote\n"
            "  procurator rollout undo ro-3f9a0c12b7de"
        ),
        formatter_class=raw,
    )
    commands = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action in RolloutAction:
        p = commands.add_parser(
            action.value,
            help=_ROLLOUT_HELP[action],
            description=(
                f"{_ROLLOUT_HELP[action]}.\n\nexample:\n  procurator rollout {action.value}"
            ),
            formatter_class=raw,
        )
        p.add_argument("id", nargs="?", default="", help="the rollout's id (default: current)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        add_master_address(p)
        add_common(p, daemon=False)
        p.set_defaults(handler=_runs("procurator.cli.rollout:run"))


def snapshot(sub: Any) -> None:
    """``procurator snapshot`` and its four commands."""
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
    p.set_defaults(handler=_runs("procurator.cli.snapshot:run"))

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
    p.set_defaults(handler=_runs("procurator.cli.snapshot:run"))

    p = commands.add_parser(
        "delete",
        help="delete a snapshot",
        description="Delete a snapshot.\n\nexample:\n  procurator snapshot delete web-1 old",
        formatter_class=raw,
    )
    p.add_argument("vm", help="the VM's id")
    p.add_argument("name", help="the snapshot's name")
    common(p)
    p.set_defaults(handler=_runs("procurator.cli.snapshot:run"))

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
    p.set_defaults(handler=_runs("procurator.cli.snapshot:run"))


_MOVE_DESCRIPTION = """\
Move VM to worker WORKER, keeping its id and MAC (docs/SNAPSHOTS.md).

A cold move (the default): the target prepares the VM's image (realised
and rooted) while the VM runs on; then the VM is stopped on its worker
(stop ladder); once that worker reports it stopped, it sends the VM's
writable disk copies to the target (to the target's --transfer-listen
address, a one-time token, sizes and sha256 checked; in mutual TLS when
the target runs with the fleet's certificates, plain TCP otherwise),
and once the target has them all, the target boots the VM with them. The
VM never runs on two workers; any failure before the switch (a worker
lost, the image failing to prepare, --timeout passed) leaves it running
on its worker, and the move failed with the reason. The move is stored:
a master restart or failover continues it. The target must run with
--transfer-listen.

--live: a live move. The target starts an incoming VMM for the VM, the
source migrates the running guest into it (QEMU mirrors the disks while
it runs), and only once the source says it sent the whole state does the
VM switch to the target, which lets it run. Both workers must run the
same VMM driver, one that moves running VMs (refused otherwise, saying
which); cloud-hypervisor cannot move a VM with writable disks live yet
(the move fails, the VM runs on). Any failure before the switch leaves
the guest running on its worker.

Not carried: the VM's snapshots (they stay, and go with the VM's
directory on its old worker).

A pinned VM ([workers.W] in the fleet file) is pinned to WORKER by the
move; the next apply of a fleet file that still pins it elsewhere moves
it back (the fleet file wins): update the file. An unpinned VM stays on
WORKER.

--wait follows the move until it is done or failed, for --timeout
seconds: the move's own deadline, which for a live move then migrating
asks the source to cancel (phase cancelling); --wait then follows that
up to 60 s more for the source's verdict (undone: failed; too late to
undo: done), which normally comes within seconds. A verdict still missing
then is said ("cancelling after N s: the source ... has been asked to
stop the migration"): check `procurator moves VM`.

exit status: 0 recorded (with --wait: done); 1 refused; 3 --wait: not
over after --timeout (the move goes on until its own deadline), or still
cancelling 60 s after it; 4 --wait: the move failed.

example:
  procurator move web-1 --to host-b --wait
  procurator moves web-1"""


def move_and_moves(sub: Any) -> None:
    """``procurator move`` and ``procurator moves``."""
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("move", description=_MOVE_DESCRIPTION, formatter_class=raw)
    p.add_argument("vm", help="the VM's id")
    p.add_argument("--to", required=True, metavar="WORKER", help="the worker to move it to")
    p.add_argument(
        "--live",
        action="store_true",
        help="move it running (a live move: the same VMM driver on both workers)",
    )
    p.add_argument("--wait", action="store_true", help="follow the move until it is done or failed")
    p.add_argument(
        "--timeout",
        type=int_between(1, MAX_MOVE_TIMEOUT_S),
        default=DEFAULT_MOVE_TIMEOUT_S,
        metavar="S",
        help="the move fails if not done within S seconds (before its switch, the VM "
        "stays on its worker; a live move then migrating first asks its source to cancel "
        "and ends as that does, possibly later, phase cancelling); --wait waits as long, "
        f"and for a cancelling move up to 60 s more (default: {DEFAULT_MOVE_TIMEOUT_S})",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_master_address(p)
    add_common(p, daemon=False)
    p.set_defaults(handler=_runs("procurator.cli.move:run_move"))

    q = sub.add_parser(
        "moves",
        description=(
            "The moves under way and the newest that are over, newest first: phase,\n"
            "source -> target, op id, and why a failed one failed.\n\n"
            "example:\n  procurator moves\n  procurator moves web-1 --json"
        ),
        formatter_class=raw,
    )
    q.add_argument("vm", nargs="?", default="", help="one VM's moves (default: all)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    add_master_address(q)
    add_common(q, daemon=False)
    q.set_defaults(handler=_runs("procurator.cli.move:run_moves"))


def master(sub: Any) -> None:
    """``procurator master`` and its database commands."""
    p = sub.add_parser(
        "master",
        description=(
            "Run the master: it stores the desired fleet in its database, hands out\n"
            "generations, and pushes each worker its assignment.\n\n"
            "The database is a SQLite file (one master), or PostgreSQL: then several\n"
            "masters share it and all serve workers and clients, which are given\n"
            "every master (--master a:7300,b:7300,c:7300; docs/HA.md). Its schema is\n"
            "created or migrated when the master starts.\n\n"
            "commands on the database (each takes --database):\n"
            "  migrate   create or migrate the schema, then exit\n"
            "  export    print the fleet (desired state, generations, apply log,\n"
            "            request ids, removals) as JSON\n"
            "  import    load such a JSON into an empty database\n\n"
            "example:\n"
            "  procurator master --listen 0.0.0.0:7300 --db /var/lib/procurator/master.db\n"
            "  procurator master --listen 0.0.0.0:7300 \\\n"
            "    --database postgresql://procurator@db.example:5432/procurator\n"
            "  procurator master --database /var/lib/procurator/master.db export > fleet.json\n"
            "  procurator master --database postgresql://procurator@db.example/procurator "
            "import fleet.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_MASTER_ADDRESS,
        help=f"host:port or unix:/path to listen on (default: {DEFAULT_MASTER_ADDRESS})",
    )
    p.add_argument(
        "--database",
        "--db",
        dest="db",
        default=DEFAULT_DB,
        metavar="PATH|URL",
        help="a SQLite file (its directory is made, 0700, when missing), or "
        "postgresql://USER@HOST:PORT/DB for several masters on one database; a password "
        f"goes in ~/.pgpass or $PGPASSFILE, never in the URL (default: {DEFAULT_DB})",
    )
    p.add_argument(
        "--master-id",
        default="",
        metavar="ID",
        help="this master's name in the database and its logs, unique among the masters of "
        "one database (default: the host name and a random suffix)",
    )
    p.add_argument(
        "--worker-lease",
        type=positive,
        default=DEFAULT_WORKER_LEASE,
        metavar="SECONDS",
        help="a worker's session outlives its master's last renewal this long; then the "
        f"leader marks the worker lost (default: {DEFAULT_WORKER_LEASE:g})",
    )
    p.add_argument(
        "--leader-lease",
        type=positive,
        default=DEFAULT_LEADER_LEASE,
        metavar="SECONDS",
        help="the lease under which one master does what only one may (expiring workers' "
        f"leases); a dead leader is replaced within about 4/3 of it (default: "
        f"{DEFAULT_LEADER_LEASE:g})",
    )
    p.add_argument(
        "--sync-interval",
        type=positive,
        default=DEFAULT_SYNC_INTERVAL,
        metavar="SECONDS",
        help="how often the master compares its caches with the database, in case a change "
        f"notification was lost (default: {DEFAULT_SYNC_INTERVAL:g})",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="connections served at once; more are refused with limitExceeded "
        f"(default: {DEFAULT_MAX_CONNECTIONS})",
    )
    p.add_argument(
        "--push-timeout",
        type=positive,
        default=DEFAULT_PUSH_TIMEOUT,
        help="seconds before a worker that does not take a push is disconnected "
        f"(default: {DEFAULT_PUSH_TIMEOUT:g})",
    )
    p.add_argument(
        "--metrics-listen",
        default=f"127.0.0.1:{MASTER_METRICS_PORT}",
        help="host:port for Prometheus /metrics and HTTP service discovery /sd; '' for "
        f"none (default: 127.0.0.1:{MASTER_METRICS_PORT})",
    )
    add_common(p, daemon=True)
    p.set_defaults(handler=_runs("procurator.cli.master:run"))
    _master_database_commands(p)


def _master_database_commands(p: argparse.ArgumentParser) -> None:
    commands = p.add_subparsers(dest="database_command", metavar="{migrate,export,import}")
    raw = argparse.RawDescriptionHelpFormatter

    def database(q: argparse.ArgumentParser) -> None:
        # SUPPRESS: a --database given before the command is kept.
        q.add_argument(
            "--database",
            "--db",
            dest="db",
            default=argparse.SUPPRESS,
            metavar="PATH|URL",
            help=f"the database (default: the master's --database, else {DEFAULT_DB})",
        )
        # It prints and ends: not a daemon (procurator.cli), unlike ``master``.
        q.set_defaults(daemon=False)

    q = commands.add_parser(
        "migrate",
        help="create or migrate the database's schema, then exit",
        description=(
            "Create the database's schema, or migrate it to this release's (versioned,\n"
            "idempotent: running it twice changes nothing), then exit. A master does the\n"
            "same when it starts; run this ahead of a rolling upgrade.\n\n"
            "example:\n  procurator master migrate --database postgresql://procurator@db/procurator"
        ),
        formatter_class=raw,
    )
    database(q)
    q.set_defaults(handler=_runs("procurator.cli.master:migrate"))
    q = commands.add_parser(
        "export",
        help="print the fleet in the database as JSON",
        description=(
            "Print the durable part of the database as JSON: the desired fleet, the\n"
            "generations, the apply log, request ids and removals (not sessions,\n"
            "statuses or events: workers report those again). A SQLite database is\n"
            "locked by its running master: stop it first.\n\n"
            "example:\n  procurator master export --database /var/lib/procurator/master.db "
            "> fleet.json"
        ),
        formatter_class=raw,
    )
    database(q)
    q.add_argument("-o", "--output", metavar="FILE", help="write to FILE, not stdout")
    q.set_defaults(handler=_runs("procurator.cli.master:export"))
    q = commands.add_parser(
        "import",
        help="load an exported fleet into an empty database",
        description=(
            "Load what `procurator master export` printed into an empty database\n"
            "(its schema is created first). Generations go on from the exported\n"
            "one, so workers keep what they run. To move a fleet from SQLite to\n"
            "PostgreSQL: stop the master, export, import, start the masters on\n"
            "PostgreSQL (docs/HA.md).\n\n"
            "example:\n  procurator master import fleet.json "
            "--database postgresql://procurator@db/procurator"
        ),
        formatter_class=raw,
    )
    q.add_argument("file", help="the JSON export ('-' for stdin)")
    database(q)
    q.set_defaults(handler=_runs("procurator.cli.master:import_dump"))


def _worker_handler(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """Runs the worker; --id is checked here, by hand (the mode commands,
    subcommands of ``worker``, need none)."""
    run = _runs("procurator.cli.worker:run")

    def handler(args: argparse.Namespace) -> int:
        if not args.id:
            parser.error("the following arguments are required: --id")
        return run(args)

    return handler


def worker(sub: Any) -> None:
    """``procurator worker`` and ``procurator worker cordon|uncordon|drain``."""
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
        default=DEFAULT_RESYNC_INTERVAL,
        help=f"seconds between full pulls of the assignment (default: {DEFAULT_RESYNC_INTERVAL:g})",
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
        f"lease of {DEFAULT_WORKER_LEASE:g})",
    )
    p.add_argument(
        "--driver",
        default="auto",
        choices=["auto", *VMM_DRIVERS],
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
    p.add_argument(
        "--bridge",
        default=DEFAULT_BRIDGE,
        help=f"bridge for the VMs' taps (default: {DEFAULT_BRIDGE})",
    )
    p.add_argument(
        "--subnet",
        default=DEFAULT_SUBNET,
        help="IPv4 subnet of the bridge; the bridge is .1, VMs get stable addresses from it "
        f"(default: {DEFAULT_SUBNET})",
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
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"VMs prepared/started at once (default: {DEFAULT_CONCURRENCY})",
    )
    p.add_argument(
        "--stop-grace",
        type=positive,
        default=DEFAULT_STOP_GRACE,
        help="seconds a guest gets to power off before it is stopped hard "
        f"(default: {DEFAULT_STOP_GRACE:g})",
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
        default=DEFAULT_METRICS_INTERVAL,
        help="seconds between metric polls and reports to the master, and between two reads "
        "of every VM's counters (with cloud-hypervisor one sweep for all VMs, which is "
        f"also their health check) (default: {DEFAULT_METRICS_INTERVAL:g})",
    )
    p.add_argument(
        "--health-interval",
        type=positive,
        default=DEFAULT_HEALTH_INTERVAL,
        metavar="SECONDS",
        help="seconds between a VM's health checks (vm.info / QMP query-status) where the "
        "driver cannot tell a VM's transitions itself (QEMU); a VMM that exits is seen at "
        "once, this bounds how long a hung one goes unnoticed (two missed checks). Each "
        "check is an API call per VM. cloud-hypervisor VMs are checked by the counters "
        f"sweep every --metrics-interval instead (default: {DEFAULT_HEALTH_INTERVAL:g})",
    )
    p.add_argument(
        "--health-budget",
        type=non_negative,
        default=DEFAULT_HEALTH_CHECKS_PER_SECOND,
        metavar="CHECKS_PER_S",
        help="at most this many health checks a second across all VMs: with more VMs than "
        "--health-interval allows, each VM's interval stretches to VMs / CHECKS_PER_S "
        f"({1000 / DEFAULT_HEALTH_CHECKS_PER_SECOND:g} s at 1,000 VMs by default), keeping "
        f"the idle cost flat; 0: no cap (default: {DEFAULT_HEALTH_CHECKS_PER_SECOND:g})",
    )
    p.add_argument(
        "--guest-check-interval",
        type=positive,
        default=DEFAULT_GUEST_CHECK_INTERVAL,
        metavar="SECONDS",
        help="seconds between two guest health checks of a VM whose check (sent by the master "
        "with a rollout: tcp, http) names no interval (docs/ROLLOUTS.md; default: "
        f"{DEFAULT_GUEST_CHECK_INTERVAL:g})",
    )
    p.add_argument(
        "--guest-check-timeout",
        type=positive,
        default=DEFAULT_GUEST_CHECK_TIMEOUT,
        metavar="SECONDS",
        help="the most one guest health check may take before it counts as failed "
        f"(default: {DEFAULT_GUEST_CHECK_TIMEOUT:g})",
    )
    _add_placement_arguments(p)
    _add_jail_arguments(p)
    _add_snapshot_arguments(p)
    add_common(p, daemon=True)
    p.set_defaults(handler=_worker_handler(p))
    _add_worker_mode_commands(p)


_WORKER_MODE_HELP = {
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


def _add_worker_mode_commands(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(
        dest="mode_action",
        metavar="{cordon,uncordon,drain}",
        title="a worker's mode (through a master; no --id needed)",
    )
    for action, (short, description) in _WORKER_MODE_HELP.items():
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
                default=DEFAULT_MAX_UNAVAILABLE,
                metavar="N",
                help="at most N of its VMs in handoff at once "
                f"(default: {DEFAULT_MAX_UNAVAILABLE})",
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
        q.set_defaults(handler=_runs("procurator.cli.worker:change_mode"))


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
        default=DEFAULT_OVERCOMMIT,
        metavar="RATIO",
        help="memory sold per MiB of the host (with --max-memory-mib: of that cap): the "
        "master places unpinned VMs here up to the memory times RATIO, above 0, at "
        f"most 64 (default: {DEFAULT_OVERCOMMIT:g}, no overcommit; --cpu-overcommit is the "
        "same for vCPUs)",
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
        f"above 0, at most 64 (default: {policy.cpu_overcommit:g}, a VM never uses more than "
        "its vCPUs' worth)",
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
