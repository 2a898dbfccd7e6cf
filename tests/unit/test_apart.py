"""Work in a child process (the periodic proof, the key comparison): its answer, its CPU, and every way it
can fail to answer, each turned into a FlowproxyError (the node then goes the full way) and never a child
left behind."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import pytest

from flowproxy.errors import FlowproxyError
from flowproxy.node import apart, proof
from flowproxy.pipeline import Warm


def answers(*message: object) -> Callable[[Connection], None]:
    def child(send: Connection) -> None:
        send.send(message)

    return child


def dies(send: Connection) -> None:
    os._exit(3)


def hangs(send: Connection) -> None:
    time.sleep(60)


def forked(target: Callable[[Connection], None]) -> apart.Apart:
    """A child that speaks the pipe's protocol by hand (or breaks it)."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=target, args=(send,), name="the child", daemon=True)
    process.start()
    send.close()
    return apart.Apart(process, receive)


@pytest.mark.parametrize(("target", "expected", "counts"), [
    (answers("done", True, 0.75), (True, 0.75), (1, 0)),
    (answers("done", False, 0.5), (False, 0.5), (0, 1)),
    (answers("done", None, 0.25), (None, 0.25), (0, 0)),
], ids=["equal", "differs", "another-state"])
def test_the_proof_counts_what_its_child_answers(target: Callable[[Connection], None],
                                                 expected: tuple[bool | None, float], counts: tuple[int, int]) -> None:
    warm = Warm()
    child = forked(target)
    assert proof.outcome(child, warm) == expected
    assert (warm.proved, warm.diverged) == counts
    assert not child.process.is_alive()


@pytest.mark.parametrize(("target", "said"), [
    (answers("error", "Consul answered 500", 0.0), "Consul answered 500"),
    (dies, "ended with code 3"),
    (hangs, "no answer in 1 s"),
], ids=["its-error", "it-dies", "it-hangs"])
def test_a_child_that_cannot_answer_is_an_error_and_gone(target: Callable[[Connection], None], said: str) -> None:
    child = forked(target)
    with pytest.raises(FlowproxyError, match=said):
        apart.outcome(child, timeout=1)
    assert not child.process.is_alive()


def raises_error() -> int:
    raise FlowproxyError("Consul answered 500")


def has_a_bug() -> int:
    return 1 // 0


def answers_pid() -> dict[str, int]:
    return {"pid": os.getpid()}


WORK: list[tuple[str, Callable[[], object], str]] = [
    ("returns", answers_pid, ""),
    ("raises-its-error", raises_error, "the child: Consul answered 500"),
    ("has-a-bug", has_a_bug, "the child: ZeroDivisionError"),
]


@pytest.mark.parametrize(("work", "said"), [w[1:] for w in WORK], ids=[w[0] for w in WORK])
def test_work_runs_in_another_process_and_its_errors_come_back(work: Callable[[], object], said: str) -> None:
    if said:
        with pytest.raises(FlowproxyError, match=said):
            apart.run(work, "the child", timeout=30)
        return
    value, cpu = apart.run(work, "the child", timeout=30)
    assert value == {"pid": value["pid"]} and value["pid"] != os.getpid() and cpu >= 0
