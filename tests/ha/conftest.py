"""Fixtures of the high-availability tests (helpers: halab.py): a
PostgreSQL cluster per session (``pg``; tests that stop the server make
their own), the private Nix configuration and images of the end-to-end
tests (``nix_env``, ``add_image``). Real processes throughout: masters,
workers on the fake cloud-hypervisor, PostgreSQL, Nix. Needs root and
nix-bin."""

from __future__ import annotations

from pathlib import Path

import pytest
from fleethelpers import add_image, nix_env
from pgfixtures import pg, pg_url

__all__ = ["add_image", "nix_env", "pg", "pg_url"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.root)
            item.add_marker(pytest.mark.nix)
