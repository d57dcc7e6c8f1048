"""Rollouts (issue 28): the fixtures of the master tests (tests/rpcfixtures.py,
tests/pgfixtures.py) and of the fake-VMM fleet (tests/fleethelpers.py)."""

from fleethelpers import add_image, fake_fleet, nix_env
from pgfixtures import pg, pg_url
from rpcfixtures import bridge, fleet_of, master, master_factory

__all__ = [
    "add_image",
    "bridge",
    "fake_fleet",
    "fleet_of",
    "master",
    "master_factory",
    "nix_env",
    "pg",
    "pg_url",
]
