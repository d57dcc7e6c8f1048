"""The alerting and recording rules of contrib/prometheus, tested like code
with Prometheus' own ``promtool``: they load, their unit tests pass, every
alert has a case that fires it and one in which it must stay silent, every
alert says how bad it is and what to do, and every name they read is one
procurator exports."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from operatorhelpers import (
    RULE_TESTS,
    RULES,
    dashboard_exprs,
    rules,
    run_promtool,
    series_names,
)

from procurator.core.metrics import CATALOGUE, MetricKind

SEVERITIES = {"critical", "warning", "info"}


def exported_names() -> set[str]:
    """Every sample name the exporters can publish, per the catalogue."""
    names = set()
    for spec in CATALOGUE.values():
        if spec.kind is MetricKind.HISTOGRAM:
            names |= {f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count"}
        else:
            names.add(spec.name)
    return names


def test_rules_load(promtool: str) -> None:
    checked = run_promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_rule_unit_tests_pass(promtool: str) -> None:
    tested = run_promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_a_broken_rule_fails_its_unit_test(promtool: str, tmp_path: Path) -> None:
    # The unit tests can fail: the same tests against rules whose crash-loop
    # alert waits longer than it should.
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    text = RULES.read_text()
    crash = text.index("alert: ProcuratorVmCrashLooping")
    broken = text[:crash] + text[crash:].replace("for: 1m", "for: 10m", 1)
    (tmp_path / RULES.name).write_text(broken)
    tested = run_promtool("test", "rules", str(tmp_path / RULE_TESTS.name))
    assert tested.returncode != 0
    assert "ProcuratorVmCrashLooping" in tested.stdout + tested.stderr


def test_every_alert_fires_in_one_case_and_stays_silent_in_another() -> None:
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in rules("alert")}
    assert alerts - fires == set(), "alerts no test fires"
    assert alerts - silent == set(), "alerts no test shows silent"
    assert (fires | silent) - alerts == set(), "tests of alerts that do not exist"


def test_every_recording_rule_is_used() -> None:
    # By an alert, another recording rule, or the dashboard.

    readers = [rule["expr"] for rule in rules("alert") + rules("record")]
    used = set().union(*(series_names(expr) for expr in readers))
    used = used.union(*(series_names(expr) for _, expr in dashboard_exprs()))
    unused = {rule["record"] for rule in rules("record")} - used
    assert unused == set()


@pytest.mark.parametrize("rule", rules("alert"), ids=lambda rule: rule["alert"])
def test_alert_says_how_bad_and_what_to_do(rule: dict[str, object]) -> None:
    assert rule["alert"].startswith("Procurator")  # type: ignore[attr-defined]
    labels = rule["labels"]
    assert isinstance(labels, dict)
    assert labels["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert isinstance(annotations, dict)
    assert set(annotations) == {"summary", "description"}
    assert 10 <= len(annotations["summary"]) <= 100
    # A description says what happened and what to do about it.
    assert len(annotations["description"]) >= 120


def test_rules_read_only_exported_names() -> None:
    known = exported_names() | {rule["record"] for rule in rules("record")}
    for rule in rules("alert") + rules("record"):
        unknown = series_names(rule["expr"]) - known
        assert unknown == set(), f"{rule.get('alert') or rule.get('record')} reads {unknown}"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (worker) (rate(a_total{x="y"}[5m]))', {"a_total"}),
        ("a - on (worker) group_left (hash) b_info", {"a", "b_info"}),
        ("time() - c > 1e3 and d offset 5m", {"c", "d"}),
        ('histogram_quantile(0.9, sum by (le) (rate(e_bucket{l=~"x|y"}[$__rate_interval])))',
         {"e_bucket"}),
        ("count(f != g) or vector(0)", {"f", "g"}),
        ("level:rule_name:rate5m", {"level:rule_name:rate5m"}),
    ],
)  # fmt: skip
def test_series_names(expr: str, names: set[str]) -> None:
    assert series_names(expr) == names
