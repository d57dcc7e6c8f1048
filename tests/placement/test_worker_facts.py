"""What a worker tells the scheduler at registration — labels and overcommit
ratios — from its flags, over the wire and into the store (both adapters)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from procurator.cli import build_parser
from procurator.cli.worker import worker_config
from procurator.core.errors import LimitExceededError, PermanentError, ValidationError
from procurator.core.models import Capacity, WorkerInfo
from procurator.core.validation import LIMITS
from procurator.master.store import open_store
from procurator.master.store.port import Store
from procurator.rpc import convert
from procurator.rpc.schema import load_schema

S = load_schema()

INFO = WorkerInfo(
    "host-a",
    "1.0",
    Capacity(8, 32768, 0),
    "http://h:9301/metrics",
    "qemu",
    labels=(("kvm", "true"), ("zone", "b")),
    cpu_overcommit=4.0,
    memory_overcommit=1.5,
)


def _read(builder: Any) -> WorkerInfo:
    with S.WorkerInfo.from_bytes(builder.to_bytes()) as reader:
        info: WorkerInfo = convert.worker_info_from_reader(reader)
    return info


def test_labels_and_overcommit_cross_the_wire() -> None:
    builder = S.WorkerInfo.new_message()
    convert.fill_worker_info(builder, INFO)
    assert _read(builder) == INFO


def test_a_worker_that_does_not_report_them_has_no_labels_and_no_overcommit() -> None:
    # An older worker's message: the fields are absent.
    builder = S.WorkerInfo.new_message(workerId="host-a")
    info = _read(builder)
    assert (info.labels, info.cpu_overcommit, info.memory_overcommit) == ((), 1.0, 1.0)


def test_bad_labels_and_ratios_are_refused_naming_the_field() -> None:
    builder = S.WorkerInfo.new_message(workerId="host-a")
    labels = builder.init("labels", 3)
    labels[0].name, labels[0].value = "Zone", "b"
    labels[1].name, labels[1].value = "kvm", "-x"
    labels[2].name, labels[2].value = "kvm", "true"
    builder.cpuOvercommit = 0.0
    builder.memoryOvercommit = math.nan
    with pytest.raises(ValidationError) as caught:
        _read(builder)
    details = "\n".join(caught.value.details)
    assert "info.labels[0]: 'Zone' is not a valid label key" in details
    assert "info.labels[1]: '-x' is not a valid label value" in details
    assert "info.labels[2]: label 'kvm' is given twice" in details
    assert "info.cpuOvercommit: 0.0 is out of range" in details
    assert "info.memoryOvercommit: nan is out of range" in details


def test_too_many_labels_are_refused_before_reading_them() -> None:
    builder = S.WorkerInfo.new_message(workerId="host-a")
    labels = builder.init("labels", LIMITS.max_labels + 1)
    for index, label in enumerate(labels):
        label.name, label.value = f"k{index}", "v"
    with pytest.raises(LimitExceededError, match=r"info\.labels"):
        _read(builder)


def _config(*flags: str) -> Any:
    return worker_config(build_parser().parse_args(["worker", "--id", "w1", *flags]))


def test_the_worker_flags_make_what_it_reports() -> None:
    config = _config(
        "--label",
        "zone=b",
        "--label",
        "kvm=true",
        "--label",
        "zone=b",  # the same pair again is harmless
        "--cpu-overcommit",
        "4",
        "--memory-overcommit",
        "1.25",
    )
    assert config.labels == (("kvm", "true"), ("zone", "b"))
    assert (config.cpu_overcommit, config.memory_overcommit) == (4.0, 1.25)
    assert config.runtime.jail.cpu_overcommit == 4.0  # one flag, both uses
    default = _config()
    assert (default.labels, default.cpu_overcommit, default.memory_overcommit) == ((), 1.0, 1.0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--label", "zone"], "must be KEY=VALUE"),
        (["--label", "Zone=b"], "not a valid label key"),
        (["--label", "zone=b c"], "not a valid label value"),
        (["--memory-overcommit", "0"], "must be a positive number, at most 64, not 0"),
        (["--cpu-overcommit", "65"], "must be a positive number, at most 64, not 65"),
        (["--memory-overcommit", "lots"], "must be a positive number, at most 64, not lots"),
    ],
)
def test_bad_flags_are_refused(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--id", "w1", *flags])
    assert message in capsys.readouterr().err


def test_one_key_with_two_values_is_refused() -> None:
    with pytest.raises(PermanentError, match="a label key is given twice"):
        _config("--label", "zone=a", "--label", "zone=b")


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    target = (
        str(tmp_path / "m.db") if request.param == "sqlite" else request.getfixturevalue("pg_url")
    )
    opened: Store = await open_store(target)
    try:
        yield opened
    finally:
        await opened.aclose()


async def test_the_store_keeps_what_the_worker_reported(store: Store) -> None:
    await store.register("host-a", "m1", INFO, unix_ms=1, lease_ms=60_000)
    worker = await store.worker("host-a")
    assert worker.registration is not None and worker.registration.info == INFO
    loaded = await store.load()
    registration = loaded.workers["host-a"].registration
    assert registration is not None and registration.info == INFO
