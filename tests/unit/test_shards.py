"""Route watches in shards: every valid name in exactly one, within the watch budget, split where it pays."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowproxy.core import shards
from flowproxy.core.fields import NAME_RE

NAMES = st.from_regex(NAME_RE, fullmatch=True)


def holders(parts: tuple[str, ...], name: str) -> list[str]:
    return [p for p in parts if (name + "/").startswith(p)]


@settings(max_examples=200, deadline=None)
@given(st.sets(NAMES, max_size=300), st.integers(1, 50), st.integers(1, 200), NAMES)
def test_every_valid_name_is_in_exactly_one_shard(names: set[str], size: int, most: int, later: str) -> None:
    parts = shards.partition(names, size, most)
    assert len(parts) <= max(most, 1)
    for name in [*names, later]:  # a name written after the split is watched too
        assert len(holders(parts, name)) == 1, (name, parts)
    assert sum(shards.loads(parts, names).values()) == len(names)


def spread(count: int) -> list[str]:
    letters = string.ascii_lowercase
    return [letters[i % 26] + letters[(i // 26) % 26] + str(i) for i in range(count)]


# (what, names, size, what the split must give: (most watches, fullest shard at most))
CASES = [
    ("no routes: one watch", [], 500, (1, 0)),
    ("fewer than a shard: one watch", [f"r{i}" for i in range(400)], 500, (1, 400)),
    ("spread names: one shard a first letter", spread(10_000), 500, (36, 400)),
    ("one first letter: split again", [f"r{i}" for i in range(10_000)], 500, (128, 1111)),
    ("a route named like a split shard has its own", ["a", *(f"a{i}" for i in range(20))], 5, (128, 5)),
]


@pytest.mark.parametrize(("names", "size", "bound"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_partition(names: list[str], size: int, bound: tuple[int, int]) -> None:
    parts = shards.partition(names, size, shards_most := 128)
    assert len(parts) <= min(bound[0], shards_most)
    assert max(shards.loads(parts, names).values(), default=0) <= bound[1]
    assert all(len(holders(parts, name)) == 1 for name in names)


def test_a_route_named_like_a_split_shard_is_watched_alone() -> None:
    parts = shards.partition(["a", *(f"a{i}" for i in range(20))], 5, 128)
    assert holders(parts, "a") == ["a/"] and holders(parts, "a1") == ["a1/"]


BETTER = [
    ("the same split is not worth a reload", ("",), ("",), [f"r{i}" for i in range(100)], False),
    ("half the fullest shard is", ("",), tuple(shards.FIRST), spread(1000), True),
    ("a little better is not", tuple(shards.FIRST), shards.partition(spread(1000), 30, 128), spread(1000), False),
]


@pytest.mark.parametrize(("current", "proposed", "names", "expected"), [c[1:] for c in BETTER],
                         ids=[c[0] for c in BETTER])
def test_better(current: tuple[str, ...], proposed: tuple[str, ...], names: list[str], expected: bool) -> None:
    assert shards.better(current, proposed, names) is expected
