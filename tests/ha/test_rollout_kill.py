"""Rollouts survive kill -9 (issue 28), with real processes: masters on one
PostgreSQL database (``HaLab``), workers on the fake cloud-hypervisor.

- **The leader master.** Two masters, two workers (each starting on a
  different master), 8 VMs rolled with ``max_parallel = 2``: once the first
  VMs are switched, the leader is killed with SIGKILL. The other master
  takes the lead and finishes the rollout from the store: ``done``, every
  VM on the new image, none replaced twice.
- **A worker.** One master, two workers. ``host-0-vm0``'s new VMM never
  answers ``vm.boot`` (the fake VMM's fault file): once ``host-0`` has
  launched it (the VM's replacement under way, not yet recorded),
  ``host-0`` is killed with SIGKILL, the fault removed, and ``host-0``
  restarted on the same state dir. Its VMMs live on and are adopted; the
  one it was launching is stopped and the VM launched again (asserted from
  its log). The rollout finishes ``done`` — its ``healthy_deadline`` (60 s)
  is far longer than the restart, so it has no reason to revert — every
  VM on the new image, none replaced twice.

"Replaced twice" is counted two ways: the guests each VM started since the
rollout's apply (its ``booted``, ``replaced`` and ``restarted`` events in
the store: exactly one each), and the VMM processes each VM had, sampled
every 0.1 s throughout (the old one and the new one, not counting a VMM
whose launch the worker's kill interrupted: a third would be a second
replacement).
"""

from __future__ import annotations

import json
import re
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from halab import HaLab

from procurator.core.validation import store_path_hash
from procurator.worker.state import RUN_DIR

PER_WORKER = 4


def config(cmdline: str) -> dict[str, Any]:
    return {
        "payload": {"kernel": "vmlinux", "cmdline": cmdline},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
    }


def fleet_text(lab: HaLab, image: str) -> str:
    """Every worker ``PER_WORKER`` VMs of ``image``, in one rollout group."""
    lines = []
    for worker_id in lab.worker_ids:
        vms = ", ".join(
            f'{{ id = "{worker_id}-vm{i}", image = "{image}" }}' for i in range(PER_WORKER)
        )
        lines.append(f"[workers.{worker_id}]\nvms = [ {vms} ]\n")
    lines.append(
        '[rollout]\nmax_parallel = 2\nhealth = "none"\nmin_healthy_time = "1s"\n'
        'healthy_deadline = "60s"\n'
    )
    return "\n".join(lines)


def apply(lab: HaLab, image: str, *args: str) -> None:
    path = lab.dir / f"fleet-{store_path_hash(image)[:8]}.toml"
    path.write_text(fleet_text(lab, image))
    result = lab.cli("apply", str(path), *args)
    assert result.returncode == 0, result.stdout + result.stderr


def rollout(lab: HaLab, masters: Sequence[int] | None = None) -> dict[str, Any] | None:
    shown = lab.cli("rollout", "status", "--json", masters=masters, timeout=60)
    if shown.returncode != 0:
        return None
    data: dict[str, Any] = json.loads(shown.stdout)
    return data


def wait_rollout(
    lab: HaLab,
    what: str,
    condition: Callable[[dict[str, Any]], bool],
    masters: Sequence[int] | None = None,
    timeout: float = 60,
) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def reached() -> bool:
        nonlocal seen
        shown = rollout(lab, masters)
        if shown is None:
            return False
        seen = shown
        return condition(shown)

    lab.wait_for(what, reached, timeout=timeout)
    return seen


class VmmSampler:
    """Every VMM process of each VM, sampled every 0.1 s in a thread."""

    def __init__(self, lab: HaLab) -> None:
        self.lab = lab
        self.pids: dict[str, set[int]] = {}
        self.samples = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vmm sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.1)

    def sample(self) -> None:
        found = self.lab.vmm_pids_by_worker()
        with self._lock:
            for by_vm in found.values():
                for vm_id, pid in by_vm.items():
                    self.pids.setdefault(vm_id, set()).add(pid)
            self.samples += 1

    def launches(self, vm_id: str) -> int:
        """How many VMM processes ``vm_id`` was seen with."""
        with self._lock:
            return len(self.pids.get(vm_id, ()))

    def __enter__(self) -> VmmSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def event_seq(database: str) -> int:
    with psycopg.connect(database) as conn:
        row = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()
    return int(row[0]) if row else 0


def guest_starts(database: str, after: int) -> Counter[str]:
    """VM id -> how many guests it started after event ``after``: each VMM
    start is one ``booted``, ``replaced`` or ``restarted`` event."""
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT vm_id FROM events WHERE seq > %s "
            "AND kind IN ('booted', 'replaced', 'restarted')",
            (after,),
        ).fetchall()
    return Counter(vm_id for (vm_id,) in rows)


def event_kinds(database: str, vm_id: str, after: int) -> list[str]:
    """The kinds of VM ``vm_id``'s events after event ``after``, in order."""
    with psycopg.connect(database) as conn:
        rows = conn.execute(
            "SELECT kind FROM events WHERE seq > %s AND vm_id = %s ORDER BY seq",
            (after, vm_id),
        ).fetchall()
    return [str(kind) for (kind,) in rows]


UNRECORDED_RE = re.compile(r"killing VMM pid (\d+) of \S+/vms/(\S+) that no handle recorded")


def unrecorded(log: Path) -> dict[str, set[int]]:
    """VM id -> pids of the VMMs a restarted worker found launched but never
    recorded (its previous self was killed while launching them), which it
    stopped before launching the VM again."""
    found: dict[str, set[int]] = {}
    for pid, vm_id in UNRECORDED_RE.findall(log.read_text(errors="replace")):
        found.setdefault(vm_id, set()).add(int(pid))
    return found


def leader(database: str) -> str:
    with psycopg.connect(database) as conn:
        row = conn.execute(
            "SELECT holder FROM leases WHERE name = 'leader' AND expires_unix_ms > "
            "(extract(epoch from clock_timestamp()) * 1000)::bigint"
        ).fetchone()
    return str(row[0]) if row else ""


def assert_rolled_once(
    lab: HaLab,
    sampler: VmmSampler,
    before: dict[str, int],
    events_before: int,
    new: str,
    aborted: dict[str, set[int]] | None = None,
) -> None:
    """Every VM on ``new``, by a VMM other than its first (``before``), and
    no VM replaced more than once: one guest started since event
    ``events_before``, two VMMs sampled (``aborted``: VM id -> pids of VMMs
    whose launch a worker's kill interrupted, never a guest)."""
    aborted = aborted or {}
    vm_ids = {f"{w}-vm{i}" for w in lab.worker_ids for i in range(PER_WORKER)}
    want = dict.fromkeys(vm_ids, ("running", new))

    def on_new() -> bool:
        status = lab.status()
        return status is not None and want == {
            vm["id"]: (vm["phase"], vm["observed_hash"])
            for w in status["workers"]
            for vm in w["vms"]
        }

    lab.wait_for("every VM running the new image", on_new)
    now = {vm: pid for by_vm in lab.vmm_pids_by_worker().values() for vm, pid in by_vm.items()}
    assert set(now) == vm_ids
    assert all(now[vm] != before[vm] for vm in vm_ids), (before, now)
    assert sampler.samples >= 2, sampler.samples  # the rollout was watched while it ran
    # The old VMM and the new one; not counted: a VMM a worker launched and
    # was killed before it recorded it, which it stops when it restarts.
    launched = {vm: len(pids - aborted.get(vm, set())) for vm, pids in sampler.pids.items()}
    assert launched == dict.fromkeys(vm_ids, 2), (sampler.pids, aborted)
    assert guest_starts(lab.database, events_before) == dict.fromkeys(vm_ids, 1)


@pytest.fixture
def images(add_image: Callable[..., str]) -> tuple[str, str]:
    return (
        add_image("kill-vm", config("console=ttyS0")),
        add_image("kill-vm-v2", config("console=ttyS0 v2")),
    )


def start_lab(lab: HaLab, v1: str) -> dict[str, int]:
    """Start ``lab`` with every VM on ``v1``; each VM's VMM pid."""
    lab.start()
    apply(lab, v1, "--wait", "--timeout", "60")
    pids = {vm: pid for by_vm in lab.vmm_pids_by_worker().values() for vm, pid in by_vm.items()}
    assert len(pids) == PER_WORKER * len(lab.worker_ids), pids
    # Every first boot's event stored, so none is counted as the rollout's.
    lab.wait_for(
        "every VM's boot event",
        lambda: guest_starts(lab.database, 0) == dict.fromkeys(pids, 1),
    )
    return pids


@pytest.fixture
def two_masters(tmp_path: Path, nix_env: dict[str, str], pg_url: str) -> Iterator[HaLab]:
    lab = HaLab(tmp_path, nix_env, pg_url, masters=2, workers=2)
    try:
        yield lab
    finally:
        lab.close()


def test_kill9_of_the_leader_master_mid_rollout(
    two_masters: HaLab, images: tuple[str, str]
) -> None:
    lab = two_masters
    v1, v2 = images
    before = start_lab(lab, v1)
    events_before = event_seq(lab.database)
    with VmmSampler(lab) as sampler:
        apply(lab, v2)
        wait_rollout(
            lab,
            "the first VMs switched",
            lambda r: (
                r["phase"] == "switching"
                and any(vm["state"] in ("switching", "healthy") for vm in r["vms"])
            ),
        )
        leading = leader(lab.database)
        assert leading in ("m0", "m1"), leading
        index = int(leading[1:])
        lab.kill_master(index)
        survivor = 1 - index
        shown = rollout(lab, [survivor])
        assert shown is not None and shown["phase"] not in ("done", "failed", "reverted"), shown
        done = wait_rollout(
            lab,
            "the rollout to end",
            lambda r: r["phase"] in ("done", "failed", "reverted"),
            masters=[survivor],
        )
        assert done["phase"] == "done", done
        assert leader(lab.database) == f"m{survivor}"
    assert_rolled_once(lab, sampler, before, events_before, store_path_hash(v2))


@pytest.fixture
def one_master(tmp_path: Path, nix_env: dict[str, str], pg_url: str) -> Iterator[HaLab]:
    lab = HaLab(tmp_path, nix_env, pg_url, masters=1, workers=2)
    try:
        yield lab
    finally:
        lab.close()


def test_kill9_of_a_worker_mid_rollout(one_master: HaLab, images: tuple[str, str]) -> None:
    lab = one_master
    v1, v2 = images
    before = start_lab(lab, v1)
    vm0 = "host-0-vm0"
    # The fake VMM's fault file, beside its API socket (WorkerState.paths).
    fault = lab.state_dir("host-0") / "vms" / vm0 / RUN_DIR / "api.sock.fault"
    assert fault.with_name("api.sock").is_socket()
    fault.write_text(json.dumps({"hang": ["vm.boot"]}))
    events_before = event_seq(lab.database)
    with VmmSampler(lab) as sampler:
        apply(lab, v2)
        # host-0-vm0 is in the first batch; its new VMM never answers
        # vm.boot (the fake VMM's fault file, read on every request): the
        # worker is killed while it launches it, not yet recorded.
        lab.wait_for("host-0 to launch host-0-vm0's new VMM", lambda: sampler.launches(vm0) == 2)
        victim = lab.workers["host-0"]
        victim.popen.send_signal(signal.SIGKILL)
        victim.popen.wait(timeout=30)
        fault.unlink()
        lab.start_worker("host-0")
        done = wait_rollout(
            lab, "the rollout to end", lambda r: r["phase"] in ("done", "failed", "reverted")
        )
        assert done["phase"] == "done", done
    # The kill interrupted host-0-vm0's launch (and maybe its batch mate's):
    # the restarted worker stopped the VMM its previous self had not
    # recorded, once, and launched the VM again.
    aborted = unrecorded(lab.dir / "host-0.log")
    assert vm0 in aborted, aborted
    assert set(aborted) <= {vm0, "host-0-vm1"}, aborted
    assert all(len(pids) == 1 for pids in aborted.values()), aborted
    assert_rolled_once(lab, sampler, before, events_before, store_path_hash(v2), aborted)
    # ... and each interrupted launch is told as the replacement it was,
    # never as a new VM: its spawning record says what the VM ran before.
    for vm_id in aborted:
        kinds = event_kinds(lab.database, vm_id, events_before)
        assert "replaced" in kinds and "created" not in kinds, (vm_id, kinds)
