"""Fixtures for the QEMU driver tests: the test image (built once per
session by scripts/build-test-image.sh, which is cached), a VM directory per
test, and a stop ladder that every booted VM goes through at teardown, so no
QEMU outlives its test even when the guest ignores the power button.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemuhelpers import Vms
from testnames import netns_name

REPO = Path(__file__).resolve().parents[2]


def _need(condition: bool, reason: str) -> None:
    if not condition:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def test_image() -> Path:
    """The store path of the test image (built, or found in the cache)."""
    _need(os.geteuid() == 0, "needs root (apt, /nix/store)")
    _need(shutil.which("nix-build") is not None, "needs nix-build (nix-bin)")
    _need(shutil.which("qemu-system-x86_64") is not None, "needs qemu-system-x86")
    result = subprocess.run(
        [str(REPO / "scripts" / "build-test-image.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"build-test-image.sh failed ({result.returncode}):\n{result.stderr}")
    image = Path(result.stdout.strip().splitlines()[-1])
    assert (image / "vm-config.json").is_file(), result.stdout
    return image


@pytest.fixture
def vms() -> Iterator[Vms]:
    # Unix socket paths are limited to 108 bytes: keep the VM dirs short.
    root = Path("/tmp") / f"pq-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    fleet = Vms(root)
    try:
        yield fleet
    finally:
        fleet.stop_all()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def netns() -> Iterator[str]:
    """A throwaway network namespace, deleted even when the test fails
    (deleting it destroys the bridge and taps made in it)."""
    _need(os.geteuid() == 0, "needs root (network namespaces)")
    name = netns_name("pq")
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)
