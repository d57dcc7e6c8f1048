"""What the end-to-end tests with real ``procurator`` processes share
(tests/e2e, tests/ops): a private Nix configuration, images added to the
real store and deleted afterwards, the CLI, and daemons stopped with SIGTERM
(SIGKILL after 30 s)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "fakes" / "cloud-hypervisor-fake.py"
NIX_CONF = "build-users-group =\nsubstituters =\nflake-registry =\n"


@pytest.fixture(scope="module")
def nix_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    conf = tmp_path_factory.mktemp("nix-conf")
    (conf / "nix.conf").write_text(NIX_CONF)
    return {**os.environ, "NIX_CONF_DIR": str(conf)}


AddImage = Callable[..., str]


@pytest.fixture(scope="module")
def add_image(
    nix_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AddImage]:
    """``add_image(name, config, files={})``: a store path holding
    vm-config.json, a dummy kernel and ``files``; deleted afterwards."""
    added: list[str] = []

    def add(name: str, config: dict[str, Any], files: dict[str, bytes] | None = None) -> str:
        src = tmp_path_factory.mktemp("image") / name
        src.mkdir()
        (src / "vmlinux").write_bytes(b"\0" * 4096)
        (src / "vm-config.json").write_text(json.dumps(config))
        for file_name, data in (files or {}).items():
            (src / file_name).write_bytes(data)
        out = subprocess.run(
            ["nix-store", "--add", str(src)],
            env=nix_env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        added.append(out)
        return out

    yield add
    for path in added:
        subprocess.run(
            ["nix-store", "--delete", path], env=nix_env, check=False, capture_output=True
        )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "procurator", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


@contextmanager
def procurator_process(
    args: list[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``procurator <args>`` with its output appended to ``log``."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "procurator", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
