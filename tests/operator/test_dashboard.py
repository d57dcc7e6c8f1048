"""The Grafana dashboard of contrib/grafana: importable (the data source is
a variable), every query parses (``promtool check rules`` on a rules file
made of the dashboard's queries), and every name it reads is published by a
live master and worker (real processes, scraped over HTTP) or is one of the
recording rules of contrib/prometheus."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fleethelpers import AddImage, FakeFleet
from operatorhelpers import (
    dashboard,
    dashboard_exprs,
    dashboard_panels,
    rules,
    run_promtool,
    series_names,
    substitute,
)
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_is_importable_with_the_data_source_as_a_variable() -> None:
    data = dashboard()
    assert data["uid"] == "procurator-fleet"
    assert data["title"]
    assert data["__inputs"] == []  # nothing to map on import but the variable
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["worker"]["datasource"] == DATASOURCE
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["description"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


def test_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard_panels():
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def _check_as_rules(tmp_path: Path, exprs: list[str]) -> Any:
    """promtool's verdict on ``exprs`` as the expressions of recording rules."""
    path = tmp_path / "dashboard.rules.yml"
    records = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    return run_promtool("check", "rules", str(path))


def test_every_query_parses(promtool: str, tmp_path: Path) -> None:
    exprs = [substitute(expr) for _, expr in dashboard_exprs()]
    assert len(exprs) >= 20
    checked = _check_as_rules(tmp_path, exprs)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_parse_check_catches_a_broken_query(promtool: str, tmp_path: Path) -> None:
    checked = _check_as_rules(tmp_path, ["sum(rate(procurator_vm_restarts_total[5m])"])
    assert checked.returncode != 0


def test_docs_describe_every_row() -> None:
    text = (REPO / "docs" / "METRICS.md").read_text()
    rows = [p["title"] for p in dashboard()["panels"] if p["type"] == "row"]
    assert len(rows) >= 6
    missing = [row for row in rows if f"**{row}**" not in text]
    assert missing == [], "rows docs/METRICS.md does not describe"


# ---------------------------------------------------------------- live


def _published(text: str) -> set[str]:
    """Every sample name an exposition can carry: its samples' names, and
    the names its families' types imply (a family may have no samples yet)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        else:
            names.add(family.name)
    return names


def _sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


def _scrape(url: str) -> str:
    response = httpx.get(url, timeout=10)
    response.raise_for_status()
    return response.text


@pytest.mark.root
@pytest.mark.nix
def test_dashboard_and_rules_read_what_a_live_master_and_worker_publish(
    metrics_fleet: FakeFleet, add_image: AddImage
) -> None:
    image = add_image(
        "dash-vm",
        {
            "payload": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "memory": {"size": 64 << 20},
        },
    )
    metrics_fleet.apply_ok(f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{image}" }} ]\n')
    urls = metrics_fleet.metrics_urls
    scrapes: dict[str, str] = {}

    def vm_figures_published() -> bool:
        # The worker polls its VMs every --metrics-interval (15 s) and
        # reports them to the master on its own beat: a poll that saw the
        # VM still starting gives the master a phase without a boot time
        # until the next report, so both are waited for on both endpoints.
        scrapes.update({role: _scrape(url) for role, url in urls.items()})
        return all(
            "procurator_vm_phase{" in text and "procurator_vm_boot_duration_seconds{" in text
            for text in scrapes.values()
        ) and ('phase="running"' in scrapes["worker"])

    metrics_fleet.wait_for("the VM's figures on both endpoints", vm_figures_published)
    published = _published(scrapes["master"]) | _published(scrapes["worker"])
    recorded = {rule["record"] for rule in rules("record")}

    for title, expr in dashboard_exprs():
        unknown = series_names(substitute(expr)) - published - recorded
        assert unknown == set(), f"panel {title!r} reads {unknown}, which nothing publishes"
    for rule in rules("record") + rules("alert"):
        unknown = series_names(rule["expr"]) - published - recorded
        assert unknown == set(), f"{rule.get('record') or rule.get('alert')} reads {unknown}"
    variable = dashboard()["templating"]["list"][1]["query"]["query"]
    match = re.fullmatch(r"label_values\((\w+), worker\)", variable)
    assert match is not None and match.group(1) in published

    # The worker timed the VM's boot (launch to running), and relayed it.
    for role in ("worker", "master"):
        assert _sample(scrapes[role], "procurator_vm_boot_duration_seconds", vm="web-1") > 0

    # The master counted its own work: the apply, the worker's reports,
    # the commit, and the time from the apply to the worker observing it.
    master = scrapes["master"]
    # An apply travels as a fleet patch: its parts' digests, then the parts a
    # fresh master does not hold.
    assert _sample(master, "procurator_master_rpc_calls_total", method="applyPatch") == 2
    assert _sample(master, "procurator_master_rpc_calls_total", method="apply") == 0
    assert _sample(master, "procurator_master_rpc_calls_total", method="register") >= 1
    assert _sample(master, "procurator_master_rpc_calls_total", method="reportStatus") >= 1
    assert (
        _sample(
            master, "procurator_master_store_operation_duration_seconds_count", operation="commit"
        )
        >= 1
    )
    assert _sample(master, "procurator_master_apply_to_observed_seconds_count") >= 1
    assert _sample(master, "procurator_master_store_errors_total", operation="commit") == 0
