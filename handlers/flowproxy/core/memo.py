"""A bounded memo of a pure function's answers, owned by whoever keeps it (see `pipeline.Warm`)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """Answers by key, forgotten all at once past `limit` (a changing table churns keys; a clear costs one
    cold render, an LRU's bookkeeping would cost every warm one)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._answers: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        return self._answers.get(key)

    def put(self, key: K, value: V) -> None:
        if len(self._answers) >= self.limit:
            self._answers.clear()
        self._answers[key] = value

    def __len__(self) -> int:
        return len(self._answers)


def remembered(memo: Memo[K, V] | None, key: K, compute: Callable[[], V]) -> V:
    """`compute()`, or the answer `memo` kept for `key` (without a memo, always computed)."""
    known = memo.get(key) if memo is not None else None
    if known is None:
        known = compute()
        if memo is not None:
            memo.put(key, known)
    return known
