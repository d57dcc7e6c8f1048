"""Images prepared ahead of a switch (procurator.worker.prepare), with the
real Nix store: realised (from a binary cache when missing) and rooted,
failures reported with the path and the reason, roots dropped once nothing
wants them, and a restarted worker that prepares again what its assignment
still names."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing
from nixtool_helpers import NixTool

from procurator.core.assignments import AssignmentChanges
from procurator.core.models import Assignment, PreparedImage, PrepareState, VmAssignment
from procurator.nix import NixStore
from procurator.worker.prepare import ImagePreparer

ABSENT = "/nix/store/" + "0" * 32 + "-procurator-test-absent"


def tree(tag: str) -> dict[str, bytes | str]:
    return {"vm-config.json": "{}", "tag": tag}


def assignment(generation: int, *prepare: str, vms: tuple[VmAssignment, ...] = ()) -> Assignment:
    return Assignment("host-a", generation, vms, f"op-{generation}", prepare)


class Progress(list[tuple[PreparedImage, ...]]):
    async def wait(self, check: Callable[[tuple[PreparedImage, ...]], bool]) -> None:
        with trio.fail_after(60):
            while not self or not check(self[-1]):
                await trio.sleep(0.02)

    async def states(self, *states: PrepareState) -> tuple[PreparedImage, ...]:
        await self.wait(lambda last: tuple(i.state for i in last) == states)
        return self[-1]


@asynccontextmanager
async def running(
    store: NixStore, state_dir: Path
) -> AsyncIterator[tuple[ImagePreparer, Progress]]:
    progress = Progress()
    preparer = ImagePreparer(store, state_dir, on_progress=progress.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(preparer.run)
        yield preparer, progress
        nursery.cancel_scope.cancel()


async def wait_until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(60):
        while not condition():
            await trio.sleep(0.02)


async def test_paths_are_rooted_until_neither_prepare_nor_a_vm_names_them(
    nix: NixTool, store: NixStore, tmp_path: Path
) -> None:
    one, two = nix.add(tree("one"), "one"), nix.add(tree("two"), "two")
    async with running(store, tmp_path / "state") as (preparer, progress):
        preparer.take_assignment(assignment(1, one, two))
        ready = await progress.states(PrepareState.READY, PrepareState.READY)
        assert [image.path for image in ready] == [one, two]
        assert not {one, two} & nix.dead()
        # The switch: `one` leaves prepare as a VM starts on it; `two` is unwanted.
        web = VmAssignment("web", "h1", one)
        preparer.take_assignment(AssignmentChanges("host-a", 1, 2, "op-2", (web,)))
        await wait_until(lambda: preparer.roots() == {one})
        assert progress[-1] == ()
        assert two in nix.dead() and one not in nix.dead()
        # The VM goes: nothing wants `one` any more.
        preparer.take_assignment(AssignmentChanges("host-a", 2, 3, "op-3", removed=("web",)))
        await wait_until(lambda: preparer.roots() == set())
        assert {one, two} <= nix.dead()
        assert not preparer.directory.exists()


async def test_a_path_that_cannot_be_realised_fails_alone_naming_itself(
    nix: NixTool, store: NixStore, tmp_path: Path
) -> None:
    good = nix.add(tree("good"), "good")
    async with running(store, tmp_path / "state") as (preparer, progress):
        preparer.take_assignment(assignment(1, ABSENT, good))
        absent, ready = await progress.states(PrepareState.FAILED, PrepareState.READY)
        assert absent.path == ABSENT and absent.message.startswith(f"could not realise {ABSENT}")
        assert ready == PreparedImage(good, PrepareState.READY)
        # Failed stays failed while it stays in prepare; it is tried afresh
        # when it comes back.
        preparer.take_assignment(assignment(2, good))
        await progress.states(PrepareState.READY)
        preparer.take_assignment(assignment(3, ABSENT, good))
        assert progress[-1][0] == PreparedImage(ABSENT)
        await progress.states(PrepareState.FAILED, PrepareState.READY)
        preparer.take_assignment(assignment(4))
        await wait_until(lambda: preparer.roots() == set())


async def test_a_missing_path_is_realised_from_the_worker_substituters(
    nix: NixTool, nix_env: dict[str, str], tmp_path: Path
) -> None:
    path = nix.add(tree("cached"), "cached")
    cache = f"file://{tmp_path}/cache"
    nix.run("nix", "copy", "--to", cache, path)
    assert nix.delete(path).returncode == 0
    store = NixStore(substituters=[cache], extra_env=nix_env)
    async with running(store, tmp_path / "state") as (preparer, progress):
        preparer.take_assignment(assignment(1, path))
        await progress.states(PrepareState.READY)
        assert nix.valid(path) and path not in nix.dead()
        preparer.take_assignment(assignment(2))
        await wait_until(lambda: preparer.roots() == set())


async def test_a_restarted_worker_keeps_its_roots_until_told_and_prepares_again(
    nix: NixTool, store: NixStore, tmp_path: Path
) -> None:
    kept, stale = nix.add(tree("kept"), "kept"), nix.add(tree("stale"), "stale")
    state = tmp_path / "state"
    async with running(store, state) as (preparer, progress):
        preparer.take_assignment(assignment(1, kept, stale))
        await progress.states(PrepareState.READY, PrepareState.READY)
    # The next run: nothing is dropped before an assignment arrives.
    async with running(store, state) as (preparer, progress):
        await trio.testing.wait_all_tasks_blocked()
        assert preparer.roots() == {kept, stale}
        assert not {kept, stale} & nix.dead()
        preparer.take_assignment(assignment(2, kept))
        await progress.states(PrepareState.READY)
        await wait_until(lambda: preparer.roots() == {kept})
        assert stale in nix.dead() and kept not in nix.dead()
        preparer.take_assignment(assignment(3))
        await wait_until(lambda: preparer.roots() == set())


class GatedStore:
    """A ``Store`` whose roots wait for the test; counts those at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.release = threading.Event()

    def add_root(self, path: str, link: Path) -> None:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.release.wait(60)
        with self.lock:
            self.running -= 1

    def remove_root(self, link: Path) -> None:
        pass

    def realise(self, path: str, *, root: Path | None = None) -> None:
        raise AssertionError("present paths are rooted, never realised")


async def test_at_most_concurrency_paths_are_prepared_at_once(tmp_path: Path) -> None:
    store = GatedStore()
    paths = [f"/nix/store/{str(i) * 32}-image" for i in range(1, 6)]
    progress = Progress()
    preparer = ImagePreparer(store, tmp_path, on_progress=progress.append, concurrency=2)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(preparer.run)
        preparer.take_assignment(assignment(1, *paths))
        await wait_until(lambda: store.running == 2)
        await trio.testing.wait_all_tasks_blocked()
        assert store.running == 2
        store.release.set()
        await progress.states(*[PrepareState.READY] * 5)
        assert store.most == 2
        nursery.cancel_scope.cancel()
