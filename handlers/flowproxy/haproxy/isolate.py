"""Find which backends make HAProxy refuse a candidate that vetting passed, so they are refused alone. Pure.

Vetting judges each thing HAProxy may refuse on its own, but HAProxy can still refuse a whole candidate
for a reason nobody foresaw; then the node would stop applying everything until the key is deleted.
`find_culprits` bisects instead: with independent faults, each culprit costs about log2(n) checks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def find_culprits(suspects: Sequence[str], passes: Callable[[frozenset[str]], bool]) -> frozenset[str] | None:
    """The suspects whose removal makes `passes(removed)` true, found by bisection; None when even removing
    every suspect does not help (the fault is elsewhere).

    Assumes a fault follows its item: adding items to a passing candidate only adds their own faults.
    """
    if not passes(frozenset(suspects)):
        return None
    bad: set[str] = set()
    rest = list(suspects)
    while rest and not passes(frozenset(bad)):
        low, high = 0, len(rest) - 1  # keeping rest[:high + 1] fails; find the shortest failing prefix
        while low < high:
            middle = (low + high) // 2
            if passes(frozenset(bad) | frozenset(rest[middle + 1:])):
                low = middle + 1
            else:
                high = middle
        bad.add(rest[low])
        rest = rest[low + 1:]
    return frozenset(bad)
