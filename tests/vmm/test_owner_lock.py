"""The state dir's owner lock: one process manages all of a state dir's VMs
with one descriptor, and a VM it claims under that lock is its own, with
none (issue 31: a settled VM costs the worker only its VMM's pidfd)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from vmmhelpers import ManagerFactory, definition

from procurator.core.models import Phase
from procurator.worker.manager import VmSpec
from procurator.worker.state import StateDir, StateLockedError, VmLockedError

# A second process: takes the state dir's owner lock, or the VM's own flock
# (as a worker of the release before the owner lock did), and says so.
_OTHER = """
import sys
from pathlib import Path
from procurator.worker.state import StateDir, VmLockedError
state = StateDir(Path(sys.argv[1]))
try:
    held = state.lock_owner() if sys.argv[2] == "owner" else state.lock(sys.argv[2])
except VmLockedError as exc:
    print("refused:", exc, flush=True)
    sys.exit(3)
print("locked", flush=True)
sys.stdin.read()  # holds it until told to end
"""


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    made = StateDir(tmp_path / "state")
    made.prepare()
    return made


def other_process(state: StateDir, what: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _OTHER, str(state.root), what],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_the_owner_lock_is_exclusive_across_processes(state: StateDir) -> None:
    owner = state.lock_owner()
    try:
        other = other_process(state, "owner")
        out, _ = other.communicate(timeout=30)
        assert other.returncode == 3 and f"pid {os.getpid()}" in out
    finally:
        owner.release()
    other = other_process(state, "owner")
    try:
        assert other.stdout is not None and other.stdout.readline() == "locked\n"
        with pytest.raises(StateLockedError, match=f"pid {other.pid}"):
            state.lock_owner()
    finally:
        other.communicate(timeout=30)


def test_a_claim_holds_no_descriptor_and_lasts_as_long_as_the_owner_lock(
    state: StateDir,
) -> None:
    owner = state.lock_owner()
    before = len(os.listdir("/proc/self/fd"))
    claims = [state.claim(f"vm{i}", owner) for i in range(5)]
    assert len(os.listdir("/proc/self/fd")) == before
    assert all(claim.held for claim in claims)
    state.write_spec(claims[0], {"hash": "h1"})  # a claim is ownership
    claims[1].release()
    assert not claims[1].held
    owner.release()
    assert not any(claim.held for claim in claims)
    with pytest.raises(RuntimeError, match="without holding its lock"):
        state.write_spec(claims[0], {"hash": "h2"})
    with pytest.raises(RuntimeError, match="owner lock"):
        state.claim("vm9", owner)


def test_a_claim_makes_no_lock_file_and_stamps_one_an_older_release_left(
    state: StateDir,
) -> None:
    # Issue 31: a new file is a new inode, tens to hundreds of us of a VM
    # start's CPU on ext4 without a journal; a claim made one per VM.
    owner = state.lock_owner()
    try:
        state.claim("vm0", owner)
        assert not (state.locks_dir / "vm0.lock").exists()
        # A lock file a worker of the release before claims left (it held
        # VMs by their own flocks) is taken a moment and names this process.
        state.lock("vm1").release()
        (state.locks_dir / "vm1.lock").write_text("1\n")
        assert state.claim("vm1", owner).held
        assert (state.locks_dir / "vm1.lock").read_text() == f"{os.getpid()}\n"
    finally:
        owner.release()


def test_a_vm_whose_flock_another_process_holds_is_not_claimed(state: StateDir) -> None:
    # A worker of the release before the owner lock holds VMs by their
    # own flocks: what it holds stays its own.
    other = other_process(state, "vm1")
    owner = state.lock_owner()
    try:
        assert other.stdout is not None and other.stdout.readline() == "locked\n"
        with pytest.raises(VmLockedError, match=f"pid {other.pid}"):
            state.claim("vm1", owner)
        state.claim("vm2", owner).release()
    finally:
        owner.release()
        other.communicate(timeout=30)


def test_a_second_manager_is_refused_every_vm_of_the_state_dir(
    make_manager: ManagerFactory,
) -> None:
    # With the VMs' own flocks a second manager was refused only the VMs
    # the first one managed; the owner lock refuses it the state dir.
    first = make_manager()
    second = make_manager()
    assert first.ensure(VmSpec("vm1", "h1", definition())).phase is Phase.RUNNING
    with pytest.raises(StateLockedError, match=f"pid {os.getpid()}"):
        second.ensure(VmSpec("vm2", "h1", definition()))
    assert second.list() == []
    first.remove("vm1")
    first.close()
    # Released when the first closes: the state dir can change hands.
    assert second.ensure(VmSpec("vm2", "h1", definition())).phase is Phase.RUNNING
