"""The periodic proof's child process: its answer, its CPU, and every way it can fail to answer, each
turned into a FlowproxyError (the applier then converges in full) and never a child left behind."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import pytest

from flowproxy.errors import FlowproxyError
from flowproxy.node import proof
from flowproxy.pipeline import Warm


def answers(*message: object) -> Callable[[Connection], None]:
    def child(send: Connection) -> None:
        send.send(message)

    return child


def dies(send: Connection) -> None:
    os._exit(3)


def hangs(send: Connection) -> None:
    time.sleep(60)


def forked(target: Callable[[Connection], None]) -> proof.Proof:
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=target, args=(send,), daemon=True)
    process.start()
    send.close()
    return proof.Proof(process, receive)


@pytest.mark.parametrize(("target", "expected", "counts"), [
    (answers("done", True, 0.75), (True, 0.75), (1, 0)),
    (answers("done", False, 0.5), (False, 0.5), (0, 1)),
    (answers("done", None, 0.25), (None, 0.25), (0, 0)),
], ids=["equal", "differs", "another-state"])
def test_the_child_answers(target: Callable[[Connection], None], expected: tuple[bool | None, float],
                           counts: tuple[int, int]) -> None:
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
        proof.outcome(child, Warm(), timeout=1)
    assert not child.process.is_alive()
