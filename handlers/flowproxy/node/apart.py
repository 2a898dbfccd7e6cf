"""Work in a forked child process, for the node's periodic reads of the whole table.

The periodic proof (a full read and build) and the key comparison (a full read and its fingerprint) are
~1 s and ~0.3 s of Python at 10,000 routes. In the node's process they held the GIL that the events'
threads need: an event that came meanwhile took 0.5-1 s instead of ~20 ms. A forked child has every
import and the model as they are, runs on the other core, and the node's thread only waits on a pipe.

A child touches nothing that the parent's other threads may hold: it opens its own Consul client, and
CPython re-creates the import lock and the logging module's locks in a forked child. The node's signal
handlers are reset in it: they would stop the node from the copy.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from flowproxy.errors import FlowproxyError

log = logging.getLogger(__name__)


@dataclass
class Apart:
    """A child process at work, and the pipe its answer comes by."""

    process: BaseProcess
    answer: Connection


def start(work: Callable[[], Any], name: str) -> Apart:
    """Fork a child that runs `work()` and sends back what it returns (picklable) or the error it raised."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(work, send), name=name, daemon=True)
    process.start()
    send.close()
    return Apart(process, receive)


def outcome(apart: Apart, timeout: float) -> tuple[Any, float]:
    """What the child's work returned, and the CPU seconds the child used; its FlowproxyError raised
    here, and so is a child that died or did not answer within `timeout`. The child is gone on return."""
    answered = apart.answer.poll(timeout)
    try:
        kind, value, cpu = apart.answer.recv() if answered else ("error", f"no answer in {timeout:.0f} s", 0.0)
    except (EOFError, OSError):
        apart.process.join(timeout=5)
        kind, value, cpu = "error", f"the child process ended with code {apart.process.exitcode} and no answer", 0.0
    finally:
        apart.answer.close()
        apart.process.join(timeout=5 if answered else 0)  # one that answered ends at once; a hung one is killed
        if apart.process.is_alive():
            apart.process.kill()
            apart.process.join()
    if kind == "error":
        raise FlowproxyError(f"{apart.process.name}: {value}")
    return value, cpu


def run(work: Callable[[], Any], name: str, timeout: float) -> tuple[Any, float]:
    """`work()` in a child process: its result and CPU seconds (see `outcome`)."""
    return outcome(start(work, name), timeout)


def _child(work: Callable[[], Any], send: Connection) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    try:
        answer: tuple[str, Any] = ("done", work())
    except FlowproxyError as exc:
        answer = ("error", str(exc))
    except Exception as exc:  # a bug: said, and the caller goes the full way
        log.exception("%s failed unexpectedly", multiprocessing.current_process().name)
        answer = ("error", f"{type(exc).__name__}: {exc}")
    send.send((*answer, time.process_time()))
    send.close()
