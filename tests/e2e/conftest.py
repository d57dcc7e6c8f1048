"""Fixtures of the end-to-end tests with the fake VMM: images and the Nix
environment from tests/fleethelpers.py."""

from fleethelpers import add_image, nix_env

__all__ = ["add_image", "nix_env"]
