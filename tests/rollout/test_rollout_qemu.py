"""A rollout with real guests (issue 28): real ``procurator master`` and
``worker`` processes in a network namespace, QEMU under TCG, the test
image whose guest serves port 80 ("good") and its variant that never opens
it ("bad", ``--arg service false``). Rolling good→bad with auto_revert
ends ``reverted`` (``apply --wait`` exits 7) with every VM on the good
image again, the bad one having touched only the first batch; good→good2
then completes. Lean: two VMs, max_parallel 1."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from testnames import netns_name

from procurator.core.validation import store_path_hash
from procurator.lab import Lab, build_test_image

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.nix]

# Bounds for failure, not performance: a TCG boot takes 7-9 s here.
DEADLINE = "40s"
WAIT = "400"


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(netns_name("procurator-ro"), stop_grace=5, resync_interval=2) as running:
        running.start_master()
        running.start_worker()
        yield running


def fleet(lab: Lab, image: str) -> str:
    path = lab.write_fleet([("web-1", image), ("web-2", image)])
    path.write_text(
        path.read_text()
        + "[rollout]\nmax_parallel = 1\nhealth = { tcp = 80 }\n"
        + f'min_healthy_time = "2s"\nhealthy_deadline = "{DEADLINE}"\n'
    )
    return str(path)


def images_running(lab: Lab) -> dict[str, str]:
    (worker,) = lab.status()["workers"]
    return {vm["id"]: vm.get("observed_hash", "") for vm in worker["vms"]}


def test_good_to_bad_reverts_and_good_to_good_completes(lab: Lab) -> None:
    good = build_test_image("--argstr", "name", "procurator-rollout-good")
    good2 = build_test_image("--argstr", "name", "procurator-rollout-good2")
    bad = build_test_image(
        "--argstr", "name", "procurator-rollout-bad", "--arg", "service", "false"
    )
    first = lab.cli("apply", fleet(lab, good), "--wait", "--timeout", WAIT)
    assert "rollout" not in first.stdout  # nothing replaced: no rollout

    to_bad = lab.cli("apply", fleet(lab, bad), "--wait", "--timeout", WAIT, check=False)
    assert to_bad.returncode == 7, to_bad.stdout + to_bad.stderr
    assert "reverted: VM web-1 on host-a: not healthy within 40 s" in to_bad.stderr
    shown = json.loads(lab.cli("rollout", "status", "--json").stdout)
    assert shown["phase"] == "reverted"
    states = {vm["id"]: vm["state"] for vm in shown["vms"]}
    assert states == {"web-1": "failed", "web-2": "waiting"}  # the first batch only
    # Every VM back on (and running) the good image.
    back = {"web-1": store_path_hash(good), "web-2": store_path_hash(good)}
    deadline = time.monotonic() + float(WAIT)
    while images_running(lab) != back:
        assert time.monotonic() < deadline, images_running(lab)
        time.sleep(1)

    to_good2 = lab.cli("apply", fleet(lab, good2), "--wait", "--timeout", WAIT, check=False)
    assert to_good2.returncode == 0, to_good2.stdout + to_good2.stderr
    assert "done" in to_good2.stdout
    assert images_running(lab) == {
        "web-1": store_path_hash(good2),
        "web-2": store_path_hash(good2),
    }
