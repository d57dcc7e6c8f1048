"""What a jail shows (``procurator.worker.jail.Exposure``): its pruning
against the rule it states, on generated paths. The jails' own tests show
the binds working inside a real jail; this one holds the rule."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from procurator.worker.jail import Exposure, _exposure

segments = st.sampled_from(["nix", "store", "a", "ab", "a-b", "lib", "", "."])
paths = st.lists(segments, min_size=0, max_size=5).map(lambda parts: "/" + "/".join(parts))
binds = st.lists(st.tuples(paths, st.booleans()), max_size=8)
symlinks = st.lists(st.tuples(paths, st.sampled_from(["x", "/nix/store/a"])), max_size=8)


def reference(links: list[tuple[str, str]], bound: list[tuple[str, bool]]) -> Exposure:
    """The rule as first written: one bind per path (writable wins), none
    inside another kept one (parents first); symlinks not inside a kept
    bind, once each, in order."""
    best: dict[str, bool] = {}
    for path, writable in bound:
        best[path] = best.get(path, False) or writable
    kept: list[tuple[str, bool]] = []
    for path in sorted(best, key=lambda p: (p.count("/"), p)):
        if any(path.startswith(k.rstrip("/") + "/") for k, _ in kept):
            continue
        kept.append((path, best[path]))
    return Exposure(
        symlinks=tuple(
            link
            for link in dict.fromkeys(links)
            if not any(link[0].startswith(k.rstrip("/") + "/") for k, _ in kept)
        ),
        binds=tuple(kept),
    )


@settings(max_examples=500)
@given(symlinks, binds)
def test_the_exposure_keeps_what_the_rule_keeps(
    links: list[tuple[str, str]], bound: list[tuple[str, bool]]
) -> None:
    assert _exposure(links, bound) == reference(links, bound)


def test_a_bind_shows_what_lies_below_it_and_only_that() -> None:
    shown = _exposure(
        [("/nix/store/a/lib/x", "y"), ("/nix/store/ab", "a"), ("/run/z", "/nix/store/a")],
        [("/nix/store/a", False), ("/nix/store/a/lib", True), ("/nix/store/ab/", False)],
    )
    # /nix/store/a/lib is inside /nix/store/a: one bind; /nix/store/ab is
    # not inside /nix/store/a (a prefix, not a parent).
    assert shown.binds == (("/nix/store/a", False), ("/nix/store/ab/", False))
    assert shown.symlinks == (("/nix/store/ab", "a"), ("/run/z", "/nix/store/a"))
    assert _exposure([("/a/b", "c")], [("/", False)]).symlinks == ()
