"""The one loader of the wire contract ``procurator.capnp``.

Invariant: the schema is parsed at most once per process. pycapnp aborts the
whole process (SIGABRT) when the same file id is loaded twice, for instance
by ``capnp.load`` and by its import hook, so every module that needs the
schema calls :func:`load_schema` and nobody calls ``capnp.load`` on it.

Where the file lives:

- in an installed wheel it is package data, ``procurator/schema/procurator.capnp``
  (``pyproject.toml`` force-includes it);
- in a source checkout (editable install) it is ``schema/procurator.capnp`` at
  the repository root, the source of truth.

Package data wins when both exist, so an installed product never reads a
stray checkout.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import capnp

from procurator.core.errors import PermanentError

__all__ = ["SCHEMA_FILE_NAME", "load_schema", "schema_path"]

SCHEMA_FILE_NAME = "procurator.capnp"

_lock = threading.Lock()
_loaded: dict[str, Any] = {}  # "schema" -> the module, once loaded


def _candidates() -> list[Path]:
    package_dir = Path(__file__).resolve().parent.parent  # .../procurator
    return [
        package_dir / "schema" / SCHEMA_FILE_NAME,
        package_dir.parent / "schema" / SCHEMA_FILE_NAME,
    ]


def schema_path() -> Path:
    """Path of the schema file this process uses."""
    candidates = _candidates()
    for path in candidates:
        if path.is_file():
            return path
    raise PermanentError(
        "cannot find the wire contract "
        + SCHEMA_FILE_NAME
        + "; looked in "
        + ", ".join(str(p) for p in candidates)
    )


def load_schema() -> Any:
    """The parsed schema module (``.Master``, ``.Assignment``, ...), loaded
    on first use and shared by every caller and thread afterwards."""
    loaded = _loaded.get("schema")
    if loaded is not None:
        return loaded
    with _lock:
        if "schema" not in _loaded:
            _loaded["schema"] = capnp.load(str(schema_path()), imports=[])
        return _loaded["schema"]
