"""Suite-wide rules: a test that leaves a VMM, jailer or procurator process,
a tap device, a network namespace, a mount, a cgroup or a Nix GC root behind
fails, whatever it asserted.

Processes count only when they carry this session's marker in their
environment (children inherit it), so two test runs on one machine never
judge, or kill, each other's processes. Namespaces count only when their
name carries this session's token (``testnames.netns_name``). Taps and
mounts are judged host-wide (a concurrent run can, rarely, be blamed for
them; tests make their taps inside their own namespaces).

Mounts: every mount in ``/proc/self/mountinfo`` that was not there before,
except a network namespace's ``/run/netns/<name>`` (judged as a namespace)
and automounts (``autofs``, ``binfmt_misc``) the kernel makes on access.

Cgroups: every VM cgroup a worker of this session makes lives under a
parent named ``procurator-test-<token>`` (``PROCURATOR_CGROUP_PARENT``, set
here, is the default of the worker's ``--cgroup-parent`` and of the tests'
jails); any directory under such a parent, in any cgroup hierarchy, that was
not there before the test, or such a parent left behind, is a leak.

GC roots: an entry of Nix's ``gcroots/auto`` that is new and either points
into this session's pytest temporary directory (a root left in a test's
``tmp_path`` pins its store path until pytest rotates the directory away) or
dangles (the root link it records is gone: someone deleted a root's
directory without removing the root, so Nix's record outlives it) inside a
directory this test process made (``_own_dirs``: the short ``/tmp/p*-``
directories tests make with ``tempfile.mkdtemp`` for socket paths). A
dangling root elsewhere is another run's (a benchmark deleting its
``/tmp/procurator-bench-*`` directory while a test runs) and no leak of the
test. Roots made elsewhere on purpose (the cached test image's) stay allowed.

Area fixtures live in each test directory's own conftest.py.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fleethelpers import live_processes
from testnames import TOKEN, is_ours

# Tests press Ctrl-C on the commands they run (`events --follow`, `top`):
# SIGINT must reach them as the default KeyboardInterrupt. A run started in
# the background of a non-interactive shell (`make test &` in a script)
# inherits SIGINT and SIGQUIT *ignored*, which exec keeps and Python honours
# (it installs no handler for a signal ignored at start-up), so those
# commands would never stop. Restore the defaults for this process (pytest is
# then interruptible too) and, through exec, for every child.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGQUIT, signal.SIG_DFL)

_MARKER = f"PROCURATOR_TEST_SESSION={uuid.uuid4().hex}"
os.environ["PROCURATOR_TEST_SESSION"] = _MARKER.split("=", 1)[1]
_MARKER_BYTES = _MARKER.encode()
_CGROUP_PARENT = f"procurator-test-{TOKEN}"
os.environ["PROCURATOR_CGROUP_PARENT"] = _CGROUP_PARENT

_OURS = re.compile(
    rb"qemu-system|cloud-hypervisor|procurator/worker/_jailer\.py"
    rb"|procurator(\x00| )(master|worker)|-m\x00procurator\x00(master|worker)"
)


def _our_processes() -> dict[int, str]:
    found: dict[int, str] = {}
    me = os.getpid()
    for pid, cmdline in live_processes():
        if pid == me or not _OURS.search(cmdline):
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if _MARKER_BYTES in environ.split(b"\x00"):
            found[pid] = cmdline.replace(b"\x00", b" ").decode(errors="replace")[:200]
    return found


def _taps() -> set[str]:
    base = Path("/sys/class/net")
    return (
        {p.name for p in base.iterdir() if (p / "tun_flags").exists()} if base.exists() else set()
    )


def _namespaces() -> set[str]:
    """This session's namespaces (named by ``testnames.netns_name``)."""
    run = Path("/run/netns")
    return {p.name for p in run.iterdir() if is_ours(p.name)} if run.exists() else set()


_GCROOTS_AUTO = Path(os.environ.get("NIX_STATE_DIR", "/nix/var/nix")) / "gcroots" / "auto"
_AUTOMOUNT_TYPES = {"autofs", "binfmt_misc"}


def _mounts() -> set[str]:
    """``<mount id> <mount point>`` of every mount we judge."""
    found = set()
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        fstype = fields[fields.index("-") + 1] if "-" in fields else ""
        point = fields[4]
        # /run/netns itself becomes a mount (a shared bind mount of itself)
        # the first time any namespace is created on the host, and stays one
        # by design; the namespaces under it are judged as namespaces.
        if point == "/run/netns" or point.startswith("/run/netns/"):
            continue
        if fstype in _AUTOMOUNT_TYPES:
            continue
        found.add(f"{fields[0]} {point}")
    return found


@dataclass(frozen=True)
class _CgroupMount:
    point: Path
    root: str  # the hierarchy's path this mount shows (mountinfo's 4th field)
    names: frozenset[str]  # v1: its controllers and name=...; v2: empty


def _cgroup_mounts() -> list[_CgroupMount]:
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        fstype = fields[sep + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        options = fields[sep + 3].split(",") if fstype == "cgroup" and len(fields) > sep + 3 else []
        mounts.append(_CgroupMount(Path(fields[4]), fields[3], frozenset(options)))
    return mounts


def _own_cgroup(mount: _CgroupMount, own: list[tuple[frozenset[str], str]]) -> Path | None:
    """This process's cgroup on disk under ``mount``; None when unknown."""
    for names, path in own:
        # v2's line names no controller; a v1 line names its hierarchy's.
        if (names <= mount.names) if names else not mount.names:
            root = mount.root.rstrip("/")
            if root and path != root and not path.startswith(root + "/"):
                return None
            rest = path[len(root) :].strip("/")
            return mount.point / rest if rest else mount.point
    return None


@functools.cache
def _cgroup_parents() -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(where this session's cgroup parent can be, hierarchies to search
    whole). A worker puts its parent under its own cgroup (v1), beside it
    (v2: under the cgroup's parent) or, for a parent starting with ``/``,
    at the hierarchy's root; the workers and jails of the tests run in this
    process's cgroup. So the candidates are, in each hierarchy, this
    process's cgroup and each of its ancestors. A hierarchy where this
    process's cgroup is unknown is searched as a whole (to depth 4).

    Searching every hierarchy whole, as this fixture once did, took 1-4 s
    per test on the CI host: its cpu and pids hierarchies hold some 15,000
    cgroups of other sandboxes."""
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        text = ""
    own = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            own.append((frozenset(n for n in parts[1].split(",") if n), parts[2]))
    candidates: list[Path] = []
    whole: list[Path] = []
    for mount in _cgroup_mounts():
        mine = _own_cgroup(mount, own)
        if mine is None:
            whole.append(mount.point)
            continue
        for directory in (mine, *mine.parents):
            candidates.append(directory / _CGROUP_PARENT)
            if directory == mount.point:
                break
    return tuple(candidates), tuple(whole)


def _search(mount: Path) -> set[str]:
    """Every directory named ``_CGROUP_PARENT`` under ``mount`` (to depth 4)."""
    found = set()
    for root, dirs, _ in os.walk(mount):
        if Path(root).name == _CGROUP_PARENT:
            found.add(root)
            dirs.clear()
        elif len(Path(root).relative_to(mount).parts) >= 4:
            dirs.clear()
    return found


def _cgroups() -> set[str]:
    """This session's cgroup parents and every directory under them."""
    candidates, whole = _cgroup_parents()
    parents = {str(c) for c in candidates if c.is_dir()}
    for mount in whole:
        parents |= _search(mount)
    found = set(parents)
    for parent in parents:
        found.update(os.path.join(r, d) for r, ds, _ in os.walk(parent) for d in ds)
    return found


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The per-test check looks for this session's cgroup parent only where
    the tests' workers can put it (``_cgroup_parents``); once per session,
    every hierarchy is searched whole, so a parent made anywhere else (a
    change in where workers put it) fails the run instead of going unseen."""
    candidates, _ = _cgroup_parents()
    found: set[str] = set()
    for mount in _cgroup_mounts():
        found |= _search(mount.point)
    elsewhere = sorted(found - {str(c) for c in candidates})
    if elsewhere:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"cgroup parents of this session where no test looked: {elsewhere}", red=True
            )


# Every directory this process made (``os.mkdir``'s audit event: tempfile,
# pathlib and shutil all go through it), as an absolute path. Directories the
# tests' children make lie under one of these or under pytest's basetemp.
_OWN_DIRS: set[str] = set()


def _record_own_dir(event: str, args: tuple[object, ...]) -> None:
    # An audit hook runs on every audited event of the process: do nothing
    # else cheaply, and never raise (that would fail the audited call).
    if event != "os.mkdir":
        return
    with contextlib.suppress(TypeError, ValueError):
        path, _, dir_fd = args
        if dir_fd is None or dir_fd == -1:
            _OWN_DIRS.add(os.path.abspath(os.fsdecode(path)))  # type: ignore[arg-type]


sys.addaudithook(_record_own_dir)


def _in_own_dir(path: str, own_dirs: set[str]) -> bool:
    """Whether ``path`` lies inside a directory of ``own_dirs``."""
    parent = os.path.dirname(path)
    while parent not in own_dirs:
        above = os.path.dirname(parent)
        if above == parent:
            return False
        parent = above
    return True


def _gc_roots() -> dict[str, str]:
    """Entry name -> the root link it records, for Nix's ``gcroots/auto``."""
    found: dict[str, str] = {}
    try:
        entries = list(_GCROOTS_AUTO.iterdir())
    except OSError:
        return found
    for entry in entries:
        with contextlib.suppress(OSError):
            found[entry.name] = os.readlink(entry)
    return found


def _leaked_roots(
    before: dict[str, str], after: dict[str, str], basetemp: str, own_dirs: set[str]
) -> set[str]:
    """The root links of ``after``'s new entries that are a test's leak (see
    the module docstring): into ``basetemp``, or dangling inside
    ``own_dirs``."""
    return {
        target
        for name, target in after.items()
        if before.get(name) != target
        and (
            target.startswith(basetemp)
            or (not os.path.lexists(target) and _in_own_dir(target, own_dirs))
        )
    }


def _snapshot() -> tuple[dict[int, str], set[str], set[str], set[str], set[str]]:
    return _our_processes(), _taps(), _namespaces(), _mounts(), _cgroups()


@pytest.fixture(autouse=True)
def no_leaks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    basetemp = f"{tmp_path_factory.getbasetemp()}/"
    procs_before, taps_before, ns_before, mounts_before, cgroups_before = _snapshot()
    roots_before = _gc_roots()
    yield
    # Processes may take a moment to be reaped after a test's teardown.
    deadline = time.monotonic() + 5.0
    while True:
        procs, taps, namespaces, mounts, cgroups = _snapshot()
        leaked_procs = {p: c for p, c in procs.items() if p not in procs_before}
        leaked = {
            "processes": leaked_procs,
            "taps": taps - taps_before,
            "namespaces": namespaces - ns_before,
            "mounts": mounts - mounts_before,
            "cgroups": cgroups - cgroups_before,
            "gc roots": _leaked_roots(roots_before, _gc_roots(), basetemp, _OWN_DIRS),
        }
        if not any(leaked.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    problems = {k: v for k, v in leaked.items() if v}
    if problems:
        for pid in leaked_procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        pytest.fail(f"test leaked {problems}")
