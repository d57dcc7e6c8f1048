"""Moves (issue 30): the fixtures of the master tests (tests/rpcfixtures.py,
tests/pgfixtures.py)."""

from pgfixtures import pg, pg_url
from rpcfixtures import bridge, fleet_of, master, master_factory

__all__ = ["bridge", "fleet_of", "master", "master_factory", "pg", "pg_url"]
