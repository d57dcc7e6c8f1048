"""flake.nix itself, as far as it can be evaluated without nixpkgs.

The outputs are evaluated with a stand-in for the nixpkgs input that has
only ``lib.genAttrs``: enough for the outputs that do not need nixpkgs
(``lib``, ``nixosModules``, the output names), and for ``lib.mkVmImage``'s
argument handling. ``lib.mkVmImage`` from kernel files is then built for
real, with Debian's /bin/sh and coreutils standing in for nixpkgs' bash and
coreutils (``pkgs`` is an argument of that form). Nothing here evaluates a
package or a NixOS system: those need nixpkgs.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from flakehelpers import REPO, Nix, StorePaths, nix_path

pytestmark = pytest.mark.nix

OUTPUTS = f"""(
  let
    flake = import {nix_path(REPO / "flake.nix")};
    nixpkgs.lib.genAttrs = names: f:
      builtins.listToAttrs (map (name: {{ inherit name; value = f name; }}) names);
    nixpkgs.legacyPackages = throw "this test has no nixpkgs";
    self = flake.outputs {{ inherit self nixpkgs; }};
  in self)"""

# Debian's shell and coreutils in place of nixpkgs' (only for the kernel form).
HOST_PKGS = """{
  runtimeShell = "/bin/sh";
  coreutils = "/usr";
  stdenv.hostPlatform.system = builtins.currentSystem;
}"""


def test_inputs_are_nixpkgs_only(nix: Nix) -> None:
    assert nix.eval(f"(import {nix_path(REPO / 'flake.nix')}).inputs") == {
        "nixpkgs": {"url": "github:NixOS/nixpkgs/nixos-25.05"}
    }


def test_output_names(nix: Nix) -> None:
    names = nix.eval(
        f"""let o = {OUTPUTS}; in {{
          top = builtins.attrNames o;
          lib = builtins.attrNames o.lib;
          modules = builtins.attrNames o.nixosModules;
          packages = builtins.mapAttrs (_: builtins.attrNames) o.packages;
          shells = builtins.mapAttrs (_: builtins.attrNames) o.devShells;
          checks = builtins.mapAttrs (_: builtins.attrNames) o.checks;
        }}"""
    )
    assert names["top"] == [
        "checks",
        "devShells",
        "lib",
        "nixosModules",
        "overlays",
        "packages",
    ]
    assert names["lib"] == [
        "assembleImage",
        "mkVmImage",
        "net",
        "offlineTestImage",
        "vmConfig",
    ]
    assert names["modules"] == ["default", "guest", "master", "worker"]
    systems = ["aarch64-linux", "x86_64-linux"]
    assert names["packages"] == {key: ["default", "procurator", "testVmImage"] for key in systems}
    assert names["shells"] == {key: ["default"] for key in systems}
    assert names["checks"] == {key: ["procurator", "testVmImage"] for key in systems}


def test_pure_lib_outputs(nix: Nix) -> None:
    result = nix.eval(
        f"""let o = {OUTPUTS}; in {{
          bridge = o.lib.net.bridgeAddress "10.120.0.0/24";
          config = o.lib.vmConfig.mkVmConfig {{ kernel = "vmlinux"; }};
          testImageArgs = builtins.functionArgs o.lib.offlineTestImage;
        }}"""
    )
    assert result["bridge"] == "10.120.0.1"
    assert result["config"]["payload"] == {"kernel": "vmlinux"}
    # The offline test image takes host paths (nix/test-image/default.nix).
    assert {"busybox", "kernel", "modules"} <= set(result["testImageArgs"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("{ }", "pass one of `modules` (NixOS modules), `nixos`"),
        ('{ modules = [ ]; kernel = "k"; }', "pass only one of `modules`, `nixos`, `kernel`"),
        ('{ kernel = "k"; }', "with `kernel`, pass `pkgs` or `system`"),
        (
            f'{{ kernel = "k"; pkgs = {HOST_PKGS}; diskSize = 1024; }}',
            "diskSize applies only to disks built from a NixOS system",
        ),
        (
            '{ nixos = { config = { }; pkgs = { path = "/x"; stdenv.hostPlatform = { }; }; }; }',
            "the NixOS system does not enable procurator.guest",
        ),
    ],
)
def test_mk_vm_image_refuses_bad_arguments(nix: Nix, args: str, message: str) -> None:
    error = nix.eval_error(f'({OUTPUTS}.lib.mkVmImage ({args} // {{ name = "t"; }})).drvPath')
    assert "procurator.mkVmImage (t): " + message in error, error


@pytest.fixture
def unique_name(nix: Nix) -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("building without a Nix daemon needs root (writes /nix/store)")
    if not (Path("/bin/sh").exists() and shutil.which("ln", path="/usr/bin")):
        pytest.skip("needs /bin/sh and coreutils in /usr/bin")
    name = f"procurator-flake-test-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        StorePaths(nix, name).delete()


@pytest.mark.root
def test_mk_vm_image_from_kernel_files_builds(nix: Nix, unique_name: str, tmp_path: Path) -> None:
    (tmp_path / "vmlinux").write_bytes(b"kernel")
    (tmp_path / "initrd").write_bytes(b"initrd")
    kernel = (
        f'builtins.path {{ path = {nix_path(tmp_path / "vmlinux")}; name = "{unique_name}-k"; }}'
    )
    initrd = (
        f'builtins.path {{ path = {nix_path(tmp_path / "initrd")}; name = "{unique_name}-i"; }}'
    )
    proc = nix.run(
        "nix-build",
        "--no-out-link",
        "--expr",
        f"""{OUTPUTS}.lib.mkVmImage {{
          name = "{unique_name}";
          pkgs = {HOST_PKGS};
          kernel = {kernel};
          initrd = {initrd};
          cmdline = "console=ttyS0";
          memoryMib = 128;
        }}""",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip()
    assert sorted(os.listdir(out)) == ["initrd", "vm-config.json", "vmlinux"]
    assert json.loads(Path(out, "vm-config.json").read_text()) == {
        "payload": {
            "kernel": f"{out}/vmlinux",
            "initramfs": f"{out}/initrd",
            "cmdline": "console=ttyS0",
        },
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 128 << 20},
    }
    assert Path(out, "vmlinux").read_bytes() == b"kernel"
