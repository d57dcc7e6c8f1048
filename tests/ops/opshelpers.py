"""Helpers of the operations tests: the fleet fixture lives in
tests/fleethelpers.py (``fake_fleet``); this module adds VM configs and a
command whose reader goes away."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def vm_config(*, disk: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = {
        "payload": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
    }
    if disk:
        config["disks"] = [{"path": "disk.img"}]
    return config


def until_reader_gone(
    env: dict[str, str], args: str, *, reader: str = "head -n 1", cwd: Path | None = None
) -> list[str]:
    """``procurator ARGS | READER``: what the reader printed, then how
    procurator exited. A guard against waiting forever (the bug), not a
    measurement."""
    shell = subprocess.Popen(
        [
            "bash",
            "-c",
            f'"{sys.executable}" -m procurator {args} | {reader}; '
            'echo "procurator exited ${PIPESTATUS[0]}"',
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        stdout, stderr = shell.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.communicate()
        pytest.fail(f"procurator {args} went on after its reader was gone")
    assert stderr == ""
    return stdout.splitlines()
