"""End to end with a real Prometheus server (Debian's /usr/bin/prometheus)
on loopback: it discovers two worker exporters through the master's /sd,
scrapes them and the master, and answers queries over its HTTP API.

Everything runs in this process except Prometheus, which runs as a child of
the test's nursery: cancelling the nursery terminates and reaps it, whatever
the outcome. The test never touches a system Prometheus (e.g. one the
Debian package may have started on :9090): it uses its own free port.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import trio
from metricshelpers import realistic_vms
from testnames import free_port

from procurator.core.metrics import FleetView, WorkerSnapshot, WorkerView
from procurator.core.models import Phase
from procurator.master.http import run_master_http
from procurator.master.metrics import MasterMetrics
from procurator.prometheus import HttpServer
from procurator.worker.metrics import WorkerMetrics

WAIT = 90  # seconds: an upper bound for Prometheus to start and scrape, not a threshold


def _config(master: str) -> str:
    return json.dumps(  # JSON is YAML
        {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {
                    "job_name": "procurator-workers",
                    "http_sd_configs": [{"url": f"http://{master}/sd", "refresh_interval": "1s"}],
                },
                {"job_name": "procurator-master", "static_configs": [{"targets": [master]}]},
            ],
        },
        indent=2,
    )


async def _api(client: httpx.AsyncClient, base: str, path: str, **params: str) -> Any:
    response = await client.get(f"{base}{path}", params=params)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]


async def _wait_until_ready(client: httpx.AsyncClient, base: str) -> None:
    """Until Prometheus listens and says it is ready (it answers 503 while
    its storage starts)."""
    while True:
        try:
            if (await client.get(f"{base}/-/ready")).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        await trio.sleep(0.2)


async def _wait_for_targets(client: httpx.AsyncClient, base: str, want: set[str]) -> None:
    """Until every wanted scrape URL is an active target whose last scrape
    succeeded."""
    while True:
        data = await _api(client, base, "/api/v1/targets", state="active")
        up = {t["scrapeUrl"] for t in data["activeTargets"] if t["health"] == "up"}
        if want <= up:
            return
        await trio.sleep(0.2)


async def _query(client: httpx.AsyncClient, base: str, promql: str) -> list[dict[str, Any]]:
    """Until the instant query returns a result (the first scrape after a
    target comes up may land just after its health does)."""
    while True:
        data = await _api(client, base, "/api/v1/query", query=promql)
        if data["result"]:
            result: list[dict[str, Any]] = data["result"]
            return result
        await trio.sleep(0.2)


async def test_prometheus_discovers_and_scrapes_workers_and_master(
    prometheus_binary: str, tmp_path: Path
) -> None:
    workers = {}
    for worker_id, vm_count in (("w1", 11), ("w2", 3)):
        metrics = WorkerMetrics()
        metrics.update(WorkerSnapshot(vms=realistic_vms(vm_count), taken_at=1.0))
        metrics.set_observed_generation(12)
        metrics.observe_reconcile_pass(0.003, 1)
        workers[worker_id] = metrics

    log_path = tmp_path / "prometheus.log"
    async with trio.open_nursery() as nursery:
        servers: dict[str, HttpServer] = {}
        for worker_id, metrics in workers.items():
            servers[worker_id] = await nursery.start(metrics.run_http, "127.0.0.1", 0)

        def view() -> FleetView:
            return FleetView(
                tuple(
                    WorkerView(
                        worker_id,
                        connected=True,
                        desired_generation=12,
                        observed_generation=12,
                        last_report_unix=1.0,
                        vms_by_phase={Phase.RUNNING: 1},
                        samples=tuple(workers[worker_id].to_report()),
                        metrics_url=servers[worker_id].url("/metrics"),
                    )
                    for worker_id in sorted(workers)
                )
            )

        master = await nursery.start(run_master_http, MasterMetrics(view), "127.0.0.1", 0)
        master_address = f"127.0.0.1:{master.port}"
        config = tmp_path / "prometheus.yml"
        config.write_text(_config(master_address))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        argv = [
            prometheus_binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        with log_path.open("wb") as log:
            process = await nursery.start(
                lambda task_status: trio.run_process(
                    argv, stdout=log, stderr=subprocess.STDOUT, check=False, task_status=task_status
                )
            )
            try:
                async with httpx.AsyncClient(timeout=10) as client:
                    with trio.fail_after(WAIT):
                        await _wait_until_ready(client, base)
                        await _wait_for_targets(
                            client,
                            base,
                            {
                                servers["w1"].url("/metrics"),
                                servers["w2"].url("/metrics"),
                                master.url("/metrics"),
                            },
                        )
                        # A worker metric, scraped from the worker directly,
                        # labelled by service discovery.
                        direct = await _query(
                            client,
                            base,
                            'procurator_vm_phase{job="procurator-workers",phase="running"} == 1',
                        )
                        # A master metric.
                        connected = await _query(
                            client,
                            base,
                            'procurator_master_workers_connected{job="procurator-master"}',
                        )
                        # The same worker figures, relayed by the master.
                        relayed = await _query(
                            client,
                            base,
                            'count by (worker) (procurator_vm_info{job="procurator-master"})',
                        )
                        generation = await _query(
                            client, base, 'procurator_worker_observed_generation{worker="w2"}'
                        )
            except BaseException:
                print(log_path.read_text(errors="replace"))  # shown by pytest on failure
                raise
            finally:
                nursery.cancel_scope.cancel()
    assert process.returncode is not None  # terminated and reaped

    assert {(r["metric"]["worker"], r["metric"]["vm"]) for r in direct} == {
        ("w1", "vm-04"),  # realistic_vms(): index 4 is the running one
    }
    assert [float(r["value"][1]) for r in connected] == [2.0]
    assert {r["metric"]["worker"]: float(r["value"][1]) for r in relayed} == {"w1": 11.0, "w2": 3.0}
    jobs = {r["metric"]["job"]: float(r["value"][1]) for r in generation}
    assert jobs == {"procurator-workers": 12.0, "procurator-master": 12.0}
