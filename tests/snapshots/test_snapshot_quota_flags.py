"""The worker's snapshot quota flags: what they make of its config."""

from __future__ import annotations

import pytest

from procurator.cli import build_parser
from procurator.cli.worker import worker_config
from procurator.core.snapshot import SnapshotQuota


def test_the_flags_set_the_quota_and_default_to_the_core_s() -> None:
    defaults = worker_config(build_parser().parse_args(["worker", "--id", "w"]))
    assert defaults.snapshot_quota == SnapshotQuota()
    args = build_parser().parse_args(
        [
            "worker",
            "--id",
            "w",
            "--snapshots-per-vm",
            "2",
            "--snapshot-mib-per-vm",
            "1024",
            "--snapshots-per-worker",
            "0",
            "--snapshot-mib-per-worker",
            "4096",
        ]
    )
    assert worker_config(args).snapshot_quota == SnapshotQuota(
        max_per_vm=2, max_bytes_per_vm=1 << 30, max_per_worker=0, max_bytes_per_worker=4 << 30
    )


@pytest.mark.parametrize("value", ["-1", "1.5", "many"])
def test_a_quota_that_is_not_a_count_is_refused(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--id", "w", "--snapshots-per-vm", value])
    assert "--snapshots-per-vm" in capsys.readouterr().err
