"""Fixtures of the operator-facing tests (alert rules, dashboard, ``top``):
Prometheus' own tools."""

from __future__ import annotations

from pathlib import Path

import pytest
from operatorhelpers import PROMTOOL

__all__ = ["promtool"]


@pytest.fixture
def promtool() -> str:
    if not Path(PROMTOOL).exists():
        pytest.skip(f"{PROMTOOL} missing (Debian package prometheus)")
    return PROMTOOL
