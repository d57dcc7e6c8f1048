"""nix/lib/assemble-image.nix, really built: the last step of every image
``lib.mkVmImage`` makes, run here with a static busybox as its shell (with
nixpkgs, mkVmImage runs the same script with bash and coreutils).

The built image is then handed to the worker's own image code
(``procurator.nix.ImageManager``: closure, confinement, GC root, disk copy),
so the test proves an image from the flake's library is one a worker boots.

Every store path a test creates carries a unique name and is deleted at
teardown (``nix-store --delete`` refuses a path that is still rooted).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flake_schema import problems
from flakehelpers import NIX_LIB, Nix, StorePaths, nix_path

from procurator.core.confinement import HostSide, ImageLimits
from procurator.nix import ImageManager, NixStore

pytestmark = [pytest.mark.nix, pytest.mark.root]

ASSEMBLE = nix_path(NIX_LIB / "assemble-image.nix")
VM_CONFIG = nix_path(NIX_LIB / "vm-config.nix")


@dataclass
class Inputs:
    name: str
    busybox: Path
    kernel: Path
    initrd: Path
    disk: Path

    def expr(self, *, kernel: Path | None = None, extra: str = "") -> str:
        def stored(path: Path, suffix: str) -> str:
            return f'(builtins.path {{ path = {nix_path(path)}; name = "{self.name}-{suffix}"; }})'

        return f"""import {ASSEMBLE} {{
          name = "{self.name}";
          system = builtins.currentSystem;
          shell = [ "${{{stored(self.busybox, "busybox")}}}/busybox" "sh" ];
          kernel = {stored(kernel or self.kernel, "vmlinux")};
          initramfs = {stored(self.initrd, "initrd")};
          disk = {stored(self.disk, "disk")};
          cmdline = [ "console=ttyS0" "quiet" ];
          vcpus = 2;
          memoryMib = 256;
          {extra}
        }}"""


@pytest.fixture
def inputs(nix: Nix, tmp_path: Path) -> Iterator[Inputs]:
    if os.geteuid() != 0:
        pytest.skip("building without a Nix daemon needs root (writes /nix/store)")
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox not found: install busybox-static (scripts/bootstrap.sh does)")
    # Nix runs the builder with argv[0] = its path; busybox picks the applet
    # from argv[0] unless its name is "busybox", so it lives in a directory.
    (tmp_path / "bb").mkdir()
    shutil.copy(busybox, tmp_path / "bb" / "busybox")
    for name, content in [("vmlinux", b"not a kernel"), ("initrd", b"not an initrd")]:
        (tmp_path / name).write_bytes(content)
    (tmp_path / "disk.img").write_bytes(b"\0" * 4096)
    name = f"procurator-flake-test-{uuid.uuid4().hex[:12]}"
    paths = StorePaths(nix, name)
    try:
        yield Inputs(
            name=name,
            busybox=tmp_path / "bb",
            kernel=tmp_path / "vmlinux",
            initrd=tmp_path / "initrd",
            disk=tmp_path / "disk.img",
        )
    finally:
        paths.delete()


def build(nix: Nix, expr: str) -> str:
    proc = nix.run("nix-build", "--no-out-link", "--expr", expr)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def input_path(nix: Nix, inputs: Inputs, suffix: str) -> str:
    path = nix.eval(
        f'"${{builtins.path {{ path = {nix_path(getattr(inputs, suffix))}; '
        f'name = "{inputs.name}-{"vmlinux" if suffix == "kernel" else suffix}"; }}}}"'
    )
    assert isinstance(path, str)
    return path


def test_image_holds_its_files_and_a_config_naming_them(nix: Nix, inputs: Inputs) -> None:
    out = build(nix, inputs.expr())
    kernel = input_path(nix, inputs, "kernel")
    initrd = input_path(nix, inputs, "initrd")
    disk = input_path(nix, inputs, "disk")

    assert sorted(os.listdir(out)) == ["disk.img", "initrd", "vm-config.json", "vmlinux"]
    assert os.readlink(f"{out}/vmlinux") == kernel
    assert os.readlink(f"{out}/initrd") == initrd
    assert os.readlink(f"{out}/disk.img") == disk

    text = Path(out, "vm-config.json").read_text()
    assert text.endswith("}\n")
    expected = nix.eval(
        f"""(import {VM_CONFIG}).mkVmConfig {{
          kernel = "{out}/vmlinux"; initramfs = "{out}/initrd"; disk = "{out}/disk.img";
          cmdline = "console=ttyS0 quiet"; vcpus = 2; memoryMib = 256;
        }}"""
    )
    assert json.loads(text) == expected

    references = nix.run("nix-store", "--query", "--references", out).stdout.split()
    assert {kernel, initrd, disk} <= set(references)


def test_config_matches_the_cloud_hypervisor_schema(
    nix: Nix, inputs: Inputs, vm_config_schema: dict[str, Any]
) -> None:
    out = build(nix, inputs.expr(extra='extraConfig.rng.src = "/dev/urandom";'))
    config = json.loads(Path(out, "vm-config.json").read_text())
    assert problems(config, vm_config_schema) == []


def test_a_worker_accepts_the_image(nix: Nix, inputs: Inputs, tmp_path: Path) -> None:
    out = build(nix, inputs.expr())
    store = NixStore(extra_env={"NIX_CONF_DIR": nix.env["NIX_CONF_DIR"]}, timeout=60)
    images = ImageManager(
        store, tmp_path / "state", limits=ImageLimits(max_vcpus=4, max_memory_mib=1024)
    )
    try:
        prepared = images.prepare("flake-test", out, host=HostSide())
        config = prepared.definition.to_vm_config()
        # The worker hands the VMM resolved store paths and a private disk copy.
        assert config["payload"]["kernel"] == input_path(nix, inputs, "kernel")
        assert config["payload"]["initramfs"] == input_path(nix, inputs, "initrd")
        assert config["payload"]["cmdline"].startswith("console=ttyS0 quiet")
        assert config["cpus"] == {"boot_vcpus": 2, "max_vcpus": 2}
        assert config["memory"]["size"] == 256 << 20
        (copy,) = prepared.disks
        assert config["disks"][0]["path"] == str(copy)
        assert copy.read_bytes() == inputs.disk.read_bytes()
        assert not str(copy).startswith("/nix/store/")
    finally:
        images.release("flake-test")


def test_a_package_instead_of_a_file_fails_the_build_with_a_message(
    nix: Nix, inputs: Inputs, tmp_path: Path
) -> None:
    package = tmp_path / "linux"
    package.mkdir()
    (package / "vmlinux").write_bytes(b"kernel")
    proc = nix.run("nix-build", "--no-out-link", "--expr", inputs.expr(kernel=package))
    assert proc.returncode != 0
    assert "assemble-image: kernel '/nix/store/" in proc.stderr
    assert "is not a regular file (did you pass a package" in proc.stderr


def test_shell_must_be_a_list(nix: Nix) -> None:
    error = nix.eval_error(
        f'(import {ASSEMBLE} {{ name = "x"; system = "x86_64-linux"; shell = "/bin/sh"; '
        'kernel = "/nix/store/x-k/vmlinux"; }).drvPath'
    )
    assert "procurator.assembleImage: shell must be a non-empty list" in error
