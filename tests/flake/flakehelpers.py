"""Real Nix for the flake's own expressions, offline and without nixpkgs.

nixpkgs cannot be fetched on these machines, so nothing here evaluates
flake.nix's outputs. What is tested is everything that does not need
nixpkgs: every .nix file parses; the pure library (nix/lib/vm-config.nix,
net.nix) evaluates with ``nix-instantiate --eval --strict --json``; the last
step of every image (nix/lib/assemble-image.nix) is really built with a
static busybox as its shell; and the NixOS modules' own expressions are
evaluated against a small stub of nixpkgs' ``lib`` (tests/flake/stub-lib.nix).

Nix 2.8 runs with a private ``NIX_CONF_DIR`` (no substituters, no build
users, no flake registry). Builds need root (no daemon); evaluation does not.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
NIX_LIB = REPO / "nix" / "lib"
NIX_MODULES = REPO / "nix" / "modules"
STUB_LIB = Path(__file__).resolve().parent / "stub-lib.nix"
OPENAPI = REPO.parent / "shared" / "reference" / "cloud-hypervisor-openapi.yaml"

NIX_CONF = """\
build-users-group =
substituters =
flake-registry =
experimental-features = nix-command flakes
sandbox = false
"""


class NixEvalError(Exception):
    """nix-instantiate failed; ``stderr`` holds Nix's message."""

    def __init__(self, stderr: str) -> None:
        super().__init__(stderr)
        self.stderr = stderr


def nix_path(path: Path) -> str:
    """A Nix path expression for ``path`` (safe for any characters but ``${``)."""
    text = str(path.resolve())
    assert "${" not in text
    return f"(/. + {json.dumps(text)})"


class Nix:
    """Runs Nix 2.8 commands with the private configuration."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def eval(self, expr: str) -> Any:
        """Evaluate ``expr`` strictly and return it as JSON data."""
        proc = self.run(
            "nix-instantiate", "--readonly-mode", "--eval", "--strict", "--json", "--expr", expr
        )
        if proc.returncode != 0:
            raise NixEvalError(proc.stderr)
        return json.loads(proc.stdout)

    def eval_error(self, expr: str) -> str:
        """Evaluate ``expr``, which must fail; return Nix's error text."""
        try:
            value = self.eval(expr)
        except NixEvalError as err:
            return err.stderr
        raise AssertionError(f"expected an evaluation error, got {value!r}")


class StorePaths:
    """Store paths whose names start with a test's unique prefix."""

    def __init__(self, nix: Nix, prefix: str) -> None:
        self.nix = nix
        self.prefix = prefix

    def ours(self) -> list[str]:
        return sorted(
            f"/nix/store/{entry}"
            for entry in os.listdir("/nix/store")
            if entry[33:].startswith(self.prefix)
        )

    def delete(self) -> None:
        paths = self.ours()
        if paths:
            proc = self.nix.run("nix-store", "--delete", *paths)
            assert proc.returncode == 0, f"cannot delete {paths}: {proc.stderr}"
        assert self.ours() == [], "store paths left behind"
