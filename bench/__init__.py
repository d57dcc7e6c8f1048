"""procurator's benchmarks: the control plane's cost against its physical
floor, at fleet scale. ``make bench`` (``python -m bench``) runs them all
and prints one table; every figure is a ratio to, or is shown next to, a
baseline measured in the same run, because absolute times drift on shared
machines. Results and the machine they came from: docs/BENCHMARKS.md.

Benchmarks (one module each, ``NAME`` and ``measure(run) -> rows``):

- ``start``  N VMs through apply vs a bare spawn-and-boot loop
- ``change`` one VM's hash changes in the N-VM fleet: apply -> observed, at
  1,000 and 10,000 VMs
- ``idle``   the worker's CPU share and memory holding N VMs
- ``confine`` N VMs started jailed (the default) vs ``--unconfined``
- ``memcg`` N VM cgroups removed with their memory released first vs
  without: pages left charged to removed cgroups, the time of a removal
- ``resync`` one no-op reconcile pass at 1,000 and 10,000 VMs
- ``wire``   a 10,000-VM assignment on the wire
- ``placement`` the scheduler: 10,000 VMs onto 100 workers, 100,000 onto 1,000
- ``fanout`` 100 workers x 100 VMs: one apply until all report
- ``move``   a live move of a 256 MiB guest between two hosts (QEMU, TCG) vs a
  bare QEMU migration by hand: downtime (ping gap) and total
- ``ha``     masters on PostgreSQL: a change vs SQLite, failover after a
  kill -9, memory and database size at 100,000 VMs (docs/HA.md)

The fake VMM (instant boot and poweroff, so the control plane is what is
measured) is ``bench/tiny_vmm.c``, compiled at run time (``--vmm tiny``,
the default where ``cc`` exists: ~180 KB each, so ``change`` also runs at
10,000 VMs), or ``bench/lean_vmm.py`` (``--vmm python``);
``bench/null_worker.py`` runs a real worker with an in-process null VMM
driver for the fan-out benchmark.
"""
