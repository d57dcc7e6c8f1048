"""Fixtures of the operator-facing tests (alert rules, dashboard, ``top``):
Prometheus' own tools and a running fake-VMM fleet (tests/fleethelpers.py),
with or without metrics endpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fleethelpers import FakeFleet, add_image, fake_fleet, nix_env, running_fake_fleet
from promhelpers import promtool

__all__ = ["add_image", "fake_fleet", "metrics_fleet", "nix_env", "promtool"]


@pytest.fixture
def metrics_fleet(tmp_path: Path, nix_env: dict[str, str]) -> Iterator[FakeFleet]:
    """``fake_fleet`` whose master and worker also serve /metrics."""
    with running_fake_fleet(tmp_path, nix_env, metrics=True) as fleet:
        yield fleet
