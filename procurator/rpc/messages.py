"""Plain values of the RPC boundary that the core models do not cover.

Pure Python (no capnp import), so the master and the worker can use these
types without depending on Cap'n Proto. Every collection is a tuple; values
are immutable and safe to share between threads.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from procurator.core.errors import ValidationError
from procurator.core.metrics import MetricSample
from procurator.core.models import (
    Fleet,
    VmAssignment,
    VmEvent,
    VmStatus,
    WorkerDiff,
    WorkerInfo,
    WorkerStatus,
)

__all__ = [
    "DEFAULT_MASTER_ADDRESS",
    "DEFAULT_PORT",
    "Address",
    "ApplyRequest",
    "ApplyResult",
    "FleetStatus",
    "MetricSample",
    "VmDescription",
    "WorkerConnection",
    "WorkerEvent",
    "check_request_id",
    "default_master_address",
    "parse_address",
]

DEFAULT_PORT = 7300
DEFAULT_MASTER_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"
MASTER_ENV = "PROCURATOR_MASTER"


@dataclass(frozen=True, slots=True)
class Address:
    """Where a master listens: TCP ``host:port`` or a unix socket path."""

    host: str = ""
    port: int = 0
    unix_path: str | None = None

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(text: str, *, default_port: int = DEFAULT_PORT) -> Address:
    """Parse ``host:port``, ``[v6]:port``, ``host`` (default port) or
    ``unix:/path``. Raises ``ValidationError`` naming the text."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValidationError(f"address {text!r}: empty unix socket path")
        return Address(unix_path=path)
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValidationError(f"address {text!r}: unbalanced '['")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValidationError(f"address {text!r}: expected ':port' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise ValidationError(f"address {text!r}: empty host")
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ValidationError(f"address {text!r}: port must be 0..65535")
        port = int(port_text)
    return Address(host=host, port=port)


MAX_REQUEST_ID_LENGTH = 64
_REQUEST_ID = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_REQUEST_ID_LENGTH}}}")


def check_request_id(request_id: str) -> str | None:
    """Why ``request_id`` is not a valid request id of ``Control.apply``
    (None: it is). The wire's rule (``schema/procurator.capnp``): 1 to 64
    characters of ``A-Z a-z 0-9 . _ -``; "" means none and is not checked
    here. Both the client and the master's RPC layer check it."""
    if _REQUEST_ID.fullmatch(request_id):
        return None
    return (
        f"{request_id[:80]!r} is not 1 to {MAX_REQUEST_ID_LENGTH} characters of "
        "A-Z, a-z, 0-9, '.', '_', '-'"
    )


def default_master_address() -> str:
    """``$PROCURATOR_MASTER`` or ``127.0.0.1:7300``."""
    return os.environ.get(MASTER_ENV) or DEFAULT_MASTER_ADDRESS


@dataclass(frozen=True, slots=True)
class WorkerEvent:
    worker_id: str
    event: VmEvent
    seq: int = 0  # the master's receipt order (see the schema)


@dataclass(frozen=True, slots=True)
class ApplyRequest:
    """The parameters of ``Control.apply``."""

    fleet: Fleet
    expected_generation: int | None = None  # None: any
    dry_run: bool = False
    request_id: str = ""  # "" for none; else as ``check_request_id`` allows


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What an apply did (or, with ``dry_run``, would do)."""

    generation: int
    changed: bool
    diffs: tuple[WorkerDiff, ...]
    op_id: str
    dry_run: bool = False
    # True when the apply's request id matched one the master had already
    # committed: this is that apply's result, nothing was applied again.
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class WorkerConnection:
    """The master's view of one worker."""

    worker_id: str
    connected: bool
    since_unix_ms: int  # when it (dis)connected; 0: never seen
    desired_generation: int
    status: WorkerStatus | None  # last reported, None before the first report
    last_report_unix_ms: int
    vm_count: int
    desired_vms: tuple[VmAssignment, ...] = ()
    info: WorkerInfo | None = None  # as it last registered; None: never connected


@dataclass(frozen=True, slots=True)
class FleetStatus:
    generation: int
    workers: tuple[WorkerConnection, ...]
    # The master's change index when it answered: pass it back to block
    # until something changes (``ControlClient.status(wait_index=...)``).
    change_index: int = 0


@dataclass(frozen=True, slots=True)
class VmDescription:
    """Everything the master knows about one VM (``procurator describe``)."""

    vm_id: str
    fleet_generation: int
    worker_id: str  # assigned to; "" when not desired anywhere
    desired_generation: int  # of that worker's assignment; 0 when not desired
    desired_op_id: str  # op id of the apply that made that assignment
    desired: VmAssignment | None
    observed_by: str  # the worker whose last status shows the VM; "" if none
    worker_connected: bool
    observed_generation: int  # of the assigned worker (else of observed_by)
    status: VmStatus | None
    events: tuple[WorkerEvent, ...] = ()
    change_index: int = 0  # as in FleetStatus
