"""make_plan: specificity, conflicts, instance selection."""

from __future__ import annotations

import json

import pytest

from flowproxy.core.kv import desired_from_kv
from flowproxy.core.model import Instance, KVEntry
from flowproxy.core.naming import endpoint, server_name, weight
from flowproxy.core.plan import Claim, make_plan

P = "flowproxy/"


def desired(routes: dict[str, tuple[int, dict[str, object]]]) -> list[KVEntry]:
    """routes: name -> (CreateIndex of its active key, intent)."""
    out = []
    for name, (since, intent) in routes.items():
        out.append(KVEntry(f"{P}routes/{name}/live", json.dumps(intent).encode(), 1, 1))
        out.append(KVEntry(f"{P}routes/{name}/active", b"live", since, since))
    return out


def test_conflict_goes_to_the_oldest_active_key_whatever_the_names() -> None:
    same: dict[str, object] = {"service": "s", "paths": ["/x"]}
    entries = desired({"aaa": (20, same), "zzz": (10, same)})
    plan = make_plan(desired_from_kv(P, entries), {})
    states = {s.route: s for s in plan.states}
    assert states["zzz"].state == "serving"
    assert states["aaa"].state == "rejected"
    assert "conflict" in states["aaa"].reasons[0] and "flowproxy/routes/zzz" in states["aaa"].reasons[0]
    assert [c.backend for c in plan.claims] == ["zzz:live"]


def test_conflict_outcome_does_not_depend_on_entry_order() -> None:
    same: dict[str, object] = {"service": "s", "domains": ["x.io"]}
    entries = desired({"a": (5, same), "b": (7, same)})
    assert make_plan(desired_from_kv(P, entries), {}) == make_plan(desired_from_kv(P, entries[::-1]), {})


NO_CONFLICT = [
    ("different-path-type", {"service": "s", "paths": ["/x"], "path_type": "exact"}, {"service": "s", "paths": ["/x"]}),
    ("host-and-any-host", {"service": "s", "paths": ["/x"], "domains": ["a.io"]}, {"service": "s", "paths": ["/x"]}),
    ("wildcard-and-exact", {"service": "s", "domains": ["*.a.io"]}, {"service": "s", "domains": ["b.a.io"]}),
]


@pytest.mark.parametrize(("one", "two"), [c[1:] for c in NO_CONFLICT], ids=[c[0] for c in NO_CONFLICT])
def test_distinct_claims_both_serve(one: dict[str, object], two: dict[str, object]) -> None:
    plan = make_plan(desired_from_kv(P, desired({"one": (1, one), "two": (2, two)})), {})
    assert [s.state for s in plan.states] == ["serving", "serving"]


def test_domain_only_route_claims_every_path_of_its_hosts() -> None:
    plan = make_plan(desired_from_kv(P, desired({"w": (1, {"service": "s", "domains": ["a.io", "*.b.io"]})})), {})
    assert plan.claims == (Claim("*.b.io", "prefix", "/", "w:live"), Claim("a.io", "prefix", "/", "w:live"))


INSTANCES = [
    ("tags-all-required", {"tags": ["blue", "v2"]},
     [Instance("10.0.0.1", 80, tags=("blue", "v2", "x")), Instance("10.0.0.2", 80, tags=("blue",))], ["10.0.0.1:80"]),
    ("dedupe-same-endpoint", {}, [Instance("10.0.0.1", 80, "a"), Instance("10.0.0.1", 80, "b")], ["10.0.0.1:80"]),
    ("stable-order", {}, [Instance("10.0.0.2", 80), Instance("10.0.0.1", 81), Instance("10.0.0.1", 80)],
     ["10.0.0.1:80", "10.0.0.1:81", "10.0.0.2:80"]),
    ("bad-address-skipped", {}, [Instance("1.2.3.4 check", 80), Instance("", 80), Instance("10.0.0.1", 0),
                                 Instance("db.internal", 5432)], ["db.internal:5432"]),
    ("ipv6", {}, [Instance("::1", 8080)], ["[::1]:8080"]),
]


@pytest.mark.parametrize(("extra", "instances", "endpoints"), [c[1:] for c in INSTANCES], ids=[c[0] for c in INSTANCES])
def test_instance_selection(extra: dict[str, object], instances: list[Instance], endpoints: list[str]) -> None:
    intent = {"service": "s", "paths": ["/x"]} | extra
    plan = make_plan(desired_from_kv(P, desired({"r": (1, intent)})), {"s": instances})
    (backend,) = plan.backends
    assert [endpoint(s) for s in backend.servers] == endpoints
    (state,) = plan.states
    assert state.instances == len(endpoints)


def test_unusable_instances_are_noted() -> None:
    plan = make_plan(desired_from_kv(P, desired({"r": (1, {"service": "s", "paths": ["/x"]})})),
                     {"s": [Instance("bad host", 80, "x1", "n1")]})
    (state,) = plan.states
    assert state.instances == 0 and "instance x1 on node n1 skipped" in state.notes[0]


def canary(active: bytes, green: dict[str, object] | None = None) -> list[KVEntry]:
    blue = {"service": "s", "tags": ["blue"], "paths": ["/c"]}
    return [KVEntry(f"{P}routes/c/blue", json.dumps(blue).encode(), 1, 1),
            KVEntry(f"{P}routes/c/green", json.dumps(green or blue | {"tags": ["green"]}).encode(), 2, 2),
            KVEntry(f"{P}routes/c/active", active, 3, 3)]


CANARY_HEALTH = {"s": [Instance("10.0.0.1", 80, tags=("blue",)), Instance("10.0.0.2", 80, tags=("blue",)),
                       Instance("10.0.0.3", 80, tags=("green",))]}
WEIGHTS = [
    ("ninety-ten", b"blue=90,green=10", {"blue_10.0.0.1:80": 115, "blue_10.0.0.2:80": 115, "green_10.0.0.3:80": 26}),
    ("even", b"blue=1,green=1", {"blue_10.0.0.1:80": 64, "blue_10.0.0.2:80": 64, "green_10.0.0.3:80": 128}),
    ("green-off", b"blue=10,green=0", {"blue_10.0.0.1:80": 128, "blue_10.0.0.2:80": 128, "green_10.0.0.3:80": 0}),
]


@pytest.mark.parametrize(("active", "weights"), [c[1:] for c in WEIGHTS], ids=[c[0] for c in WEIGHTS])
def test_canary_shares_each_variant_weight_among_its_instances(active: bytes, weights: dict[str, int]) -> None:
    plan = make_plan(desired_from_kv(P, canary(active)), CANARY_HEALTH)
    backend = next(b for b in plan.backends if b.name == "c::canary")
    assert {server_name(s): weight(s) for s in backend.servers} == weights
    assert [c.backend for c in plan.claims] == ["c::canary"]
    (state,) = plan.states
    assert (state.state, state.variant, state.instances) == ("serving", active.decode(), 3)


def test_canary_variants_must_route_the_same_requests() -> None:
    plan = make_plan(desired_from_kv(P, canary(b"blue=90,green=10", {"service": "s", "paths": ["/other"]})), {})
    (state,) = plan.states
    assert state.state == "rejected" and "canary variants must have the same" in state.reasons[0]
    assert plan.claims == ()


def test_tcp_ports_and_sni_names_are_claimed_and_conflict_like_paths() -> None:
    entries = desired({"db": (1, {"service": "db", "mode": "tcp", "port": 5432}),
                       "db2": (2, {"service": "db", "mode": "tcp", "port": 5432}),
                       "tls": (3, {"service": "t", "mode": "sni", "domains": ["a.io"]}),
                       "web": (4, {"service": "w", "domains": ["a.io"]})})
    plan = make_plan(desired_from_kv(P, entries), {})
    states = {s.route: s.state for s in plan.states}
    assert states == {"db": "serving", "db2": "rejected", "tls": "serving", "web": "serving"}
    assert {(c.path_type, c.host, c.path, c.port, c.backend) for c in plan.claims} == {
        ("tcp", "", "", 5432, "db:live"), ("sni", "a.io", "", 0, "tls:live"), ("prefix", "a.io", "/", 0, "web:live")}
    assert all(c.path_type not in ("tcp", "sni") for c in plan.preview)  # TCP and SNI have no preview
