"""The master's defaults that both its flags and its code use, in one place
that imports nothing: ``procurator master --help`` shows them without
importing trio, Cap'n Proto or the master's composition root
(``procurator.cli.parsers``), and ``procurator.app.master`` and
``procurator.rpc.master_server`` take the same values from here."""

from __future__ import annotations

__all__ = ["DEFAULT_DB", "DEFAULT_MAX_CONNECTIONS", "MASTER_METRICS_PORT"]

DEFAULT_DB = "/var/lib/procurator/master.db"  # the master's SQLite database
MASTER_METRICS_PORT = 9300  # its Prometheus /metrics and /sd
DEFAULT_MAX_CONNECTIONS = 1024  # connections served at once
