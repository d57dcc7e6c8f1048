"""Rules every identifier and store path must obey, wherever it comes from.

VM ids become directory names, tap-name seeds and metric labels; worker ids
become certificate names and labels. Store paths are handed to Nix. So each
is checked against a strict pattern once at every trust boundary (fleet file,
RPC request, state dir on disk) with this one module.
"""

from __future__ import annotations

import hashlib
import re

__all__ = [
    "LIMITS",
    "MAX_HTTP_PATH_LENGTH",
    "MAX_REQUEST_ID_LENGTH",
    "MAX_ROLLOUT_ID_LENGTH",
    "Limits",
    "check_group_name",
    "check_hash",
    "check_http_path",
    "check_label_key",
    "check_label_value",
    "check_overcommit",
    "check_request_id",
    "check_rollout_id",
    "check_snapshot_name",
    "check_store_path",
    "check_vm_id",
    "check_worker_id",
    "default_hash",
    "store_path_hash",
]

VM_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
WORKER_ID_RE = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
HASH_RE = re.compile(r"[A-Za-z0-9._+-]{1,128}")
# Worker labels and the constraints that match them (``zone = "b"``), and
# spread group names: they become metric label values and log fields.
LABEL_KEY_RE = re.compile(r"[a-z][a-z0-9._-]{0,62}")
LABEL_VALUE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
GROUP_RE = VM_ID_RE
# Snapshot names become directory names under a VM's state directory and
# CLI arguments: the VM id's rule (no '/', no '.', no leading '-').
SNAPSHOT_NAME_RE = VM_ID_RE
# Control.apply's request ids (schema/procurator.capnp).
MAX_REQUEST_ID_LENGTH = 64
REQUEST_ID_RE = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_REQUEST_ID_LENGTH}}}")
# Rollout ids as a client names them (Control.rollout's rolloutId).
MAX_ROLLOUT_ID_LENGTH = 64
# A health check's HTTP path (HealthCheck.path): it goes into a request line.
MAX_HTTP_PATH_LENGTH = 1024
# Nix's base-32 alphabet has no e, o, u, t. Names: nix's own rule
# (store-api.cc checkName), at most 211 characters, not starting with '.'.
NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
STORE_DIR = "/nix/store"
STORE_PATH_RE = re.compile(
    rf"{re.escape(STORE_DIR)}/([{NIX_BASE32}]{{32}})-([A-Za-z0-9+\-_?=][A-Za-z0-9+\-._?=]{{0,210}})"
)


class Limits:
    """Bounds on what any peer or file may ask for. One place, so the fleet
    parser, the RPC servers and the docs agree."""

    max_workers = 10_000
    max_vms_per_worker = 20_000
    max_vms_total = 200_000
    max_vcpus = 256
    min_memory_mib = 16
    max_memory_mib = 1 << 20  # 1 TiB
    max_text = 4096  # any single string on the wire
    max_fleet_file_bytes = 64 * 1024 * 1024
    max_labels = 64  # labels of one worker, constraints of one VM
    max_overcommit = 64.0  # a worker's CPU or memory overcommit ratio


LIMITS = Limits()


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_vm_id(value: object) -> str | None:
    """Return a problem description, or None when ``value`` is a valid VM id."""
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not VM_ID_RE.fullmatch(value):
        return (
            f"{_shown(value)} is not a valid VM id: 1-63 characters of a-z, 0-9 and '-', "
            "starting with a letter or digit"
        )
    return None


def check_worker_id(value: object) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not WORKER_ID_RE.fullmatch(value):
        return (
            f"{_shown(value)} is not a valid worker id: 1-63 characters of a-z, 0-9, '.' "
            "and '-', starting with a letter or digit"
        )
    return None


def check_snapshot_name(value: object) -> str | None:
    """Why ``value`` is not a valid snapshot name (None: it is): the VM
    id's rule, so a name can never leave the directory it names."""
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not SNAPSHOT_NAME_RE.fullmatch(value):
        return (
            f"{_shown(value)} is not a valid snapshot name: 1-63 characters of a-z, 0-9 "
            "and '-', starting with a letter or digit"
        )
    return None


def check_request_id(request_id: str) -> str | None:
    """Why ``request_id`` is not a valid request id of ``Control.apply``
    (None: it is). The wire's rule (``schema/procurator.capnp``): 1 to 64
    characters of ``A-Z a-z 0-9 . _ -``; "" means none and is not checked
    here. The client, the master's RPC layer and its service check it."""
    if REQUEST_ID_RE.fullmatch(request_id):
        return None
    return (
        f"{request_id[:80]!r} is not 1 to {MAX_REQUEST_ID_LENGTH} characters of "
        "A-Z, a-z, 0-9, '.', '_', '-'"
    )


def check_rollout_id(rollout_id: str) -> str | None:
    """Why ``rollout_id`` is not a rollout id a client may ask for (None:
    it is; "" names the rollout under way, else the newest). A master names
    its rollouts "ro-" and the apply's op id
    (``procurator.master.rollout.rollout_id_of``); the rule is looser, at
    most 64 printable characters, so that an id any master gave is asked
    for and answered "not found" if unknown, never refused by its shape.
    The client and the master's RPC layer check it."""
    if len(rollout_id) <= MAX_ROLLOUT_ID_LENGTH and rollout_id.isprintable():
        return None
    return (
        f"{rollout_id[:80]!r} is not a rollout id: at most {MAX_ROLLOUT_ID_LENGTH} "
        "printable characters"
    )


def check_http_path(path: str) -> str | None:
    """Why ``path`` is not a health check's HTTP path (None: it is): it
    starts with '/', is at most ``MAX_HTTP_PATH_LENGTH`` characters and has
    no whitespace or control characters (it goes into the request line;
    the prober percent-encodes non-ASCII). The fleet file, the wire and
    ``validate_fleet`` check it with this one rule, so what a master
    accepts its workers take."""
    if len(path) > MAX_HTTP_PATH_LENGTH:
        return f"is longer than {MAX_HTTP_PATH_LENGTH} characters"
    if not path.startswith("/") or any(c.isspace() or not c.isprintable() for c in path):
        return (
            f"{path[:64]!r} is not an HTTP path: it starts with '/' and has no spaces "
            "or control characters"
        )
    return None


def check_store_path(value: object) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not STORE_PATH_RE.fullmatch(value):
        return (
            f"{_shown(value)} is not a Nix store path: expected "
            f"{STORE_DIR}/<32 base-32 characters>-<name>"
        )
    return None


def check_hash(value: object) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not HASH_RE.fullmatch(value):
        return f"{_shown(value)} is not a valid hash: 1-128 characters of A-Z a-z 0-9 . _ + -"
    return None


def check_label_key(value: object) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not LABEL_KEY_RE.fullmatch(value):
        return (
            f"{_shown(value)} is not a valid label key: 1-63 characters of a-z, 0-9, '.', '_' "
            "and '-', starting with a letter"
        )
    return None


def check_label_value(value: object) -> str | None:
    if not isinstance(value, str):
        hint = f' (write "{str(value).lower()}" in quotes)' if isinstance(value, bool | int) else ""
        return f"must be a string, not {type(value).__name__}{hint}"
    if not LABEL_VALUE_RE.fullmatch(value):
        return (
            f"{_shown(value)} is not a valid label value: 1-63 characters of A-Z, a-z, 0-9, "
            "'.', '_' and '-', starting with a letter or digit"
        )
    return None


def check_group_name(value: object) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not GROUP_RE.fullmatch(value):
        return (
            f"{_shown(value)} is not a valid group name: 1-63 characters of a-z, 0-9 and '-', "
            "starting with a letter or digit"
        )
    return None


def check_overcommit(value: object) -> str | None:
    """An overcommit ratio: a finite number above 0, at most
    ``LIMITS.max_overcommit`` (below 1 holds capacity back for the host)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, not {type(value).__name__}"
    if not 0 < value <= LIMITS.max_overcommit:  # also false for nan
        return f"{_shown(value)} is out of range: above 0, at most {LIMITS.max_overcommit:g}"
    return None


def store_path_hash(path: str) -> str:
    """The 32-character hash part of a valid store path."""
    match = STORE_PATH_RE.fullmatch(path)
    if match is None:
        raise ValueError(f"not a store path: {path!r}")
    return match.group(1)


def default_hash(path: str, vcpus: int = 0, memory_mib: int = 0) -> str:
    """The identity of a VM when the fleet file names none.

    It changes whenever the VM must be replaced: a new image (a new store path
    always has a new hash part) or new resources. Without resource overrides
    it is the store path's own hash, which Nix users recognise.
    """
    if not vcpus and not memory_mib:
        return store_path_hash(path)
    digest = hashlib.sha256(f"{path}\0{vcpus}\0{memory_mib}".encode()).hexdigest()
    return digest[:32]
