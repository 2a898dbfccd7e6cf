"""The supervisor's periodic checks: run in the warm applier's process, and within their CPU budget."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from flowproxy.node import supervisor
from flowproxy.node.applier import THREAD
from flowproxy.node.supervisor import BUDGET, PERIODIC, Supervisor, every
from flowproxy.settings import Settings

EVERY = [
    ("cheap-keeps-its-floor", 20.0, 0.02, 20.0),
    ("free", 10.0, 0.0, 10.0),
    ("costly-runs-rarer", 20.0, 0.5, 125.0),
    ("very-costly", 10.0, 2.0, 500.0),
]


@pytest.mark.parametrize(("floor", "cost", "expected"), [c[1:] for c in EVERY], ids=[c[0] for c in EVERY])
def test_a_check_runs_no_more_often_than_its_budget_allows(floor: float, cost: float, expected: float) -> None:
    assert every(floor, cost) == pytest.approx(expected)
    assert cost / every(floor, cost) <= BUDGET / 2 + 1e-12


class FakeApplier:
    """Stands in for the warm applier: records where and how it was asked to apply, burns some CPU."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.proof_cpu = 0.0


    def run(self, kind: str, payload: str, index: int | None = None) -> int:
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass
        self.calls.append((kind, payload, threading.current_thread().name))
        return 0

    def prove(self) -> int:
        """The real one compares a full render with the model (in a child process, whose CPU it leaves in
        `proof_cpu`) and converges only when they differ."""
        self.proof_cpu = 0.25
        return self.run("prove", "")


def test_the_periodic_full_resync_runs_in_the_warm_applier_and_measures_its_cost(tmp_path: Path) -> None:
    sup = Supervisor(Settings(node="t", data_dir=tmp_path))
    fake = FakeApplier()
    sup.applier = fake  # type: ignore[assignment]
    running = sup.apply_now(PERIODIC)
    assert isinstance(running, threading.Thread)
    running.join(timeout=10)
    assert fake.calls == [("prove", "", THREAD)]  # the proof, logged to handler.log like a handler's
    assert sup.full_cost >= 0.05 + 0.25 and not sup.busy()  # its thread's CPU and the proof's child's


def test_a_costly_full_resync_is_due_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sup = Supervisor(Settings(node="t", data_dir=tmp_path))
    sup.last_full = time.monotonic() - (supervisor.FULL_RESYNC_EVERY + 1)
    sup.last_resync = time.monotonic()  # the key comparison is not due: only the full resync is judged
    assert sup.resync_due() == PERIODIC
    sup.last_full = time.monotonic() - (supervisor.FULL_RESYNC_EVERY + 1)
    sup.full_cost = 1.0  # -> at most every 200 s
    assert sup.resync_due() == ""


def test_notify_never_blocks_on_a_queue_nobody_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A blocking send to a full datagram queue (10 by default) once stopped the supervisor's loop for good."""
    import socket

    from flowproxy.node.supervisor import notify

    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink:
        sink.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        done = threading.Event()

        def beat() -> None:
            for _ in range(50):
                notify("WATCHDOG=1")
            done.set()

        threading.Thread(target=beat, daemon=True).start()
        assert done.wait(20), "notify blocked on a queue nobody reads"
        assert sink.recv(64) == b"WATCHDOG=1"


def test_a_change_left_behind_is_due_when_no_apply_took_it_at_two_ticks(tmp_path: Path) -> None:
    """An apply under way has counted its change and not yet recorded it, and an event counts itself a moment
    before it takes the lock: neither is a change left behind (read then, this ran a full apply after every
    few events)."""
    from flowproxy import runstate
    from flowproxy.node import coalesce
    from flowproxy.node.applier import Applier

    sup = Supervisor(Settings(node="t", data_dir=tmp_path))
    sup.applier = Applier(sup.settings)
    run_dir = sup.settings.run_dir
    runstate.save(run_dir, runstate.LAST_APPLY, {"generation": 0})
    coalesce.bump(run_dir)
    with sup.applier._serial:
        assert sup.left_behind() == "" and sup.left_behind() == ""  # the applier is at work
    assert sup.left_behind() == ""  # the first tick that sees it
    coalesce.bump(run_dir)
    assert sup.left_behind() == ""  # counted again since: an event on its way
    assert "left it to the next apply" in sup.left_behind()  # the same count, still not applied
    runstate.save(run_dir, runstate.LAST_APPLY, {"generation": 2})
    assert sup.left_behind() == ""


# Consul's keys at each check (a, b: two states) and what was applied then; the verdict of each check.
STANDING = [
    ("applied", [("a", "a")], [""]),
    ("in-flight-then-applied", [("b", "a"), ("b", "b")], ["", ""]),
    ("missed-and-standing-still", [("b", "a"), ("b", "a")], ["", "other than those last applied"]),
    ("moving-under-writes", [("b", "a"), ("c", "b"), ("d", "c")], ["", "", ""]),
    ("missed-then-standing-still", [("b", "a"), ("c", "a"), ("c", "a")],
     ["", "", "other than those last applied"]),
]


@pytest.mark.parametrize(("checks", "verdicts"), [c[1:] for c in STANDING], ids=[c[0] for c in STANDING])
def test_keys_apart_from_the_applied_ones_are_due_once_they_stand_still(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checks: list[tuple[str, str]], verdicts: list[str]) -> None:
    from flowproxy import runstate
    from flowproxy.consul import reads
    from flowproxy.core import contract
    from flowproxy.core.model import KVEntry

    settings = Settings(node="t", data_dir=tmp_path)
    sup = Supervisor(settings)
    monkeypatch.setattr(sup, "store", lambda: None)
    key = contract.active_key(settings.prefix, "r")
    for (held, applied), verdict in zip(checks, verdicts, strict=True):
        monkeypatch.setattr(reads, "read_config", lambda _store, _prefix, held=held: (
            1, [KVEntry(key, held.encode(), 1, 1)]))
        runstate.save(settings.run_dir, runstate.LAST_APPLY,
                      {"fingerprint": contract.kv_fingerprint(settings.prefix, [(key, applied.encode())])})
        sup.last_full = time.monotonic()  # the periodic proof is not judged here
        sup.last_resync = 0.0  # the check is due (a difference makes it due again after RESYNC_GRACE)
        found = sup.resync_due()
        assert (verdict in found) if verdict else found == ""
        if held != applied and not verdict:  # judged again RESYNC_GRACE s later, not RESYNC_EVERY
            wait = supervisor.every(supervisor.RESYNC_EVERY, sup.resync_cost) - (time.monotonic() - sup.last_resync)
            assert wait == pytest.approx(supervisor.RESYNC_GRACE, abs=0.5)
