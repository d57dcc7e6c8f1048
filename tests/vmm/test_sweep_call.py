"""The sweep's counters call and the driver's kept connections (issue 31
target 3): while the budget (``kept_connections``) has room, an idle VMM's
connection is kept from one sweep to the next (a connect and a close per
call were half the sweep's CPU); once it is spent, an idle VMM whose
transport is not kept is read on a transport made for that call and closed
after it, so a sweep over more VMMs than the budget neither cycles the
kept set nor evicts the connections of VMs being started or changed. A
hand-written transport factory (the driver's ``TransportFactory`` port)
records what is made and closed."""

from __future__ import annotations

import json

import httpx

from procurator.worker.vmm.base import VmmHandle
from procurator.worker.vmm.cloud_hypervisor import (
    KEPT_CONNECTIONS,
    CloudHypervisorDriver,
    connection_budget,
)


class Recorded(httpx.BaseTransport):
    def __init__(self, path: str) -> None:
        self.path = path
        self.calls = 0
        self.closed = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert not self.closed, f"a request on the closed transport of {self.path}"
        self.calls += 1
        if request.url.path.endswith("/vm.counters"):
            body = {"_net0": {"rx_bytes": self.calls}}
        else:
            body = {"state": "Running"}
        return httpx.Response(200, stream=httpx.ByteStream(json.dumps(body).encode()))

    def close(self) -> None:
        self.closed = True


def handle(n: int) -> VmmHandle:
    return VmmHandle("cloud-hypervisor", pid=1000 + n, pid_start_ticks=n, api_socket=f"/vm{n}.sock")


def recording_driver(kept_connections: int) -> tuple[CloudHypervisorDriver, list[Recorded]]:
    """A driver whose transports are ``Recorded``, and the list of them in
    the order it made them."""
    made: list[Recorded] = []

    def factory(path: str) -> httpx.BaseTransport:
        made.append(Recorded(path))
        return made[-1]

    driver = CloudHypervisorDriver(
        "cloud-hypervisor", transport_factory=factory, kept_connections=kept_connections
    )
    return driver, made


def test_the_sweeps_calls_leave_the_kept_connections_alone() -> None:
    driver, made = recording_driver(kept_connections=2)
    try:
        starting = [handle(0), handle(1)]
        for h in starting:
            driver.info(h, timeout=1.0)
        kept = list(made)
        for n in range(2, 12):
            assert driver.counters(handle(n), timeout=1.0) == {"_net0": {"rx_bytes": 1}}
        # Each idle VMM was read on a transport of its own, closed after its call ...
        assert [t.path for t in made[2:]] == [f"/vm{n}.sock" for n in range(2, 12)]
        assert all(t.closed and t.calls == 1 for t in made[2:])
        # ... and the VMs being started still have theirs.
        assert not any(t.closed for t in kept)
        for h in starting:
            driver.info(h, timeout=1.0)
        assert len(made) == 12 and [t.calls for t in kept] == [2, 2]
        # A VMM whose transport is kept is read on it.
        driver.counters(starting[0], timeout=1.0)
        assert len(made) == 12 and kept[0].calls == 3
    finally:
        driver.close()
    assert all(t.closed for t in made)


def test_a_sweep_keeps_idle_connections_while_the_budget_has_room() -> None:
    driver, made = recording_driver(kept_connections=4)
    try:
        for _ in range(3):  # three sweeps over six idle VMMs
            for n in range(6):
                driver.counters(handle(n), timeout=1.0)
        # The first four keep theirs from sweep to sweep; the last two are
        # read on a transport each call (the budget is spent: no eviction).
        assert [t.path for t in made[:4]] == [f"/vm{n}.sock" for n in range(4)]
        assert [t.calls for t in made[:4]] == [3, 3, 3, 3]
        assert not any(t.closed for t in made[:4])
        assert len(made) == 4 + 2 * 3 and all(t.closed and t.calls == 1 for t in made[4:])
        # A VM being started needs one too: it takes the least recently used.
        driver.info(handle(9), timeout=1.0)
        assert made[0].closed and not made[-1].closed
    finally:
        driver.close()
    assert all(t.closed for t in made)


def test_the_budget_is_a_quarter_of_the_open_file_limit() -> None:
    assert connection_budget(20_000) == 5_000  # 10,000 VMs' pidfds still fit
    assert connection_budget(1_048_576) == 262_144
    assert connection_budget(40) == KEPT_CONNECTIONS
    assert connection_budget() >= KEPT_CONNECTIONS
