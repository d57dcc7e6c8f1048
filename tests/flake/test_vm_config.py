"""nix/lib/vm-config.nix: what vm-config.json holds, evaluated without
nixpkgs and checked against the image contract and cloud-hypervisor's
OpenAPI ``VmConfig`` schema (skipped, saying so, when the file is absent)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flake_schema import problems
from flakehelpers import NIX_LIB, Nix, nix_path

from procurator.core.validation import LIMITS

pytestmark = pytest.mark.nix

VM_CONFIG = nix_path(NIX_LIB / "vm-config.nix")
KERNEL = "/nix/store/00000000000000000000000000000000-linux/vmlinux"
INITRD = "/nix/store/11111111111111111111111111111111-initrd/initrd"
DISK = "/nix/store/22222222222222222222222222222222-disk/nixos.img"


def mk(nix: Nix, args: str) -> Any:
    return nix.eval(f"(import {VM_CONFIG}).mkVmConfig {args}")


def test_minimal_config_names_the_kernel_and_defaults(nix: Nix) -> None:
    assert mk(nix, f'{{ kernel = "{KERNEL}"; }}') == {
        "payload": {"kernel": KERNEL},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 512 * 1024 * 1024},
    }


def test_full_config(nix: Nix) -> None:
    config = mk(
        nix,
        f"""{{
          kernel = "{KERNEL}"; initramfs = "{INITRD}"; disk = "{DISK}";
          cmdline = [ "console=ttyS0" "" "init=/nix/store/x/init" ];
          vcpus = 4; memoryMib = 2048;
          extraConfig = {{ rng.src = "/dev/urandom"; balloon = {{ size = 0; }}; }};
        }}""",
    )
    assert config == {
        "payload": {
            "kernel": KERNEL,
            "initramfs": INITRD,
            "cmdline": "console=ttyS0 init=/nix/store/x/init",
        },
        "cpus": {"boot_vcpus": 4, "max_vcpus": 4},
        "memory": {"size": 2048 * 1024 * 1024},
        "disks": [{"path": DISK, "id": "disk0"}],
        "rng": {"src": "/dev/urandom"},
        "balloon": {"size": 0},
    }


@pytest.mark.parametrize(
    "args",
    [
        f'{{ kernel = "{KERNEL}"; }}',
        '{ kernel = "vmlinux"; initramfs = "initrd"; disk = "disk.img"; cmdline = "quiet"; }',
        f'{{ kernel = "{KERNEL}"; vcpus = 256; memoryMib = 1048576; disk = "{DISK}"; }}',
        f'{{ kernel = "{KERNEL}"; extraConfig.rng.src = "/dev/urandom"; }}',
    ],
)
def test_configs_match_the_cloud_hypervisor_schema(
    nix: Nix, vm_config_schema: dict[str, Any], args: str
) -> None:
    assert problems(mk(nix, args), vm_config_schema) == []


def test_limits_mirror_the_workers(nix: Nix) -> None:
    limits = nix.eval(f"(import {VM_CONFIG}).limits")
    assert limits == {
        "minVcpus": 1,
        "maxVcpus": LIMITS.max_vcpus,
        "minMemoryMib": LIMITS.min_memory_mib,
        "maxMemoryMib": LIMITS.max_memory_mib,
    }


def test_layout_is_the_image_contract(nix: Nix) -> None:
    assert nix.eval(f'(import {VM_CONFIG}).imagePaths "/nix/store/x-img"') == {
        "config": "/nix/store/x-img/vm-config.json",
        "kernel": "/nix/store/x-img/vmlinux",
        "initramfs": "/nix/store/x-img/initrd",
        "disk": "/nix/store/x-img/disk.img",
    }


def test_json_text_is_the_same_config(nix: Nix) -> None:
    text = nix.eval(f'(import {VM_CONFIG}).mkVmConfigJSON {{ kernel = "{KERNEL}"; vcpus = 2; }}')
    assert json.loads(text) == mk(nix, f'{{ kernel = "{KERNEL}"; vcpus = 2; }}')


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ('{ kernel = "k"; vcpus = 0; }', "vcpus = 0 is out of range [1, 256]"),
        ('{ kernel = "k"; vcpus = 257; }', "vcpus = 257 is out of range [1, 256]"),
        ('{ kernel = "k"; vcpus = "2"; }', "vcpus must be an integer, got string"),
        ('{ kernel = "k"; memoryMib = 15; }', "memoryMib = 15 is out of range [16, 1048576]"),
        ('{ kernel = ""; }', "kernel must be a non-empty path string"),
        ("{ kernel = null; }", "kernel must be a non-empty path string, got null"),
        ('{ kernel = "k"; initramfs = ""; }', "initramfs must be null or a non-empty path"),
        ('{ kernel = "k"; disk = 3; }', "disk must be null or a non-empty path string"),
        ('{ kernel = "k"; cmdline = 3; }', "cmdline must be a string or a list of strings"),
        ('{ kernel = "k"; extraConfig.net = [ ]; }', "extraConfig sets net: the worker sets"),
        (
            '{ kernel = "k"; extraConfig = { serial.mode = "Tty"; console.mode = "Off"; }; }',
            "extraConfig sets console, serial: the worker sets",
        ),
        ('{ kernel = "k"; extraConfig.devices = [ ]; }', "extraConfig sets devices: these reach"),
        ('{ kernel = "k"; extraConfig.fs = [ ]; }', "extraConfig sets fs: these reach host"),
        ('{ kernel = "k"; extraConfig.payload = { }; }', "extraConfig sets payload: use the"),
        ('{ kernel = "k"; extraConfig.cpus = { }; }', "extraConfig sets cpus: use the"),
    ],
)
def test_refuses_bad_arguments_with_a_message(nix: Nix, args: str, message: str) -> None:
    error = nix.eval_error(f"(import {VM_CONFIG}).mkVmConfig {args}")
    assert "procurator.mkVmConfig: " + message in error, error
