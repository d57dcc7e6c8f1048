"""The fence of a worker restarted while no master answers (issue 27): a
master and a worker (the fake VMM of tests/fakes), one ``reschedule`` and
one ``wait`` VM. The worker is killed (its VMMs live on), the master
frozen (SIGSTOP), and the worker started again: it re-adopts both VMs,
holds no assignment, and after ``--fence-after`` pauses the
``reschedule`` VM its ``vm.json`` marks, and only that one. The master
thaws: the whole assignment comes, and the VM runs again.

Before ``vm.json`` recorded the mark, such a worker fenced nothing."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from fleethelpers import FAKE, AddImage, add_image, nix_env, procurator_process, run_cli
from test_fence_process import _config, _fleet
from testnames import free_port

from procurator.core.vmdef import VmDefinition
from procurator.worker.vmrecord import VmSpec

__all__ = ["add_image", "nix_env"]  # fixtures

pytestmark = [pytest.mark.root, pytest.mark.nix]


@contextmanager
def _worker(tmp_path: Path, env: dict[str, str], log: Path) -> Iterator[Any]:
    args = ["worker", "--id", "host-a", "--state-dir", str(tmp_path / "state")]
    args += ["--resync-interval", "1", "--fence-after", "2", "--driver", "cloud-hypervisor"]
    args += ["--vmm-binary", sys.executable, "--vmm-arg", str(FAKE), "--no-network"]
    args += ["--metrics-listen", "", "--stop-grace", "2", "--log-format", "json"]
    with procurator_process(args, env, log) as proc:
        yield proc


def _wait(what: str, condition: Any, timeout: float = 60) -> None:
    import time  # noqa: PLC0415

    deadline = time.monotonic() + timeout  # a hang guard only
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _connected(env: dict[str, str]) -> bool:
    import json  # noqa: PLC0415

    result = run_cli(env, "status", "--json")
    return result.returncode == 0 and any(
        w["connected"] for w in json.loads(result.stdout)["workers"]
    )


def test_a_worker_restarted_without_a_master_fences_the_reschedule_vm_it_readopted(
    tmp_path: Path, nix_env: dict[str, str], add_image: AddImage
) -> None:
    image = add_image("fence-restart-vm", _config())
    master = f"127.0.0.1:{free_port()}"
    env = {**nix_env, "PROCURATOR_MASTER": master}
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(_fleet(image))
    first, second = tmp_path / "worker-1.log", tmp_path / "worker-2.log"
    args = ["master", "--listen", master, "--db", str(tmp_path / "m.db"), "--metrics-listen", ""]

    def phases() -> dict[str, str]:
        import json  # noqa: PLC0415

        result = run_cli(env, "status", "--json")
        if result.returncode != 0:
            return {}
        return {
            vm["id"]: vm["phase"]
            for w in json.loads(result.stdout)["workers"]
            if w["connected"]
            for vm in w["vms"]
        }

    with ExitStack() as stack:
        master_process = stack.enter_context(procurator_process(args, env, tmp_path / "master.log"))
        with _worker(tmp_path, env, first) as worker:
            # The worker registered, not only the master answering: the
            # fleet's VMs are unpinned, and the master places them only on
            # workers it knows ("no worker is known" otherwise).
            _wait("the worker to register", lambda: _connected(env))
            assert run_cli(env, "apply", str(fleet)).returncode == 0
            _wait("both VMs", lambda: phases() == {"moves": "running", "stays": "running"})
            worker.send_signal(signal.SIGKILL)  # its VMMs live on
            worker.wait()
        master_process.send_signal(signal.SIGSTOP)
        try:
            with _worker(tmp_path, env, second):

                def fenced() -> bool:
                    return "reschedule VM(s) paused" in second.read_text()

                _wait("the fence", fenced)
                text = second.read_text()
                assert "1 re-adopted reschedule VM(s) paused: moves" in text, text[-3000:]
                _wait("the pause", lambda: '"VM moves: paused: ' in second.read_text())
                assert '"VM stays: paused: ' not in second.read_text()
                master_process.send_signal(signal.SIGCONT)
                _wait("the VM to run again", lambda: phases().get("moves") == "running")
                assert phases() == {"moves": "running", "stays": "running"}
                # Leave no VMM behind: remove every VM through the product.
                empty = tmp_path / "empty.toml"
                empty.write_text("[workers.host-a]\nvms = []\n")
                assert run_cli(env, "apply", str(empty)).returncode == 0
                _wait("every VM to be removed", lambda: phases() == {})
        finally:
            master_process.send_signal(signal.SIGCONT)


def test_vm_json_keeps_the_reschedule_mark_and_an_older_one_reads_unmarked() -> None:
    definition = VmDefinition.from_vm_config(
        {**_config(), "payload": {"kernel": "/nix/store/" + "k" * 32 + "-k/vmlinux"}}
    )
    spec = VmSpec("moves", "h", definition, reschedule=True)
    assert VmSpec.from_json(spec.to_json()).reschedule
    older = {k: v for k, v in spec.to_json().items() if k != "reschedule"}
    assert not VmSpec.from_json(older).reschedule
