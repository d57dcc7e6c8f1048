"""The VMM and the host misbehave under a running worker; each fault must
end in a clear status, and the worker process must stay alive and answering.

- VMM killed (``kill -9`` of the fake): restarted after backoff; status
  counts the restarts.
- VMM hung (fake fault ``hang: ["*"]``): health checks go unanswered, the
  supervisor escalates through the stop ladder and restarts it.
- VMM rejecting calls (``reject: {vm.create: 400}``): the VM is ``failed``
  with the VMM's message, not retried in a loop.
- Image realise failing (a well-formed store path that does not exist, no
  substituter): a clear message, retried with backoff — never a storm
  (attempts counted in the worker's log over a window).
- State dir full (a small tmpfs as the worker's state dir, filled up): a
  clear message for the VM that cannot be prepared, the others keep running,
  and it converges once there is space again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faultlab import FaultLab, config, leaks, record

MISSING = "/nix/store/0000000000000000000000000000000a-never-built-vm"


def _write_faults(lab: FaultLab, vm_id: str, faults: dict[str, object]) -> Path:
    path = lab.vm_dir(vm_id) / "run" / "api.sock.fault"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(faults))
    tmp.replace(path)
    return path


def _alive_and_answering(lab: FaultLab) -> None:
    assert lab.worker_alive(), lab.worker_log()[-3000:]
    worker = lab.worker_status()
    assert worker is not None and worker["connected"], worker


def test_vmm_killed_is_restarted_with_backoff(
    images: Callable[..., str], make_lab: Callable[..., FaultLab]
) -> None:
    v1 = images("killed-v1", config())
    lab = make_lab(network=False)
    lab.start_worker()
    lab.apply([("vm-k", v1), ("vm-other", v1)])
    other = lab.vmm_processes()["vm-other"]
    kills = 3
    for n in range(1, kills + 1):
        (pid,) = lab.vmm_processes()["vm-k"]
        os.kill(pid, signal.SIGKILL)
        lab.wait_status(
            lambda w, n=n, pid=pid: (
                any(
                    vm["id"] == "vm-k" and vm["phase"] == "running" and vm["restarts"] == n
                    for vm in w["vms"]
                )
                and lab.vmm_processes().get("vm-k", [pid]) != [pid]
            ),
            f"vm-k restarted {n} times",
        )
    _alive_and_answering(lab)
    assert lab.vmm_processes()["vm-other"] == other
    assert leaks(lab, {"vm-k": v1, "vm-other": v1}, network=False) == []
    record("test_vmm_killed_is_restarted_with_backoff", kills=kills, restarts_shown=kills)


def test_vmm_hung_is_escalated_and_restarted(
    images: Callable[..., str], make_lab: Callable[..., FaultLab]
) -> None:
    v1 = images("hung-v1", config())
    # Checks every second, so the two missed ones come soon (default 15 s).
    lab = make_lab(network=False, worker_args=["--health-interval", "1"])
    lab.start_worker()
    lab.apply([("vm-h", v1)])
    (pid,) = lab.vmm_processes()["vm-h"]
    fault = _write_faults(lab, "vm-h", {"hang": ["*"]})
    # Health checks time out twice, the ladder's API steps time out, signals end it.
    deadline = time.monotonic() + 90
    while pid in lab.vmm_processes().get("vm-h", []):
        assert time.monotonic() < deadline, lab.worker_log()[-3000:]
        time.sleep(0.2)
    fault.unlink()
    worker = lab.wait_status(
        lambda w: any(
            vm["id"] == "vm-h" and vm["phase"] == "running" and vm["restarts"] >= 1
            for vm in w["vms"]
        ),
        "vm-h running again after the hang",
    )
    assert "hung" in lab.worker_log()
    _alive_and_answering(lab)
    record(
        "test_vmm_hung_is_escalated_and_restarted",
        hangs=1,
        restarts=[vm["restarts"] for vm in worker["vms"]],
    )


def test_vmm_rejecting_calls_and_missing_image_give_clear_status(
    images: Callable[..., str],
    make_lab: Callable[..., FaultLab],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    good = images("fine-v1", config())
    rejecting = images("rejected-v1", config("console=ttyS0 rejected"))
    lab = make_lab(network=False)
    lab.start_worker()
    lab.apply([("vm-ok", good)])
    (ok_pid,) = lab.vmm_processes()["vm-ok"]
    # The fault must be in place before the VMM starts: through its environment.
    lab.stop_worker()
    monkeypatch.setenv("FAKE_CHV_FAULTS", json.dumps({"reject": {"vm.create": 400}}))
    lab.start_worker()
    lab.apply_nowait([("vm-ok", good), ("vm-reject", rejecting), ("vm-missing", MISSING)])
    window_start = time.monotonic()
    worker = lab.wait_status(
        lambda w: (
            {vm["id"]: vm["phase"] for vm in w["vms"]}.get("vm-reject") == "failed"
            and "realise" in {vm["id"]: vm["message"] for vm in w["vms"]}.get("vm-missing", "")
        ),
        "vm-reject failed and vm-missing reported",
    )
    vms = {vm["id"]: vm for vm in worker["vms"]}
    assert "rejected" in vms["vm-reject"]["message"], vms["vm-reject"]
    assert MISSING in vms["vm-missing"]["message"], vms["vm-missing"]
    assert vms["vm-ok"]["phase"] == "running"
    # Count realise attempts over a window of several resync intervals.
    time.sleep(8)
    window = time.monotonic() - window_start
    attempts = lab.worker_log().count(f"{MISSING} is not in the store; realising it")
    create_calls = lab.worker_log().count("vm-reject: created")
    # The reconciler waits max(30 s asked by the store, its backoff) between
    # attempts: one attempt in the window, a second one at the very most.
    assert 1 <= attempts <= 2, attempts
    assert create_calls == 0
    assert lab.vmm_processes()["vm-ok"] == [ok_pid], "an unrelated VM was disturbed"
    _alive_and_answering(lab)
    record(
        "test_vmm_rejecting_calls_and_missing_image_give_clear_status",
        window_seconds=round(window, 1),
        realise_attempts=attempts,
        reject_phase=vms["vm-reject"]["phase"],
    )
    lab.apply_nowait([("vm-ok", good)])
    monkeypatch.delenv("FAKE_CHV_FAULTS")


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
            out.flush()
    return filler


def test_state_dir_full(images: Callable[..., str], make_lab: Callable[..., FaultLab]) -> None:
    v1 = images("full-v1", config())
    lab = make_lab(network=False)
    with _tmpfs(lab.state_dir, "4m"):
        try:
            lab.start_worker()
            lab.apply([("vm-1", v1)])
            (pid,) = lab.vmm_processes()["vm-1"]
            filler = _fill(lab.state_dir)
            lab.apply_nowait([("vm-1", v1), ("vm-2", v1)])
            worker = lab.wait_status(
                lambda w: (
                    "No space left" in {vm["id"]: vm["message"] for vm in w["vms"]}.get("vm-2", "")
                ),
                "vm-2 reported without space",
            )
            message = {vm["id"]: vm["message"] for vm in worker["vms"]}["vm-2"]
            _alive_and_answering(lab)
            assert lab.vmm_processes()["vm-1"] == [pid]
            filler.unlink()
            lab.wait_converged({"vm-1": v1, "vm-2": v1})
            assert lab.vmm_processes()["vm-1"] == [pid]
            record("test_state_dir_full", message=message[:200], worker_crashed=False)
            # Remove the VMs while the tmpfs is still there (roots, disks).
            lab.apply([])
        finally:
            lab.stop_worker()
            lab.kill_vmms()
