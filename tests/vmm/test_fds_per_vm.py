"""A settled VM costs its worker at most one descriptor (its VMM's pidfd):
10,000 VMs must fit an open-file limit of 20,000 with room to spare
(issue 31, docs/BENCHMARKS.md). Counted in this process's ``/proc/self/fd``
around real fake-VMM processes, jailed as a worker's are."""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from vmmhelpers import FAST, ManagerFactory, definition, fake_driver

from procurator.core.models import Phase
from procurator.worker.manager import VmManager, VmSpec
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver

# Settled VMs have no timed check and the sweep does not run while the
# descriptors are counted: no API call is in flight then.
QUIET = dataclasses.replace(FAST, counters_interval=3600.0, health_interval=3600.0)


def open_fds() -> dict[int, str]:
    """This process's descriptors and what each one is."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
    return found


def kinds(fds: dict[int, str]) -> Counter[str]:
    """How many descriptors of each kind (``anon_inode:[pidfd]``,
    ``socket:``, a path's directory)."""
    return Counter(
        target.split("[")[0]
        if target.startswith("socket:")
        else target.rsplit("/", 1)[0]
        if target.startswith("/")
        else target
        for target in fds.values()
    )


def wait_idle_on_the_sweep(manager: VmManager, ids: list[str]) -> None:
    deadline = time.monotonic() + 30.0  # a hang guard, not a timing
    while not all(manager._vms[i].swept is not None for i in ids):
        assert time.monotonic() < deadline, "the supervisors never waited idle"
        time.sleep(0.005)


def ensure_all(manager: VmManager, ids: list[str]) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        observations = list(pool.map(lambda i: manager.ensure(VmSpec(i, "h1", definition())), ids))
    assert all(o.phase is Phase.RUNNING for o in observations)


def test_a_settled_vm_holds_at_most_its_pidfd(make_manager: ManagerFactory) -> None:
    driver: CloudHypervisorDriver = fake_driver(kept_connections=2)
    manager = make_manager(driver=driver, timeouts=QUIET)
    try:
        # Five first: the jailer, the exit watcher, the kept connections
        # (at most two) are there before the count starts.
        ensure_all(manager, [f"vm-{i:02d}" for i in range(5)])
        before = open_fds()
        ensure_all(manager, [f"vm-{i:02d}" for i in range(5, 25)])
        after = open_fds()
        grown = len(after) - len(before)
        print(f"\n20 more VMs: {grown} more descriptors ({grown / 20:.2f} per VM)")
        new = {fd: target for fd, target in after.items() if before.get(fd) != target}
        assert grown <= 20, f"{grown / 20:.2f} per VM: {dict(kinds(new))}"
        assert kinds(new)["anon_inode:[pidfd]"] == 20
    finally:
        for obs in manager.list():
            manager.remove(obs.vm_id)
        manager.close()
        driver.close()


def test_the_sweep_reads_every_vm_through_a_bounded_set_of_connections(
    make_manager: ManagerFactory,
) -> None:
    driver = fake_driver(kept_connections=2)
    manager = make_manager(driver=driver, timeouts=QUIET)
    try:
        ids = [f"vm-{i}" for i in range(6)]
        ensure_all(manager, ids[:1])  # the jailer's sockets are there now
        sockets = kinds(open_fds())["socket:"]
        ensure_all(manager, ids[1:])
        # ``ensure`` returns once a VM runs; its supervisor hands the sweep
        # its VMM a moment later, when it goes to wait idle. A sweep before
        # that skips the VM (seen once under load).
        wait_idle_on_the_sweep(manager, ids)
        manager.sweep()
        # Every VM answered its counters call (on a connection made for it
        # when its VMM's was not kept), and at most two are kept.
        assert sorted(vm for vm, counters in manager.counters().items() if counters) == ids
        assert kinds(open_fds())["socket:"] <= sockets + 2
    finally:
        for obs in manager.list():
            manager.remove(obs.vm_id)
        manager.close()
        driver.close()
