"""Helpers of the operations tests: the fleet fixture lives in
tests/fleethelpers.py (``fake_fleet``); this module adds VM configs."""

from __future__ import annotations

from typing import Any


def vm_config(*, disk: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = {
        "payload": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
    }
    if disk:
        config["disks"] = [{"path": "disk.img"}]
    return config
