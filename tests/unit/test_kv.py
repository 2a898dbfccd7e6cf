"""desired_from_kv: the KV layout of contract v1."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowproxy.core.kv import RouteMemo, ShapeMemo, desired_from_kv
from flowproxy.core.memo import Memo
from flowproxy.core.model import KVEntry

P = "flowproxy/"
GOOD = b'{"service": "go-demo", "paths": ["/demo"]}'


def kv(*pairs: tuple[str, bytes]) -> list[KVEntry]:
    return [KVEntry(P + k, v, create_index=i + 1, modify_index=i + 1) for i, (k, v) in enumerate(pairs)]


ACTIVE_CASES = [
    ("absent", [("routes/r/live", GOOD)], None, []),
    ("empty", [("routes/r/live", GOOD), ("routes/r/active", b"")], None, []),
    ("whitespace-trimmed", [("routes/r/live", GOOD), ("routes/r/active", b" live\n")], "live", []),
    ("missing-variant", [("routes/r/live", GOOD), ("routes/r/active", b"green")], "green",
     ["flowproxy/routes/r/active: names variant 'green', which does not exist (variants: live)"]),
    ("junk", [("routes/r/live", GOOD), ("routes/r/active", b"live; drop")], "live; drop",
     ["flowproxy/routes/r/active: 'live; drop' is not a variant name"]),
    ("not-utf8", [("routes/r/live", GOOD), ("routes/r/active", b"\xff")], "?",
     ["flowproxy/routes/r/active: value is not UTF-8"]),
]


@pytest.mark.parametrize(("pairs", "active", "problems"), [c[1:] for c in ACTIVE_CASES],
                         ids=[c[0] for c in ACTIVE_CASES])
def test_active_key(pairs: list[tuple[str, bytes]], active: str | None, problems: list[str]) -> None:
    (route,) = desired_from_kv(P, kv(*pairs)).routes
    assert route.active == active
    got = [str(p) for p in route.problems]
    assert len(got) == len(problems) and all(g.startswith(w) for g, w in zip(got, problems, strict=True))


STRAY = [
    ("top-level", "junk", "key is outside the flowproxy KV contract"),
    ("route-without-variant", "routes/r", "key is outside the flowproxy KV contract"),
    ("too-deep", "routes/r/v/x", "key is outside the flowproxy KV contract"),
    ("bad-route-name", "routes/Bad Name/v", "route and variant names must match"),
    ("bad-variant-name", "routes/r/V1", "route and variant names must match"),
    ("bad-template-name", "templates/../x", "key is outside"),
    ("status-too-deep", "status/a/b", "key is outside"),
    ("challenge-short-token", "acme/challenges/abc", "challenge tokens are 16-128 base64url characters"),
    ("acme-unknown-folder", "acme/secrets/x", "key is outside"),
]


@pytest.mark.parametrize(("key", "message"), [c[1:] for c in STRAY], ids=[c[0] for c in STRAY])
def test_keys_outside_the_contract_are_reported_not_used(key: str, message: str) -> None:
    desired = desired_from_kv(P, kv((key, b"1"), ("routes/ok/live", GOOD), ("routes/ok/active", b"live")))
    assert [r.name for r in desired.routes] == ["ok"]
    (problem,) = desired.stray
    assert problem.key == P + key and problem.message.startswith(message)


def test_status_folders_and_templates_are_not_routes() -> None:
    desired = desired_from_kv(P, kv(("status/node-1", b"{}"), ("", b""), ("routes/", b""),
                                    ("templates/t1", b"backend {{ backend.name }}")))
    assert desired.routes == () and desired.stray == ()
    assert desired.templates == {"t1": "backend {{ backend.name }}"}


def test_services_counts_every_valid_intent_active_or_staged() -> None:
    desired = desired_from_kv(P, kv(
        ("routes/a/live", GOOD), ("routes/a/active", b"live"),
        ("routes/b/live", b'{"service": "other", "paths": ["/b"]}'),  # staged, not active
        ("routes/c/live", b'{"service": "broken"}'), ("routes/c/active", b"live"),  # invalid
    ))
    assert desired.services() == ("go-demo", "other")


def test_a_large_status_leaves_serving_routes_out_but_keeps_every_rejection() -> None:
    from flowproxy.core.plan import make_plan
    from flowproxy.core.status import BUDGET, applied_doc

    own = [b'{"service": "s", "paths": ["/r%d"]}' % i for i in range(10_000)]
    entries = [KVEntry(f"{P}routes/r{i}/live", own[i], 1, 1) for i in range(10_000)]
    entries += [KVEntry(f"{P}routes/r{i}/active", b"live", 2, 2) for i in range(10_000)]
    entries += [KVEntry(f"{P}routes/bad/live", b"{}", 1, 1), KVEntry(f"{P}routes/bad/active", b"live", 3, 3)]
    doc = applied_doc("n1", 5, "c" * 64, "b" * 64, make_plan(desired_from_kv(P, entries), {}))
    assert len(json.dumps(doc)) <= BUDGET
    assert doc["serving_omitted"] == 10_000
    assert doc["routes"]["bad"]["state"] == "rejected" and doc["routes"]["bad"]["reasons"]
    assert doc["counts"] == {"serving": 10_000, "rejected": 1}


BLUE = b'{"service": "s", "tags": ["blue"], "paths": ["/c"]}'
GREEN = b'{"service": "s", "tags": ["green"], "paths": ["/c"]}'
CANARY_CASES = [
    ("two-variants", b"blue=90,green=10", (("blue", 90), ("green", 10)), []),
    ("spaces", b" blue=1 , green=3 ", (("blue", 1), ("green", 3)), []),
    ("zero-allowed", b"blue=0,green=10", (("blue", 0), ("green", 10)), []),
    ("all-zero", b"blue=0,green=0", (), ["flowproxy/routes/c/active: a canary needs at least two variants"]),
    ("one-variant", b"blue=100", (), ["flowproxy/routes/c/active: a canary needs at least two variants"]),
    ("unknown", b"blue=90,red=10", (), ["flowproxy/routes/c/active: names variant 'red', which does not exist"]),
    ("twice", b"blue=50,blue=50", (), ["flowproxy/routes/c/active: names variant 'blue' twice"]),
    ("negative", b"blue=-1,green=10", (), ["flowproxy/routes/c/active: 'blue=-1' is not variant=weight"]),
    ("too-heavy", b"blue=1001,green=1", (), ["flowproxy/routes/c/active: 'blue=1001' is not variant=weight"]),
    ("percent", b"blue=90%,green=10%", (), ["flowproxy/routes/c/active: 'blue=90%' is not variant=weight",
                                           "flowproxy/routes/c/active: 'green=10%' is not variant=weight"]),
]


@pytest.mark.parametrize(("value", "weights", "problems"), [c[1:] for c in CANARY_CASES],
                         ids=[c[0] for c in CANARY_CASES])
def test_canary_weights(value: bytes, weights: tuple[tuple[str, int], ...], problems: list[str]) -> None:
    entries = kv(("routes/c/blue", BLUE), ("routes/c/green", GREEN), ("routes/c/active", value))
    (route,) = desired_from_kv(P, entries).routes
    assert route.weights == weights
    got = [str(p) for p in route.problems]
    assert len(got) == len(problems) and all(g.startswith(w) for g, w in zip(got, problems, strict=True))


def test_certs_are_read_by_name_and_bad_names_reported() -> None:
    desired = desired_from_kv(P, kv(("certs/site", b"PEM"), ("certs/Bad Name", b"PEM"), ("certs/big", b"x" * 300_000)))
    assert desired.certs == {"site": b"PEM"}
    assert [str(p) for p in desired.stray] == [
        "flowproxy/certs/Bad Name: certificate names must match [a-z0-9][a-z0-9_.-]{0,62}; key ignored",
        "flowproxy/certs/big: certificate is 300000 bytes, at most 262144; ignored"]


KEYS = st.sampled_from(["flowproxy/routes/a/blue", "flowproxy/routes/a/green", "flowproxy/routes/a/active",
                        "flowproxy/routes/b/live", "flowproxy/routes/b/active", "flowproxy/routes/B/x",
                        "flowproxy/templates/t", "flowproxy/other", "flowproxy/status/n1"])
VALUES = st.sampled_from([b'{"service": "s", "paths": ["/a"]}', b'{"service": "s", "paths": ["nope"]}', b"blue",
                          b"green", b"live", b"blue=1,green=3", b"", b"\xff"])
STATES = st.lists(st.dictionaries(KEYS, st.tuples(VALUES, st.integers(1, 3))), min_size=1, max_size=6)


@given(STATES)
def test_the_warm_memos_never_change_what_a_table_reads_as(states: list[dict[str, tuple[bytes, int]]]) -> None:
    """The warm applier parses through its memos (a key's shape, a route's value from its entries): after
    any sequence of tables, each reads exactly as a fresh parse reads it."""
    shapes: ShapeMemo = Memo(3)  # small: the memos also forget mid-sequence
    routes: RouteMemo = Memo(2)
    for state in states:
        entries = [KVEntry(k, v, i, i) for k, (v, i) in sorted(state.items())]
        assert desired_from_kv("flowproxy/", entries, 7, shapes=shapes, routes_memo=routes) == \
            desired_from_kv("flowproxy/", entries, 7)


TOKEN = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
THUMB = "9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
CHALLENGES = [
    ("answer", TOKEN, f"{TOKEN}.{THUMB}".encode(), True),
    ("answer-with-newline", TOKEN, f"{TOKEN}.{THUMB}\n".encode(), True),
    ("other-token", TOKEN, f"{'A' * 43}.{THUMB}".encode(), False),
    ("no-thumbprint", TOKEN, TOKEN.encode(), False),
    ("space-injection", TOKEN, f"{TOKEN}.{THUMB} extra".encode(), False),
    ("map-row-injection", TOKEN, f"{TOKEN}.{THUMB}\n/other x".encode(), False),
    ("short-token", "abc", b"abc." + THUMB.encode(), False),
    ("token-slash-is-deeper", TOKEN + "/x", f"{TOKEN}.{THUMB}".encode(), False),
]


@pytest.mark.parametrize(("token", "value", "served"), [c[1:] for c in CHALLENGES], ids=[c[0] for c in CHALLENGES])
def test_challenge_answers_are_served_only_as_key_authorizations(token: str, value: bytes, served: bool) -> None:
    """What reaches HAProxy's challenge map must be exactly `<token>.<thumbprint>`: anything else a KV writer
    puts there is reported, never served."""
    key = f"{P}acme/challenges/{token}"
    desired = desired_from_kv(P, [KVEntry(key, value, 1, 1)])
    assert (desired.challenges == {token: value.decode().strip()}) is served
    assert bool(desired.stray) is not served
