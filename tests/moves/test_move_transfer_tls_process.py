"""A cold move in TLS through real processes (issue 30): a master and two
workers run with the fleet's certificates (procurator.certs), the fake
cloud-hypervisor, no network. The target registers that its transfer port
serves TLS, the master tells the source, and the disks cross in TLS: the
move ends done with what the guest wrote on the source on the target's
disk, and the source never logged an unencrypted send."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
from fleethelpers import FAKE, AddImage, add_image, nix_env, procurator_process
from moveprocs import WORKERS, runs_on, until
from testnames import free_port

from procurator.certs import init_ca, issue
from procurator.core.errors import UnavailableError
from procurator.core.fleet import parse_fleet
from procurator.core.move import MovePhase
from procurator.rpc.bridge import open_bridge
from procurator.rpc.clients import open_control
from procurator.rpc.tls import Role, TlsFiles

__all__ = ["add_image", "nix_env"]  # fixtures

pytestmark = [pytest.mark.root, pytest.mark.nix]


def _flags(files: TlsFiles) -> list[str]:
    return ["--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", str(files.ca)]


async def test_a_cold_move_between_workers_with_certificates_runs_in_tls(
    tmp_path: Path, nix_env: dict[str, str], add_image: AddImage
) -> None:
    ca = tmp_path / "ca"
    init_ca(ca)
    tls: dict[str, TlsFiles] = {}
    for role, name in [(Role.MASTER, ""), (Role.CONTROL, "ops")] + [
        (Role.WORKER, w) for w in WORKERS
    ]:
        issued = issue(ca, role, name)
        tls[name or "master"] = TlsFiles(issued.cert, issued.key, ca / "ca.crt")
    config: dict[str, Any] = {
        "payload": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
        "disks": [{"path": "disk.img"}],
    }
    image = add_image("tls-move-vm", config, {"disk.img": b"\0" * (1 << 20)})
    master = f"127.0.0.1:{free_port()}"
    with ExitStack() as stack:
        args = ["master", "--listen", master, "--db", str(tmp_path / "m.db")]
        args += ["--metrics-listen", "", *_flags(tls["master"])]
        master_log = tmp_path / "master.log"
        master_proc = stack.enter_context(procurator_process(args, nix_env, master_log))
        for w in WORKERS:
            args = ["worker", "--id", w, "--master", master, "--state-dir", str(tmp_path / w)]
            args += ["--resync-interval", "1", "--driver", "cloud-hypervisor"]
            args += ["--vmm-binary", sys.executable, "--vmm-arg", str(FAKE), "--no-network"]
            args += ["--metrics-listen", "", "--stop-grace", "2"]
            args += ["--transfer-listen", "127.0.0.1:0", *_flags(tls[w])]
            stack.enter_context(procurator_process(args, nix_env, tmp_path / f"{w}.log"))
        async with open_bridge() as bridge:
            with trio.fail_after(60):  # a hang guard: the master starts
                while True:
                    try:
                        async with open_control(bridge, master, tls=tls["ops"]) as control:
                            await control.status()
                            break
                    except UnavailableError:
                        assert master_proc.poll() is None, master_log.read_text()[-4000:]
                    await trio.sleep(0.1)
            async with open_control(bridge, master, tls=tls["ops"]) as control:
                await until(control, lambda s: sum(w.connected for w in s.workers) == 2)
                await control.apply(
                    parse_fleet(
                        f'[[vms]]\nid = "web-1"\nimage = "{image}"\nvcpus = 1\nmemory_mib = 64\n'
                    )
                )
                await until(control, lambda s: runs_on(s, "web-1") == {"host-a"})
                disk = Path("vms", "web-1", "disks", Path(image).name, "disk0.img")
                with open(tmp_path / "host-a" / disk, "r+b") as copy:
                    copy.seek(4096)
                    copy.write(b"written on host-a")
                await control.move("web-1", "host-b")
                with trio.fail_after(60):  # a hang guard only
                    while not (moves := await control.moves("web-1")) or not moves[0].over:
                        await trio.sleep(0.1)
                assert moves[0].phase is MovePhase.DONE, moves
                await until(control, lambda s: runs_on(s, "web-1") == {"host-b"})
                data = (tmp_path / "host-b" / disk).read_bytes()
                assert data[4096 : 4096 + 17] == b"written on host-a"
                source_log = (tmp_path / "host-a.log").read_text()
                assert "UNENCRYPTED" not in source_log
                assert "disks sent" in source_log
                target_log = (tmp_path / "host-b.log").read_text()
                assert "disks received in TLS from worker host-a" in target_log
                # Leave no VMM behind: remove every VM through the product.
                await control.apply(
                    parse_fleet("[workers.host-a]\nvms = []\n[workers.host-b]\nvms = []\n")
                )
                await until(
                    control,
                    lambda s: all(
                        w.status is not None
                        and not w.status.vms
                        and w.status.observed_generation == w.desired_generation
                        for w in s.workers
                    ),
                )
