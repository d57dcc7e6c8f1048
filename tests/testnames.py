"""Names for what tests take host-wide: network namespaces, carrying this
test session's token, so the leak guard (tests/conftest.py) judges only this
session's namespaces and two test runs on one machine never blame each
other; and loopback ports."""

from __future__ import annotations

import os
import socket
import uuid

# Child processes inherit it; a test importing this module in a subprocess
# gets the same token.
TOKEN = os.environ.setdefault("PROCURATOR_TEST_TOKEN", uuid.uuid4().hex[:6])


def netns_name(prefix: str) -> str:
    """``<prefix>-<token><random>``: unique, and recognisably this session's."""
    return f"{prefix}-{TOKEN}{uuid.uuid4().hex[:6]}"


def is_ours(name: str) -> bool:
    return f"-{TOKEN}" in name


def free_port() -> int:
    """A loopback TCP port nothing listens on right now. Another process may
    take it before the caller binds it: bind it at once (and give a daemon
    the number only when it cannot be told to pick one itself, port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
