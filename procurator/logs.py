"""Log records that tell the story of an operation: ``op_id``, ``vm_id``,
``worker_id``, ``generation`` on every line the work of an apply produces.

The fields travel in a context variable, not through every call signature:

- ``log_context(op_id=..., vm_id=...)`` adds fields for the duration of a
  ``with`` block. trio tasks inherit the context they were spawned in, and
  ``trio.to_thread.run_sync`` runs its function in a copy of the caller's
  context, so a reconciler action's fields reach the actuator's blocking
  steps, the image manager and the VMM driver without being passed along.
- Threads started with ``threading.Thread`` begin with an *empty* context
  (Python's rule). A VmManager's supervisor keeps a context of its own,
  entered by whichever thread drives its turns, and sets its fields there
  (``bind``) from the spec it is converging, whose op id it knows.
- Process-wide fields (a worker's ``worker_id``) are given to
  ``configure(static=...)`` and stamped on every record.

``ContextFilter`` copies the fields onto each record at the handler, so
every logger of every library is covered; a field the call site passed in
``extra=`` wins over the context. Both formats carry the same fields: text
lines end with ``[op_id=... vm_id=...]``, JSON lines have them as keys. One
``grep op-3f9a0c12b7de`` across the master's and the workers' logs — text or
JSON — therefore finds every line of that rollout.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import secrets
import sys
import types
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO

__all__ = [
    "DEFAULT_LOG_FORMAT",
    "DEFAULT_LOG_LEVEL",
    "FIELDS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "ContextFilter",
    "JsonFormatter",
    "TextFormatter",
    "bind",
    "configure",
    "log_context",
    "new_op_id",
    "some",
]

# What ``configure`` takes (the daemons' --log-level and --log-format).
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "info"
LOG_FORMATS = ("text", "json")
DEFAULT_LOG_FORMAT = "text"

# Libraries whose INFO records are per request (see ``configure``).
_CHATTY = ("httpx", "httpcore")

# The correlation fields, in the order text lines show them.
FIELDS = ("op_id", "worker_id", "vm_id", "generation")


def new_op_id() -> str:
    """A fresh operation id, e.g. ``op-3f9a0c12b7de`` (48 random bits)."""
    return "op-" + secrets.token_hex(6)


_EMPTY: Mapping[str, object] = types.MappingProxyType({})
_fields: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "procurator_log_fields", default=_EMPTY
)


def some(names: Iterable[str], limit: int = 10) -> str:
    """``a, b, c and 997 more``: a list for a log line that stays one line
    on a worker of a thousand VMs."""
    items = list(names)
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def _clean(fields: Mapping[str, object]) -> dict[str, object]:
    """Only known fields with a value: "" and None mean "not known here"."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown log fields {sorted(unknown)}; known: {', '.join(FIELDS)}")
    return {k: v for k, v in fields.items() if v is not None and v != ""}


@contextlib.contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Add ``fields`` to every record logged in this block (and in tasks
    and ``to_thread`` calls started from it)."""
    token = _fields.set({**_fields.get(), **_clean(fields)})
    try:
        yield
    finally:
        _fields.reset(token)


def bind(**fields: object) -> None:
    """Set fields for the rest of the current context: for a thread that
    owns its context (a supervisor's turns). A field given as "" or None is
    dropped."""
    current = {k: v for k, v in _fields.get().items() if k not in fields}
    current.update(_clean(fields))
    _fields.set(current)


class ContextFilter(logging.Filter):
    """Stamps the context's fields (and the static ones) on each record."""

    def __init__(self, static: Mapping[str, object] | None = None) -> None:
        super().__init__()
        self.static = _clean(static or {})

    def filter(self, record: logging.LogRecord) -> bool:
        attrs = record.__dict__
        for source in (_fields.get(), self.static):
            for key, value in source.items():
                if attrs.get(key) in (None, ""):
                    attrs[key] = value
        return True


def _record_fields(record: logging.LogRecord) -> dict[str, object]:
    attrs = record.__dict__
    return {k: attrs[k] for k in FIELDS if attrs.get(k) not in (None, "")}


class TextFormatter(logging.Formatter):
    """``time level logger: message [op_id=... vm_id=...]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _record_fields(record)
        if not fields:
            return text
        suffix = " ".join(f"{k}={v}" for k, v in fields.items())
        # The fields go on the first line: a traceback follows the message.
        head, sep, tail = text.partition("\n")
        return f"{head} [{suffix}]{sep}{tail}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (Unix seconds to the microsecond: a
    change's trace points are a few milliseconds apart), level, logger,
    message, the correlation fields that are known, and the exception if
    any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_record_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(
    level: str = DEFAULT_LOG_LEVEL,
    fmt: str = DEFAULT_LOG_FORMAT,
    *,
    static: Mapping[str, object] | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send every record to ``stream`` (stderr) as text or JSON lines, with
    the correlation fields; replaces the root logger's handlers."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter(static))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO: a VMM health check every few seconds
    # would bury the story of an operation. Its requests show at debug.
    quiet = logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING
    for name in _CHATTY:
        logging.getLogger(name).setLevel(quiet)
    return handler
