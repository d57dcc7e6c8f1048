"""An ensure that lands while the VM's supervisor finishes a removal nobody
waits for any more (a ``remove`` that gave up, the supervisor carrying on
alone): the removal ends the supervisor, and takes the ``vm.json`` just
written for the ensure with the VM's directory. The ensure must start over
on a new supervisor, not fail with "supervisor stopped before ensure ...
completed" (a live move's target then could not take the VM incoming: the
flake of test_move_live_process.py). Real fake cloud-hypervisor processes."""

from __future__ import annotations

import dataclasses
import socket
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vmm"))

from movevms import driver, root
from vmmhelpers import FAST, FAST_POLICY, RemovalGate, definition, vmm_pids_under

from procurator.core.errors import ProcuratorError, TemporaryError
from procurator.core.models import Phase
from procurator.worker.manager import VmManager, VmObservation
from procurator.worker.state import StateDir
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver
from procurator.worker.vmrecord import Incoming, VmSpec

TOKEN = bytes(range(0x40, 0x50))

__all__ = ["driver", "root"]  # fixtures


def free_address() -> tuple[str, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return ("127.0.0.1", int(probe.getsockname()[1]))


def test_an_ensure_during_a_removal_nobody_waits_for_starts_over(
    root: Path, driver: CloudHypervisorDriver
) -> None:
    gate = RemovalGate()
    state = root / "target"
    # A short ensure timeout: the removal's caller gives up while its
    # supervisor is held at the gate.
    m = VmManager(
        state,
        driver,
        timeouts=dataclasses.replace(FAST, ensure=0.5),
        policy=FAST_POLICY,
        on_change=gate,
        jail=None,
    )
    spec = VmSpec("vm1", "h1", definition(), op_id="op-apply")
    held = dataclasses.replace(
        spec, op_id="op-m", incoming=Incoming("op-m", free_address(), None, TOKEN)
    )
    try:
        assert m.ensure(spec).phase is Phase.RUNNING
        with pytest.raises(TemporaryError, match="remove not done"):
            m.remove("vm1")
        assert gate.reached.is_set()
        # The ensure after it is given time enough (the worker's own value).
        m.timeouts = dataclasses.replace(FAST, ensure=60.0)
        answers: list[VmObservation | ProcuratorError] = []

        def hold() -> None:
            try:
                answers.append(m.ensure(held))
            except ProcuratorError as exc:
                answers.append(exc)

        holder = threading.Thread(target=hold)
        holder.start()
        # Once the ensure wrote its vm.json, the removal goes on (and ends
        # the supervisor, before or after the ensure's request).
        spec_file = StateDir(state).vm_dir("vm1") / "vm.json"
        while not (spec_file.exists() and "op-m" in spec_file.read_text()):
            holder.join(0.01)
            assert holder.is_alive(), answers
        gate.opened.set()
        holder.join(60)  # a hang guard
        (answer,) = answers
        assert isinstance(answer, VmObservation), answer
        assert (answer.incoming, answer.phase) == ("op-m", Phase.STARTING), answer
        assert answer.pid is not None and list(vmm_pids_under(state)) == [answer.pid]
        assert "op-m" in spec_file.read_text()  # its vm.json is there again
        m.remove("vm1", op_id="op-m")
        assert vmm_pids_under(state) == {} and not StateDir(state).exists("vm1")
    finally:
        gate.opened.set()
        m.close()
