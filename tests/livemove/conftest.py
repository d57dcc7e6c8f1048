"""Fixtures for the live-move tests: the QEMU tests' helpers
(tests/qemu/qemuhelpers.py) on ``sys.path``, as pytest puts each test
directory there for its own modules, and their fixtures (the test image,
throwaway VM directories)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_TESTS / "qemu"))

# The QEMU tests' conftest, loaded under another name for its fixtures.
_spec = importlib.util.spec_from_file_location(
    "livemove_qemu_conftest", _TESTS / "qemu" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
_qemu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_qemu)
test_image = _qemu.test_image
vms = _qemu.vms
