"""The cloud-hypervisor driver against the fake VMM (a real process on a real
unix socket), and the fake against the cloud-hypervisor API description."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from vmmhelpers import (
    FAKE,
    GUEST,
    NET,
    U64_MAX,
    ApiCalls,
    ApiValidator,
    config,
    definition,
    fake_driver,
    walk_documented_api,
)

from procurator.core.errors import PermanentError, TemporaryError
from procurator.core.vmdef import VmDefinition
from procurator.worker.runtime import RuntimeOptions, make_driver
from procurator.worker.state import StateDir
from procurator.worker.vmm import process
from procurator.worker.vmm.base import (
    VmExit,
    VmmError,
    VmmGone,
    VmmHandle,
    VmmPaths,
    VmmRejected,
    VmmTimeout,
    VmState,
)
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver


@pytest.fixture
def paths(state_dir: Path) -> VmmPaths:
    """The paths the worker gives VM ``vm`` (its directory made)."""
    paths = StateDir(state_dir).paths("vm")
    paths.vmm_dir.mkdir(parents=True)
    return paths


def faults(paths: VmmPaths, **values: object) -> None:
    Path(f"{paths.api_socket}.fault").write_text(json.dumps(values))


@pytest.fixture
def vmm(driver: CloudHypervisorDriver, paths: VmmPaths) -> Iterator[VmmHandle]:
    """A VMM running the VM of ``definition()`` with a NIC."""
    handle = driver.launch(definition(net=[NET]), paths, timeout=20.0)
    yield handle
    process.terminate(handle.pid, handle.pid_start_ticks, grace=2.0)


def events(paths: VmmPaths) -> list[str]:
    return [json.loads(line)["event"] for line in paths.event_file.read_text().splitlines()]


def left_running(paths: VmmPaths) -> list[tuple[int, int]]:
    """Processes launched for the VM that still run (none after a failure)."""
    return process.find_launched(paths.vm_dir)


def test_launch_boot_and_inspect(
    driver: CloudHypervisorDriver, paths: VmmPaths, api_calls: ApiCalls
) -> None:
    handle = driver.launch(definition(), paths, timeout=20.0)
    try:
        assert process.is_alive(handle.pid, handle.pid_start_ticks)
        assert handle.api_socket == str(paths.api_socket)
        cmdline = Path(f"/proc/{handle.pid}/cmdline").read_bytes().split(b"\0")
        assert b"--api-socket" in cmdline
        assert f"path={paths.api_socket}".encode() in cmdline
        assert f"path={paths.event_file}".encode() in cmdline
        # Marked as launched for this VM, whatever its command line says.
        assert [pid for pid, _ in left_running(paths)] == [handle.pid]
        # Its own session, and not our child: it outlives the worker, and
        # is watched the same way whether started or re-adopted.
        assert os.getsid(handle.pid) != os.getsid(0)
        ppid = int(Path(f"/proc/{handle.pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert ppid != os.getpid()

        assert driver.state(handle, timeout=5.0) is VmState.RUNNING
        info = driver.info(handle, timeout=5.0)
        assert info is not None
        assert info["config"]["payload"]["kernel"] == str(GUEST / "vmlinux")
        assert info["config"] == config()  # the definition, rendered as the VmConfig

        driver.pause(handle, timeout=5.0)
        assert driver.state(handle, timeout=5.0) is VmState.PAUSED
        driver.resume(handle, timeout=5.0)
        assert driver.state(handle, timeout=5.0) is VmState.RUNNING
        assert events(paths)[:3] == ["starting", "booting", "booted"]
        assert events(paths)[3:7] == ["pausing", "paused", "resuming", "resumed"]

        driver.shutdown_vmm(handle, timeout=5.0)
        assert process.wait_exit(handle.pid, handle.pid_start_ticks, 10.0)
        assert not paths.api_socket.exists()  # a clean exit removes the socket
        assert driver.classify_exit(paths, handle) is VmExit.POWERED_OFF
    finally:
        process.terminate(handle.pid, handle.pid_start_ticks, grace=1.0)
    endpoints = {endpoint for endpoint, _, _ in api_calls.calls}
    assert {"vmm.ping", "vm.create", "vm.boot", "vm.info", "vm.pause", "vm.resume"} <= endpoints
    assert all(seconds >= 0 for _, seconds, _ in api_calls.calls)


def test_every_field_of_a_definition_is_rendered_as_the_documented_vmconfig(
    driver: CloudHypervisorDriver, paths: VmmPaths, openapi: ApiValidator
) -> None:
    """A definition using every section of the schema goes to the VMM as a
    VmConfig the OpenAPI description accepts (the driver's transport checks
    the vm.create body), and comes back from vm.info as it went."""
    bucket = {"size": 1 << 20, "refill_time": 100, "one_time_burst": 1 << 20}
    limiter = {"bandwidth": bucket, "ops": {"size": 100, "refill_time": 100}}
    rich = config(
        cpus={
            "boot_vcpus": 2,
            "max_vcpus": 2,
            "topology": {
                "threads_per_core": 1,
                "cores_per_die": 2,
                "dies_per_package": 1,
                "packages": 1,
            },
            "kvm_hyperv": False,
            "max_phys_bits": 46,
            "nested": False,
        },
        memory={"size": 256 << 20, "mergeable": True, "shared": False, "thp": True},
        disks=[
            {
                "path": "/var/lib/procurator/disk.img",
                "id": "disk0",
                "readonly": False,
                "direct": True,
                "num_queues": 2,
                "queue_size": 256,
                "serial": "root",
                "rate_limiter_config": limiter,
                "image_type": "Raw",
                "sparse": True,
                "lock_granularity": "Full",
            }
        ],
        net=[
            {
                "tap": "vm-tap0",
                "mac": "52:54:00:12:34:56",
                "host_mac": "fe:54:00:12:34:56",
                "id": "net0",
                "mtu": 1500,
                "offload_tso": True,
                "rate_limiter_config": limiter,
            }
        ],
        rng={"src": "/dev/urandom"},
        balloon={"size": 64 << 20, "deflate_on_oom": True},
        console={"mode": "Null"},
        platform={"num_pci_segments": 1, "serial_number": "sn-1", "oem_strings": ["a", "b"]},
        rate_limit_groups=[{"id": "group0", "rate_limiter_config": limiter}],
        pci_segments=[{"pci_segment": 0, "mmio32_aperture_weight": 1}],
        watchdog=True,
        pvpanic=True,
    )
    handle = driver.launch(VmDefinition.from_vm_config(rich), paths, timeout=20.0)
    try:
        info = driver.info(handle, timeout=5.0)
        assert info is not None and info["config"] == rich
    finally:
        process.terminate(handle.pid, handle.pid_start_ticks, grace=1.0)
    assert openapi.seen["PUT /api/v1/vm.create"] == 1
    assert not openapi.errors


def test_counters_drop_the_u64_max_latency_sentinels(
    driver: CloudHypervisorDriver, vmm: VmmHandle
) -> None:
    raw = httpx.Client(transport=httpx.HTTPTransport(uds=vmm.api_socket), trust_env=False)
    with raw:
        first_raw = raw.get("http://localhost/api/v1/vm.counters").json()
    assert first_raw["disk0"]["read_latency_min"] == U64_MAX  # no I/O yet
    first = driver.counters(vmm, timeout=5.0)
    assert set(first) == {"disk0", "net0"}
    assert all(value != U64_MAX for device in first.values() for value in device.values())
    later = driver.counters(vmm, timeout=5.0)
    assert later["disk0"]["read_latency_max"] > 0
    assert later["disk0"]["read_bytes"] >= first["disk0"]["read_bytes"]
    assert {"rx_bytes", "rx_frames", "tx_bytes", "tx_frames"} <= set(later["net0"])


def test_a_rejected_config_is_permanent_with_the_vmm_error_chain(
    driver: CloudHypervisorDriver, paths: VmmPaths, api_calls: ApiCalls
) -> None:
    faults(paths, reject={"vm.create": 400})
    with pytest.raises(VmmRejected) as caught:
        driver.launch(definition(), paths, timeout=20.0)
    assert isinstance(caught.value, PermanentError)
    assert caught.value.status == 400
    assert caught.value.details == ("Error from API: vm.create rejected", "fault injection")
    assert "vm.create" in str(caught.value) and str(paths.api_socket) in str(caught.value)
    assert ("vm.create", False) in [(e, ok) for e, _, ok in api_calls.calls]
    assert left_running(paths) == []  # a failed launch leaves no process
    assert not paths.api_socket.exists()


def test_a_server_error_is_temporary(driver: CloudHypervisorDriver, paths: VmmPaths) -> None:
    faults(paths, reject={"vm.boot": 500})
    with pytest.raises(VmmError) as caught:
        driver.launch(definition(), paths, timeout=20.0)
    assert isinstance(caught.value, TemporaryError)
    assert not isinstance(caught.value, PermanentError)
    assert "HTTP 500" in str(caught.value)
    assert left_running(paths) == []


def test_wrong_state_is_rejected(driver: CloudHypervisorDriver, vmm: VmmHandle) -> None:
    with pytest.raises(VmmRejected) as caught:
        driver.resume(vmm, timeout=5.0)  # it runs
    assert caught.value.status == 405
    driver.shutdown_vm(vmm, timeout=5.0)
    with pytest.raises(VmmRejected) as caught:
        driver.pause(vmm, timeout=5.0)  # it is shut down
    assert caught.value.status == 405


def test_a_hung_call_times_out(
    driver: CloudHypervisorDriver, vmm: VmmHandle, paths: VmmPaths
) -> None:
    faults(paths, hang=["vm.info"])
    with pytest.raises(VmmTimeout, match=r"did not answer vm\.info"):
        driver.state(vmm, timeout=0.3)
    # The API as a whole still answers: only that call hangs.
    assert driver.ping(vmm, timeout=5.0)["version"]


def test_a_vanished_vmm_is_gone(
    driver: CloudHypervisorDriver, vmm: VmmHandle, paths: VmmPaths
) -> None:
    process.signal_process(vmm.pid, vmm.pid_start_ticks, signal.SIGKILL)
    assert process.wait_exit(vmm.pid, vmm.pid_start_ticks, 10.0)
    with pytest.raises(VmmGone):
        driver.state(vmm, timeout=2.0)
    assert driver.adopt(paths, vmm) is None
    assert driver.classify_exit(paths, vmm) is VmExit.CRASHED  # it left its socket


def test_a_vmm_that_fails_to_start_leaves_nothing(
    driver: CloudHypervisorDriver, paths: VmmPaths
) -> None:
    faults(paths, fail_start="no such kernel feature")
    with pytest.raises(VmmGone) as caught:
        driver.launch(definition(), paths, timeout=20.0)
    assert any("no such kernel feature" in line for line in caught.value.details)
    assert left_running(paths) == []


def test_a_missing_binary_is_reported(paths: VmmPaths) -> None:
    missing = CloudHypervisorDriver(str(paths.vm_dir / "no-such-cloud-hypervisor"))
    with pytest.raises(VmmError, match="cannot start"):
        missing.launch(definition(), paths, timeout=5.0)


def test_vmm_binary_is_a_path_taken_as_is(state_dir: Path, paths: VmmPaths) -> None:
    # ``--vmm-binary`` names one executable, spaces and all: it is never
    # split like a shell line (arguments go in ``--vmm-arg``).
    bin_dir = state_dir / "my vmm"
    bin_dir.mkdir()
    wrapper = bin_dir / "cloud hypervisor"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    driver = make_driver(RuntimeOptions(driver="cloud-hypervisor", vmm_binary=str(wrapper)))
    assert isinstance(driver, CloudHypervisorDriver)
    assert driver.argv(paths)[0] == str(wrapper)
    # The wrapper runs the fake, named by an argument of its own.
    driver = make_driver(
        RuntimeOptions(driver="cloud-hypervisor", vmm_binary=str(wrapper), vmm_args=(str(FAKE),))
    )
    assert isinstance(driver, CloudHypervisorDriver)
    assert driver.argv(paths)[:2] == [str(wrapper), str(FAKE)]
    handle = driver.launch(definition(), paths, timeout=20.0)
    try:
        assert driver.ping(handle, timeout=5.0)["pid"] == handle.pid  # the wrapper exec'd
    finally:
        process.terminate(handle.pid, handle.pid_start_ticks, grace=1.0)
        driver.close()


def test_a_socket_held_by_another_vmm_is_never_taken(
    driver: CloudHypervisorDriver, vmm: VmmHandle, paths: VmmPaths
) -> None:
    # v53 semantics: the first VMM holds <socket>.lock and a second one exits;
    # if the driver pings before that, the answering pid gives it away.
    with pytest.raises(VmmError) as caught:
        driver.launch(definition(), paths, timeout=20.0)
    assert "another VMM owns this socket" in str(caught.value) or any(
        "in use by another VMM" in line for line in caught.value.details
    )
    assert driver.ping(vmm, timeout=5.0)["pid"] == vmm.pid  # its socket is still there
    assert driver.adopt(paths, vmm) == vmm
    with pytest.raises(VmmError, match="held by a live VMM"):
        driver.clear_leftovers(paths, unrecorded=False, grace=0.0)


def test_clear_leftovers_stops_an_unrecorded_vmm_and_removes_its_socket(
    driver: CloudHypervisorDriver, vmm: VmmHandle, paths: VmmPaths
) -> None:
    driver.clear_leftovers(paths, unrecorded=True, grace=2.0)
    assert not process.is_alive(vmm.pid, vmm.pid_start_ticks)
    assert not paths.api_socket.exists()
    assert left_running(paths) == []


def test_power_button_powers_the_guest_off_and_the_vmm_exits(
    driver: CloudHypervisorDriver, vmm: VmmHandle, paths: VmmPaths
) -> None:
    driver.power_button(vmm, timeout=5.0)
    assert process.wait_exit(vmm.pid, vmm.pid_start_ticks, 10.0)
    assert not paths.api_socket.exists()
    assert events(paths)[-2:] == ["shutdown", "shutdown"]  # vm, then vmm


def test_shutdown_vm_keeps_the_vmm(driver: CloudHypervisorDriver, vmm: VmmHandle) -> None:
    driver.shutdown_vm(vmm, timeout=5.0)
    assert driver.state(vmm, timeout=5.0) is VmState.SHUTDOWN
    assert process.is_alive(vmm.pid, vmm.pid_start_ticks)


def test_the_api_observer_sees_every_call(
    driver: CloudHypervisorDriver, paths: VmmPaths, api_calls: ApiCalls
) -> None:
    handle = driver.launch(definition(), paths, timeout=20.0)
    try:
        driver.state(handle, timeout=5.0)
    finally:
        process.terminate(handle.pid, handle.pid_start_ticks, grace=1.0)
    endpoints = api_calls.endpoints()
    pings = endpoints.index("vm.create")
    assert pings >= 1 and set(endpoints[:pings]) == {"vmm.ping"}  # until the API answered
    assert endpoints[pings:] == ["vm.create", "vm.boot", "vm.info", "vm.info"]


def test_the_fake_speaks_the_documented_api(openapi: ApiValidator, paths: VmmPaths) -> None:
    """Every endpoint the fake serves, in every state, through a validating
    client: request and response checked against the OpenAPI description
    (the walk is shared with bench/tiny_vmm.c's test, test_tiny_vmm.py)."""
    driver = fake_driver(transport_factory=openapi.transport)
    try:
        walk_documented_api(driver, paths, openapi)
    finally:
        driver.close()


def test_the_validator_catches_drift(openapi: ApiValidator) -> None:
    """The validation is real: a malformed request and response are caught."""
    openapi.check_request(
        "put", "/api/v1/vm.create", b'{"cpus": {"boot_vcpus": 0}}', "application/json"
    )
    openapi.check_response(
        "get", "/api/v1/vm.info", 200, b'{"state": "Sleeping", "config": {}}', "application/json"
    )
    openapi.check_response("put", "/api/v1/vm.boot", 500, b"oops", "text/plain")
    found = list(openapi.errors)
    openapi.errors.clear()
    assert len(found) >= 3, found
    assert any("payload" in e for e in found)
    assert any("Sleeping" in e for e in found)


def test_a_socket_path_too_long_is_refused(driver: CloudHypervisorDriver, state_dir: Path) -> None:
    deep = state_dir / ("d" * 120)
    deep.mkdir()
    long_paths = VmmPaths(deep, deep / "api.sock", deep / "e", deep / "l", deep / "s")
    with pytest.raises(VmmRejected, match="too long"):
        driver.launch(definition(), long_paths, timeout=5.0)


def test_fake_runs_under_the_leak_guard_name(paths: VmmPaths) -> None:
    # The suite's leak guard looks for "cloud-hypervisor" in command lines.
    argv = fake_driver().argv(paths)
    assert argv[:2] == [sys.executable, str(FAKE)]
    assert "cloud-hypervisor" in " ".join(argv)
