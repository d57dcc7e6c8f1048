"""Every Nix file in the repository parses (``nix-instantiate --parse``).

This is the only check flake.nix itself can get here: its outputs need
nixpkgs, which cannot be fetched on these machines.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flakehelpers import REPO, Nix

pytestmark = pytest.mark.nix

_SKIPPED_DIRS = {"node_modules", "result"}


def _nix_files() -> list[Path]:
    found: list[Path] = []
    for path in sorted(REPO.rglob("*.nix")):
        parts = path.relative_to(REPO).parts[:-1]
        if any(p.startswith(".") or p in _SKIPPED_DIRS or p.startswith("result-") for p in parts):
            continue
        found.append(path)
    return found


NIX_FILES = _nix_files()


def test_the_flake_and_its_parts_are_among_the_files() -> None:
    names = {str(p.relative_to(REPO)) for p in NIX_FILES}
    assert {
        "flake.nix",
        "nix/lib/vm-config.nix",
        "nix/lib/mk-vm-image.nix",
        "nix/lib/assemble-image.nix",
        "nix/lib/net.nix",
        "nix/lib/package.nix",
        "nix/modules/master.nix",
        "nix/modules/worker.nix",
        "nix/modules/guest.nix",
    } <= names


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_parses(nix: Nix, path: Path) -> None:
    proc = nix.run("nix-instantiate", "--parse", str(path))
    assert proc.returncode == 0, f"{path.relative_to(REPO)} does not parse:\n{proc.stderr}"
