"""One source per default: a daemon started with no flags runs with the
config its own code defaults to, and every ``--help`` states the default
its flag has.

The daemons' defaults live in ``procurator.core.defaults`` (and a few
core modules): the parsers (``procurator.cli.parsers``, which must not
import trio or Cap'n Proto) and the settings classes read them there. These
tests catch a default written twice that drifted: they parse each daemon's
command line with no flags, turn it into its config the way the command
does (``master_config``, ``worker_config``) and compare that, field by
field and nested, with the config made from the classes' own defaults; and
they walk every parser's actions for a help text whose "default: N"
disagrees with the flag's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from collections.abc import Iterator
from typing import Any

import pytest

from procurator.app.master import MasterConfig
from procurator.app.worker import WorkerConfig
from procurator.cli import build_parser
from procurator.cli.master import master_config
from procurator.cli.worker import worker_config
from procurator.core.defaults import DEFAULT_WORKER_LEASE
from procurator.core.fence import DEFAULT_FENCE_AFTER, check_fence_after
from procurator.master.service import MasterService
from procurator.worker.runtime import RuntimeOptions

# Where a daemon's flag deliberately defaults otherwise than its config:
# the daemons serve /metrics by default; a config made in a process (a
# test, an embedding) serves none unless it asks.
_DELIBERATE = {"metrics_listen", "runtime.metrics_listen"}


@pytest.fixture(autouse=True)
def _no_environment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults some flags take from the environment, taken away."""
    for name in (
        "PROCURATOR_MASTER",
        "PROCURATOR_CGROUP_PARENT",
        "PROCURATOR_TLS_CERT",
        "PROCURATOR_TLS_KEY",
        "PROCURATOR_TLS_CA",
    ):
        monkeypatch.delenv(name, raising=False)


def _differences(flags: Any, own: Any, path: str = "") -> Iterator[str]:
    """Each field (nested in dataclasses) where ``flags`` and ``own`` differ."""
    if dataclasses.is_dataclass(own) and type(flags) is type(own):
        for f in dataclasses.fields(own):
            name = f"{path}.{f.name}" if path else f.name
            yield from _differences(getattr(flags, f.name), getattr(own, f.name), name)
    elif flags != own and path not in _DELIBERATE:
        yield f"{path}: the flags make {flags!r}, the daemon's default is {own!r}"


def test_a_worker_with_no_flags_runs_with_the_worker_s_own_defaults() -> None:
    args = build_parser().parse_args(["worker", "--id", "host-a"])
    own = WorkerConfig(worker_id="host-a", runtime=RuntimeOptions())
    assert list(_differences(worker_config(args), own)) == []


def test_a_master_with_no_flags_runs_with_the_master_s_own_defaults() -> None:
    args = build_parser().parse_args(["master"])
    assert list(_differences(master_config(args), MasterConfig())) == []


def test_the_master_service_defaults_as_the_master_s_config() -> None:
    # MasterService is also made without a MasterConfig (tests, the lab's
    # in-process masters): its keyword defaults are the config's.
    config = MasterConfig()
    parameters = inspect.signature(MasterService).parameters
    shared = [f.name for f in dataclasses.fields(config) if f.name in parameters]
    assert "worker_lease" in shared
    assert {
        name: parameters[name].default
        for name in shared
        if parameters[name].default is not inspect.Parameter.empty
        and name != "master_id"  # "" both: the host name and a random suffix
    } == {
        name: getattr(config, name)
        for name in shared
        if parameters[name].default is not inspect.Parameter.empty and name != "master_id"
    }


def test_the_default_fence_comes_before_healing_under_the_default_lease() -> None:
    assert check_fence_after(DEFAULT_FENCE_AFTER, worker_lease=DEFAULT_WORKER_LEASE)


def _parsers(
    parser: argparse.ArgumentParser, path: str
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


# "default: 30" or "(default: 1, no ...": a number standing alone.
_STATED = re.compile(r"default: (-?\d+(?:\.\d+)?)(?=[),;\s]|$)")


def test_every_help_states_the_default_its_flag_has() -> None:
    wrong = []
    for path, parser in _parsers(build_parser(), "procurator"):
        for action in parser._actions:
            stated = _STATED.findall(action.help or "")
            if len(stated) != 1 or not isinstance(action.default, int | float):
                continue
            if float(stated[0]) != float(action.default):
                wrong.append(
                    f"{path} {action.option_strings[0]}: says {stated[0]}, is {action.default}"
                )
    assert wrong == []
