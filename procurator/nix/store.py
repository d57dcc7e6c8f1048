"""The Nix store, through the ``nix-store`` command line.

Why the CLI and not a library: it is the one stable interface across Nix
releases, and as root it works on the local store without a daemon (and
through the daemon when ``NIX_REMOTE`` says so), so the worker needs no
binding and no build of its own.

Invariants:

- Every method is blocking, bounded by a timeout, and thread-safe (the
  only mutable state is the closure cache, behind a leaf lock); the worker
  calls it through ``trio.to_thread.run_sync``.
- A store path's closure never changes (its references are fixed when it is
  registered, and the path names its content), so ``closure`` answers from
  a bounded cache after the first query: a worker starting a thousand VMs
  of one image asks ``nix-store`` once, not a thousand times. Only queries
  of *valid* paths are cached (a failed one raises and is asked again).
- Nix's failures are translated here, at the boundary: a malformed path is a
  ``ValidationError``, an absent one a ``NotFoundError``; a substituter that
  fails, a timeout or a missing ``nix-store`` binary a ``TemporaryError``
  carrying nix's own message, so the caller retries with backoff.
- GC roots are *indirect*: the link lives in the worker's state dir and Nix
  records ``<nix state>/gcroots/auto/<hash of the link's path>`` pointing to
  it. ``remove_root`` removes both, so a removed VM leaves nothing behind in
  ``/nix/var`` (Nix would otherwise drop the dangling ``auto`` entry only at
  its next collection).
- Rooting goes through ``nix-store --realise --add-root``: the same process
  that makes the path valid (or finds it valid) holds a temporary root until
  the permanent one exists, so a concurrent ``nix-collect-garbage`` can
  never slip in between "present" and "rooted".
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from procurator.core.errors import NotFoundError, TemporaryError, UnavailableError, ValidationError
from procurator.core.validation import check_store_path

__all__ = ["NixStore", "Store", "auto_root_name"]

log = logging.getLogger(__name__)

_NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
_MAX_MESSAGE = 2000
_CLOSURE_CACHE_SIZE = 1024  # store paths; dropped all at once when full


class Store(Protocol):
    """The port the image manager needs from a Nix store."""

    def is_valid(self, path: str) -> bool: ...

    def realise(self, path: str, *, root: Path | None = None) -> None: ...

    def closure(self, path: str) -> frozenset[str]: ...

    def add_root(self, path: str, link: Path) -> None: ...

    def add_root_beside(self, path: str, link: Path, witness: Path) -> bool: ...

    def has_root(self, link: Path) -> bool: ...

    def remove_root(self, link: Path) -> None: ...


class NixStore:
    """The local Nix store, driven through ``nix-store``.

    ``substituters`` (binary cache URLs, e.g. ``https://cache.example`` or
    ``file:///srv/cache``) and ``trusted_public_keys`` replace nix.conf's for
    :meth:`realise` only; empty means "as nix.conf says". ``extra_env`` is
    added to the environment of every call (e.g. ``NIX_CONF_DIR``).
    ``timeout`` bounds queries, ``realise_timeout`` a fetch, which may move
    gigabytes.
    """

    def __init__(
        self,
        *,
        substituters: Sequence[str] = (),
        trusted_public_keys: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
        nix_bin_dir: Path | None = None,
        timeout: float = 60.0,
        realise_timeout: float = 3600.0,
    ) -> None:
        for url in substituters:
            if not url or any(c.isspace() for c in url):
                raise ValueError(f"invalid substituter URL: {url!r}")
        self._substituters = tuple(substituters)
        self._trusted_keys = tuple(trusted_public_keys)
        self._env = {**os.environ, **(extra_env or {})}
        self._nix_store = str(nix_bin_dir / "nix-store") if nix_bin_dir else "nix-store"
        self._timeout = timeout
        self._realise_timeout = realise_timeout
        self._gcroots_auto = (
            Path(self._env.get("NIX_STATE_DIR", "/nix/var/nix")) / "gcroots" / "auto"
        )
        self._closures_lock = threading.Lock()  # leaf lock: guards _closures only
        self._closures: dict[str, frozenset[str]] = {}

    # ------------------------------------------------------------- queries

    def check(self, path: str) -> None:
        """Raise unless ``path`` is a well-formed, valid store path that is
        on disk: ``ValidationError`` (malformed) or ``NotFoundError``."""
        _check_syntax(path)
        if not self.is_valid(path):
            raise NotFoundError(f"store path {path} is not in the local Nix store")
        if not os.path.isdir(path) and not os.path.isfile(path):
            raise NotFoundError(
                f"store path {path} is registered valid but missing on disk "
                "(repair it with `nix-store --repair-path`)"
            )

    def is_valid(self, path: str) -> bool:
        """Whether the store's database holds ``path`` (and so its closure)."""
        _check_syntax(path)
        done = self._run(["--check-validity", "--print-invalid", path], what=f"checking {path}")
        if done.returncode != 0:
            raise TemporaryError(
                f"nix-store could not check the validity of {path}: {_message(done.stderr)}"
            )
        return path not in done.stdout.split()

    def closure(self, path: str) -> frozenset[str]:
        """Every store path ``path`` needs at run time, itself included
        (cached: see the module docstring)."""
        _check_syntax(path)
        with self._closures_lock:
            cached = self._closures.get(path)
        if cached is not None:
            return cached
        done = self._run(["--query", "--requisites", path], what=f"querying {path}")
        if done.returncode != 0:
            self._raise_absent_or_temporary(path, done, "query the closure of")
        closure = frozenset(line for line in done.stdout.splitlines() if line)
        with self._closures_lock:
            if len(self._closures) >= _CLOSURE_CACHE_SIZE:
                self._closures.clear()
            self._closures[path] = closure
        return closure

    # ------------------------------------------------------------- changes

    def realise(self, path: str, *, root: Path | None = None) -> None:
        """Make ``path`` valid, fetching it (and its closure) from the
        substituters when it is missing; with ``root``, also register an
        indirect GC root there, atomically with respect to the collector.

        A failure is a ``TemporaryError`` with nix's message: the path may
        reach the cache later (a CI job still pushing it, a cache down)."""
        _check_syntax(path)
        args = ["--realise", path]
        if root is not None:
            args += ["--add-root", _absolute(root)]
        if self._substituters:
            args += ["--option", "substituters", " ".join(self._substituters)]
        if self._trusted_keys:
            args += ["--option", "trusted-public-keys", " ".join(self._trusted_keys)]
        if root is not None:
            root.parent.mkdir(parents=True, exist_ok=True)
        done = self._run(args, what=f"realising {path}", timeout=self._realise_timeout)
        if done.returncode != 0:
            caches = ", ".join(self._substituters) or "the substituters of nix.conf"
            raise TemporaryError(
                f"could not realise {path} from {caches}: {_message(done.stderr)}",
                delay=30.0,
            )

    def add_root(self, path: str, link: Path) -> None:
        """Register an indirect GC root ``link`` -> ``path`` (idempotent:
        an existing link is replaced). Never fetches: a missing path is a
        ``NotFoundError``."""
        _check_syntax(path)
        link.parent.mkdir(parents=True, exist_ok=True)
        args = ["--realise", path, "--add-root", _absolute(link), "--option", "substituters", ""]
        done = self._run(args, what=f"rooting {path}")
        if done.returncode != 0:
            self._raise_absent_or_temporary(path, done, "add a GC root for")

    def add_root_beside(self, path: str, link: Path, witness: Path) -> bool:
        """Root ``path`` at ``link`` as ``add_root`` does, without running
        ``nix-store``, when ``witness`` (another indirect root, which the
        caller keeps from being removed meanwhile) already roots ``path``:
        write what ``nix-store --add-root`` writes, the link and then Nix's
        record of it in ``gcroots/auto``, each replaced atomically. The path
        is rooted by the witness until ours exists, so the collector never
        sees it unrooted, and a valid witness means a valid path.

        Returns False when it cannot: the witness does not root ``path``, or
        this process may not write ``gcroots/auto`` (a client of the Nix
        daemon). Then call ``add_root``; a link written here is replaced."""
        _check_syntax(path)
        witness_link = _absolute(witness)
        try:
            if os.readlink(witness_link) != path:
                return False
            if os.readlink(self._gcroots_auto / auto_root_name(witness_link)) != witness_link:
                return False
        except OSError:
            return False
        absolute = _absolute(link)
        try:
            link.parent.mkdir(parents=True, exist_ok=True)
            _replace_symlink(path, absolute)
            _replace_symlink(absolute, str(self._gcroots_auto / auto_root_name(absolute)))
        except PermissionError:
            return False
        except OSError as err:
            raise TemporaryError(f"could not add the GC root {absolute}: {err}") from err
        return True

    def has_root(self, link: Path) -> bool:
        """Whether ``link`` is an indirect root Nix knows of (its record in
        ``gcroots/auto`` names it). A link without one roots nothing: a
        worker killed between writing the two of ``add_root_beside``."""
        absolute = _absolute(link)
        try:
            return os.readlink(self._gcroots_auto / auto_root_name(absolute)) == absolute
        except OSError:
            return False

    def remove_root(self, link: Path) -> None:
        """Drop the indirect GC root ``link`` and Nix's record of it
        (idempotent). Leaves the store path for the collector to decide."""
        absolute = _absolute(link)
        auto = self._gcroots_auto / auto_root_name(absolute)
        try:
            if os.path.islink(absolute):
                os.unlink(absolute)
        except FileNotFoundError:
            pass  # a concurrent removal (or a collector) got there first
        except OSError as err:
            raise TemporaryError(f"could not remove the GC root {absolute}: {err}") from err
        # The link is gone, so the path is no longer rooted. Nix's record of
        # it is only bookkeeping: the collector drops records whose link is
        # gone. A worker that is a daemon client (the NixOS module runs it
        # as its own user) may not write gcroots/auto; that is fine.
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if os.path.islink(auto) and os.readlink(auto) == absolute:
                os.unlink(auto)

    # ------------------------------------------------------------- helpers

    def _run(
        self, args: list[str], *, what: str, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = [self._nix_store, *args]
        limit = self._timeout if timeout is None else timeout
        log.debug("running %s", argv)
        try:
            return subprocess.run(
                argv,
                env=self._env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=limit,
                check=False,
            )
        except FileNotFoundError as err:
            raise UnavailableError(
                f"{self._nix_store} not found while {what}: is Nix (nix-bin) installed?",
                delay=60.0,
            ) from err
        except subprocess.TimeoutExpired as err:
            raise TemporaryError(f"nix-store took longer than {limit:g}s {what}") from err
        except OSError as err:
            raise UnavailableError(f"could not run {self._nix_store} while {what}: {err}") from err

    def _raise_absent_or_temporary(
        self, path: str, done: subprocess.CompletedProcess[str], doing: str
    ) -> None:
        message = _message(done.stderr)
        if not self.is_valid(path):
            raise NotFoundError(f"store path {path} is not in the local Nix store: {message}")
        raise TemporaryError(f"nix-store could not {doing} {path}: {message}")


def auto_root_name(link: str) -> str:
    """The name Nix gives the ``gcroots/auto`` entry of an indirect root
    (``LocalStore::addIndirectRoot``: SHA-1 of the link's path, in Nix's
    base-32)."""
    digest = hashlib.sha1(link.encode(), usedforsecurity=False).digest()
    chars = []
    length = (len(digest) * 8 - 1) // 5 + 1
    for n in range(length - 1, -1, -1):  # most significant character first
        bit = n * 5
        i, j = divmod(bit, 8)
        value = digest[i] >> j
        if i + 1 < len(digest):
            value |= digest[i + 1] << (8 - j)
        chars.append(_NIX_BASE32[value & 0x1F])
    return "".join(chars)


def _check_syntax(path: str) -> None:
    problem = check_store_path(path)
    if problem is not None:
        raise ValidationError(f"not a store path: {problem}")


def _replace_symlink(target: str, at: str) -> None:
    """``at`` -> ``target``, replacing whatever ``at`` was, atomically (a
    new link under a temporary name, renamed over it), as Nix does. A name
    that is free gets the link at once: ``symlink(2)`` makes it whole, so
    no reader sees it half made, and a VM's start spares an ``unlink`` and
    a ``rename`` for each of its two links (issue 31)."""
    with contextlib.suppress(FileExistsError):
        os.symlink(target, at)
        return
    temporary = f"{at}.tmp-{os.getpid()}-{threading.get_ident()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    os.symlink(target, temporary)
    try:
        os.rename(temporary, at)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _absolute(link: Path) -> str:
    # Nix canonicalises the link's path without resolving symlinks before
    # hashing it; os.path.abspath does the same.
    return os.path.abspath(link)


def _message(stderr: str) -> str:
    """Nix's own explanation, on one line: the last lines it printed, less
    its warnings (nix puts the context of an error just before it)."""
    lines = [
        line.strip()
        for line in stderr.splitlines()
        if line.strip() and not line.startswith("warning:")
    ]
    text = " ".join(lines[-6:]) or "(no message)"
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."
