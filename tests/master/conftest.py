"""The master tests' fixtures live in tests/rpcfixtures.py (shared with the
RPC tests) and tests/pgfixtures.py (a PostgreSQL cluster)."""

from pgfixtures import pg, pg_url
from rpcfixtures import bridge, fleet_of, master, master_factory

__all__ = ["bridge", "fleet_of", "master", "master_factory", "pg", "pg_url"]
