"""A second ``remove`` that lands while the VM's supervisor finishes a removal
nobody waits for any more (a ``remove`` that timed out, the supervisor going
on alone): the supervisor answers the first removal's request and ends
without taking the second's in. The VM is gone, which is what the second
remove wanted: it returns, instead of failing "supervisor stopped before
remove completed" (the reconciler's next pass then healed it). Real fake
cloud-hypervisor processes; the supervisor held at the start of its removal
by an ``on_change`` gate (as tests/moves/test_move_incoming_after_removal.py)."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest
from vmmhelpers import FAST, FAST_POLICY, RemovalGate, definition, vmm_pids_under

from procurator.core.errors import ProcuratorError, TemporaryError
from procurator.core.models import Phase
from procurator.worker.manager import VmManager
from procurator.worker.state import StateDir
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver
from procurator.worker.vmrecord import VmSpec


class WaitingClock:
    """The manager's clock; tells when ``thread`` first reads it. A
    ``remove`` reads it only once its request is raised, to time its wait
    for the outcome."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.read = threading.Event()

    def __call__(self) -> float:
        if threading.current_thread() is self.thread:
            self.read.set()
        return time.monotonic()


def test_a_remove_during_a_removal_nobody_waits_for_returns(
    state_dir: Path, driver: CloudHypervisorDriver
) -> None:
    gate, clock = RemovalGate(), WaitingClock()
    # A short ensure timeout: the first removal's caller gives up while its
    # supervisor is held at the gate.
    m = VmManager(
        state_dir,
        driver,
        timeouts=dataclasses.replace(FAST, ensure=0.5),
        policy=FAST_POLICY,
        on_change=gate,
        clock=clock,
        jail=None,
    )
    try:
        assert m.ensure(VmSpec("vm1", "h1", definition())).phase is Phase.RUNNING
        with pytest.raises(TemporaryError, match="remove not done"):
            m.remove("vm1")
        assert gate.reached.is_set()
        m.timeouts = dataclasses.replace(FAST, ensure=60.0)
        answers: list[ProcuratorError | None] = []

        def remove_again() -> None:
            try:
                m.remove("vm1", op_id="op-again")
                answers.append(None)
            except ProcuratorError as exc:
                answers.append(exc)

        clock.thread = threading.Thread(target=remove_again)
        clock.thread.start()
        # Its request raised, the held removal goes on and ends the supervisor.
        while not clock.read.wait(0.01):
            assert clock.thread.is_alive(), answers
        gate.opened.set()
        clock.thread.join(60)  # a hang guard
        assert answers == [None]
        assert m.get("vm1") is None
        assert vmm_pids_under(state_dir) == {} and not StateDir(state_dir).exists("vm1")
        m.remove("vm1")  # still idempotent
    finally:
        gate.opened.set()
        m.close()
