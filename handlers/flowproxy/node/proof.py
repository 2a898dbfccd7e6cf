"""The periodic proof in a child process of its own.

The proof reads Consul and builds in full (`pipeline.prove`): at 10,000 routes ~1 s of Python. In the
node's process it held the GIL that the events' threads need, and the events that came meanwhile took
0.7-1 s instead of ~15 ms (2-3 trials in 30). A forked child has the model as it is, with nothing to
load, and runs on the other core; the node's threads only wait on a pipe.

The child is forked while the applier holds its event lock, so no event is half-applied in the copy,
and it touches nothing the other threads may hold: it opens its own Consul client, and the logging
module re-creates its handlers' locks in a forked child.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from flowproxy.errors import FlowproxyError

if TYPE_CHECKING:
    from flowproxy.core.delta import Model
    from flowproxy.pipeline import Warm
    from flowproxy.settings import Settings

log = logging.getLogger(__name__)
# Far above a proof's time (30,000 routes: ~7 s), so only a child that hangs (a Consul read that never
# returns) meets it.
TIMEOUT = 600.0


@dataclass
class Proof:
    """A proof running in a child process, and the pipe its answer comes by."""

    process: BaseProcess
    answer: Connection


def start(settings: Settings, warm: Warm, model: Model) -> Proof:
    """Fork the child that proves `model` against Consul's state now (call it holding the event lock)."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(settings, warm, model, send), name="flowproxy-proof",
                              daemon=True)
    process.start()
    send.close()
    return Proof(process, receive)


def outcome(proof: Proof, warm: Warm, timeout: float = TIMEOUT) -> tuple[bool | None, float]:
    """What `pipeline.prove` answered in the child (its counts added to `warm`), with the CPU seconds the
    child used (the supervisor's budget counts them); its FlowproxyError raised here; a child that died
    or took longer than `timeout` is an error too. The child is gone when this returns."""
    answered = proof.answer.poll(timeout)
    try:
        kind, value, cpu = proof.answer.recv() if answered else ("error", f"no answer in {timeout:.0f} s", 0.0)
    except (EOFError, OSError):
        proof.process.join(timeout=5)
        kind, value, cpu = "error", f"the child process ended with code {proof.process.exitcode} and no answer", 0.0
    finally:
        proof.answer.close()
        proof.process.join(timeout=5 if answered else 0)  # one that answered ends at once; a hung one is killed
        if proof.process.is_alive():
            proof.process.kill()
            proof.process.join()
    if kind == "error":
        raise FlowproxyError(f"the periodic proof: {value}")
    if value is True:
        warm.proved += 1
    elif value is False:
        warm.diverged += 1
    return (bool(value) if value is not None else None), cpu


def _child(settings: Settings, warm: Warm, model: Model, send: Connection) -> None:
    # The node's handlers for these would stop the node (deregister it, stop HAProxy) from the copy.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    from flowproxy.pipeline import prove

    try:
        answer: tuple[str, bool | str | None] = ("done", prove(settings, warm, model))
    except FlowproxyError as exc:
        answer = ("error", str(exc))
    except Exception as exc:  # a bug in the proof: said, and the node converges in full
        log.exception("the periodic proof failed unexpectedly")
        answer = ("error", f"{type(exc).__name__}: {exc}")
    send.send((*answer, time.process_time()))
    send.close()
