"""The periodic proof (`pipeline.prove`: a full read and build compared with the model), in a child
process of its own (node/apart.py): at 10,000 routes it is ~1 s of Python.

The child is forked while the applier holds its event lock, so no event is half-applied in the copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowproxy.node import apart

if TYPE_CHECKING:
    from flowproxy.core.delta import Model
    from flowproxy.pipeline import Warm
    from flowproxy.settings import Settings

# Far above a proof's time (30,000 routes: ~7 s), so only a child that hangs (a Consul read that never
# returns) meets it.
TIMEOUT = 600.0


def start(settings: Settings, warm: Warm, model: Model) -> apart.Apart:
    """Fork the child that proves `model` against Consul's state now (call it holding the event lock)."""
    from flowproxy.pipeline import prove

    return apart.start(lambda: prove(settings, warm, model), "the periodic proof")


def outcome(proof: apart.Apart, warm: Warm, timeout: float = TIMEOUT) -> tuple[bool | None, float]:
    """What the proof answered (its count added to `warm`: its own copy stays in the child), with the CPU
    seconds the child used (the supervisor's budget counts them); an error raises FlowproxyError."""
    value, cpu = apart.outcome(proof, timeout)
    if value is True:
        warm.proved += 1
    elif value is False:
        warm.diverged += 1
    return value, cpu
