"""Real Nix for the image tests, offline.

Nix 2.8 (nix-bin) runs as root on the machine's /nix/store without a daemon,
with a private ``NIX_CONF_DIR`` (no substituters, no build users, no flake
registry), so the tests never reach the network nor read the host's
nix.conf. Images are small directories (a vm-config.json and dummy kernel /
disk files) added with ``nix-store --add``, or built with ``nix-build`` and a
static busybox as builder when an image must *reference* another store path
(``nix-store --add`` records no references).

Leak guard: every store path a test adds has a unique name and is deleted at
teardown with ``nix-store --delete``, which refuses a path that is still
rooted, so a leaked GC root fails the test; so does an entry left in
``gcroots/auto`` pointing into the test's directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from nixtool_helpers import NIX_CONF, NixTool

from procurator.core.confinement import ImageLimits
from procurator.nix import ImageManager, NixStore


def _nix_bin() -> str:
    found = shutil.which("nix-store")
    if found is None:
        pytest.skip("nix-store not found: install nix-bin (scripts/bootstrap.sh does)")
    return found


@pytest.fixture(scope="session")
def nix_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment every nix command of the tests runs with."""
    _nix_bin()
    if os.geteuid() != 0:
        pytest.skip("Nix without a daemon needs root to write /nix/store")
    conf = tmp_path_factory.mktemp("nix-conf")
    (conf / "nix.conf").write_text(NIX_CONF)
    return {"NIX_CONF_DIR": str(conf)}


@pytest.fixture
def nix(nix_env: dict[str, str], tmp_path: Path) -> Iterator[NixTool]:
    tool = NixTool(nix_env, tmp_path)
    yield tool
    problem = tool.cleanup()
    if problem is not None:
        pytest.fail(problem)


@pytest.fixture
def store(nix_env: dict[str, str]) -> NixStore:
    return NixStore(extra_env=nix_env, timeout=60)


@pytest.fixture
def limits() -> ImageLimits:
    return ImageLimits(max_vcpus=4, max_memory_mib=1024)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def images(nix: NixTool, store: NixStore, state_dir: Path, limits: ImageLimits) -> ImageManager:
    # Depends on ``nix`` so that its leak guard runs after the test's images.
    return ImageManager(store, state_dir, limits=limits)
