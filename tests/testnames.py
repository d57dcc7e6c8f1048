"""Names for what tests create host-wide (network namespaces), carrying this
test session's token, so the leak guard (tests/conftest.py) judges only this
session's namespaces and two test runs on one machine never blame each
other."""

from __future__ import annotations

import os
import uuid

# Child processes inherit it; a test importing this module in a subprocess
# gets the same token.
TOKEN = os.environ.setdefault("PROCURATOR_TEST_TOKEN", uuid.uuid4().hex[:6])


def netns_name(prefix: str) -> str:
    """``<prefix>-<token><random>``: unique, and recognisably this session's."""
    return f"{prefix}-{TOKEN}{uuid.uuid4().hex[:6]}"


def is_ours(name: str) -> bool:
    return f"-{TOKEN}" in name
