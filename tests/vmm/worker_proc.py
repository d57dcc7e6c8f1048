"""A worker-like process for the crash tests: it builds a VmManager on a
state dir, ensures VMs, prints one JSON line {vm_id: pid} and then waits to
be killed (the test sends it SIGKILL). With ``--then HASH``, once it reads a
line on stdin, it replaces each VM by one of spec hash HASH (in turn) before
it waits: a test kills it mid-replacement. With ``--hold-on KIND`` as well,
the turn that tells an event of that kind (``replaced``...) is held there
for good, before the VM's handles record stops owing it: the test kills
the process in that window.

    python worker_proc.py <state_dir> <vm_id>... [--then HASH [--hold-on KIND]]
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from pathlib import Path

from vmmhelpers import FAST, FAST_POLICY, definition, fake_driver, make_jail

from procurator.core.errors import ProcuratorError
from procurator.core.models import VmEvent
from procurator.worker.manager import VmManager, VmSpec
from procurator.worker.vmrecord import VmObservation


def main() -> None:
    state_dir = Path(sys.argv[1])
    vm_ids = sys.argv[2:]
    then = hold_on = ""
    if "--hold-on" in vm_ids:
        at = vm_ids.index("--hold-on")
        vm_ids, hold_on = vm_ids[:at] + vm_ids[at + 2 :], vm_ids[at + 1]
    if "--then" in vm_ids:
        at = vm_ids.index("--then")
        vm_ids, then = vm_ids[:at], vm_ids[at + 1]

    def on_change(obs: VmObservation, event: VmEvent | None) -> None:
        if event is not None and event.kind.value == hold_on:
            threading.Event().wait()  # the turn telling it, held until killed

    # Its own jail and jailer, as a worker has: killing this process ends
    # its jailer too (the jailer sees its socket close).
    jail = make_jail(state_dir)
    manager = VmManager(
        state_dir,
        fake_driver(),
        timeouts=FAST,
        policy=FAST_POLICY,
        jail=jail,
        on_change=on_change if hold_on else None,
    )
    pids = {}
    for vm_id in vm_ids:
        obs = manager.ensure(VmSpec(vm_id, "h1", definition()))
        pids[vm_id] = obs.pid
    print(json.dumps(pids), flush=True)
    if then:
        sys.stdin.readline()  # the test is ready (its faults set, if any)
        for vm_id in vm_ids:
            # The test may hold the replacement (a fault, --hold-on) and kill us then.
            with contextlib.suppress(ProcuratorError):
                manager.ensure(VmSpec(vm_id, then, definition()))
    threading.Event().wait()


if __name__ == "__main__":
    main()
