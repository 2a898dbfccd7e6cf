"""The incremental path equals a full build, byte for byte, after any sequence of changes (hypothesis).

Each step changes KV keys or a service's instances, as watch events do. The model advances when the
change is local, else it is rebuilt from the full build (as the applier does); after every step its plan
and every file of its render must equal a full plan and render of the same state.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flowproxy.core.delta import Change, Model, advance, model_of, named_services
from flowproxy.core.kv import desired_from_kv
from flowproxy.core.model import Desired, Instance, KVEntry
from flowproxy.core.plan import make_plan
from flowproxy.core.render import Templates, assemble, render_pieces

P = "flowproxy/"
TEMPLATES = Templates(Path(__file__).resolve().parents[2] / "templates")
ROUTES = ["a", "b", "c", "d"]
VARIANTS = ["blue", "green"]
SERVICES = ["s1", "s2"]

intents = st.fixed_dictionaries(
    {"service": st.sampled_from(SERVICES)},
    optional={
        "paths": st.lists(st.sampled_from(["/x", "/y", "/z/", "/x/deep"]), min_size=1, max_size=2, unique=True),
        "domains": st.lists(st.sampled_from(["a.example", "b.example", "*.w.example"]), min_size=1, max_size=2,
                            unique=True),
        "https_only": st.booleans(),
        "balance": st.sampled_from(["roundrobin", "leastconn"]),
        "check": st.booleans(),
        "tags": st.just(["t"]),
        "path_type": st.sampled_from(["prefix", "exact", "regex"]),  # regex: not local, a full build
        "mode": st.just("tcp"),  # not local either (and usually invalid without a port)
    })
actives = st.sampled_from(["blue", "green", "", "blue=50,green=50", "red"])
instances = st.lists(st.tuples(st.sampled_from(["127.0.0.1", "127.0.0.2"]), st.integers(8000, 8003),
                               st.booleans()), max_size=3)
steps = st.lists(st.one_of(
    st.tuples(st.just("intent"), st.sampled_from(ROUTES), st.sampled_from(VARIANTS), intents),
    st.tuples(st.just("active"), st.sampled_from(ROUTES), actives),
    st.tuples(st.just("drop"), st.sampled_from(ROUTES), st.sampled_from([*VARIANTS, "active"])),
    st.tuples(st.just("health"), st.sampled_from(SERVICES), instances),
), min_size=1, max_size=25)


def full(desired: Desired, health: dict[str, list[Instance]]) -> Model:
    """A model of the full build, with the instances of the services the routes name (as `gather` reads)."""
    health = {s: health.get(s, []) for s in desired.services()}
    pieces = render_pieces(make_plan(desired, health), TEMPLATES)
    return model_of(desired, health, pieces, assemble(pieces, TEMPLATES), templates=TEMPLATES, certs={})


def instance_list(rows: list[tuple[str, int, bool]]) -> list[Instance]:
    return [Instance(a, p, f"i{n}", "n1", ("t",) if tagged else ()) for n, (a, p, tagged) in enumerate(rows)]


# Sequences of changes: each example runs several full builds, so no deadline (shared by test_patch).
SEQUENCES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def start() -> tuple[dict[str, KVEntry], dict[str, list[Instance]], Model]:
    """Where every generated sequence starts: no keys, one instance of s1, the model of that."""
    health = {"s1": instance_list([("127.0.0.1", 8000, True)])}
    return {}, health, full(desired_from_kv(P, []), health)


@SEQUENCES
@given(steps)
def test_the_model_equals_a_full_build_after_every_step(sequence: list[tuple[Any, ...]]) -> None:
    entries, health, model = start()
    for index, step_op in enumerate(sequence, start=1):
        op = step_op[0]
        change = apply_op(step_op, entries, health, index)
        desired = desired_from_kv(P, list(entries.values()), index if op != "health" else model.desired.index)
        expected = full(desired, health)
        step = advance(model, read_missing(model, change, health), TEMPLATES)
        if step is None:
            event(f"full {op}")
            model = expected
            continue
        event(f"advanced {op}")
        assert step.model.pieces.plan == expected.pieces.plan
        assert dict(step.model.bundle.files) == dict(expected.bundle.files)
        assert step.model.desired == expected.desired
        assert dict(step.model.public) == dict(expected.public)
        assert dict(step.model.previews) == dict(expected.previews)
        assert dict(step.model.users) == dict(expected.users)
        model = step.model


def read_missing(model: Model, change: Change, health: dict[str, list[Instance]]) -> Change:
    """The change with the instances of its routes' services that differ from the model's, as
    `pipeline.apply_change` reads them."""
    moved = {s: health.get(s, []) for s in named_services(change) if model.health.get(s) != health.get(s, [])}
    return dataclasses.replace(change, health=dict(change.health) | moved)


def apply_op(step: tuple[Any, ...], entries: dict[str, KVEntry], health: dict[str, list[Instance]],
             index: int) -> Change:
    """Apply one generated step to the KV entries or the health table; the change a watch event brings."""
    op, *args = step
    if op == "health":
        health[args[0]] = instance_list(args[1])
        return Change(health={args[0]: health[args[0]]})
    route = args[0]
    if op == "intent":
        key = f"{P}routes/{route}/{args[1]}"
        entries[key] = KVEntry(key, json.dumps(args[2]).encode(), index, index)
    elif op == "active":
        key = f"{P}routes/{route}/active"
        created = entries[key].create_index if key in entries else index
        entries[key] = KVEntry(key, args[1].encode(), created, index)
    else:
        entries.pop(f"{P}routes/{route}/{args[1]}", None)
    parsed = {r.name: r for r in desired_from_kv(P, list(entries.values()), index).routes}
    return Change(routes={route: parsed.get(route)}, index=index)


OTHER = [("routes/o/live", {"service": "s1", "paths": ["/o/"]}), ("routes/o/active", "live")]

CASES = [
    ("activation", [*OTHER, ("routes/r/live", {"service": "s1", "paths": ["/r"]})], ("routes/r/active", "live"), True),
    ("switched-off", [*OTHER, ("routes/r/live", {"service": "s1", "paths": ["/r"]}), ("routes/r/active", "live")],
     ("routes/r/active", ""), True),
    ("conflict-with-another-route",
     [("routes/r/live", {"service": "s1", "paths": ["/r"]}), ("routes/q/live", {"service": "s1", "paths": ["/r"]}),
      ("routes/q/active", "live")], ("routes/r/active", "live"), False),
    ("regex-path", [*OTHER, ("routes/r/live", {"service": "s1", "paths": ["^/r$"], "path_type": "regex"})],
     ("routes/r/active", "live"), False),
    # The public frontend has a lookup step only for a map with rows, but for prefix paths (the default):
    # the first row of another changes it (a reload), and so does the last one going.
    ("a-node's-first-route", [("routes/r/live", {"service": "s1", "paths": ["/r"]})],
     ("routes/r/active", "live"), True),
    ("a-node's-last-route-going", [("routes/r/live", {"service": "s1", "paths": ["/r"]}), ("routes/r/active", "live")],
     ("routes/r/active", ""), True),
    ("the-last-exact-path-going",
     [*OTHER, ("routes/r/live", {"service": "s1", "paths": ["/r"], "path_type": "exact"}), ("routes/r/active", "live")],
     ("routes/r/active", ""), False),
    ("the-first-exact-path", [*OTHER, ("routes/r/live", {"service": "s1", "paths": ["/r"], "path_type": "exact"})],
     ("routes/r/active", "live"), False),
    ("the-first-route-with-domains", [*OTHER, ("routes/r/live", {"service": "s1", "domains": ["r.example"]})],
     ("routes/r/active", "live"), False),
    ("the-first-https-only", [*OTHER, ("routes/r/live", {"service": "s1", "paths": ["/r"], "https_only": True})],
     ("routes/r/active", "live"), False),
]


def test_a_route_with_domains_among_others_is_local() -> None:
    health = {"s1": instance_list([("127.0.0.1", 8000, False)])}
    entries = {P + k: KVEntry(P + k, v.encode(), i + 1, i + 1) for i, (k, v) in enumerate([
        ("routes/q/live", json.dumps({"service": "s1", "domains": ["q.example"]})), ("routes/q/active", "live"),
        ("routes/r/live", json.dumps({"service": "s1", "domains": ["r.example"]}))])}
    model = full(desired_from_kv(P, list(entries.values())), health)
    entries[P + "routes/r/active"] = KVEntry(P + "routes/r/active", b"live", 99, 99)
    desired = desired_from_kv(P, list(entries.values()), 99)
    (parsed,) = [r for r in desired.routes if r.name == "r"]
    step = advance(model, Change(routes={"r": parsed}, index=99), TEMPLATES)
    assert step is not None and dict(step.model.bundle.files) == dict(full(desired, health).bundle.files)


@pytest.mark.parametrize(("before", "write", "local"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_which_changes_are_local(before: list[tuple[str, Any]], write: tuple[str, str], local: bool) -> None:
    health = {"s1": instance_list([("127.0.0.1", 8000, False)])}
    entries = {P + k: KVEntry(P + k, (json.dumps(v) if isinstance(v, dict) else v).encode(), i + 1, i + 1)
               for i, (k, v) in enumerate(before)}
    model = full(desired_from_kv(P, list(entries.values())), health)
    entries[P + write[0]] = KVEntry(P + write[0], write[1].encode(), 99, 99)
    route = write[0].split("/")[1]
    (parsed,) = [r for r in desired_from_kv(P, list(entries.values()), 99).routes if r.name == route]
    step = advance(model, Change(routes={route: parsed}, index=99), TEMPLATES)
    assert (step is not None) == local
    if step is not None:
        assert step.keys == {"maps/path_beg.map": frozenset({"/r"})}
        assert step.model.bundle.config == model.bundle.config  # an activation changes maps only


def test_an_edited_template_file_is_not_local(tmp_path: Path) -> None:
    import os
    import shutil

    folder = tmp_path / "templates"
    shutil.copytree(TEMPLATES.folder, folder)
    templates = Templates(folder)
    entries = [KVEntry(P + "routes/o/active", b"live", 1, 1),
               KVEntry(P + "routes/o/live", b'{"service": "s1", "paths": ["/o/"]}', 1, 1),
               KVEntry(P + "routes/r/live", b'{"service": "s1", "paths": ["/r"]}', 1, 1)]
    desired = desired_from_kv(P, entries, 1)
    health = {"s1": instance_list([("127.0.0.1", 8000, False)])}
    pieces = render_pieces(make_plan(desired, health), templates)
    model = model_of(desired, health, pieces, assemble(pieces, templates), templates=templates, certs={})
    active = desired_from_kv(P, [*entries, KVEntry(P + "routes/r/active", b"live", 2, 2)], 2).routes[1]
    assert advance(model, Change(routes={"r": active}, index=2), templates) is not None
    cfg = folder / "haproxy.cfg.j2"
    cfg.write_text(cfg.read_text() + "# edited\n")
    os.utime(cfg, (cfg.stat().st_atime, cfg.stat().st_mtime + 5))  # a later modification time, whatever the clock
    assert advance(model, Change(routes={"r": active}, index=2), templates) is None


def test_a_lagging_service_watch_does_not_decide_a_route_change() -> None:
    """The model holds s1 without instances (its watch lags, as after an agent restart); an activation reads
    s1 afresh, and the step equals a full build of Consul's health, every route naming s1 included."""
    entries = [KVEntry(P + f"routes/{r}/live", json.dumps({"service": "s1", "paths": [f"/{r}"]}).encode(), 1, 1)
               for r in ("r", "q")] + [KVEntry(P + "routes/q/active", b"live", 1, 1)]
    consul = {"s1": instance_list([("127.0.0.1", 8000, False)])}
    model = full(desired_from_kv(P, entries, 1), {"s1": []})
    entries.append(KVEntry(P + "routes/r/active", b"live", 2, 2))
    desired = desired_from_kv(P, entries, 2)
    change = Change(routes={"r": next(x for x in desired.routes if x.name == "r")}, index=2)
    step = advance(model, read_missing(model, change, consul), TEMPLATES)
    assert step is not None
    assert dict(step.model.bundle.files) == dict(full(desired, consul).bundle.files)


@pytest.mark.parametrize(("config", "changed", "expected"), [
    (b"head\nbackend a\n s 1\nbackend b\n s 2\n", {"a": "backend a\n s 3\n"},
     b"head\nbackend a\n s 3\nbackend b\n s 2\n"),
    # The old text twice: which one is the section is unknown, so the caller joins every fragment again.
    (b"backend a\n s 1\n# backend a\n s 1\n", {"a": "backend a\n s 3\n"}, None),
    (b"backend b\n s 2\n", {"a": "backend a\n s 3\n"}, None),
], ids=["one-section-swapped", "old-text-not-unique", "old-text-missing"])
def test_a_changed_section_is_swapped_only_where_it_is_unique(config: bytes, changed: dict[str, str],
                                                              expected: bytes | None) -> None:
    from flowproxy.core.delta import _swapped

    assert _swapped(config, {"a": "backend a\n s 1\n"}, changed) == expected
