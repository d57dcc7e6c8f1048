"""The operations tests' fixtures: images and the Nix environment from
tests/fleethelpers.py, the running fleet from opshelpers.py."""

from fleethelpers import add_image, nix_env
from opshelpers import ops_fleet

__all__ = ["add_image", "nix_env", "ops_fleet"]
