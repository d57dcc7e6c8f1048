"""``kill -9`` the worker at random points of rollouts, many times (seeded).

Each iteration applies a random fleet (VMs added, replaced by a new image,
removed, on three images), kills the worker with SIGKILL after a random delay
— while the apply is in flight, while images are prepared, VMMs spawned or
stopped, taps made — sometimes applies another fleet while it is down,
sometimes kills it again right after it restarted (during recovery), then
restarts it and waits for convergence. Then
``faultlab.leaks`` must find nothing: each desired VM has exactly one VMM
(counted by API socket path), and no VMM, tap, address, socket, VM directory,
lock, disk copy or GC root remains for any other VM.

Seed and iteration count: ``PROCURATOR_FAULT_SEED`` (default 9),
``PROCURATOR_FAULT_ITERATIONS`` (default 20).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faultlab import FaultLab, config, leaks, random_fleet, record

from procurator.worker.vmm import process

SEED = int(os.environ.get("PROCURATOR_FAULT_SEED", "9"))
ITERATIONS = int(os.environ.get("PROCURATOR_FAULT_ITERATIONS", "20"))
IDS = ("vm-a", "vm-b", "vm-c", "vm-d", "vm-e")
GC_LOCK = "/nix/var/nix/gc.lock"


def test_kill9_worker_at_random_points_of_rollouts(
    images: Callable[..., str], make_lab: Callable[..., FaultLab]
) -> None:
    rng = random.Random(SEED)
    versions = [images(f"crash-v{i}", config(f"console=ttyS0 v{i}")) for i in range(3)]
    lab = make_lab()
    lab.start_worker()
    lab.wait_converged({})
    leaked: list[str] = []
    kills = double_kills = changed_while_down = 0
    checked_vms = 0
    for iteration in range(ITERATIONS):
        desired = random_fleet(rng, IDS, versions)
        apply = lab.apply_async(sorted(desired.items()))
        time.sleep(rng.uniform(0.0, 2.0))
        lab.kill_worker()
        kills += 1
        output, _ = apply.communicate(timeout=120)
        assert apply.returncode == 0, output
        if rng.random() < 0.3:
            # The fleet moves on while the worker is down.
            desired = random_fleet(rng, IDS, versions)
            lab.apply_nowait(sorted(desired.items()))
            changed_while_down += 1
        if rng.random() < 0.3:
            # Again, while the new worker re-adopts and sweeps.
            lab.start_worker()
            time.sleep(rng.uniform(0.0, 1.5))
            lab.kill_worker()
            kills += 1
            double_kills += 1
        lab.start_worker()
        lab.wait_converged(desired)
        problems = leaks(lab, desired)
        checked_vms += len(desired)
        leaked += [f"iteration {iteration} ({sorted(desired)}): {p}" for p in problems]
    record(
        "test_kill9_worker_at_random_points_of_rollouts",
        seed=SEED,
        iterations=ITERATIONS,
        kills=kills,
        double_kills=double_kills,
        fleet_changed_while_down=changed_while_down,
        desired_vms_checked=checked_vms,
        leaked=len(leaked),
    )
    assert not leaked, "\n".join(leaked)
    assert lab.worker_alive()


# A nix-store in front of the real one (first on the worker's PATH): once
# armed, the first `--add-root` run that finds the arming file claims it,
# runs the real nix-store (the root is made), says so on a unix socket and
# then holds its answer until its parent, the worker, dies (PR_SET_PDEATHSIG).
# So the test kills the worker at exactly that point: the image is rooted,
# the VM's directory does not exist yet.
_NIX_STORE_SHIM = """\
import ctypes, os, signal, socket, subprocess, sys

REAL, ARMED, SOCKET = {real!r}, {armed!r}, {socket!r}
args = sys.argv[1:]
if "--add-root" not in args:
    os.execv(REAL, [REAL, *args])
parent = os.getppid()
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if os.getppid() != parent:
    sys.exit(1)  # the worker is gone already
code = subprocess.run([REAL, *args], check=False).returncode
try:
    os.rename(ARMED, ARMED + ".claimed")
except FileNotFoundError:
    sys.exit(code)  # not armed, or another run claimed it
with socket.socket(socket.AF_UNIX) as reached:
    reached.connect(SOCKET)
    reached.sendall(str(os.getpid()).encode())
while True:
    signal.pause()
"""


def test_kill9_worker_while_it_roots_an_image_then_fleet_changes(
    images: Callable[..., str],
    make_lab: Callable[..., FaultLab],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A targeted kill point: the moment the worker's ``nix-store`` rooted
    the image of a new VM — the GC root exists, the VM's directory does not
    yet. While the worker is down the fleet drops that VM; the restarted
    worker must not keep its root (nor anything else)."""
    v1 = images("root-v1", config("console=ttyS0 r1"))
    real = shutil.which("nix-store")
    assert real is not None
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    armed = shim_dir / "armed"
    with socket.socket(socket.AF_UNIX) as reached:
        reached.bind(str(shim_dir / "s"))
        reached.listen()
        reached.settimeout(60)
        shim = shim_dir / "nix-store"
        code = _NIX_STORE_SHIM.format(real=real, armed=str(armed), socket=str(shim_dir / "s"))
        shim.write_text(f"#!{sys.executable}\n{code}")
        shim.chmod(0o755)
        # The lab's processes take this environment (procurator.lab._plain_env).
        monkeypatch.setenv("PATH", f"{shim_dir}:{os.environ['PATH']}")
        lab = make_lab()
        lab.start_worker()
        lab.wait_converged({})
        rounds = 4
        for iteration in range(rounds):
            new = {f"vm-{iteration}-{k}": v1 for k in range(3)}
            armed.touch()
            apply = lab.apply_async(sorted(new.items()))
            try:
                held, _ = reached.accept()
            except TimeoutError:
                raise AssertionError(
                    f"the worker never rooted the image\n{lab.worker_log()[-3000:]}"
                ) from None
            with held:
                held.recv(32)
            lab.kill_worker()
            output, _ = apply.communicate(timeout=120)
            assert apply.returncode == 0, output
            # The fleet changes while the worker is down: the new VMs are gone.
            lab.apply_nowait([])
            lab.start_worker()
            lab.wait_converged({})
            # Checked at once: a root left behind would also spare the next
            # round's worker its nix-store run (it roots beside it).
            leaked = leaks(lab, {})
            if leaked:
                record(
                    "test_kill9_worker_while_it_roots_an_image_then_fleet_changes",
                    kills=iteration + 1,
                    leaked=len(leaked),
                )
            assert not leaked, f"round {iteration}: " + "\n".join(leaked)
    record("test_kill9_worker_while_it_roots_an_image_then_fleet_changes", kills=rounds, leaked=0)


@contextlib.contextmanager
def _nix_gc_lock_held() -> Iterator[None]:
    """Hold Nix's GC lock: ``nix-store --add-root`` blocks until released
    (so a test can catch one in flight). Held for seconds at most."""
    fd = os.open(GC_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_kill9_worker_while_nix_store_is_stuck_rooting(
    images: Callable[..., str], make_lab: Callable[..., FaultLab]
) -> None:
    """The killed worker's ``nix-store --add-root`` outlives it (blocked on
    Nix's GC lock here; on a busy host, slow). The next worker must end it
    before deciding which roots to keep, else it makes its root later, for
    a VM nobody has any more."""
    v1 = images("stuck-v1", config("console=ttyS0 s1"))
    lab = make_lab()
    lab.start_worker()
    lab.wait_converged({})
    gcroots = lab.state_dir / "gcroots"
    with _nix_gc_lock_held():
        apply = lab.apply_async([("vm-stuck", v1)])
        deadline = time.monotonic() + 60
        while not any("--add-root" in argv for _, argv in lab.worker_children("nix-store")):
            assert time.monotonic() < deadline, "the worker never rooted the image"
            time.sleep(0.005)
        lab.kill_worker()
        output, _ = apply.communicate(timeout=120)
        assert apply.returncode == 0, output
        lab.apply_nowait([])
        lab.start_worker()
        lab.wait_converged({})
    # Whatever is still running against our roots finishes now.
    deadline = time.monotonic() + 30
    while process.find_by_argument_under(gcroots):
        assert time.monotonic() < deadline, "a nix-store never finished"
        time.sleep(0.05)
    leaked = leaks(lab, {})
    record("test_kill9_worker_while_nix_store_is_stuck_rooting", kills=1, leaked=len(leaked))
    assert not leaked, "\n".join(leaked)
    assert "killing pid" in lab.worker_log()
