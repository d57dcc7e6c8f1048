"""The daemons' defaults that both their flags and their code use, in one
place that imports nothing: ``procurator master --help`` and ``procurator
worker --help`` show them without importing trio, Cap'n Proto or the
composition roots (``procurator.cli.parsers``), and ``procurator.app.master``,
``procurator.rpc.master_server``, ``procurator.app.worker`` and
``procurator.worker.runtime`` take the same values from here."""

from __future__ import annotations

__all__ = [
    "DEFAULT_DB",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_STATE_DIR",
    "MASTER_METRICS_PORT",
    "VMM_DRIVERS",
    "WORKER_METRICS_PORT",
]

DEFAULT_DB = "/var/lib/procurator/master.db"  # the master's SQLite database
MASTER_METRICS_PORT = 9300  # its Prometheus /metrics and /sd
DEFAULT_MAX_CONNECTIONS = 1024  # connections served at once

DEFAULT_STATE_DIR = "/var/lib/procurator/worker"  # the worker's state
WORKER_METRICS_PORT = 9301  # its Prometheus /metrics
VMM_DRIVERS = ("cloud-hypervisor", "qemu")  # the VMMs a worker can run VMs with
