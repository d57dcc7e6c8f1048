"""Suite-wide rules: a test that leaves a VMM or procurator process, a tap
device or a network namespace behind fails, whatever it asserted.

Processes count only when they carry this session's marker in their
environment (children inherit it), so two test runs on one machine never
judge, or kill, each other's processes.

Area fixtures live in each test directory's own conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

_MARKER = f"PROCURATOR_TEST_SESSION={uuid.uuid4().hex}"
os.environ["PROCURATOR_TEST_SESSION"] = _MARKER.split("=", 1)[1]
_MARKER_BYTES = _MARKER.encode()

_OURS = re.compile(
    rb"qemu-system|cloud-hypervisor"
    rb"|procurator(\x00| )(master|worker)|-m\x00procurator\x00(master|worker)"
)


def _our_processes() -> dict[int, str]:
    found: dict[int, str] = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # A zombie is already dead; its parent reaps it.
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            continue
        if not _OURS.search(cmdline):
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if _MARKER_BYTES in environ.split(b"\x00"):
            found[int(entry)] = cmdline.replace(b"\x00", b" ").decode(errors="replace")[:200]
    return found


def _taps() -> set[str]:
    base = Path("/sys/class/net")
    return (
        {p.name for p in base.iterdir() if (p / "tun_flags").exists()} if base.exists() else set()
    )


def _namespaces() -> set[str]:
    run = Path("/run/netns")
    return {p.name for p in run.iterdir()} if run.exists() else set()


def _snapshot() -> tuple[dict[int, str], set[str], set[str]]:
    return _our_processes(), _taps(), _namespaces()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    procs_before, taps_before, ns_before = _snapshot()
    yield
    # Processes may take a moment to be reaped after a test's teardown.
    deadline = time.monotonic() + 5.0
    while True:
        procs, taps, namespaces = _snapshot()
        leaked_procs = {p: c for p, c in procs.items() if p not in procs_before}
        leaked = {
            "processes": leaked_procs,
            "taps": taps - taps_before,
            "namespaces": namespaces - ns_before,
        }
        if not any(leaked.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    problems = {k: v for k, v in leaked.items() if v}
    if problems:
        for pid in leaked_procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        pytest.fail(f"test leaked {problems}")
