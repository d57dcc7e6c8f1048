"""A worker-like process for the crash tests: it builds a VmManager on a
state dir, ensures VMs, prints one JSON line {vm_id: pid} and then waits to
be killed (the test sends it SIGKILL).

    python worker_proc.py <state_dir> <vm_id>...
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from vmmhelpers import FAST, FAST_POLICY, definition, fake_driver, make_jail

from procurator.worker.manager import VmManager, VmSpec


def main() -> None:
    state_dir = Path(sys.argv[1])
    # Its own jail and jailer, as a worker has: killing this process ends
    # its jailer too (the jailer sees its socket close).
    jail = make_jail(state_dir)
    manager = VmManager(state_dir, fake_driver(), timeouts=FAST, policy=FAST_POLICY, jail=jail)
    pids = {}
    for vm_id in sys.argv[2:]:
        obs = manager.ensure(VmSpec(vm_id, "h1", definition()))
        pids[vm_id] = obs.pid
    print(json.dumps(pids), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
