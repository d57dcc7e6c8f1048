"""The worker's composition root: a ``WorkerConfig`` in, a worker out.

The one place that puts a worker together: the RPC adapter
(``procurator.rpc``: the bridge and the Cap'n Proto dialer) and the
worker's own package (``procurator.worker``: the link to the master and
the handler that turns assignments into VMs), which knows nothing of Cap'n
Proto.

- ``run_worker(config)`` runs a worker in this process until cancelled;
  ``task_status.started`` gets its ``MasterLink`` (ready at once, it
  connects in the background).
- ``worker_main(config)`` is the ``procurator worker`` process: logging
  (every record stamped with the worker id), run until SIGTERM or SIGINT.
  The VMs keep running when it ends: the next worker re-adopts them.

``WorkerConfig.runtime`` says how VMs run (``RuntimeOptions``: the VMM, the
network, images, health checks, metrics); ``None`` runs no VM at all and
records assignments (``RecordingHandler``), for tests of the link and the
master that need a real worker but no VMs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio

from procurator import __version__, logs
from procurator.app._process import host_port, raise_open_file_limit, run_until_signalled
from procurator.app.masters import master_addresses
from procurator.core.defaults import DEFAULT_OVERCOMMIT, DEFAULT_STATE_DIR, WORKER_METRICS_PORT
from procurator.core.errors import PermanentError
from procurator.core.models import Capacity, WorkerInfo
from procurator.core.snapshot import SnapshotQuota
from procurator.core.validation import (
    LIMITS,
    check_label_key,
    check_label_value,
    check_overcommit,
    check_worker_id,
)
from procurator.rpc.address import DEFAULT_MASTER_ADDRESS
from procurator.rpc.bridge import open_bridge
from procurator.rpc.clients import CapnpMasterDialer
from procurator.rpc.tls import (
    Role,
    TlsFiles,
    client_context,
    peer_identity,
    server_context,
)
from procurator.worker import daemon
from procurator.worker.daemon import HandlerFactory, RecordingHandler, StatusPublisher
from procurator.worker.link import FailoverDialer, LinkSettings, MasterDialer, MasterLink
from procurator.worker.move_transfer import TransferTls
from procurator.worker.runtime import ReconcilingHandler, RuntimeOptions, resolve_driver
from procurator.worker.snapshots import SnapshotNode, SnapshotService
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver
from procurator.worker.vmm.qemu import QemuDriver

__all__ = ["DEFAULT_STATE_DIR", "WORKER_METRICS_PORT", "WorkerConfig", "run_worker", "worker_main"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """Everything a worker is configured with (``procurator worker``'s
    flags). ``runtime`` has no default: a worker that runs VMs says how."""

    worker_id: str
    runtime: RuntimeOptions | None  # None: runs no VM, records assignments (tests)
    # "host:port" or "unix:/path"; several masters of one database
    # separated by commas, tried in turn (procurator.worker.link).
    master: str = DEFAULT_MASTER_ADDRESS
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    link: LinkSettings = field(default_factory=LinkSettings)  # resync, timeouts, backoff
    # The exporter URL the master lists for Prometheus' service discovery;
    # "": from ``runtime.metrics_listen`` (this host's name for a wildcard).
    metrics_advertise: str = ""
    tls: TlsFiles | None = None  # its certificate must name ``worker_id``
    insecure: bool = False  # plaintext to a master off loopback
    log_level: str = logs.DEFAULT_LOG_LEVEL  # debug, info, warning, error
    log_format: str = logs.DEFAULT_LOG_FORMAT  # text or json
    # What the master's scheduler knows of this worker (docs/SCHEDULING.md):
    # its labels (sorted by key) and the overcommit ratios it reports.
    labels: tuple[tuple[str, str], ...] = ()
    cpu_overcommit: float = DEFAULT_OVERCOMMIT
    memory_overcommit: float = DEFAULT_OVERCOMMIT
    # Bounds on the snapshots of this worker's VMs (docs/SNAPSHOTS.md).
    snapshot_quota: SnapshotQuota = field(default_factory=SnapshotQuota)
    # The capacity reported; None: the host's (``RuntimeOptions.capacity``).
    capacity: Capacity | None = None
    # HOST:PORT where it takes a move's disks (docs/SNAPSHOTS.md); "": it
    # takes no moves. Port 0: any free one (the master is told the one bound).
    transfer_listen: str = ""

    def __post_init__(self) -> None:
        if (problem := check_worker_id(self.worker_id)) is not None:
            raise PermanentError(f"worker id: {problem}")
        problems = [
            f"label {key}={value}: {problem}"
            for key, value in self.labels
            if (problem := check_label_key(key) or check_label_value(value)) is not None
        ]
        if len({key for key, _ in self.labels}) != len(self.labels):
            problems.append("a label key is given twice")
        if len(self.labels) > LIMITS.max_labels:
            problems.append(f"more than {LIMITS.max_labels} labels")
        for name in ("cpu_overcommit", "memory_overcommit"):
            if (problem := check_overcommit(getattr(self, name))) is not None:
                problems.append(f"{name}: {problem}")
        if problems:
            raise PermanentError("worker configuration: " + "; ".join(problems))


def worker_main(config: WorkerConfig) -> int:
    """The ``procurator worker`` process: logs to stderr with the worker id
    on every record, runs until SIGTERM or SIGINT. Returns the exit status
    (0); errors propagate."""
    logs.configure(config.log_level, config.log_format, static={"worker_id": config.worker_id})
    _open_files()
    run_until_signalled(run_worker, config)
    return 0


# Descriptors a running VM holds in its worker: its VMM's pidfd (its API
# connection is kept only while in use, it is owned under the state dir's
# one owner lock and woken without a descriptor: tests/vmm/test_fds_per_vm.py),
# and what the rest of the worker holds (the master link, the metrics
# server, the jailer, the kept API connections, logs).
_FILES_PER_VM = 1
_FILES_SPARE = 256


def _open_files() -> None:
    """Take the hard open-file limit (a worker holds a descriptor per VM:
    at Debian's default soft limit of 1024 it would fail on EMFILE near 770
    VMs), and say how many VMs the limit leaves room for when that is fewer
    than a worker may be assigned."""
    soft = raise_open_file_limit()
    room = max(0, soft - _FILES_SPARE) // _FILES_PER_VM
    if room < LIMITS.max_vms_per_worker:
        logger.warning(
            "the open-file limit (%d) leaves room for about %d VMs on this worker (%d "
            "descriptor per VM, %d for the rest); raise LimitNOFILE / ulimit -n for more",
            soft,
            room,
            _FILES_PER_VM,
            _FILES_SPARE,
        )


async def run_worker(
    config: WorkerConfig, *, task_status: trio.TaskStatus[MasterLink] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a worker until cancelled (see the module docstring). A worker
    that would refuse its master's address (plaintext off loopback without
    ``insecure``) or its TLS files does so before it starts anything."""
    runtime = config.runtime
    if runtime is not None:
        # Resolved once: the handler runs the driver the master is told of.
        runtime = dataclasses.replace(runtime, driver=resolve_driver(runtime.driver))
    # Bound before registering: the master is told the port bound.
    listener = _transfer_listener(config.transfer_listen) if runtime is not None else None
    # With certificates, the transfers run in TLS (the master is told, and
    # tells a move's source to require it).
    tls = transfer_tls(config.tls) if listener is not None and config.tls is not None else None
    info = WorkerInfo(
        worker_id=config.worker_id,
        version=__version__,
        capacity=(
            config.capacity
            if config.capacity is not None
            else runtime.capacity()
            if runtime is not None
            else Capacity()
        ),
        metrics_url=_metrics_url(runtime, config.metrics_advertise),
        driver=runtime.driver if runtime is not None else "",
        labels=config.labels,
        cpu_overcommit=config.cpu_overcommit,
        memory_overcommit=config.memory_overcommit,
        transfer_address=_advertised(listener) if listener is not None else "",
        live_moves=runtime is not None and _LIVE_MOVES.get(runtime.driver, False),
        transfer_tls=tls is not None,
    )
    addresses = master_addresses(config.master)
    # The master's snapshot calls, served by the runtime's VMs once it has
    # made them (a worker without a runtime refuses them).
    snapshots = SnapshotNode() if runtime is not None else None
    try:
        async with open_bridge() as bridge:
            dialers = [
                CapnpMasterDialer(
                    bridge, address, tls=config.tls, insecure=config.insecure, snapshots=snapshots
                )
                for address in addresses
            ]
            dialer: MasterDialer = dialers[0] if len(dialers) == 1 else FailoverDialer(dialers)
            logger.info(
                "worker %s starting; master%s at %s",
                config.worker_id,
                "s" if len(dialers) > 1 else "",
                ", ".join(str(a) for a in addresses),
            )
            await daemon.run_worker(
                dialer,
                info,
                state_dir=config.state_dir,
                settings=config.link,
                handler_factory=_handler_factory(config, runtime, snapshots, listener, tls),
                task_status=task_status,
            )
    finally:
        if listener is not None:
            listener.close()  # the receiver closed it already, unless it never ran


def _transfer_listener(listen: str) -> socket.socket | None:
    """The socket a move's disks arrive on (``--transfer-listen``), or None."""
    if not listen:
        return None
    host, port = host_port(listen)
    try:
        return socket.create_server(
            (host.strip("[]"), port), family=socket.AF_INET6 if ":" in host else socket.AF_INET
        )
    except OSError as exc:
        raise PermanentError(f"--transfer-listen {listen}: cannot listen: {exc}") from exc


def transfer_tls(files: TlsFiles) -> TransferTls:
    """The worker's TLS for move transfers (``procurator.worker.
    move_transfer``), from its fleet certificate: a target serves its
    transfer port with it, a source dials a target that serves TLS with
    it. Raises ``PermanentError`` naming a file that is wrong."""
    client = client_context(files)
    # A target is dialed by address; the identity the master named is
    # checked after the handshake (TransferTls.worker_of), not a DNS name.
    client.check_hostname = False
    return TransferTls(server=server_context(files), client=client, worker_of=_worker_of)


def _worker_of(peercert: Mapping[str, object] | None) -> str:
    """The worker id a verified peer certificate names; ``PermanentError``
    for any other (a control's, the master's, none)."""
    peer = peer_identity(peercert)  # UnauthorizedError is a PermanentError
    if peer.role is not Role.WORKER:
        raise PermanentError(f"its certificate is {peer}'s, not a worker's")
    return peer.name


_LIVE_MOVES = {
    "cloud-hypervisor": CloudHypervisorDriver.capabilities.live_move,
    "qemu": QemuDriver.capabilities.live_move,
}
"""Whether each driver moves a running VM (``Capabilities.live_move``): the
master is told at registration (``WorkerInfo.live_moves``), before the
driver is made."""


def _advertised(listener: socket.socket) -> str:
    """``HOST:PORT`` of ``listener`` as other workers reach it (this host's
    name for a wildcard)."""
    host, port = listener.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = socket.getfqdn()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _handler_factory(
    config: WorkerConfig,
    runtime: RuntimeOptions | None,
    snapshots: SnapshotNode | None,
    listener: socket.socket | None = None,
    tls: TransferTls | None = None,
) -> HandlerFactory:
    """What turns this worker's assignments into VMs (and serves the
    snapshots of those VMs through ``snapshots``)."""
    if runtime is None:
        return functools.partial(RecordingHandler, config.worker_id)

    def reconciling(publisher: StatusPublisher) -> ReconcilingHandler:
        handler = ReconcilingHandler(
            worker_id=config.worker_id,
            state_dir=config.state_dir,
            options=runtime,
            publisher=publisher,
            transfer_listener=listener,
            transfer_tls=tls,
        )
        if snapshots is not None:
            snapshots.attach(SnapshotService(handler.manager, quota=config.snapshot_quota))
        return handler

    return reconciling


def _metrics_url(runtime: RuntimeOptions | None, advertise: str) -> str:
    """Where Prometheus finds this worker's exporter, as the master's /sd
    lists it: ``advertise``, else the listen address, or this host's name
    when it listens on all of them; "" without an exporter."""
    if runtime is None or not runtime.metrics_listen:
        return advertise
    host, port = host_port(runtime.metrics_listen)  # checked even when advertised
    if advertise:
        return advertise
    if host in ("0.0.0.0", "::"):
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"
