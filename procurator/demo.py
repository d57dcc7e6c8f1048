"""``make demo``: a master and a worker booting real VMs from Nix store paths.

Runs on this host as root, inside a throwaway network namespace (see
``procurator.lab``), and leaves nothing behind. The steps are what a user
does: build images, apply a fleet, watch it converge, update one VM's
image, remove one VM. Every ``procurator`` command it runs is printed.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from procurator.lab import MASTER_METRICS_PORT, WORKER_METRICS_PORT, Lab, build_test_image

__all__ = ["main"]


def _say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def _show(output: str) -> None:
    for line in output.rstrip().splitlines():
        print(f"    {line}")
    sys.stdout.flush()


def _run(lab: Lab, *args: str) -> str:
    print(f"    $ procurator {' '.join(args)}", flush=True)
    out = lab.cli(*args).stdout
    _show(out)
    return out


def _pick(exposition: str, *prefixes: str) -> str:
    """Sample lines starting with one of ``prefixes`` (a prefix followed by
    a value filter such as " 1.0" keeps only lines containing it)."""
    wanted = []
    items = list(prefixes)
    while items:
        prefix = items.pop(0)
        needle = items.pop(0) if items and items[0].startswith(" ") else ""
        wanted.append((prefix, needle))
    return "\n".join(
        line
        for line in exposition.splitlines()
        if any(line.startswith(p) and needle in line for p, needle in wanted)
    )


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (network namespace, taps, Nix store)", file=sys.stderr)
        return 2
    started = time.monotonic()
    driver = "cloud-hypervisor" if shutil.which("cloud-hypervisor") else "qemu"

    _say("Building two VM images into the Nix store (offline, no nixpkgs)")
    web_v1 = build_test_image("--argstr", "name", "web-vm")
    web_v2 = build_test_image("--argstr", "name", "web-vm-v2")
    _show(f"web-vm     {web_v1}\nweb-vm-v2  {web_v2}")

    with Lab("procurator-demo", driver=driver, qemu_accel="tcg", stop_grace=10) as lab:
        why = (
            "cloud-hypervisor found on PATH"
            if driver == "cloud-hypervisor"
            else "no cloud-hypervisor here: QEMU (microvm machine, TCG)"
        )
        _say(f"Starting a master and a worker (VMM: {driver} - {why})")
        lab.start_master()
        lab.start_worker()
        _show(f"network namespace {lab.netns}, state in {lab.dir}")

        _say("Applying a fleet of two VMs and waiting until the worker converged")
        fleet = lab.write_fleet([("web-1", web_v1), ("web-2", web_v1)])
        _show(fleet.read_text())
        _run(lab, "apply", str(fleet), "--wait", "--timeout", "180")
        addresses = {vm: lab.wait_ready(vm) for vm in ("web-1", "web-2")}
        for vm, address in addresses.items():
            guest = lab.guest_status(address)
            _show(f"{vm}: serial says ready at {address}; its httpd answers {guest}")
        _run(lab, "status")

        _say("A few metrics: the worker's exporter, and the master's (relayed)")
        time.sleep(3)  # one metrics poll and report (the lab polls every 2 s)
        worker_metrics = lab.fetch(f"http://127.0.0.1:{WORKER_METRICS_PORT}/metrics")
        _show(
            _pick(
                worker_metrics,
                "procurator_vm_phase{",
                " 1.0",
                "procurator_vm_resident_memory_bytes",
                "procurator_vm_cpu_seconds_total",
                "procurator_worker_observed_generation",
            )
        )
        master_metrics = lab.fetch(f"http://127.0.0.1:{MASTER_METRICS_PORT}/metrics")
        _show(
            _pick(
                master_metrics,
                "procurator_master_workers_connected",
                "procurator_master_worker_observed_generation",
                "procurator_vm_resident_memory_bytes",
            )
        )
        _show(
            "service discovery: " + lab.fetch(f"http://127.0.0.1:{MASTER_METRICS_PORT}/sd").strip()
        )

        _say("Updating web-2's image: only web-2 is replaced")
        before = lab.vmm_pids()
        fleet = lab.write_fleet([("web-1", web_v1), ("web-2", web_v2)])
        _run(lab, "apply", str(fleet), "--wait", "--timeout", "180")
        after = lab.vmm_pids()
        _show(
            f"web-1 VMM pid {before.get('web-1')} -> {after.get('web-1')} (untouched)\n"
            f"web-2 VMM pid {before.get('web-2')} -> {after.get('web-2')} (new image)"
        )
        lab.wait_ready("web-2")

        _say("Removing web-1")
        fleet = lab.write_fleet([("web-2", web_v2)])
        _run(lab, "apply", str(fleet), "--wait", "--timeout", "180")
        _show(f"VMMs now: {sorted(lab.vmm_pids())}; taps now: {lab.taps()}")
        _run(lab, "status")

        _say("Tearing down: every VM removed, processes stopped, namespace deleted")
        fleet = lab.write_fleet([])
        _run(lab, "apply", str(fleet), "--wait", "--timeout", "120")
    print(f"\ndemo finished in {time.monotonic() - started:.0f}s; nothing left running", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
