"""The operations tests' fixtures live in opshelpers.py."""

from opshelpers import add_image, nix_env, ops_fleet

__all__ = ["add_image", "nix_env", "ops_fleet"]
