"""The operations tests' fixtures, from tests/fleethelpers.py: images, the
Nix environment and the running fake-VMM fleet."""

from fleethelpers import add_image, fake_fleet, nix_env

__all__ = ["add_image", "fake_fleet", "nix_env"]
