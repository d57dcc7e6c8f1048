"""The master module's monitoring options: a Prometheus on the master's
host gets procurator's rules (the very file tests/operator unit-tests with
promtool) and scrape jobs for the master and, through its service
discovery, the workers; a Grafana there gets the fleet dashboard. Evaluated
against the stub ``lib`` (see test_modules.py for what that does and does
not check)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flakehelpers import REPO, Nix, nix_path
from test_modules import evaluate

pytestmark = pytest.mark.nix

RULES = REPO / "contrib" / "prometheus" / "procurator.rules.yml"
DASHBOARD = REPO / "contrib" / "grafana" / "procurator-fleet.json"


def _store_path(nix: Nix, path: Path) -> str:
    """Where Nix puts ``path`` (computed, not copied: read-only mode)."""
    store_path: str = nix.eval(f'"${{{nix_path(path)}}}"')
    return store_path


def _monitoring(**prometheus: bool) -> dict[str, object]:
    return {
        "prometheus": {"enable": True, "rules": True, "scrape": True, **prometheus},
        "grafana": {"enable": True},
    }


def test_off_by_default(nix: Nix) -> None:
    config = evaluate(nix, "master", {"enable": True})["config"]
    assert config["services"]["prometheus"] == {}  # mkIf false
    assert config["services"]["grafana"]["provision"]["dashboards"]["settings"]["providers"] == {}


def test_a_local_prometheus_gets_the_rules_and_scrapes_the_fleet(nix: Nix) -> None:
    config = evaluate(nix, "master", {"enable": True, "monitoring": _monitoring()})["config"]
    prometheus = config["services"]["prometheus"]
    # The store path of a file is the hash of its contents: the very file.
    assert prometheus["ruleFiles"] == [_store_path(nix, RULES)]
    assert prometheus["scrapeConfigs"] == [
        {"job_name": "procurator-master", "static_configs": [{"targets": ["127.0.0.1:9300"]}]},
        {
            "job_name": "procurator-workers",
            "http_sd_configs": [{"url": "http://127.0.0.1:9300/sd"}],
        },
    ]
    (provider,) = config["services"]["grafana"]["provision"]["dashboards"]["settings"]["providers"]
    assert provider["name"] == "procurator"
    assert provider["options"]["path"] == _store_path(nix, DASHBOARD.parent)


def test_scrape_targets_follow_the_metrics_address(nix: Nix) -> None:
    settings = {
        "enable": True,
        "metrics": {"listenAddress": "::", "port": 9400},
        "monitoring": _monitoring(rules=False),
    }
    prometheus = evaluate(nix, "master", settings)["config"]["services"]["prometheus"]
    assert prometheus["ruleFiles"] == []
    master, workers = prometheus["scrapeConfigs"]
    assert master["static_configs"] == [{"targets": ["[::1]:9400"]}]
    assert workers["http_sd_configs"] == [{"url": "http://[::1]:9400/sd"}]
    specific = {**settings, "metrics": {"listenAddress": "10.0.0.5", "port": 9300}}
    prometheus = evaluate(nix, "master", specific)["config"]["services"]["prometheus"]
    assert prometheus["scrapeConfigs"][0]["static_configs"] == [{"targets": ["10.0.0.5:9300"]}]
    no_scrape = {**settings, "monitoring": _monitoring(scrape=False)}
    prometheus = evaluate(nix, "master", no_scrape)["config"]["services"]["prometheus"]
    assert prometheus["scrapeConfigs"] == []
