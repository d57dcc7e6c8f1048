"""bench/tiny_vmm.c, the C fake VMM of the 10,000-VM benchmarks, compiled
and run as a real process on a real unix socket: through the same OpenAPI
conformance walk as the test fake (``walk_documented_api``: every request
and answer validated against cloud-hypervisor's API description) and
through the worker's cloud-hypervisor driver (launch, state, counters,
stop), so the benchmarks' VMM cannot drift from the API the worker speaks.

The binary is named ``cloud-hypervisor-tiny`` so the suite's leak guard
(which looks for ``cloud-hypervisor`` in command lines) sees it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmmhelpers import REPO, ApiValidator, definition, walk_documented_api

from procurator.worker.state import StateDir
from procurator.worker.vmm import process
from procurator.worker.vmm.base import VmmPaths, VmState
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver

SOURCE = REPO / "bench" / "tiny_vmm.c"


@pytest.fixture(scope="module")
def tiny_vmm() -> Iterator[Path]:
    """bench/tiny_vmm.c compiled (warnings are errors)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc, gcc) to build bench/tiny_vmm.c: apt-get install gcc")
    out = Path(tempfile.mkdtemp(prefix="tiny-vmm-"))
    binary = out / "cloud-hypervisor-tiny"
    try:
        built = subprocess.run(
            [compiler, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(SOURCE)],
            check=False,
            capture_output=True,
            text=True,
        )
        assert built.returncode == 0, built.stderr
        yield binary
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def paths(state_dir: Path) -> VmmPaths:
    paths = StateDir(state_dir).paths("vm")
    paths.vmm_dir.mkdir(parents=True)
    return paths


def events(paths: VmmPaths) -> list[tuple[str, str]]:
    lines = paths.event_file.read_text().splitlines()
    return [(record["source"], record["event"]) for record in map(json.loads, lines)]


def test_the_tiny_vmm_speaks_the_documented_api(
    tiny_vmm: Path, openapi: ApiValidator, paths: VmmPaths
) -> None:
    driver = CloudHypervisorDriver(str(tiny_vmm), transport_factory=openapi.transport)
    try:
        walk_documented_api(driver, paths, openapi)
    finally:
        driver.close()
    assert not paths.api_socket.exists()  # removed on a clean exit


def test_the_driver_launches_watches_and_stops_the_tiny_vmm(
    tiny_vmm: Path, openapi: ApiValidator, paths: VmmPaths
) -> None:
    """What the worker does with a VMM, validated on the wire: launch
    (ping, create, boot, info), state, counters, power button; the events
    it writes and the socket it removes."""
    driver = CloudHypervisorDriver(str(tiny_vmm), transport_factory=openapi.transport)
    vm = definition(memory={"size": 128 << 20})
    handle = driver.launch(vm, paths, timeout=20.0)
    try:
        assert driver.ping(handle, timeout=5.0)["pid"] == handle.pid
        assert driver.state(handle, timeout=5.0) is VmState.RUNNING
        info = driver.info(handle, timeout=5.0)
        assert info is not None and info["memory_actual_size"] == 128 << 20
        assert info["config"]["payload"] == vm.to_vm_config()["payload"]
        counters = driver.counters(handle, timeout=5.0)
        assert {"rx_bytes", "rx_frames"} <= set(counters["_net0"])  # as lean_vmm.py
        mark = driver.state_mark(paths)
        driver.pause(handle, timeout=5.0)
        assert driver.state_mark(paths) != mark  # the worker reads the state again
        assert driver.state(handle, timeout=5.0) is VmState.PAUSED
        driver.resume(handle, timeout=5.0)
        driver.power_button(handle, timeout=5.0)
        assert process.wait_exit(handle.pid, handle.pid_start_ticks, 10.0)
    finally:
        process.terminate(handle.pid, handle.pid_start_ticks, grace=1.0)
        driver.close()
    assert not paths.api_socket.exists()
    assert events(paths) == [
        ("vmm", "starting"),
        ("vm", "booting"),
        ("vm", "booted"),
        ("vm", "pausing"),
        ("vm", "paused"),
        ("vm", "resuming"),
        ("vm", "resumed"),
        ("vm", "shutdown"),
        ("vmm", "shutdown"),
    ]
    assert not openapi.errors


def test_a_socket_held_by_a_live_tiny_vmm_is_refused(tiny_vmm: Path, paths: VmmPaths) -> None:
    """The flock on <socket>.lock, as cloud-hypervisor: a second VMM on the
    same socket exits with an error and leaves the first one serving."""
    driver = CloudHypervisorDriver(str(tiny_vmm))
    handle = driver.launch(definition(), paths, timeout=20.0)
    try:
        second = subprocess.run(
            driver.argv(paths), check=False, capture_output=True, text=True, timeout=10
        )
        assert second.returncode != 0 and "in use" in second.stderr
        assert driver.state(handle, timeout=5.0) is VmState.RUNNING
    finally:
        process.terminate(handle.pid, handle.pid_start_ticks, grace=1.0)
        driver.close()
