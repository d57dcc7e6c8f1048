"""The idle sweep's one API call, alone: ``python -m bench.sweep_call [--calls N] [--rounds R]``.

The idle worker's CPU is mostly its sweep thread, one ``vm.counters`` call
per settled VM every metrics interval (issue 31, target 3). This measures
that call by itself, against one tiny fake VMM (``bench/tiny_vmm.c``,
booted once): the thread CPU (user and kernel) per call of

- the driver: ``CloudHypervisorDriver.counters`` on a kept connection,
  with the worker's API-call metrics hooked in, as the sweep makes it;
- the floor, in the same process and rounds: the same request's bytes
  written and the answer read on one blocking socket, its JSON parsed
  (what any client must do).

Rounds alternate the two; the medians and the ratio of each round's pair
are printed. Needs a C compiler (``cc`` or ``gcc``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from bench._harness import TINY_VMM_SOURCE, c_compiler
from procurator.worker.metrics import WorkerMetrics
from procurator.worker.vmm import process
from procurator.worker.vmm.base import VmmHandle
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver

_CONFIG = {
    "payload": {"kernel": "/bin/true"},
    "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
    "memory": {"size": 1 << 28},
}
_COUNTERS = (
    b"GET /api/v1/vm.counters HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
)


def _put(path: str, endpoint: str, body: bytes = b"") -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.sendall(
            b"PUT /api/v1/%s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (endpoint.encode(), len(body), body)
        )
        answer = sock.recv(65536)
    if not answer.startswith(b"HTTP/1.1 2"):
        raise RuntimeError(f"{endpoint}: {answer[:80]!r}")


def _driver_round(driver: CloudHypervisorDriver, handle: VmmHandle, calls: int) -> float:
    started = time.thread_time()
    for _ in range(calls):
        driver.counters(handle, timeout=5.0)
    return (time.thread_time() - started) / calls


def _raw_round(path: str, calls: int) -> float:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        started = time.thread_time()
        for _ in range(calls):
            sock.sendall(_COUNTERS)
            _, _, body = sock.recv(65536).partition(b"\r\n\r\n")
            json.loads(body)
        return (time.thread_time() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of each")
    args = parser.parse_args()
    compiler = c_compiler()
    if compiler is None:
        sys.exit("bench.sweep_call needs a C compiler for bench/tiny_vmm.c (apt-get install gcc)")
    work = Path(tempfile.mkdtemp(prefix="procurator-sweep-call-"))
    vmm: subprocess.Popen[bytes] | None = None
    try:
        binary = work / "tiny_vmm"
        subprocess.run([compiler, "-O2", "-o", str(binary), str(TINY_VMM_SOURCE)], check=True)
        api = str(work / "api.sock")
        vmm = subprocess.Popen([str(binary), "--api-socket", f"path={api}"])
        deadline = time.monotonic() + 10
        while not os.path.exists(api):
            if time.monotonic() > deadline or vmm.poll() is not None:
                raise RuntimeError("the tiny VMM did not make its socket")
            time.sleep(0.01)
        _put(api, "vm.create", json.dumps(_CONFIG).encode())
        _put(api, "vm.boot")
        ticks = process.pid_start_ticks(vmm.pid)
        assert ticks is not None
        metrics = WorkerMetrics(registry=CollectorRegistry())
        driver = CloudHypervisorDriver(str(binary), on_api_call=metrics.observe_api_call)
        handle = VmmHandle("cloud-hypervisor", vmm.pid, ticks, api)
        driver.counters(handle, timeout=5.0)  # the connection, kept from here on
        ours: list[float] = []
        floor: list[float] = []
        for _ in range(args.rounds):
            ours.append(_driver_round(driver, handle, args.calls))
            floor.append(_raw_round(api, args.calls))
        ratios = [a / b for a, b in zip(ours, floor, strict=True)]
        print(
            f"sweep call, {args.rounds} rounds of {args.calls}: the driver "
            f"{statistics.median(ours) * 1e6:.1f} us of thread CPU a call, a raw socket "
            f"{statistics.median(floor) * 1e6:.1f} us; ratio {statistics.median(ratios):.2f}x "
            f"(rounds {min(ratios):.2f}-{max(ratios):.2f}x)"
        )
    finally:
        if vmm is not None:
            vmm.kill()
            vmm.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
