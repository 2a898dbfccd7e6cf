"""Which route-name prefixes the agent watches, one keyprefix watch each. Pure, stdlib only.

A keyprefix watch hands over its whole subtree on every change: one watch on `routes/` makes the agent
serialize every route (~3 MB at 10,000 routes, ~110 ms) to tell of one key. Watches on disjoint parts of
the name space cost what their part holds. A shard is a route-name prefix: `""` is every route, `"r1"`
the routes whose names start with `r1`, and `"r1/"` the route named exactly `r1`. Splitting a shard
replaces it by its children, so the shards always cover every valid route name exactly once (whatever
names come later, even in an empty child: a watch on an empty prefix fires when a key appears there).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable

FIRST = "abcdefghijklmnopqrstuvwxyz0123456789"  # what a route name starts with (`fields.NAME_RE`)
REST = FIRST + "_.-"
ROOT = ""


def children(shard: str) -> tuple[str, ...]:
    """The shards that together cover what `shard` covers; () for a single route's (`name/`)."""
    if shard.endswith("/"):
        return ()
    if shard == ROOT:
        return tuple(FIRST)
    return (shard + "/", *(shard + c for c in REST))


def loads(shards: Iterable[str], names: Iterable[str]) -> Counter[str]:
    """How many of `names` each shard holds (names no shard covers, which are invalid, count nowhere).
    Each name's beginnings are looked up, longest first: ~1 us a name, whatever the number of shards."""
    held = set(shards)
    out: Counter[str] = Counter()
    for name in names:
        folder = name + "/"
        shard = next((folder[:end] for end in range(len(folder), -1, -1) if folder[:end] in held), None)
        if shard is not None:
            out[shard] += 1
    return out


def partition(names: Iterable[str], size: int, most: int) -> tuple[str, ...]:
    """Split the fullest shard while it holds more than `size` routes and the watches stay within `most`."""
    members = {ROOT: sorted(set(names))}
    heap = [(-len(members[ROOT]), ROOT)]
    while heap:
        count, shard = heapq.heappop(heap)
        parts = children(shard)
        if -count <= size or not parts or len(members) - 1 + len(parts) > most:
            continue
        within = members.pop(shard)
        members.update((part, []) for part in parts)
        for name in within:
            child = (name + "/")[:len(shard) + 1]  # its shard's children add one character
            if child in members:
                members[child].append(name)
        heap.extend((-len(members[part]), part) for part in parts)
        heapq.heapify(heap)
    return tuple(sorted(members))


def better(current: Iterable[str], proposed: Iterable[str], names: Iterable[str]) -> bool:
    """Whether `proposed` is worth an agent reload: its fullest shard holds at most half the routes of the
    current fullest one (hysteresis, so that a table that grows by a route does not re-shard each time)."""
    proposed = set(proposed)
    if proposed == set(current):
        return False  # the usual case after a full apply: the same names split the same way, no count needed
    listed = list(names)
    return max(loads(proposed, listed).values(), default=0) * 2 <= max(loads(current, listed).values(), default=0)
