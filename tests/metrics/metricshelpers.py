"""Helpers shared by the metrics tests (imported as a top-level module, the
way pytest puts each test directory on sys.path)."""

from __future__ import annotations

import subprocess

from procurator.core.metrics import ProcessUsage, VmSnapshot
from procurator.core.models import Phase


def realistic_vms(count: int = 22) -> tuple[VmSnapshot, ...]:
    """VMs in every phase (twice over by default), with the counters a
    cloud-hypervisor VM has: a disk (with u64::MAX latency sentinels, as
    before its first request), a NIC, and a device the catalogue does not
    know."""
    phases = list(Phase)
    vms = []
    for i in range(count):
        phase = phases[i % len(phases)]
        runs = phase in (Phase.RUNNING, Phase.PAUSED, Phase.STOPPING, Phase.CRASH_LOOP)
        counters = (
            {
                "disk0": {
                    "read_bytes": 1_048_576 * (i + 1),
                    "write_bytes": 4096 * i,
                    "read_ops": 256 * (i + 1),
                    "write_ops": i,
                    "read_latency_min": 2**64 - 1,
                    "read_latency_max": 2**64 - 1,
                    "read_latency_avg": 2**64 - 1,
                },
                "net0": {"rx_bytes": 1500 * i, "rx_frames": i, "tx_bytes": 900 * i, "tx_frames": i},
                "rng0": {"entropy_bytes": 64},
            }
            if runs
            else {}
        )
        vms.append(
            VmSnapshot(
                id=f"vm-{i:02d}",
                phase=phase,
                hash=f"{i:032d}",
                store_path=f"/nix/store/{i:032d}-web-vm",
                address=f"10.20.0.{10 + i}" if runs else "",
                restarts=i % 4,
                pid=100_000 + i if runs else 0,
                boot_seconds=7.25 + i / 10 if runs else None,
                counters=counters,
                usage=ProcessUsage(cpu_seconds=12.5 + i, rss_bytes=(220 + i) * 2**20)
                if runs
                else None,
            )
        )
    return tuple(vms)


def promtool_check(promtool: str, exposition: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition.decode(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
