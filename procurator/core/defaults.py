"""The daemons' defaults that both their flags and their code use, in one
place that imports nothing: ``procurator master --help`` and ``procurator
worker --help`` show them without importing trio, Cap'n Proto or the
composition roots (``procurator.cli.parsers``), and the settings the
daemons run with take the same values from here: the master's
(``procurator.app.master.MasterConfig``, ``procurator.master.service.
MasterService``, ``procurator.rpc.master_server``) and the worker's
(``procurator.app.worker.WorkerConfig``, ``procurator.worker.runtime.
RuntimeOptions``, ``procurator.worker.link.LinkSettings``).

One source per default: a value changed here changes the flag, its
``--help`` and the daemon together (tests/ops/test_flag_defaults.py parses
each daemon's flags with no arguments and compares the config they make
with the config's own defaults). ``procurator.lab`` runs its fleet on the
same ports.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_BRIDGE",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_DB",
    "DEFAULT_GUEST_CHECK_INTERVAL",
    "DEFAULT_GUEST_CHECK_TIMEOUT",
    "DEFAULT_HEALTH_CHECKS_PER_SECOND",
    "DEFAULT_HEALTH_INTERVAL",
    "DEFAULT_LEADER_LEASE",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_METRICS_INTERVAL",
    "DEFAULT_OVERCOMMIT",
    "DEFAULT_PUSH_TIMEOUT",
    "DEFAULT_RESYNC_INTERVAL",
    "DEFAULT_STATE_DIR",
    "DEFAULT_STOP_GRACE",
    "DEFAULT_SUBNET",
    "DEFAULT_SYNC_INTERVAL",
    "DEFAULT_WORKER_LEASE",
    "MASTER_METRICS_PORT",
    "VMM_DRIVERS",
    "WORKER_METRICS_PORT",
]

# The master. Durations are seconds.
DEFAULT_DB = "/var/lib/procurator/master.db"  # the master's SQLite database
MASTER_METRICS_PORT = 9300  # its Prometheus /metrics and /sd
DEFAULT_MAX_CONNECTIONS = 1024  # connections served at once
DEFAULT_PUSH_TIMEOUT = 10.0  # a worker that does not take a push is disconnected
DEFAULT_WORKER_LEASE = 30.0  # a worker's session outlives its master's last renewal
DEFAULT_LEADER_LEASE = 15.0  # the lease one master leads under
DEFAULT_SYNC_INTERVAL = 5.0  # the periodic comparison of caches with the database

# The worker. Durations are seconds.
DEFAULT_STATE_DIR = "/var/lib/procurator/worker"  # the worker's state
WORKER_METRICS_PORT = 9301  # its Prometheus /metrics
VMM_DRIVERS = ("cloud-hypervisor", "qemu")  # the VMMs a worker can run VMs with
DEFAULT_RESYNC_INTERVAL = 30.0  # between full pulls of the assignment
DEFAULT_BRIDGE = "br-procurator"  # the bridge for the VMs' taps
DEFAULT_SUBNET = "10.120.0.0/24"  # its IPv4 subnet
DEFAULT_CONCURRENCY = 8  # VMs prepared/started at once
DEFAULT_STOP_GRACE = 30.0  # a guest's time to power off before it is stopped hard
DEFAULT_METRICS_INTERVAL = 15.0  # between metric polls and reports
DEFAULT_HEALTH_INTERVAL = 15.0  # between a VM's health checks (QEMU)
DEFAULT_HEALTH_CHECKS_PER_SECOND = 25.0  # across all VMs; 0: no cap
DEFAULT_GUEST_CHECK_INTERVAL = 2.0  # between guest checks naming no interval
DEFAULT_GUEST_CHECK_TIMEOUT = 2.0  # the most one guest check may take
DEFAULT_OVERCOMMIT = 1.0  # vCPUs / memory sold per host CPU / MiB: none
