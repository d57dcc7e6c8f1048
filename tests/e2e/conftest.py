"""Fixtures of the end-to-end tests with the fake VMM, from
tests/fleethelpers.py: images, the Nix environment, the running fleet."""

from fleethelpers import add_image, fake_fleet, nix_env

__all__ = ["add_image", "fake_fleet", "nix_env"]
