"""Helpers of the operator-facing tests: where the rules and the dashboard
live, promtool, and the names a PromQL expression reads."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from promhelpers import PROMTOOL

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "contrib" / "prometheus" / "procurator.rules.yml"
RULE_TESTS = REPO / "contrib" / "prometheus" / "procurator.rules.test.yml"
DASHBOARD = REPO / "contrib" / "grafana" / "procurator-fleet.json"


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


def rule_groups(path: Path = RULES) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(path.read_text())["groups"]
    return groups


def rules(kind: str, path: Path = RULES) -> list[dict[str, Any]]:
    """Every rule of ``kind`` (``alert`` or ``record``)."""
    return [rule for group in rule_groups(path) for rule in group["rules"] if kind in rule]


# PromQL words that look like names but are not series.
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
     "bool", "offset", "inf", "nan"}
)  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_WORD = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_NUMBER_WORD = re.compile(r"^(?:[0-9].*|e[0-9]+)$")


def series_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects (not functions, keywords, label
    names or durations). Enough for the expressions of this repository,
    which ``promtool`` has parsed already; not a PromQL parser."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for match in _WORD.finditer(text):
        word, call = match.groups()
        if call or word.lower() in _KEYWORDS or _NUMBER_WORD.match(word):
            continue  # a function, a keyword, part of a number
        names.add(word)
    return names


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, rows' collapsed panels included."""
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every query of the dashboard."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]


# Grafana's variables, as a query would see them once Grafana substituted
# them: the worker variable's "All" is its allValue.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "6h",
    "$worker": ".*",
}


def substitute(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr
