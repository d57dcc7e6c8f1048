"""Prometheus' own tools (Debian's ``prometheus`` package), as fixtures for
the tests that run them (tests/metrics, tests/operator): a test that needs
one is skipped, saying which, where the package is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest

PROMTOOL = "/usr/bin/promtool"
PROMETHEUS = "/usr/bin/prometheus"


def _installed(path: str) -> str:
    if not Path(path).exists():
        pytest.skip(f"{path} missing (Debian package prometheus)")
    return path


@pytest.fixture
def promtool() -> str:
    return _installed(PROMTOOL)


@pytest.fixture
def prometheus_binary() -> str:
    return _installed(PROMETHEUS)
