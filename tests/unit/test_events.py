"""Watch payloads as incremental changes: what each kind of event becomes (a table), in Consul's own format."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from flowproxy.core import contract
from flowproxy.core.delta import Change
from flowproxy.core.model import Instance, KVEntry
from flowproxy.node.events import NOTHING, EventView, kv_change, service_change
from flowproxy.pipeline import Gathered, Warm
from tests.unit.test_delta import full

P = "flowproxy/"
BLUE = json.dumps({"service": "s1", "paths": ["/r"]}).encode()
GREEN = json.dumps({"service": "s1", "paths": ["/r"], "tags": ["g"]}).encode()
BASE = [KVEntry(P + "routes/r/blue", BLUE, 5, 5), KVEntry(P + "routes/r/green", GREEN, 6, 6),
        KVEntry(P + "routes/r/active", b"blue", 7, 7), KVEntry(P + "status/n1", b"{}", 8, 8)]


def payload(entries: list[KVEntry]) -> str:
    """As the agent writes it: Go's compact JSON, keys in order, values base64."""
    docs = [{"Key": e.key, "CreateIndex": e.create_index, "ModifyIndex": e.modify_index, "LockIndex": 0,
             "Flags": 0, "Value": base64.b64encode(e.value).decode(), "Session": ""}
            for e in sorted(entries, key=lambda e: e.key)]
    return json.dumps(docs, separators=(",", ":")) + "\n"


def warm_of(entries: list[KVEntry]) -> Warm:
    from flowproxy.core.kv import desired_from_kv

    config = [e for e in entries if not contract.ignored(P, e.key)]
    desired = desired_from_kv(P, config, max(e.modify_index for e in config))
    health = {"s1": [Instance("127.0.0.1", 8000, "i1", "n1", ("g",))]}
    warm = Warm(incremental=True, model=full(desired, health))
    fingerprint = contract.kv_fingerprint(P, [(e.key, e.value) for e in config])
    warm.seen = Gathered(desired, health, fingerprint, {e.key: e for e in config}, {"s1": 10})
    warm.health_index = {"s1": 10}
    return warm


def replaced(key: str, value: bytes, index: int) -> list[KVEntry]:
    kept = [e for e in BASE if e.key != P + key]
    created = next((e.create_index for e in BASE if e.key == P + key), index)
    return [*kept, KVEntry(P + key, value, created, index)]


KV_CASES: list[tuple[str, Any, Any]] = [
    ("a status write changes nothing", replaced("status/n1", b'{"x":1}', 9), NOTHING),
    ("a flip is that route", replaced("routes/r/active", b"green", 9), {"r"}),
    ("a new route is that route", [*BASE, KVEntry(P + "routes/q/live", BLUE, 9, 9)], {"q"}),
    ("an older payload changes nothing", replaced("routes/r/active", b"green", 4), NOTHING),
    ("a deleted key takes the full converge", [e for e in BASE if not e.key.endswith("green")], None),
    ("a template takes the full converge", [*BASE, KVEntry(P + "templates/t", b"x", 9, 9)], None),
    ("a key outside the contract takes the full converge", [*BASE, KVEntry(P + "junk", b"x", 9, 9)], None),
    ("a payload in another shape takes the full converge", json.dumps([{"Key": P + "routes/r/active"}]), None),
]


def under(part: str, entries: list[KVEntry]) -> list[KVEntry]:
    return [e for e in entries if e.key.startswith(P + part)]


# (what, the part of the prefix the watch names (all of it when ""), its payload, what it becomes)
PART_CASES: list[tuple[str, str, Any, Any]] = [
    ("a flip in the route's shard", P + "routes/r", under("routes/r", replaced("routes/r/active", b"green", 9)), {"r"}),
    ("another shard, as applied", P + "routes/q", [], NOTHING),
    ("a new route in an empty shard", P + "routes/q", [KVEntry(P + "routes/q/live", BLUE, 9, 9)], {"q"}),
    ("a key gone from the route's shard", P + "routes/r", under("routes/r", BASE)[1:], None),
    ("the templates folder, as applied", P + "templates/", [], NOTHING),
    ("a new template", P + "templates/", [KVEntry(P + "templates/t", b"x", 9, 9)], None),
    ("accept-empty written", P + "accept-empty", [KVEntry(P + "accept-empty", b"1", 9, 9)], None),
    ("a part of another prefix", "other/routes/", [], None),
]
CASES = [(what, "", event, expected) for what, event, expected in KV_CASES] + PART_CASES


@pytest.mark.parametrize(("part", "event", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_keyprefix_events(part: str, event: list[KVEntry] | str, expected: Any) -> None:
    warm = warm_of(BASE)
    view = EventView()
    change = kv_change(view, warm, P, event if isinstance(event, str) else payload(event), 9, watched=part)
    if isinstance(expected, set):
        assert change is not None and change is not NOTHING and set(change.routes) == expected
        assert isinstance(event, list)
        others = [e for e in BASE if part and not e.key.startswith(part) and e.key.startswith(P + "routes/")]
        config = [(e.key, e.value) for e in [*event, *others] if not contract.ignored(P, e.key)]
        assert view.fingerprint == contract.kv_fingerprint(P, config)  # moved by the changed keys alone
    else:
        assert change is expected


def test_the_same_payload_twice_changes_nothing_the_second_time() -> None:
    warm = warm_of(BASE)
    view = EventView()
    event = payload(replaced("routes/r/active", b"green", 9))
    first = kv_change(view, warm, P, event, 9)
    assert first is not None and first.routes["r"] is not None and first.routes["r"].active == "green"
    assert kv_change(view, warm, P, event, 9) is NOTHING


def health_payload(service: str, ports: list[int]) -> str:
    return json.dumps([{"Node": {"Node": "n1", "Address": "127.0.0.1"},
                        "Service": {"ID": f"i{p}", "Service": service, "Address": "127.0.0.1", "Port": p, "Tags": []},
                        "Checks": []} for p in ports])


SERVICE_CASES: list[tuple[str, str, str, int, Any]] = [
    ("new instances", "s1", health_payload("s1", [8000, 8001]), 11, {"s1"}),
    ("the last instance goes: named by the watch", "s1", "[]", 11, {"s1"}),
    ("an older answer changes nothing", "s1", health_payload("s1", [8001]), 9, NOTHING),
    ("a service no route names changes nothing", "", health_payload("other", [8001]), 11, NOTHING),
    ("no name and no instance: the full converge", "", "[]", 11, None),
]


@pytest.mark.parametrize(("service", "event", "index", "expected"), [c[1:] for c in SERVICE_CASES],
                         ids=[c[0] for c in SERVICE_CASES])
def test_service_events(service: str, event: str, index: int, expected: Any) -> None:
    change = service_change(EventView(), warm_of(BASE), service, event, index)
    if isinstance(expected, set):
        assert isinstance(change, Change) and change is not NOTHING and set(change.health) == expected
    else:
        assert change is expected
