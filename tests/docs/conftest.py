"""Fixtures of the documentation tests, from tests/fleethelpers.py: the
private Nix configuration."""

from fleethelpers import nix_env

__all__ = ["nix_env"]
