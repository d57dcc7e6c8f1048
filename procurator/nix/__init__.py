"""Nix images: the store (``NixStore``, over the nix CLI) and the images of
a worker's VMs (``ImageManager``: present, rooted, confined, disks copied).

Blocking, thread-safe APIs: the worker calls them through
``trio.to_thread.run_sync``.
"""

from procurator.core.confinement import HostSide, ImageLimits
from procurator.nix.image import CONFIG_NAME, ImageManager, PreparedImage
from procurator.nix.store import NixStore, Store

__all__ = [
    "CONFIG_NAME",
    "HostSide",
    "ImageLimits",
    "ImageManager",
    "NixStore",
    "PreparedImage",
    "Store",
]
