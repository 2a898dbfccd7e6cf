"""The apply lock: overlapping handler runs coalesce and no change is lost."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from flowproxy.node import coalesce


def test_a_busy_lock_sends_the_newcomer_away_and_the_holder_runs_its_change(tmp_path: Path) -> None:
    runs: list[int] = []
    release = threading.Event()
    late: list[bool] = []

    def slow(generation: int) -> None:
        runs.append(generation)
        if len(runs) == 1:
            late.append(coalesce.drain(tmp_path, runs.append, coalesce.bump(tmp_path)))  # arrives mid-run
            release.wait(5)

    holder = threading.Thread(target=lambda: coalesce.drain(tmp_path, slow, coalesce.bump(tmp_path)))
    holder.start()
    time.sleep(0.1)
    release.set()
    holder.join(5)
    assert late == [False]  # the newcomer left at once
    assert runs == [1, 2]  # the holder ran again for the change that arrived meanwhile


def test_many_concurrent_processes_never_overlap_and_the_last_change_is_applied(tmp_path: Path) -> None:
    script = f"""
import fcntl, os, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[2] / 'handlers')!r})
from flowproxy.node import coalesce
run = {str(tmp_path)!r}
def work(gen):
    fd = os.open(run + '/inside', os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails if two applies overlap
    except BlockingIOError:
        open(run + '/overlap', 'w').close()
    time.sleep(0.02)
    with open(run + '/applied', 'a') as fh:
        fh.write(str(coalesce.generation(__import__('pathlib').Path(run))) + '\\n')
    os.close(fd)
coalesce.drain(__import__('pathlib').Path(run), work, coalesce.bump(__import__('pathlib').Path(run)))
"""
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(30)]
    assert all(p.wait(30) == 0 for p in procs)
    applied = [int(x) for x in (tmp_path / "applied").read_text().split()]
    assert not (tmp_path / "overlap").exists()
    assert applied[-1] == 30  # the last apply saw every change
    assert len(applied) < 30  # and runs were coalesced
