"""README.md as a new user meets it: every command line of its ``sh`` blocks
runs as written, and what it says about the tree and the defaults is true.

``COMMANDS`` knows every command line of the README (continuation lines
joined, comments dropped) and how to run it; a line it does not know fails
``test_every_readme_command_is_known`` (say how to run it, or why it cannot
run here), and so does an entry whose line left the README.

``test_readme_commands_run_as_written`` runs the runnable ones in README
order, each with ``bash -c`` exactly as written, against a scratch state:

- inside a throwaway network namespace (root resources: the master on
  ``0.0.0.0:7300``, the worker's bridge, taps and ``0.0.0.0:9301``), with an
  empty directory bind-mounted over ``/var/lib`` in each command's own mount
  namespace, so the README's default paths (``/var/lib/procurator/...``)
  are used and nothing of the host's is touched;
- ``export`` lines set the variables for the lines after them, as in the
  reader's shell; the daemons (``master``, ``worker``) are started in the
  background and the test waits until they serve; ``events --follow`` is
  stopped with Ctrl-C (SIGINT, exit status 130) once it has printed;
- ``fleet.toml`` is the README's ``# fleet.toml`` block, saved as a reader
  would; the store paths it names are made real (a NAR of a small image
  imported under exactly those names, as ``nix copy`` would bring the
  reader's own images), and removed afterwards;
- cloud-hypervisor cannot be installed here: the suite's fake
  (tests/fakes/cloud-hypervisor-fake.py) is on PATH under that name, so the
  worker line, run as written (``--driver auto``), picks it.

At the end every VM is removed through the product and the daemons are
stopped with SIGTERM; whatever a failure left in the namespace is killed
with it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fleethelpers import FAKE, read_lines
from testnames import netns_name

from procurator.cli import build_parser
from procurator.core.fleet import parse_fleet
from procurator.core.validation import STORE_PATH_RE
from procurator.rpc.address import DEFAULT_MASTER_ADDRESS

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


# ---------------------------------------------------------------- the README's commands


@dataclass(frozen=True)
class NotRunnable:
    reason: str


RUN = "run"  # to completion, exit status 0
ENV = "export"  # sets variables for the lines after it
MASTER = "master"  # a daemon: in the background, ready once it listens
WORKER = "worker"  # a daemon: in the background, ready once registered
FOLLOW = "follow"  # runs until Ctrl-C: interrupted once it has printed

COMMANDS: dict[str, str | NotRunnable] = {
    # Quick start.
    "make demo": NotRunnable(
        "the quick start itself: bootstraps the machine, then boots real VMs "
        "for two minutes (procurator.demo on procurator.lab, which tests/e2e runs)"
    ),
    "make test": NotRunnable("runs this very test suite"),
    # Several masters on PostgreSQL.
    "procurator master --listen 0.0.0.0:7300 --database "
    "postgresql://procurator@db.example/procurator": NotRunnable(
        "needs the reader's PostgreSQL server (tests/ha runs masters on a throwaway one)"
    ),
    "procurator worker --id host-a --master m1.example:7300,m2.example:7300,m3.example:7300": (
        NotRunnable("needs the reader's three master hosts (tests/ha runs such workers)")
    ),
    "export PROCURATOR_MASTER=m1.example:7300,m2.example:7300,m3.example:7300": NotRunnable(
        "names the reader's master hosts; the walk-through below sets its own"
    ),
    # The walk-through.
    "procurator certs init pki": RUN,
    "procurator certs issue pki --master": RUN,
    "procurator certs issue pki --worker host-a": RUN,
    "procurator certs issue pki --control admin": RUN,
    "procurator master --listen 0.0.0.0:7300 --tls-cert pki/master.crt "
    "--tls-key pki/master.key --tls-ca pki/ca.crt": MASTER,
    "procurator worker --id host-a --master 127.0.0.1:7300 --tls-cert "
    "pki/worker-host-a.crt --tls-key pki/worker-host-a.key --tls-ca pki/ca.crt": WORKER,
    "export PROCURATOR_MASTER=127.0.0.1:7300": ENV,
    "export PROCURATOR_TLS_CERT=pki/control-admin.crt PROCURATOR_TLS_KEY=pki/control-admin.key "
    "PROCURATOR_TLS_CA=pki/ca.crt": ENV,
    "procurator status": RUN,
    "procurator apply fleet.toml --dry-run": RUN,
    "procurator apply fleet.toml --wait --timeout 300": RUN,
    "procurator apply fleet.toml --expect-generation 1": RUN,
    "procurator status --json": RUN,
    "procurator describe vm web-1": RUN,
    "procurator events --vm web-1": RUN,
    "procurator events --follow": FOLLOW,
    "procurator top": FOLLOW,
    # Using with Nix: the reader's own flake.
    "nix build .#web-vm -o result-web": NotRunnable(
        "builds an image of the reader's own flake with nixpkgs, which cannot be "
        "fetched here (tests/flake builds what needs no nixpkgs)"
    ),
    "nix eval --json .#fleet > fleet.json": NotRunnable(
        "evaluates the fleet output of the reader's own flake (which needs nixpkgs)"
    ),
    "procurator apply fleet.json --wait --timeout 600": NotRunnable(
        "applies the fleet.json that the nix eval line above writes; the same apply "
        "of the README's fleet.toml runs in the walk-through"
    ),
}


def _sh_blocks(text: str) -> list[str]:
    return re.findall(r"^```(?:sh|bash|shell|console)\n(.*?)^```", text, re.M | re.S)


def command_lines(text: str) -> list[str]:
    """Every command line of the ``sh`` blocks, in order: continuation
    lines joined, blank and comment lines dropped."""
    lines = []
    for block in _sh_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(line.strip())
    return lines


def _words(line: str) -> list[str]:
    """A line's words without its comment: a ``#`` that starts a word, as
    bash reads it (``nix build .#web-vm`` has no comment)."""
    return shlex.split(re.sub(r"(^|\s)#.*$", "", line))


def key(line: str) -> str:
    """How ``COMMANDS`` names a line."""
    return " ".join(_words(line))


def fleet_block(text: str) -> str:
    match = re.search(r"^```toml\n(# fleet\.toml\n.*?)^```", text, re.M | re.S)
    assert match is not None, "README lost its '# fleet.toml' block"
    return match.group(1)


# ---------------------------------------------------------------- without a fleet


def test_every_readme_command_is_known() -> None:
    keys = [key(line) for line in command_lines(README.read_text())]
    unknown = [k for k in keys if k not in COMMANDS]
    assert unknown == [], (
        "README commands this test does not know: add each to COMMANDS with how to "
        f"run it, or NotRunnable(why not): {unknown}"
    )
    stale = [k for k in COMMANDS if k not in keys]
    assert stale == [], f"COMMANDS names lines the README no longer has: {stale}"


def test_the_quick_start_is_two_commands() -> None:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (block,) = _sh_blocks(section)
    assert [key(line) for line in command_lines(f"```sh\n{block}```\n")] == [
        "make demo",
        "make test",
    ]
    targets = re.findall(r"^([a-z]+):", (REPO / "Makefile").read_text(), re.M)
    assert {"demo", "test", "check", "bench"} <= set(targets)


def test_the_readme_fleet_is_valid_and_documents_its_keys() -> None:
    text = README.read_text()
    fleet = parse_fleet(fleet_block(text), fmt="toml", source="README fleet.toml")
    vms = dict(fleet.workers)["host-a"]
    assert {vm.id for vm in vms} == {"web-1", "web-2", "db-1"}
    keys_table = text.split("## Fleet files", 1)[1].split("\n## ", 1)[0]
    for name in ("id", "image", "power", "vcpus", "memory_mib", "hash"):
        assert f"| `{name}` |" in keys_table, f"the fleet key {name} is not documented"


def test_the_readme_states_the_defaults_the_commands_have() -> None:
    """The defaults a reader relies on are said as the parser has them."""
    text = README.read_text()
    master = build_parser().parse_args(["master"])
    worker = build_parser().parse_args(["worker", "--id", "host-a"])
    for value in (
        DEFAULT_MASTER_ADDRESS,
        master.listen,
        master.db,
        master.metrics_listen,
        worker.state_dir,
        worker.metrics_listen,
        worker.bridge,
        worker.subnet,
    ):
        assert f"`{value}`" in text, f"README does not state the default {value}"
    assert "--state-dir /var/lib/procurator " not in text  # the old, wrong example


def test_every_subcommand_has_help_with_an_example() -> None:
    missing = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if "example:" not in (sub.description or ""):
                        missing.append(" ".join([*path, name]))
                    walk(sub, [*path, name])

    walk(build_parser(), [])
    assert missing == []


def _layout_paths(text: str) -> list[str]:
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    paths = []
    for row in section.splitlines():
        if row.startswith("| `"):
            first = row.split("|")[1]
            paths += re.findall(r"`([^`]+)`", first)
    return paths


def test_the_layout_names_every_folder() -> None:
    """Each tracked folder (and those of ``procurator/`` and ``nix/``, whose
    parts differ) has a row, and each row names something that exists."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    folders = {f"{p.split('/')[0]}/" for p in tracked if "/" in p}
    for top in ("procurator", "nix"):
        folders |= {
            "/".join(p.split("/")[:2]) + "/"
            for p in tracked
            if p.startswith(f"{top}/") and p.count("/") >= 2
        }
    named = _layout_paths(README.read_text())
    covered = {p for p in named if p.endswith("/")}
    assert sorted(folders - covered - {"procurator/", "nix/"}) == []
    for top in ("procurator", "nix"):
        assert any(p.startswith(f"{top}/") for p in named)
    for path in named:
        assert list(REPO.glob(path.rstrip("/"))), f"the Layout names {path}, which is not there"


# ---------------------------------------------------------------- running them


def _nix_string(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


def _export_stream(nar: bytes, path: str) -> bytes:
    """What ``nix-store --export`` writes for one path with no references:
    ``nix-store --import`` registers ``nar`` under ``path`` (root, no
    signature needed), as a substituter would for the reader's images."""
    number = struct.Struct("<Q").pack
    return (
        number(1)
        + nar
        + number(0x4558494E)  # "NIXE"
        + _nix_string(path.encode())
        + number(0)  # references
        + _nix_string(b"")  # deriver
        + number(0)  # no signature
        + number(0)  # no more paths
    )


@contextlib.contextmanager
def readme_images(paths: list[str], nix_env: dict[str, str], workdir: Path) -> Iterator[None]:
    """The store paths of the README's fleet, each holding a small image
    (vm-config.json and a kernel file; the fake VMM boots anything), made
    while the test runs and deleted afterwards unless another test session
    is using them (a shared lock says so)."""
    lock = open(Path(tempfile.gettempdir()) / "procurator-readme-images.lock", "a+b")  # noqa: SIM115
    made: list[str] = []
    try:
        fcntl.flock(lock, fcntl.LOCK_SH)
        for path in paths:
            valid = subprocess.run(
                ["nix-store", "--check-validity", path],
                env=nix_env,
                capture_output=True,
                check=False,
            )
            if valid.returncode == 0:
                continue
            image = workdir / f"image-{len(made)}"
            image.mkdir()
            (image / "vmlinux").write_bytes(b"\0" * 4096)
            (image / "vm-config.json").write_text(
                json.dumps(
                    {
                        "payload": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
                        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
                        "memory": {"size": 64 << 20},
                    }
                )
            )
            nar = subprocess.run(
                ["nix-store", "--dump", str(image)], env=nix_env, capture_output=True, check=True
            ).stdout
            subprocess.run(
                ["nix-store", "--import"],
                input=_export_stream(nar, path),
                env=nix_env,
                capture_output=True,
                check=True,
            )
            made.append(path)
        yield
    finally:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another session uses them: left for it (and then for a GC)
        else:
            for path in made:
                subprocess.run(
                    ["nix-store", "--delete", path], env=nix_env, capture_output=True, check=False
                )
        lock.close()


class Scratch:
    """Where the README's commands run: a namespace, a working directory, a
    /var/lib of their own, and the environment a reader's shell would have."""

    def __init__(self, tmp_path: Path, nix_env: dict[str, str]) -> None:
        self.netns = netns_name("readme")
        self.cwd = tmp_path / "cwd"
        self.var_lib = tmp_path / "var-lib"
        self.logs = tmp_path / "logs"
        bin_dir = tmp_path / "bin"
        for d in (self.cwd, self.var_lib, self.logs, bin_dir):
            d.mkdir()
        fake = bin_dir / "cloud-hypervisor"
        # The fake VMM itself, run by this interpreter: a jailed VMM sees its
        # binary's interpreter (a #! line), not what a wrapper would exec.
        fake.write_text(f"#!{sys.executable}\n{FAKE.read_text()}")
        fake.chmod(0o755)
        drop = (
            "PROCURATOR_MASTER",
            "PROCURATOR_TLS_CERT",
            "PROCURATOR_TLS_KEY",
            "PROCURATOR_TLS_CA",
        )
        self.env = {k: v for k, v in nix_env.items() if k not in drop}
        # The reader's shell after `. .venv/bin/activate`, with the fake VMM.
        self.env["PATH"] = f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}

    def argv(self, line: str) -> list[str]:
        """``line`` as written, through bash, inside the namespace, with
        the scratch /var/lib mounted in the command's own mount namespace
        (``ip netns exec`` makes one, private to the command)."""
        return [
            "ip",
            "netns",
            "exec",
            self.netns,
            "sh",
            "-c",
            'mount --bind "$0" /var/lib && cd "$1" && exec bash -c "$2"',
            str(self.var_lib),
            str(self.cwd),
            line,
        ]

    def run(self, line: str, timeout: float = 360) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(line),
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )

    def start(self, name: str, line: str) -> Path:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            self.daemons[name] = subprocess.Popen(
                self.argv(line),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        return log

    def wait_log(self, name: str, pattern: str, timeout: float = 60) -> None:
        log = self.logs / f"{name}.log"
        deadline = time.monotonic() + timeout
        while not re.search(pattern, log.read_text(errors="replace")):
            popen = self.daemons[name]
            assert popen.poll() is None, f"{name} exited {popen.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, (
                f"{name} never logged {pattern!r}:\n{log.read_text()}"
            )
            time.sleep(0.1)

    def stop(self, name: str) -> int:
        popen = self.daemons.pop(name)
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait()
        return popen.returncode

    def logs_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.logs.iterdir())


@contextlib.contextmanager
def scratch(tmp_path: Path, nix_env: dict[str, str]) -> Iterator[Scratch]:
    here = Scratch(tmp_path, nix_env)
    gc_auto = Path(os.environ.get("NIX_STATE_DIR", "/nix/var/nix")) / "gcroots" / "auto"
    roots_before = set(os.listdir(gc_auto)) if gc_auto.exists() else set()
    subprocess.run(["ip", "netns", "add", here.netns], check=True)
    try:
        subprocess.run(["ip", "-n", here.netns, "link", "set", "lo", "up"], check=True)
        yield here
    finally:
        for name in list(here.daemons):
            here.stop(name)
        # What a failure left behind (a VMM in its own session) dies with
        # the namespace it runs in.
        pids = subprocess.run(
            ["ip", "netns", "pids", here.netns], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", here.netns], check=False)
        # GC roots the worker registered under the namespace's /var/lib
        # and could not remove (a failed teardown) dangle out here.
        if gc_auto.exists():
            for entry in set(os.listdir(gc_auto)) - roots_before:
                with contextlib.suppress(OSError):
                    if os.readlink(gc_auto / entry).startswith("/var/lib/procurator/"):
                        (gc_auto / entry).unlink()


def _interrupt_once_printed(here: Scratch, line: str) -> tuple[int, str]:
    """Run ``line`` until it has printed a line (or 60 s went by: a guard,
    not a measurement), then press Ctrl-C; its exit status and output."""
    follower = subprocess.Popen(
        here.argv(line),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=here.env,
        start_new_session=True,
    )
    try:
        data = read_lines(follower, 1, timeout=60)
        os.killpg(follower.pid, signal.SIGINT)
        rest, _ = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            os.killpg(follower.pid, signal.SIGKILL)
            follower.wait()
        assert follower.stdout is not None
        follower.stdout.close()  # on every path: a leaked pipe fails a later test
    return follower.returncode, (data + rest).decode(errors="replace")


def _wait(what: str, condition: Callable[[], bool], here: Scratch, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{here.logs_text()}"
        time.sleep(0.2)


def _status(here: Scratch) -> dict[str, Any]:
    result = here.run("procurator status --json")
    assert result.returncode == 0, result.stdout + result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


@pytest.mark.root
@pytest.mark.nix
def test_readme_commands_run_as_written(tmp_path: Path, nix_env: dict[str, str]) -> None:
    text = README.read_text()
    fleet = fleet_block(text)
    images = sorted(set(re.findall(r'"(/nix/store/[^"]+)"', fleet)))
    assert images and all(STORE_PATH_RE.fullmatch(p) for p in images)
    lines = command_lines(text)
    with readme_images(images, nix_env, tmp_path), scratch(tmp_path, nix_env) as here:
        (here.cwd / "fleet.toml").write_text(fleet)
        failures = []
        for line in lines:
            kind = COMMANDS[key(line)]
            if isinstance(kind, NotRunnable):
                continue
            if kind == ENV:
                for assignment in _words(line)[1:]:
                    name, value = assignment.split("=", 1)
                    assert "$" not in value, f"{line}: the test sets plain values only"
                    here.env[name] = value
            elif kind == MASTER:
                here.start("master", line)
                here.wait_log("master", r"master listening on \S+ \(mutual TLS")
            elif kind == WORKER:
                here.start("worker", line)
                here.wait_log("worker", r"registered with the master as host-a")
            elif kind == FOLLOW:
                code, printed = _interrupt_once_printed(here, line)
                if code != 130 or not printed.strip():
                    failures.append(f"{line}\n  exit {code}: {printed}")
            else:
                result = here.run(line)
                if result.returncode != 0:
                    failures.append(
                        f"{line}\n  exit {result.returncode}: {result.stdout}{result.stderr}"
                    )
        assert failures == [], "\n".join(failures) + "\n" + here.logs_text()

        # What the walk-through promises: host-a up over mutual TLS, the
        # fleet converged, web-2 paused.
        status = _status(here)
        (host_a,) = status["workers"]
        assert host_a["connected"] and host_a["observed_generation"] == status["generation"] == 1
        phases = {vm["id"]: vm["phase"] for vm in host_a["vms"]}
        assert phases == {"web-1": "running", "web-2": "paused", "db-1": "running"}

        # Leave nothing: every VM removed through the product, then the
        # daemons stopped as a reader would stop them.
        (here.cwd / "empty.toml").write_text("[workers.host-a]\nvms = []\n")
        result = here.run("procurator apply empty.toml --wait --timeout 120")
        assert result.returncode == 0, result.stdout + result.stderr
        _wait("every VM to be removed", lambda: not _status(here)["workers"][0]["vms"], here)
        assert here.stop("worker") == 0, here.logs_text()
        assert here.stop("master") == 0, here.logs_text()
