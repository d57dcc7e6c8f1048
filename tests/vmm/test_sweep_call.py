"""The sweep's counters call leaves the driver's kept connections alone
(issue 31 target 3): an idle VMM whose transport is not kept is read on a
transport made for that call and closed after it, so a sweep over 1,000
VMMs neither evicts the connections of VMs being started or changed nor
pays the kept set's bookkeeping per VM. A hand-written transport factory
(the driver's ``TransportFactory`` port) records what is made and closed."""

from __future__ import annotations

import json

import httpx

from procurator.worker.vmm.base import VmmHandle
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver


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


def test_the_sweeps_calls_leave_the_kept_connections_alone() -> None:
    made: list[Recorded] = []

    def factory(path: str) -> httpx.BaseTransport:
        made.append(Recorded(path))
        return made[-1]

    driver = CloudHypervisorDriver(
        "cloud-hypervisor", transport_factory=factory, kept_connections=2
    )
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
