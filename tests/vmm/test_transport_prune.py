"""The cloud-hypervisor driver drops the transport of a VMM its supervisor
saw end at once (``forget``), and closes those of VMMs that died
unnoticed a few at a time: a launch's prune looks at the least recently
used transports only (a dead VMM's is used no more, so it is among them), at
most every ``_PRUNE_INTERVAL``. Checking every kept transport took ~0.3 s at
10,000 VMs, on the path of the change whose launch ran it (issue 31)."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
import pytest
from vmmhelpers import ManagerFactory, definition

from procurator.worker.manager import VmSpec
from procurator.worker.vmm import cloud_hypervisor as ch
from procurator.worker.vmm import process
from procurator.worker.vmm.base import VmmHandle


class _Transport(httpx.BaseTransport):
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


@dataclass
class _Liveness:
    """Which VMMs are gone, and every liveness check the driver made."""

    gone: set[int] = field(default_factory=set)
    checked: list[int] = field(default_factory=list)

    def is_alive(self, pid: int, ticks: int) -> bool:
        self.checked.append(pid)
        return pid not in self.gone


@pytest.fixture
def liveness(monkeypatch: pytest.MonkeyPatch) -> _Liveness:
    seen = _Liveness()
    monkeypatch.setattr(process, "is_alive", seen.is_alive)
    return seen


def _handle(pid: int) -> VmmHandle:
    return VmmHandle("cloud-hypervisor", pid, 1000 + pid, f"/run/vm-{pid}/api.sock")


def test_a_prune_looks_at_the_least_recently_used_only(liveness: _Liveness) -> None:
    made: dict[str, _Transport] = {}

    def factory(path: str) -> _Transport:
        made[path] = _Transport()
        return made[path]

    vmms = 10 * ch._PRUNE_BATCH
    driver = ch.CloudHypervisorDriver(transport_factory=factory, kept_connections=vmms)
    for pid in range(1, vmms + 1):
        driver._transport(_handle(pid))
    # Every VMM but the first three and one in the middle is used again
    # (the sweep's calls): the first three drift to the front.
    for pid in range(4, vmms + 1):
        driver._transport(_handle(pid))
    liveness.gone.update((1, 2, 3, vmms // 2))

    driver._prune()
    assert len(liveness.checked) == ch._PRUNE_BATCH
    assert [made[f"/run/vm-{pid}/api.sock"].closed for pid in (1, 2, 3)] == [True] * 3
    assert not made[f"/run/vm-{vmms // 2}/api.sock"].closed  # not among the oldest yet
    assert len(driver._transports) == vmms - 3

    # At most one prune an interval.
    driver._prune()
    assert len(liveness.checked) == ch._PRUNE_BATCH


def test_a_vmm_seen_ending_leaves_no_transport(
    make_manager: ManagerFactory, driver: ch.CloudHypervisorDriver
) -> None:
    """The supervisor drops the transport of every VMM it saw end (a
    replacement's old one, a removal's) at once, not at a prune."""
    manager = make_manager()
    old = manager.ensure(VmSpec("vm1", "h1", definition())).pid
    new = manager.ensure(VmSpec("vm1", "h2", definition())).pid
    assert old != new
    assert [pid for pid, _ in driver._transports] == [new]
    manager.remove("vm1")
    assert not driver._transports
