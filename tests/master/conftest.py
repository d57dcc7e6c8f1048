"""The master tests' fixtures live in tests/rpcfixtures.py (shared with the
RPC tests)."""

from rpcfixtures import bridge, fleet_of, master, master_factory

__all__ = ["bridge", "fleet_of", "master", "master_factory"]
