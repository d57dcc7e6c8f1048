"""The images of these tests are private to the test session that adds them.

Store paths are content-addressed: two sessions on one host (engineers
running the suite side by side, parallel CI jobs) that add the same image
get the same path, and the first to finish deletes it at teardown under the
other. That other session's worker then finds the image gone, cannot
realise it (no substituters) and retries every 30 s: the VM stays
``pending`` and ``apply --wait`` times out (issue 24, item 11: "a replaced
VM stayed pending for 60 s" under load, i.e. while other suites ran).
"""

from __future__ import annotations

import subprocess

import pytest
from fleethelpers import AddImage

pytestmark = [pytest.mark.root, pytest.mark.nix]

CONFIG = {
    "payload": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
    "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
    "memory": {"size": 64 << 20},
}


def test_another_sessions_teardown_cannot_delete_our_image(
    add_image: AddImage, nix_env: dict[str, str]
) -> None:
    ours = add_image("web-vm", CONFIG)
    theirs = add_image("web-vm", CONFIG)  # the same image, as another session adds it
    assert ours != theirs
    # The other session's teardown.
    subprocess.run(["nix-store", "--delete", theirs], env=nix_env, check=True, capture_output=True)
    valid = subprocess.run(
        ["nix-store", "--check-validity", ours], env=nix_env, capture_output=True, check=False
    )
    assert valid.returncode == 0, f"{ours} was deleted with the other session's image"
