"""A VMM binary's runtime files: what it needs to see to run in a jail.

A jailed VMM sees only what its jail binds (``procurator.worker.jail``),
so its driver must say which host files the program itself needs, beyond
the VM's own: its *runtime files*, exposed read-only at their own paths.

- A program in the Nix store (NixOS): its store path's closure
  (``nix-store --query --requisites``), whole store paths.
- Any other ELF program (Debian): the program, its dynamic loader, the
  *directories* of the shared libraries ``ldd`` resolves for it (library
  code is public and world-readable; a directory is one bind mount where
  its files would be dozens, and it also holds what the program's modules
  load later: QEMU's accelerator, Python's extension modules), and
  ``/etc/ld.so.cache`` (how the loader finds libraries outside the default
  directories).
- An interpreter (a Python, e.g. the test suite's fake VMM): also its
  standard library directories, asked of the interpreter itself.
- A script (``#!``): its interpreter, with that program's runtime files.
- Arguments that name existing files (the script an interpreter runs).
- What the driver adds: QEMU's firmware directories and its accelerator
  modules (``QemuDriver.runtime_files``).
- What the operator adds (``--vmm-runtime-path``): what a wrapper script
  runs cannot be guessed; a program named there brings its own runtime
  files.

Computed once per driver and cached: it runs ``ldd`` or ``nix-store``
(tens of milliseconds), which no VM start should pay. Paths are kept as
the program is named (the jail replicates symlink chains), so
``/usr/bin/python3 -> python3.11`` works inside as outside.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence

from procurator.core.validation import STORE_DIR
from procurator.worker.vmm.base import VmmError

__all__ = ["elf_libraries", "runtime_files", "store_path_of"]

log = logging.getLogger(__name__)

_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")
_PYTHON = re.compile(r"^python\d*(\.\d+)?$")
_LD_SO_CACHE = "/etc/ld.so.cache"
_TIMEOUT = 60.0


def store_path_of(path: str) -> str | None:
    """The store path (``/nix/store/<hash>-<name>``) ``path`` lies in."""
    prefix = STORE_DIR.rstrip("/") + "/"
    if not path.startswith(prefix):
        return None
    name = path[len(prefix) :].split("/", 1)[0]
    return prefix + name if name else None


def _run(argv: Sequence[str], what: str) -> str:
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VmmError(f"cannot find the runtime files of {what}: {exc}") from exc
    if result.returncode != 0:
        raise VmmError(
            f"cannot find the runtime files of {what}: {argv[0]} exited with "
            f"{result.returncode}: {result.stderr.strip()[:500]}"
        )
    return result.stdout


def elf_libraries(files: Iterable[str]) -> set[str]:
    """The dynamic loader and shared libraries of ``files`` (ELF programs
    or libraries), as ``ldd`` resolves them; nothing for a static program."""
    names = sorted(set(files))
    if not names:
        return set()
    ldd = shutil.which("ldd")
    if ldd is None:
        raise VmmError("cannot find the libraries of the VMM: no ldd on PATH")
    try:
        result = subprocess.run(
            [ldd, *names], capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VmmError(f"cannot run ldd on {names[0]}: {exc}") from exc
    # ldd exits 1 when one of several files is not dynamic: the others' lines
    # are still right.
    found = set()
    for line in result.stdout.splitlines():
        match = _LDD_PATH.search(line)
        if match:
            found.add(match.group(1))
    return found


def _python_dirs(interpreter: str) -> set[str]:
    code = (
        "import json, sysconfig; "
        "print(json.dumps(sorted({sysconfig.get_path(p) for p in ('stdlib', 'platstdlib')})))"
    )
    text = _run([interpreter, "-I", "-S", "-c", code], interpreter)
    dirs = {d for d in json.loads(text) if os.path.isdir(d)}
    return dirs


def _interpreter(path: str) -> str | None:
    """The interpreter a ``#!`` script names, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].split()
    return words[0].decode(errors="replace") if words else None


def runtime_files(
    binary: str, args: Sequence[str] = (), *, extra: Iterable[str] = ()
) -> tuple[str, ...]:
    """What the program ``binary`` (a path, or a name on PATH) started with
    ``args`` needs to see to run (see the module docstring), plus
    ``extra`` (a program there with its own runtime files). Raises
    ``VmmError`` when the program is not there or its libraries cannot be
    listed."""
    paths = _program(binary, args)
    for path in extra:
        paths.add(path)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            paths |= _program(path, ())
    return tuple(sorted(paths))


def _program(binary: str, args: Sequence[str], *, depth: int = 0) -> set[str]:
    exe = binary if os.sep in binary else shutil.which(binary)
    if exe is None or not os.path.isfile(exe):
        raise VmmError(f"VMM binary {binary!r} not found")
    exe = os.path.abspath(exe)
    real = os.path.realpath(exe)
    paths: set[str] = {exe}
    interpreter = _interpreter(real)
    if interpreter is not None:
        if depth > 2:
            raise VmmError(f"{binary}: too many #! interpreters in a row")
        return paths | _program(interpreter, (), depth=depth + 1) | _files(args)
    store_path = store_path_of(real)
    if store_path is not None:
        nix_store = shutil.which("nix-store")
        if nix_store is None:
            raise VmmError(f"cannot list the closure of {store_path}: no nix-store on PATH")
        text = _run([nix_store, "--query", "--requisites", store_path], store_path)
        paths.update(line.strip() for line in text.splitlines() if line.strip())
    else:
        libraries = elf_libraries([real])
        paths.update(libraries)  # as named: the loader looks them up so
        paths.update(os.path.dirname(os.path.realpath(lib)) for lib in libraries)
        if os.path.exists(_LD_SO_CACHE):
            paths.add(_LD_SO_CACHE)
        if _PYTHON.match(os.path.basename(real)):
            paths.update(_python_dirs(exe))
    return paths | _files(args)


def _files(args: Iterable[str]) -> set[str]:
    return {arg for arg in args if os.path.isabs(arg) and os.path.isfile(arg)}
