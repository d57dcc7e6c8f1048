"""Test helpers for real Nix: the ``NixTool`` behind the ``nix`` fixture.

A module of its own (not conftest.py) so that test modules can import its
names for annotations; tests/nix is on ``sys.path`` (pytest's rootdir
conftest handling).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

NIX_CONF = """\
build-users-group =
substituters =
flake-registry =
experimental-features = nix-command flakes
"""
GCROOTS_AUTO = Path("/nix/var/nix/gcroots/auto")

# A derivation whose builder is busybox: $out/vm-config.json is the config
# text with @KERNEL@ replaced by the kernel's store path (a real reference).
IMAGE_WITH_REFERENCE = """
{ busybox, kernelDir, name, configText, script }:
let
  bbdir = builtins.path { path = /. + busybox; name = "procurator-test-busybox"; };
  kernel = builtins.path { path = /. + kernelDir; name = "${name}-kernel"; };
in derivation {
  inherit name configText;
  system = builtins.currentSystem;
  builder = "${bbdir}/busybox";
  bb = "${bbdir}/busybox";
  inherit kernel;
  args = [ "sh" "-c" script ];
}
"""


@dataclass(frozen=True)
class Link:
    """A symlink to put into a test image."""

    target: str


Tree = Mapping[str, "bytes | str | Link"]


class NixTool:
    """Adds, builds and deletes test store paths; remembers what to delete."""

    def __init__(self, env: Mapping[str, str], workdir: Path) -> None:
        self.env = {**os.environ, **env}
        self.workdir = workdir
        self.added: list[str] = []

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            list(argv), env=self.env, capture_output=True, text=True, check=False, timeout=120
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{argv} failed ({done.returncode}): {done.stderr}")
        return done

    def unique(self, name: str) -> str:
        return f"procurator-test-{name}-{uuid.uuid4().hex[:10]}"

    def write_tree(self, tree: Tree, name: str) -> Path:
        root = self.workdir / "trees" / self.unique(name)
        root.mkdir(parents=True)
        for rel, content in tree.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Link):
                path.symlink_to(content.target)
            else:
                path.write_bytes(content.encode() if isinstance(content, str) else content)
        return root

    def add(self, tree: Tree, name: str = "image") -> str:
        """``nix-store --add`` a directory made of ``tree``."""
        path = self.run("nix-store", "--add", str(self.write_tree(tree, name))).stdout.strip()
        self.added.append(path)
        return path

    def build_with_kernel(self, config_text: str, *, extra_script: str = "") -> tuple[str, str]:
        """An image whose vm-config.json names a kernel in another store path
        (``@KERNEL@`` in ``config_text``). Returns (image, kernel path)."""
        busybox = self.workdir / "busybox"
        if not busybox.exists():
            busybox.mkdir()
            shutil.copy("/bin/busybox", busybox / "busybox")
        kernel_dir = self.write_tree({"vmlinux": "a kernel", "initrd.img": "an initrd"}, "kernel")
        expr = self.workdir / "image.nix"
        expr.write_text(IMAGE_WITH_REFERENCE)
        name = self.unique("built")
        script = (
            '$bb mkdir $out && printf %s "$configText" | $bb sed "s|@KERNEL@|$kernel|g" '
            f"> $out/vm-config.json {extra_script}"
        )
        args = {
            "busybox": str(busybox),
            "kernelDir": str(kernel_dir),
            "name": name,
            "configText": config_text,
            "script": script,
        }
        argv = ["nix-build", str(expr), "--no-out-link"]
        for key, value in args.items():
            argv += ["--argstr", key, value]
        image = self.run(*argv).stdout.strip()
        drv = self.run("nix-store", "--query", "--deriver", image).stdout.strip()
        inputs = self.run("nix-store", "--query", "--requisites", drv).stdout.split()
        self.added += [image, *inputs]
        kernel = next(p for p in inputs if p.endswith(f"{name}-kernel"))
        return image, kernel

    def valid(self, path: str) -> bool:
        return self.run("nix-store", "--check-validity", path, check=False).returncode == 0

    def delete(self, *paths: str) -> subprocess.CompletedProcess[str]:
        return self.run("nix-store", "--delete", *paths, check=False)

    def dead(self) -> set[str]:
        """What a garbage collection would delete now (deletes nothing)."""
        return set(self.run("nix-store", "--gc", "--print-dead").stdout.split())

    def cleanup(self) -> str | None:
        """Remove the test's GC roots and store paths, whatever happened;
        return what had leaked, if anything."""
        leaked = []
        for entry in GCROOTS_AUTO.iterdir() if GCROOTS_AUTO.exists() else ():
            if entry.is_symlink() and os.readlink(entry).startswith(f"{self.workdir}/"):
                leaked.append(os.readlink(entry))
                Path(os.readlink(entry)).unlink(missing_ok=True)
                entry.unlink()
        remaining = [p for p in dict.fromkeys(self.added) if self.valid(p)]
        if remaining:
            done = self.delete(*remaining)
            if done.returncode != 0:
                return f"test store paths could not be deleted: {done.stderr.strip()}"
        return f"the test left GC roots: {leaked}" if leaked else None
