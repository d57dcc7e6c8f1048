"""The fleet-patch tests' fixtures live in tests/rpcfixtures.py."""

from rpcfixtures import bridge

__all__ = ["bridge"]
