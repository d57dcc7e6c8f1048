"""The worker's jail flags, and a worker that cannot jail refusing to start
(a real ``procurator worker`` process without some capabilities)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from procurator.cli import build_parser
from procurator.cli.worker import worker_config
from procurator.core.jail import JailPolicy


def _config(*flags: str) -> JailPolicy | None:
    args = build_parser().parse_args(["worker", "--id", "w1", *flags])
    config = worker_config(args)
    assert config.runtime is not None
    return config.runtime.jail


def test_jailed_by_default_with_the_documented_defaults() -> None:
    policy = _config("--cgroup-parent", "procurator")
    assert policy == JailPolicy()


def test_the_flags_make_the_policy() -> None:
    policy = _config(
        "--vmm-uids",
        "200000-200099",
        "--vmm-memory-overhead",
        "64",
        "--cpu-overcommit",
        "2.5",
        "--vmm-pids-max",
        "100",
        "--cgroup-parent",
        "/machine.slice/procurator",
    )
    assert policy == JailPolicy(
        uid_first=200000,
        uid_count=100,
        memory_overhead_mib=64,
        cpu_overcommit=2.5,
        pids_max=100,
        cgroup_parent="/machine.slice/procurator",
    )


def test_unconfined_has_no_policy() -> None:
    assert _config("--unconfined") is None


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--vmm-uids", "0-100", "must be FIRST-LAST"),
        ("--vmm-uids", "100", "must be FIRST-LAST"),
        ("--vmm-uids", "300-200", "must be FIRST-LAST"),
        ("--vmm-memory-overhead", "8", "must be 16.."),
        ("--cpu-overcommit", "nan", "must be a positive number"),
        ("--vmm-pids-max", "2", "must be 8.."),
    ],
)
def test_a_useless_value_is_a_usage_error(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["worker", "--id", "w1", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and message in err


def test_a_worker_that_cannot_jail_refuses_to_start(tmp_path: Path) -> None:
    """Without CAP_SYS_ADMIN and CAP_MKNOD (dropped from the bounding set
    before exec, so even root lacks them) the worker says what it lacks and
    what to do, and starts nothing."""
    result = subprocess.run(
        [
            "setpriv",
            "--bounding-set",
            "-sys_admin,-mknod",
            sys.executable,
            "-m",
            "procurator",
            "worker",
            "--id",
            "w1",
            "--master",
            "127.0.0.1:1",
            "--state-dir",
            str(tmp_path / "state"),
            "--no-network",
            "--metrics-listen",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "cannot jail its VMMs: it lacks CAP_SYS_ADMIN, CAP_MKNOD" in result.stderr
    assert "--unconfined" in result.stderr
    assert not (tmp_path / "state" / "vms").exists()
