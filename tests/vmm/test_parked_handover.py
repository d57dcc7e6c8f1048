"""The hand-over of a VM's turns between threads, hammered (procurator.
worker.turns, VmRecord's park/wake/poke/claim/release/unpark): the real
``VmSupervisor.drive`` with its parking and deadlines, the real
``TurnPool`` and ``VmManager._wait_outcome``, and a synthetic turn (the
only stand-in: it answers each request after 0-3 turns, sleeps now and
then, and parks with or without a deadline). Callers that drive (ensure),
callers that wake and wait (remove, jobs) and spurious wakers (exits, the
sweep) run against the same VMs at once, until each VM answered
``ANSWERS`` requests. Checked: never two threads in one
VM's turn (or its context), every request answered (no wake lost), and
closing ends every supervisor. Adapted from the review's harness, which
two broken copies of the record failed (a lost wake; two threads in)."""

from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace

from procurator.worker.manager import VmManager
from procurator.worker.supervisor import VmSupervisor
from procurator.worker.turns import TurnPool
from procurator.worker.vmrecord import Outcome, Timeouts, VmRecord

VMS = 6
ANSWERS = 150  # requests answered per VM before the callers stop
HANG_GUARD = 60.0


class _Checked:
    """Counts the threads inside each VM's turn; notes what went wrong."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside: dict[str, int] = {}
        self.errors: list[str] = []

    def enter(self, vm_id: str) -> None:
        with self.lock:
            self.inside[vm_id] = self.inside.get(vm_id, 0) + 1
            if self.inside[vm_id] != 1:
                self.errors.append(f"{vm_id}: {self.inside[vm_id]} threads in one turn")

    def leave(self, vm_id: str) -> None:
        with self.lock:
            self.inside[vm_id] -= 1


def _synthetic(checked: _Checked) -> type[VmSupervisor]:
    class Synthetic(VmSupervisor):
        steps = 0

        def _turn(self) -> bool:
            vm_id = self.vm.vm_id
            checked.enter(vm_id)
            try:
                with self.vm.cond:
                    if self.vm.closing:
                        return False
                    request = self.vm.request
                if request != self.request:
                    self.request = request
                    self.steps = random.randint(0, 3)
                if random.random() < 0.3:
                    time.sleep(random.random() * 0.002)
                if self.steps > 0:
                    self.steps -= 1
                    return True
                with self.vm.cond:
                    if self.vm.outcome is None or self.vm.outcome.request < request:
                        self.vm.outcome = Outcome(request, None)
                        self.vm.cond.notify_all()
                deadline = self.m.clock() + random.random() * 0.01
                self.parking = None if random.random() < 0.5 else deadline
                return True
            finally:
                checked.leave(vm_id)

    return Synthetic


def test_turns_are_handed_to_one_thread_at_a_time_and_no_wake_is_lost() -> None:
    checked = _Checked()
    pool = TurnPool(cap=2, spare=1, starve_after=0.01, linger=0.05)
    manager = SimpleNamespace(  # what a supervisor and _wait_outcome read of it
        driver=SimpleNamespace(name="fake"),
        timeouts=Timeouts(ensure=HANG_GUARD, health_interval=0.1),
        state=SimpleNamespace(paths=lambda vm_id: None),
        exit_watcher=lambda: None,
        turns=pool,
        clock=time.monotonic,
    )
    supervisor = _synthetic(checked)
    vms = []
    for i in range(VMS):
        vm = VmRecord(f"vm{i}", "fake")
        made = supervisor(manager, vm)  # type: ignore[arg-type]
        with vm.cond:
            vm.drive = made.drive
            vm.resume = lambda made=made: pool.submit(made.drive)
        vms.append(vm)
    stop = threading.Event()
    answered = dict.fromkeys((vm.vm_id for vm in vms), 0)

    def ask(vm: VmRecord, *, drive: bool) -> None:
        while not stop.is_set():
            with vm.op_lock:
                with vm.cond:
                    vm.request += 1
                if drive:
                    vm.poke()  # as ensure: this thread drives the turns
                else:
                    vm.wake()  # as remove and run_job: the pool does
                try:
                    VmManager._wait_outcome(manager, vm, "a request", drive=drive)  # type: ignore[arg-type]
                    answered[vm.vm_id] += 1
                except Exception as exc:
                    checked.errors.append(f"{vm.vm_id}: {exc!r}")
            time.sleep(random.random() * 0.003)

    def wake_at_random() -> None:  # exits, the sweep: wakes nobody asked for
        while not stop.is_set():
            random.choice(vms).wake()
            time.sleep(random.random() * 0.0005)

    threads = [threading.Thread(target=ask, args=(vm,), kwargs={"drive": True}) for vm in vms]
    threads += [threading.Thread(target=ask, args=(vm,), kwargs={"drive": False}) for vm in vms]
    threads += [threading.Thread(target=wake_at_random) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        guard = time.monotonic() + HANG_GUARD
        while min(answered.values()) < ANSWERS and not checked.errors:
            assert time.monotonic() < guard, f"requests stopped being answered: {answered}"
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(HANG_GUARD)
    assert not [t for t in threads if t.is_alive()], "a caller is stuck: a wake was lost"
    for vm in vms:  # as VmManager.close
        with vm.cond:
            vm.closing = True
            vm.cond.notify_all()
        vm.wake()
    for vm in vms:
        with vm.cond:
            assert vm.cond.wait_for(lambda vm=vm: vm.finished, HANG_GUARD), vm.vm_id  # type: ignore[misc]
    pool.close()
    assert checked.errors == []
