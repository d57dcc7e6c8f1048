"""VmManager against real fake-VMM processes: lifecycle, concurrency, faults,
and crashes of the worker itself."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from vmmhelpers import (
    FAKE,
    FAST,
    ApiCalls,
    ManagerFactory,
    Recorder,
    api_client,
    config,
    definition,
    vmm_pids_under,
    write_faults,
)

from procurator.core.errors import PermanentError, TemporaryError
from procurator.core.models import EventKind, Phase, PowerState
from procurator.logs import ContextFilter
from procurator.worker.manager import ManagerClosedError, Timeouts, VmSpec
from procurator.worker.state import StateDir, VmLockedError
from procurator.worker.vmm import process
from procurator.worker.vmm.base import VmmPaths
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver

HERE = Path(__file__).resolve().parent


def spec(vm_id: str = "vm1", hash: str = "h1", **kwargs: object) -> VmSpec:
    return VmSpec(vm_id, hash, definition(), **kwargs)  # type: ignore[arg-type]


def vmms_of(state_dir: Path, vm_id: str) -> list[tuple[int, int]]:
    """(pid, start ticks) of every fake VMM serving the VM's API socket,
    found by its command line (not by the product's own mechanism)."""
    return sorted(vmm_pids_under(state_dir / "vms" / vm_id / "run" / "api.sock").items())


def alive(pid: int) -> bool:
    return process.pid_start_ticks(pid) is not None


def kill9_and_wait(pid: int) -> None:
    """SIGKILL a VMM and wait until the whole process is gone. Its identity
    is read first: once the leader is a zombie (its other threads still
    exiting, still holding the socket's lock) it no longer reads as alive."""
    ticks = process.pid_start_ticks(pid)
    assert ticks is not None
    os.kill(pid, signal.SIGKILL)
    assert process.wait_exit(pid, ticks, 10.0)


def test_lifecycle(make_manager: ManagerFactory, state_dir: Path, recorder: Recorder) -> None:
    manager = make_manager()
    obs = manager.ensure(spec(address="10.0.0.2", image="/nix/store/x"))
    assert obs.phase is Phase.RUNNING
    assert obs.power is PowerState.RUNNING
    assert obs.observed_hash == obs.desired_hash == "h1"
    assert obs.pid is not None and alive(obs.pid)
    assert obs.restarts == 0
    assert obs.boot_seconds is not None and obs.boot_seconds > 0  # launch to running
    assert (obs.address, obs.image) == ("10.0.0.2", "/nix/store/x")
    assert [pid for pid, _ in vmms_of(state_dir, "vm1")] == [obs.pid]

    vm_dir = state_dir / "vms" / "vm1"
    durable = json.loads((vm_dir / "vm.json").read_text())
    assert durable["hash"] == "h1" and durable["image"] == "/nix/store/x"
    assert durable["config"] == config()  # the definition, as its VmConfig
    handles = json.loads((vm_dir / "handles.json").read_text())
    assert handles["handle"]["pid"] == obs.pid and handles["hash"] == "h1"
    assert manager.get("vm1") == obs
    assert [o.vm_id for o in manager.list()] == ["vm1"]
    assert recorder.kinds("vm1")[:2] == [EventKind.CREATED, EventKind.BOOTED]

    manager.remove("vm1")
    assert not alive(obs.pid)
    assert not vm_dir.exists()
    assert not (state_dir / "locks" / "vm1.lock").exists()
    assert manager.get("vm1") is None
    assert recorder.kinds("vm1")[-1] is EventKind.REMOVED
    manager.remove("vm1")  # idempotent


def test_ensure_is_idempotent_and_makes_no_vmm_calls(
    make_manager: ManagerFactory, api_calls: ApiCalls
) -> None:
    manager = make_manager(timeouts=Timeouts(health_interval=3600.0, counters_interval=0))
    first = manager.ensure(spec())
    before = api_calls.count()
    again = manager.ensure(spec(address="10.0.0.9", op_id="op-2"))
    assert api_calls.count() == before
    assert again.pid == first.pid
    assert again.address == "10.0.0.9" and again.op_id == "op-2"


def test_fifty_vms_concurrently(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    # What is tested is concurrency, not hang detection: with FAST's 1 s API
    # timeout, two slow answers in a row from one of 50 VMMs on a loaded
    # 2-core machine read as a hung VMM, which is (rightly) replaced by a new
    # pid (seen under stress-ng: "did not answer vm.counters within 1 s",
    # then it answered the power button). Timeouts at twice the product's.
    manager = make_manager(timeouts=dataclasses.replace(FAST, api=10.0))
    ids = [f"vm-{i:02d}" for i in range(50)]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=50) as pool:
        observations = list(pool.map(lambda vm_id: manager.ensure(spec(vm_id)), ids))
    ensured = time.monotonic() - started
    assert all(o.phase is Phase.RUNNING for o in observations)
    pids = {o.pid for o in observations}
    assert len(pids) == 50
    live = vmm_pids_under(state_dir)
    restarted = {
        o.vm_id: [
            (e.kind.value, e.message) for _, e in recorder.changes if e and e.vm_id == o.vm_id
        ]
        for o in observations
        if o.pid not in live
    }
    assert set(live) == pids, restarted  # exactly one VMM per VM, the one ensure() named
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=50) as pool:
        list(pool.map(manager.remove, ids))
    removed = time.monotonic() - started
    assert vmm_pids_under(state_dir) == {}
    assert manager.list() == []
    print(f"\n50 VMs: ensured in {ensured:.2f} s, removed in {removed:.2f} s")


def test_concurrent_ensure_of_one_vm_starts_one_vmm(
    make_manager: ManagerFactory, state_dir: Path
) -> None:
    manager = make_manager()
    with ThreadPoolExecutor(max_workers=8) as pool:
        observations = list(pool.map(lambda _: manager.ensure(spec()), range(8)))
    assert len({o.pid for o in observations}) == 1
    assert len(vmms_of(state_dir, "vm1")) == 1


def test_crash_is_restarted_with_backoff(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    manager = make_manager()
    faults = write_faults(state_dir, "vm1", {"crash_after_boot": 0.2})
    first = manager.ensure(spec())
    recorder.wait_for(lambda: (o := manager.get("vm1")) is not None and o.restarts >= 2)
    faults.unlink()  # stop crashing: the next start stays up
    recorder.wait_for(
        lambda: (
            (o := manager.get("vm1")) is not None
            and o.phase is Phase.RUNNING
            and o.pid != first.pid
            and not vmm_crashing(state_dir)
        )
    )
    kinds = recorder.kinds("vm1")
    assert EventKind.CRASHED in kinds and EventKind.RESTARTED in kinds
    crashed = [e for e in recorder.events("vm1") if e.kind is EventKind.CRASHED]
    assert "crashed" in crashed[0].message and "restart in" in crashed[0].message
    assert len(vmms_of(state_dir, "vm1")) == 1


def vmm_crashing(state_dir: Path) -> bool:
    return (state_dir / "vms" / "vm1" / "run" / "api.sock.fault").exists()


def test_fast_crashes_show_as_crash_loop(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    manager = make_manager()
    write_faults(state_dir, "vm1", {"crash_after_boot": 0.0})
    with contextlib.suppress(TemporaryError):  # it may crash before the first check
        manager.ensure(spec())
    recorder.wait_for(lambda: any(o.phase is Phase.CRASH_LOOP for o, _ in recorder.changes))
    # A caller asking again for the same spec hears of the trouble.
    with pytest.raises(TemporaryError):
        manager.ensure(spec())


def test_guest_poweroff_is_restarted(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    manager = make_manager()
    faults = write_faults(state_dir, "vm1", {"poweroff_after_boot": 0.2})
    first = manager.ensure(spec())
    recorder.wait_for(lambda: EventKind.RESTARTED in recorder.kinds("vm1"))
    faults.unlink()
    stopped = [e for e in recorder.events("vm1") if e.kind is EventKind.STOPPED]
    assert "guest powered off" in stopped[0].message
    recorder.wait_for(
        lambda: (
            (o := manager.get("vm1")) is not None
            and o.phase is Phase.RUNNING
            and o.pid not in (None, first.pid)
        )
    )


def test_new_hash_replaces_the_vm(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    manager = make_manager()
    first = manager.ensure(spec(hash="h1"))
    second = manager.ensure(spec(hash="h2"))
    assert second.pid != first.pid
    assert second.observed_hash == "h2"
    assert second.boot_seconds is not None and second.boot_seconds > 0  # the new VMM's
    assert first.pid is not None and not alive(first.pid)
    assert EventKind.REPLACED in recorder.kinds("vm1")
    assert second.restarts == 0
    assert len(vmms_of(state_dir, "vm1")) == 1


def test_power_transitions(make_manager: ManagerFactory, recorder: Recorder) -> None:
    manager = make_manager()
    running = manager.ensure(spec())
    paused = manager.ensure(spec(power=PowerState.PAUSED))
    assert paused.phase is Phase.PAUSED and paused.power is PowerState.PAUSED
    assert paused.pid == running.pid
    resumed = manager.ensure(spec())
    assert resumed.phase is Phase.RUNNING and resumed.pid == running.pid
    stopped = manager.ensure(spec(power=PowerState.STOPPED))
    assert stopped.phase is Phase.STOPPED and stopped.pid is None
    assert stopped.boot_seconds is None  # no VMM, no boot to tell of
    assert running.pid is not None and not alive(running.pid)
    assert "power button" in stopped.message  # the guest honoured it
    again = manager.ensure(spec(power=PowerState.PAUSED))
    assert again.phase is Phase.PAUSED and again.pid not in (None, running.pid)
    assert again.boot_seconds is not None  # booted, then paused: a boot all the same
    # A paused guest is resumed first, so it too shuts down cleanly.
    stopped = manager.ensure(spec(power=PowerState.STOPPED))
    assert "power button" in stopped.message, stopped.message
    kinds = recorder.kinds("vm1")
    for kind in (EventKind.PAUSED, EventKind.RESUMED, EventKind.STOPPED):
        assert kind in kinds


def test_stopped_keeps_the_durable_state(make_manager: ManagerFactory, state_dir: Path) -> None:
    manager = make_manager()
    manager.ensure(spec())
    manager.ensure(spec(power=PowerState.STOPPED))
    vm_dir = state_dir / "vms" / "vm1"
    assert json.loads((vm_dir / "vm.json").read_text())["power"] == "stopped"
    # No VMM recorded; only what the VM last ran (HandlesRecord.previous).
    handles = json.loads((vm_dir / "handles.json").read_text())
    assert (handles["handle"], handles["spawning"], handles["previous"]) == (None, False, "h1")
    assert vmms_of(state_dir, "vm1") == []


def test_hung_vmm_is_escalated_to_sigkill_and_restarted(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    manager = make_manager(timeouts=FAST_HANG)
    first = manager.ensure(spec())
    faults = write_faults(state_dir, "vm1", {"hang": ["*"], "ignore_sigterm": True})
    recorder.wait_for(lambda: EventKind.CRASHED in recorder.kinds("vm1"))
    faults.unlink()
    crashed = next(e for e in recorder.events("vm1") if e.kind is EventKind.CRASHED)
    assert "hung" in crashed.message and "SIGKILL" in crashed.message
    assert first.pid is not None and not alive(first.pid)
    recorder.wait_for(
        lambda: (
            (o := manager.get("vm1")) is not None
            and o.phase is Phase.RUNNING
            and o.pid not in (None, first.pid)
        )
    )
    assert len(vmms_of(state_dir, "vm1")) == 1


FAST_HANG = Timeouts(
    api=0.3,
    health_interval=0.1,
    hung_after=2,
    power_button_wait=1.0,
    shutdown_vmm_wait=1.0,
    sigterm_wait=0.3,
    counters_interval=0,
    ensure=60.0,
)


def test_guest_ignoring_the_power_button_is_stopped_further_down_the_ladder(
    make_manager: ManagerFactory, state_dir: Path
) -> None:
    manager = make_manager(timeouts=FAST_HANG)
    write_faults(state_dir, "vm1", {"ignore_power_button": True})
    first = manager.ensure(spec())
    stopped = manager.ensure(spec(power=PowerState.STOPPED))
    assert "vmm.shutdown" in stopped.message
    assert first.pid is not None and not alive(first.pid)


def test_stale_socket_of_a_vmm_that_crashed_while_the_worker_was_away_is_removed(
    make_manager: ManagerFactory, state_dir: Path
) -> None:
    # Releases before v53 refuse to bind over a stale socket: the manager
    # must remove it (under the VM's lock, knowing no VMM of its own runs).
    # The crash happens while no manager watches, so nothing can tidy the
    # socket away before the next owner meets it.
    first = make_manager()
    sock = state_dir / "vms" / "vm1" / "run" / "api.sock"
    write_faults(state_dir, "vm1", {"legacy_bind": True})
    pid = first.ensure(spec()).pid
    first.close()
    assert pid is not None
    kill9_and_wait(pid)
    assert sock.exists()  # a crash leaves the socket behind
    second = make_manager()
    [obs] = second.recover()
    assert obs.phase is Phase.RUNNING and obs.pid not in (None, pid)
    assert obs.restarts == 1


def test_a_vm_whose_vmm_crashed_under_a_live_manager_starts_again_over_its_socket(
    make_manager: ManagerFactory, state_dir: Path
) -> None:
    # The supervisor may notice the crash (and tidy up) before or after the
    # next ensure arrives; either way the new VMM must bind.
    manager = make_manager()
    write_faults(state_dir, "vm1", {"legacy_bind": True})
    first = manager.ensure(spec())
    assert first.pid is not None
    kill9_and_wait(first.pid)
    second = manager.ensure(spec(hash="h2"))
    assert second.pid != first.pid and second.phase is Phase.RUNNING
    assert [pid for pid, _ in vmms_of(state_dir, "vm1")] == [second.pid]


def test_a_rejected_config_fails_permanently_and_leaves_no_vmm(
    make_manager: ManagerFactory, state_dir: Path
) -> None:
    manager = make_manager()
    write_faults(state_dir, "vm1", {"reject": {"vm.create": 400}})
    with pytest.raises(PermanentError) as caught:
        manager.ensure(spec())
    assert "vm.create rejected" in str(caught.value)
    obs = manager.get("vm1")
    assert obs is not None and obs.phase is Phase.FAILED and "HTTP 400" in obs.message
    assert vmms_of(state_dir, "vm1") == []
    with pytest.raises(PermanentError):  # the same spec is not retried
        manager.ensure(spec())
    (state_dir / "vms" / "vm1" / "run" / "api.sock.fault").unlink()
    assert manager.ensure(spec(hash="h2")).phase is Phase.RUNNING  # a new spec is


def test_two_managers_cannot_double_spawn(make_manager: ManagerFactory, state_dir: Path) -> None:
    first = make_manager()
    second = make_manager()
    obs = first.ensure(spec())
    with pytest.raises(VmLockedError, match=f"pid {os.getpid()}"):
        second.ensure(spec())
    with pytest.raises(VmLockedError):
        second.remove("vm1")
    assert second.recover() == []
    assert [pid for pid, _ in vmms_of(state_dir, "vm1")] == [obs.pid]


def test_close_leaves_vmms_running_and_recover_readopts_them(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    first = make_manager()
    pids = {vm_id: first.ensure(spec(vm_id)).pid for vm_id in ("a", "b", "c")}
    first.ensure(spec("d", power=PowerState.STOPPED))
    first.close()
    assert all(pid is not None and alive(pid) for pid in pids.values())

    second = make_manager()
    recovered = {o.vm_id: o for o in second.recover()}
    assert set(recovered) == {"a", "b", "c", "d"}
    for vm_id, pid in pids.items():
        assert recovered[vm_id].pid == pid
        assert recovered[vm_id].phase is Phase.RUNNING
        assert recovered[vm_id].observed_hash == "h1"
    assert recovered["d"].phase is Phase.STOPPED
    assert EventKind.READOPTED in recorder.kinds("a")
    assert set(vmm_pids_under(state_dir)) == set(pids.values())


def test_worker_killed_with_sigkill_vms_survive_and_are_readopted(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    ids = ["k1", "k2", "k3"]
    worker = subprocess.Popen(
        [sys.executable, str(HERE / "worker_proc.py"), str(state_dir), *ids],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        pids = json.loads(worker.stdout.readline())
    finally:
        worker.kill()
        worker.wait()
        if worker.stdout is not None:
            worker.stdout.close()
    assert set(pids) == set(ids)
    assert all(alive(pid) for pid in pids.values())  # VMMs outlive the worker

    manager = make_manager()
    recovered = {o.vm_id: o for o in manager.recover()}
    for vm_id in ids:
        assert recovered[vm_id].pid == pids[vm_id]  # re-adopted, not restarted
        assert recovered[vm_id].phase is Phase.RUNNING
        assert [pid for pid, _ in vmms_of(state_dir, vm_id)] == [pids[vm_id]]
    assert all(EventKind.READOPTED in recorder.kinds(vm_id) for vm_id in ids)
    # ... and fully managed again: a new hash replaces one of them.
    replaced = manager.ensure(spec("k1", hash="h2"))
    assert replaced.pid != pids["k1"] and not alive(pids["k1"])


def test_recover_restarts_a_vmm_that_died_while_the_worker_was_away(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    first = make_manager()
    pid = first.ensure(spec()).pid
    first.close()
    assert pid is not None
    process.terminate(pid, process.pid_start_ticks(pid) or 0, grace=0.0)  # SIGTERM
    second = make_manager()
    [obs] = second.recover()
    assert obs.phase is Phase.RUNNING and obs.pid != pid
    assert obs.restarts == 1
    assert EventKind.RESTARTED in recorder.kinds("vm1")


def test_recover_kills_a_vmm_that_no_handle_recorded(
    make_manager: ManagerFactory, state_dir: Path, driver: CloudHypervisorDriver
) -> None:
    # The worker died between spawning a VMM and recording its handle: the
    # next owner finds it by its socket path on the command line.
    first = make_manager()
    first.ensure(spec(power=PowerState.STOPPED))
    first.close()
    orphan = driver.launch(definition(), StateDir(state_dir).paths("vm1"), timeout=20.0)
    (state_dir / "vms" / "vm1" / "handles.json").write_text(
        json.dumps({"driver": "cloud-hypervisor", "spawning": True, "handle": None, "hash": ""})
    )
    second = make_manager()
    [obs] = second.recover()
    assert obs.phase is Phase.STOPPED
    assert not alive(orphan.pid)
    assert vmms_of(state_dir, "vm1") == []


def test_recover_kills_an_unrecorded_vmm_started_through_a_wrapper(
    make_manager: ManagerFactory, state_dir: Path
) -> None:
    # --vmm-binary may be a wrapper script (here in a directory whose name
    # has a space): the VMM's command line then names neither the wrapper
    # nor anything the worker could guess. An unrecorded VMM is still ours:
    # the worker recognises what it launched, not a program's file name.
    bin_dir = state_dir / "my vmm"
    bin_dir.mkdir()
    wrapper = bin_dir / "chv wrapper"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE} "$@"\n')
    wrapper.chmod(0o755)
    # What the wrapper runs is the operator's to name (--vmm-runtime-path):
    # a jail shows the VMM nothing else.
    driver = CloudHypervisorDriver(str(wrapper), runtime_paths=(sys.executable, str(FAKE)))
    try:
        first = make_manager(driver=driver)
        assert first.ensure(spec()).phase is Phase.RUNNING  # the wrapper works
        first.ensure(spec(power=PowerState.STOPPED))
        first.close()
        orphan = driver.launch(definition(), StateDir(state_dir).paths("vm1"), timeout=20.0)
        (state_dir / "vms" / "vm1" / "handles.json").write_text(
            json.dumps({"driver": "cloud-hypervisor", "spawning": True, "handle": None, "hash": ""})
        )
        second = make_manager(driver=driver)
        [obs] = second.recover()
        assert obs.phase is Phase.STOPPED
        assert not alive(orphan.pid)
        assert vmms_of(state_dir, "vm1") == []
    finally:
        driver.close()


def test_a_replacement_interrupted_by_a_worker_kill_is_reported_as_a_replacement(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    # A worker replacing h1 by h2 is killed once it launched the new VMM
    # (its vm.boot held by a fault) and before it recorded it: the old
    # guest is gone and only the spawning record says what ran. The next
    # owner stops the unrecorded VMM and launches h2: that is the VM's
    # replacement, not the creation of a new VM.
    worker = subprocess.Popen(
        [sys.executable, str(HERE / "worker_proc.py"), str(state_dir), "k1", "--then", "h2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdin is not None and worker.stdout is not None
        old = json.loads(worker.stdout.readline())["k1"]
        write_faults(state_dir, "k1", {"hang": ["vm.boot"]})
        worker.stdin.write("go\n")
        worker.stdin.flush()
        deadline = time.monotonic() + 30.0
        while [pid for pid, _ in vmms_of(state_dir, "k1")] in ([], [old]):
            assert worker.poll() is None and time.monotonic() < deadline, "no new VMM launched"
            time.sleep(0.02)
    finally:
        worker.kill()
        worker.wait()
        for pipe in (worker.stdin, worker.stdout):
            if pipe is not None:
                pipe.close()
    [(orphan, _)] = vmms_of(state_dir, "k1")
    assert orphan != old and not alive(old)
    assert json.loads((state_dir / "vms" / "k1" / "handles.json").read_text())["spawning"]
    (state_dir / "vms" / "k1" / "run" / "api.sock.fault").unlink()

    [obs] = make_manager().recover()
    assert obs.phase is Phase.RUNNING and obs.observed_hash == "h2"
    assert not alive(orphan) and [pid for pid, _ in vmms_of(state_dir, "k1")] == [obs.pid]
    kinds = recorder.kinds("k1")
    assert EventKind.REPLACED in kinds, kinds
    assert EventKind.CREATED not in kinds and EventKind.BOOTED not in kinds, kinds
    assert obs.restarts == 0


def test_a_replacement_launched_but_not_yet_told_when_the_worker_dies_is_told_once(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    # The worker replacing h1 by h2 recorded the new VMM's handle and dies
    # before the replacement was told (its turn is held in the callback
    # that would hand the ``replaced`` event on, before the handles record
    # stops owing it): nobody has told the replacement yet. The next owner
    # re-adopts the VMM (no second replacement) and tells it as
    # ``replaced``: a rollout that counts replacements must see exactly one
    # (CI saw it missing).
    worker = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "worker_proc.py"),
            str(state_dir),
            "k1",
            "--then",
            "h2",
            "--hold-on",
            "replaced",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    handles = state_dir / "vms" / "k1" / "handles.json"
    try:
        assert worker.stdin is not None and worker.stdout is not None
        old = json.loads(worker.stdout.readline())["k1"]
        worker.stdin.write("go\n")
        worker.stdin.flush()
        deadline = time.monotonic() + 30.0
        while True:
            assert worker.poll() is None and time.monotonic() < deadline, "h2 never recorded"
            with contextlib.suppress(FileNotFoundError, ValueError):
                record = json.loads(handles.read_text())
                if record.get("hash") == "h2" and record.get("handle"):
                    break
            time.sleep(0.01)
    finally:
        worker.kill()
        worker.wait()
        for pipe in (worker.stdin, worker.stdout):
            if pipe is not None:
                pipe.close()
    assert record["owes"] == "replaced", record
    [(new, _)] = vmms_of(state_dir, "k1")
    assert new != old and not alive(old)

    [obs] = make_manager().recover()
    assert obs.phase is Phase.RUNNING and obs.observed_hash == "h2"
    assert obs.pid == new  # re-adopted, not launched again
    kinds = recorder.kinds("k1")
    assert kinds.count(EventKind.REPLACED) == 1, kinds
    assert EventKind.READOPTED not in kinds and EventKind.BOOTED not in kinds, kinds
    # Told once: the record no longer owes it, so another restart is quiet.
    assert json.loads(handles.read_text())["owes"] == ""


def test_a_vm_stopped_before_a_worker_restart_is_not_created_again(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    # Once a VM's VMM is gone (stopped here; or stopped for a replacement
    # and the worker killed before it recorded the next launch), the next
    # worker process must still know the VM ran h1 (HandlesRecord.previous):
    # starting it is a boot of an existing VM, not the creation of a new one.
    first = make_manager()
    first.ensure(spec("s1"))
    first.ensure(spec("s1", power=PowerState.STOPPED))
    first.close()
    second = make_manager()
    [obs] = second.recover()
    assert obs.phase is Phase.STOPPED
    before = len(recorder.kinds("s1"))
    assert second.ensure(spec("s1", hash="h2")).observed_hash == "h2"
    kinds = recorder.kinds("s1")[before:]
    assert EventKind.BOOTED in kinds and EventKind.CREATED not in kinds, kinds


def test_an_upgraded_worker_readopts_what_the_previous_release_started(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    """A worker upgraded in place meets a state dir the previous release
    wrote — vm.json format 1 (the config plus string labels), handles.json —
    and a VMM that release launched (without today's launch marker, not
    jailed, its files in the VM's directory rather than in run/). It
    re-adopts that VMM, keeps its address and image, manages it, and says
    that it runs unjailed until its next start."""
    vm_dir = StateDir(state_dir).vm_dir("vm1")
    vm_dir.mkdir(parents=True)
    # That release's layout: no run/ directory.
    paths = VmmPaths(
        vm_dir, vm_dir / "api.sock", vm_dir / "events.json", vm_dir / "vmm.log", vm_dir / "s"
    )
    argv = [sys.executable, str(FAKE), "--api-socket", f"path={paths.api_socket}"]
    argv += ["--event-monitor", f"path={paths.event_file}", "--log-file", str(paths.log_file)]
    shell = subprocess.run(
        ["/bin/sh", "-c", '"$@" </dev/null >/dev/null 2>&1 & echo $!', "sh", *argv],
        capture_output=True,
        text=True,
        check=True,
        start_new_session=True,
    )
    pid = int(shell.stdout)
    ticks = process.pid_start_ticks(pid)
    assert ticks is not None
    deadline = time.monotonic() + 20
    while not paths.api_socket.exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with api_client(str(paths.api_socket)) as client:
        base = "http://localhost/api/v1"
        while True:  # the socket exists once bound; it answers once listening
            try:
                created = client.put(f"{base}/vm.create", json=config())
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert created.status_code == 204
        assert client.put(f"{base}/vm.boot").status_code == 204
    (paths.vm_dir / "vm.json").write_text(
        json.dumps(
            {
                "format": 1,
                "vm_id": "vm1",
                "hash": "h1",
                "config": config(),
                "power": "running",
                "op_id": "op-old",
                "labels": {
                    "store_path": "/nix/store/x-web",
                    "address": "10.120.0.7",
                    "tap": "pvmvm1",
                    "mac": "52:54:00:12:34:56",
                },
            }
        )
    )
    (paths.vm_dir / "handles.json").write_text(
        json.dumps(
            {
                "driver": "cloud-hypervisor",
                "spawning": False,
                "handle": {
                    "driver": "cloud-hypervisor",
                    "pid": pid,
                    "pid_start_ticks": ticks,
                    "api_socket": str(paths.api_socket),
                },
                "hash": "h1",
            }
        )
    )
    manager = make_manager()
    [obs] = manager.recover()
    assert obs.pid == pid and obs.phase is Phase.RUNNING  # re-adopted, not restarted
    assert (obs.image, obs.address, obs.op_id) == ("/nix/store/x-web", "10.120.0.7", "op-old")
    assert EventKind.READOPTED in recorder.kinds("vm1")
    assert obs.confinement is not None and not obs.confinement.jailed
    [warning] = [e for e in recorder.events("vm1") if e.kind is EventKind.WARNING]
    assert "jail incomplete" in warning.message and "runs as uid 0" in warning.message
    paused = manager.ensure(spec(power=PowerState.PAUSED, image=obs.image, address=obs.address))
    assert paused.phase is Phase.PAUSED and paused.pid == pid
    durable = json.loads((paths.vm_dir / "vm.json").read_text())
    assert durable["format"] == 2 and durable["address"] == "10.120.0.7"


def test_the_supervisor_works_under_the_op_id_of_the_newest_spec(
    make_manager: ManagerFactory, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """An apply that leaves a VM's target as it is still becomes the VM's
    operation: what its supervisor does next (here: restart it after a
    crash) is logged, and told, under the new op id."""
    caplog.set_level(logging.INFO, logger="procurator.worker.supervisor")
    caplog.handler.addFilter(ContextFilter())
    manager = make_manager()
    first = manager.ensure(spec(op_id="op-1"))
    manager.ensure(spec(op_id="op-2"))  # the same target: nothing to do on the VMM
    assert first.pid is not None
    kill9_and_wait(first.pid)
    recorder.wait_for(lambda: EventKind.RESTARTED in recorder.kinds("vm1"))
    restarted = next(e for e in recorder.events("vm1") if e.kind is EventKind.RESTARTED)
    assert restarted.op_id == "op-2"
    logged = [r for r in caplog.records if "restarted after" in r.getMessage()]
    assert logged and all(getattr(r, "op_id", "") == "op-2" for r in logged)


def test_a_vmm_another_driver_started_is_stopped_by_signals_and_replaced(
    make_manager: ManagerFactory, state_dir: Path, api_calls: ApiCalls
) -> None:
    # The worker was run with another --driver before: its API is not this
    # driver's to speak, so it is stopped with signals and the VM started again.
    first = make_manager()
    old = first.ensure(spec()).pid
    first.close()
    handles = state_dir / "vms" / "vm1" / "handles.json"
    record = json.loads(handles.read_text())
    record["driver"] = record["handle"]["driver"] = "qemu"
    handles.write_text(json.dumps(record))
    before = api_calls.count()
    second = make_manager()
    [obs] = second.recover()
    assert old is not None and not alive(old)
    assert obs.phase is Phase.RUNNING and obs.pid not in (None, old)
    assert not {"vm.power-button", "vm.shutdown", "vmm.shutdown"} & set(
        api_calls.endpoints()[before:]
    )


@pytest.mark.parametrize(
    "point",
    [
        "unlink-lock",  # removing: the directory is deleted, the lock file not yet
        "write-spec",  # creating: the claim is made, the directory not yet
    ],
)
def test_recover_deletes_the_lock_file_a_worker_killed_between_it_and_the_directory_left(
    make_manager: ManagerFactory, state_dir: Path, point: str
) -> None:
    # Recovery finds VMs by their directories: without a sweep, such a lock
    # file stayed for good (issue 24 item 11: "VM lock files: left behind").
    # A claim makes no lock file (issue 31), so this worker's crash leaves
    # none; a worker of the release before claims, killed in the same gap,
    # left one, which is what the sweep is still for.
    worker = subprocess.run(
        [sys.executable, str(HERE / "dying_worker_proc.py"), str(state_dir), "vm1", point],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert worker.returncode == -signal.SIGKILL, worker.stdout + worker.stderr
    lock_file = state_dir / "locks" / "vm1.lock"
    assert not lock_file.exists() and not (state_dir / "vms" / "vm1").exists()  # what it left
    assert not vmm_pids_under(state_dir)
    StateDir(state_dir).lock("vm1").release()  # what the older release left there

    manager = make_manager()
    assert manager.recover() == []
    assert not lock_file.exists()
    assert manager.list() == []
    # ... and the VM can be made again, with no lock file.
    assert manager.ensure(spec()).phase is Phase.RUNNING
    assert not lock_file.exists()


def test_counters_are_polled_and_served_without_io(
    make_manager: ManagerFactory, api_calls: ApiCalls, recorder: Recorder
) -> None:
    manager = make_manager(timeouts=Timeouts(health_interval=3600.0, counters_interval=0.0))
    manager.ensure(spec())
    assert manager.counters() == {}
    manager.poll_counters()
    manager.poll_counters()
    before = api_calls.count()
    counters = manager.counters()
    assert api_calls.count() == before
    assert set(counters["vm1"]) == {"disk0"}
    assert counters["vm1"]["disk0"]["read_latency_max"] > 0
    assert all(v != 2**64 - 1 for dev in counters["vm1"].values() for v in dev.values())


def test_a_callback_error_does_not_stop_supervision(make_manager: ManagerFactory) -> None:
    calls = []

    def broken(obs: object, event: object) -> None:
        calls.append(event)
        raise RuntimeError("subscriber bug")

    manager = make_manager(on_change=broken)
    assert manager.ensure(spec()).phase is Phase.RUNNING
    assert calls


def test_invalid_vm_id_is_rejected(make_manager: ManagerFactory) -> None:
    manager = make_manager()
    with pytest.raises(PermanentError, match="VM id"):
        manager.ensure(VmSpec("../etc", "h1", definition()))


def test_operations_after_close_are_refused(make_manager: ManagerFactory) -> None:
    manager = make_manager()
    manager.close()
    with pytest.raises(TemporaryError, match="closed"):
        manager.ensure(spec())


def test_ensure_blocks_callers_of_the_same_vm_in_turn(make_manager: ManagerFactory) -> None:
    manager = make_manager()
    results = []
    lock = threading.Lock()

    def flip(power: PowerState) -> None:
        obs = manager.ensure(spec(power=power))
        with lock:
            results.append((power, obs.phase))

    threads = [
        threading.Thread(target=flip, args=(p,))
        for p in [PowerState.RUNNING, PowerState.PAUSED, PowerState.RUNNING, PowerState.PAUSED]
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = {PowerState.RUNNING: Phase.RUNNING, PowerState.PAUSED: Phase.PAUSED}
    assert all(phase is expected[power] for power, phase in results)


def test_refused_pause_keeps_the_guest_running_and_is_retried(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    """A VMM that refuses a pause leaves a healthy guest: the VM keeps its
    VMM, says why it is not paused, and pauses once the VMM agrees."""
    manager = make_manager()  # health checks every 0.1 s: the retry comes soon
    running = manager.ensure(spec())
    faults = write_faults(state_dir, "vm1", {"reject": {"vm.pause": 405}})
    with pytest.raises(TemporaryError, match="pause refused"):
        manager.ensure(spec(power=PowerState.PAUSED))
    with pytest.raises(TemporaryError, match="pause refused"):
        manager.ensure(spec(power=PowerState.PAUSED))  # retried, refused again
    obs = manager.get("vm1")
    assert obs is not None
    assert obs.phase is Phase.RUNNING and obs.pid == running.pid
    assert "cannot pause" in obs.message
    assert running.pid is not None and alive(running.pid)
    faults.unlink()
    recorder.wait_for(lambda: (o := manager.get("vm1")) is not None and o.phase is Phase.PAUSED)
    paused = manager.get("vm1")
    assert paused is not None and paused.pid == running.pid
    kinds = recorder.kinds("vm1")
    assert kinds.count(EventKind.CRASHED) == 0
    assert kinds.count(EventKind.FAILED) == 1  # once per cause, not once per retry


def test_begin_close_releases_callers_blocked_in_ensure(
    make_manager: ManagerFactory, state_dir: Path
) -> None:
    """A worker shutting down waits for no VM's next step: begin_close()
    has an ensure() that drives a slow boot on its own thread return once
    that step is over, and the VM's supervisor ends there: close() has
    nothing left to wait for. (A thread per VM made the shutdown wait for
    the same step, in close().)"""
    manager = make_manager()
    manager.ensure(spec())
    write_faults(state_dir, "vm1", {"delay": {"vm.boot": 6}})
    outcomes: dict[str, BaseException | None] = {}

    def ensure(name: str, hash_: str) -> None:
        try:
            manager.ensure(spec(hash=hash_))
            outcomes[name] = None
        except BaseException as exc:
            outcomes[name] = exc

    driver = threading.Thread(target=ensure, args=("driver", "h2"))
    driver.start()
    recorder_deadline = time.monotonic() + 30
    while (obs := manager.get("vm1")) is None or obs.phase is not Phase.STARTING:
        assert time.monotonic() < recorder_deadline, obs
        time.sleep(0.02)
    manager.begin_close()
    assert driver.is_alive(), "the driving caller left its boot step"
    driver.join()
    # The supervisor ended with the turn after the boot, before settling.
    assert isinstance(outcomes["driver"], ManagerClosedError)
    vm = manager._vms["vm1"]
    assert vm.finished and not vm.parked, "a turn ran after the close"
    with pytest.raises(ManagerClosedError):
        manager.ensure(spec())  # closed to new calls
    manager.close()
    make_manager().remove("vm1")  # the VMM outlived its manager, by design
