"""An incremental step's commands and running files equal what the full diff (`deploy.live_change`) makes
of the same two renders, after any sequence of changes (hypothesis); and a table of what takes a reload.

The running state starts as a fresh render's files, as after a reload. Each local step is patched; when the
patch asks for a reload, the running state becomes the fresh render's files again (what a reload does).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given

from flowproxy.core.delta import Change, advance
from flowproxy.core.kv import desired_from_kv
from flowproxy.core.model import Instance, KVEntry
from flowproxy.haproxy.deploy import live_change
from flowproxy.haproxy.patch import Fresh, Running, patched, running_of
from flowproxy.haproxy.runtime import Reload
from tests.unit.test_delta import SEQUENCES, TEMPLATES, P, apply_op, full, read_missing, start, steps


def fresh_of(model: Any, step: Any) -> Fresh:
    return Fresh(before={n: model.pieces.fragments[n] for n in step.before},
                 after={n: step.model.pieces.fragments[n] for n in step.after},
                 rows_before=model.pieces.rows, rows_after=step.model.pieces.rows, keys=step.keys,
                 bundle=step.model.bundle)


def reloaded(bundle: Any) -> Running:
    running = running_of(bundle)
    assert running is not None  # a render's config always cuts into sections and back
    return running


@SEQUENCES
@given(steps)
def test_a_patch_equals_the_full_diff(sequence: list[tuple[Any, ...]]) -> None:
    entries, health, model = start()
    running = reloaded(model.bundle)
    for index, op in enumerate(sequence, start=1):
        change = apply_op(op, entries, health, index)
        desired = desired_from_kv(P, list(entries.values()), index if op[0] != "health" else model.desired.index)
        step = advance(model, read_missing(model, change, health), TEMPLATES)
        if step is None:
            model = full(desired, health)
            running = reloaded(model.bundle)
            continue
        patch = patched(running, fresh_of(model, step))
        whole = live_change(running.bundle, step.model.bundle)
        if isinstance(patch, Reload):
            running = reloaded(step.model.bundle)
        else:
            assert not isinstance(whole, Reload), whole.why
            target, commands = whole
            assert dict(patch[0].bundle.files) == dict(target.files)
            assert sorted(patch[1]) == sorted(commands)
            running = patch[0]
        model = step.model


def route(name: str, intent: dict[str, Any], active: str | None = "live") -> dict[str, bytes]:
    import json

    out = {f"{P}routes/{name}/live": json.dumps(intent).encode()}
    return out | ({f"{P}routes/{name}/active": active.encode()} if active is not None else {})


# Another route holds a row of the prefix map: the first row of an empty map is a new frontend step (a reload).
OTHER = route("o", {"service": "s1", "paths": ["/o/"]})

CASES = [
    ("activation: one map row", OTHER | route("r", {"service": "s1", "paths": ["/r"]}, None),
     route("r", {"service": "s1", "paths": ["/r"]}), ["add map maps/path_beg.map /r r:live"]),
    ("an instance comes: one server", route("r", {"service": "s1", "paths": ["/r"], "check": False}),
     {}, ["add server r:live/", "set server r:live/", "set server r:live/"]),
    ("a new route: into a spare", {}, route("n", {"service": "s1", "paths": ["/n"]}, None),
     ["add server fp_spare_http_00/", "set server fp_spare_http_00/", "enable health fp_spare_http_00/",
      "set server fp_spare_http_00/", "add map maps/preview_path_beg.map live~/n fp_spare_http_00",
      "add map maps/slots.map fp_spare_http_00 n:live"]),
]


@pytest.mark.parametrize(("before", "write", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_what_a_step_sends(before: dict[str, bytes], write: dict[str, bytes], expected: list[str]) -> None:
    """Without a write, the step is a second instance of s1."""
    s1 = [Instance("127.0.0.1", 8000, "i0", "n1")]
    entries = {k: KVEntry(k, v, 1, 1) for k, v in before.items()}
    model = full(desired_from_kv(P, list(entries.values()), 1), {"s1": s1})
    if write:
        entries |= {k: KVEntry(k, v, 2, 2) for k, v in write.items()}
        names = {k.split("/")[2] for k in write}
        parsed = {r.name: r for r in desired_from_kv(P, list(entries.values()), 2).routes}
        change = Change(routes={n: parsed[n] for n in names}, index=2)
    else:
        change = Change(health={"s1": [*s1, Instance("127.0.0.1", 8001, "i1", "n1")]})
    step = advance(model, read_missing(model, change, {"s1": s1}), TEMPLATES)
    assert step is not None
    patch = patched(reloaded(model.bundle), fresh_of(model, step))
    assert not isinstance(patch, Reload)
    assert len(patch[1]) == len(expected)
    assert all(c.startswith(e) for c, e in zip(patch[1], expected, strict=True)), patch[1]


def test_a_backend_that_goes_takes_a_reload() -> None:
    intents = OTHER | route("r", {"service": "s1", "paths": ["/r"]})
    entries = {k: KVEntry(k, v, 1, 1) for k, v in intents.items()}
    model = full(desired_from_kv(P, list(entries.values()), 1), {})
    step = advance(model, Change(routes={"r": None}, index=2), TEMPLATES)
    assert step is not None
    patch = patched(reloaded(model.bundle), fresh_of(model, step))
    assert isinstance(patch, Reload) and "goes" in patch.why
