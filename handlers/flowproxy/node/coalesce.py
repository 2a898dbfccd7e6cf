"""Serialize and coalesce handler runs with a lock file and a pending counter. Stdlib only.

Watches run concurrently and an agent reload re-fires them all, so many handlers start at once. Each
bumps the pending counter, then tries the lock without waiting: the holder keeps running applies until the
counter stops moving, so a caller that finds the lock taken can exit at once and its change is not lost.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def bump(run_dir: Path) -> int:
    """Record that a change arrived; returns the new generation."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / "pending", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # short critical section: read-increment-write
        current = int(os.pread(fd, 32, 0) or b"0")
        data = str(current + 1).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        return current + 1
    finally:
        os.close(fd)


def generation(run_dir: Path) -> int:
    try:
        return int((run_dir / "pending").read_bytes() or b"0")
    except (OSError, ValueError):
        return 0


@contextmanager
def try_lock(run_dir: Path, wait: bool = False) -> Iterator[bool]:
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / "apply.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def drain(run_dir: Path, work: Callable[[int], None], first: int, wait: bool = False) -> bool:
    """Run `work` until no change arrived during the last run; returns False if another process took over.

    After releasing the lock the counter is read once more: a change that arrived between our last look
    and the release found the lock taken and left, so it is ours to handle. With `wait`, the first try
    blocks instead of leaving (a person at a terminal wants the outcome of a real apply).
    """
    seen = first
    while True:
        with try_lock(run_dir, wait=wait) as held:
            if not held:
                return False
            while True:
                work(seen)
                latest = generation(run_dir)
                if latest == seen:
                    break
                seen = latest
        if generation(run_dir) == seen:
            return True
        seen = generation(run_dir)
        wait = False
