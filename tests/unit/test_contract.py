"""The KV contract's one owner: what any key under the prefix is, how keys are built, the fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowproxy.core import contract
from flowproxy.core.contract import Key, Kind

P = "flowproxy/"
README = Path(__file__).resolve().parents[2] / "README.md"

CLASSIFY = [
    ("root", P, Key(Kind.ROOT)),
    ("outside", "other/routes/a/live", Key(Kind.OUTSIDE)),
    ("intent", P + "routes/api/blue", Key(Kind.INTENT, ("api", "blue"))),
    ("active", P + "routes/api/active", Key(Kind.ACTIVE, ("api", "active"))),
    ("template", P + "templates/t", Key(Kind.TEMPLATE, ("t",))),
    ("cert", P + "certs/site", Key(Kind.CERT, ("site",))),
    ("status", P + "status/edge-1", Key(Kind.STATUS, ("edge-1",))),
    ("status-folder", P + "status/", Key(Kind.STATUS, ("",))),
    ("status-deeper-is-stray", P + "status/a/b", Key(Kind.STRAY, ("status", "a", "b"))),
    ("accept-empty", P + "accept-empty", Key(Kind.ACCEPT_EMPTY)),
    ("route-too-deep", P + "routes/a/b/c", Key(Kind.STRAY, ("routes", "a", "b", "c"))),
    ("route-too-shallow", P + "routes/a", Key(Kind.STRAY, ("routes", "a"))),
    ("unknown-folder", P + "secrets/x", Key(Kind.STRAY, ("secrets", "x"))),
    ("template-folder", P + "templates/", Key(Kind.TEMPLATE, ("",))),
    ("challenge", P + "acme/challenges/tok", Key(Kind.CHALLENGE, ("tok",))),
    ("acme-state", P + "acme/state/acme-a", Key(Kind.ACME, ("state", "acme-a"))),
    ("acme-lock", P + "acme/locks/acme-a", Key(Kind.ACME, ("locks", "acme-a"))),
    ("acme-account", P + "acme/accounts/0123", Key(Kind.ACME, ("accounts", "0123"))),
    ("acme-unknown-folder", P + "acme/keys/x", Key(Kind.STRAY, ("acme", "keys", "x"))),
    ("acme-too-deep", P + "acme/state/a/b", Key(Kind.STRAY, ("acme", "state", "a", "b"))),
]


@pytest.mark.parametrize(("key", "expected"), [c[1:] for c in CLASSIFY], ids=[c[0] for c in CLASSIFY])
def test_classify(key: str, expected: Key) -> None:
    assert contract.classify(P, key) == expected


NAMES = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,20}", fullmatch=True)


@given(route=NAMES, variant=NAMES.filter(lambda v: v != contract.ACTIVE))
def test_built_keys_read_back_as_what_they_were_built_for(route: str, variant: str) -> None:
    assert contract.classify(P, contract.intent_key(P, route, variant)) == Key(Kind.INTENT, (route, variant))
    assert contract.classify(P, contract.active_key(P, route)) == Key(Kind.ACTIVE, (route, contract.ACTIVE))
    assert contract.classify(P, contract.template_key(P, variant)) == Key(Kind.TEMPLATE, (variant,))
    assert contract.classify(P, contract.cert_key(P, variant)) == Key(Kind.CERT, (variant,))
    assert contract.classify(P, contract.status_key(P, route)).kind is Kind.STATUS
    assert contract.intent_key(P, route, variant).startswith(contract.route_folder(P, route))


BASE = [(P + "routes/a/live", b'{"service": "a"}'), (P + "routes/a/active", b"live")]
FINGERPRINT = [
    ("status-write-changes-nothing", [*BASE, (P + "status/edge-1", b"{}")], False),
    ("folder-marker-of-status", [*BASE, (P + "status/", b"")], False),
    ("intent-value", [(P + "routes/a/live", b'{"service": "b"}'), BASE[1]], True),
    ("new-template", [*BASE, (P + "templates/t", b"x")], True),
    ("new-cert", [*BASE, (P + "certs/c", b"pem")], True),
    ("stray-key-by-name", [*BASE, (P + "secrets/x", b"1")], True),
    ("accept-empty-marker", [*BASE, (P + "accept-empty", b"yes")], True),
    ("challenge-answer", [*BASE, (P + "acme/challenges/t", b"t.x")], True),
    ("acme-bookkeeping-changes-nothing", [*BASE, (P + "acme/locks/a", b"edge-1"), (P + "acme/state/a", b"{}"),
                                          (P + "acme/orders/a", b"{}"), (P + "acme/accounts/x", b"{}")], False),
]


@pytest.mark.parametrize(("pairs", "moves"), [c[1:] for c in FINGERPRINT], ids=[c[0] for c in FINGERPRINT])
def test_the_fingerprint_moves_with_what_an_apply_depends_on(pairs: list[tuple[str, bytes]], moves: bool) -> None:
    assert (contract.kv_fingerprint(P, pairs) != contract.kv_fingerprint(P, BASE)) is moves


def test_a_stray_key_counts_by_name_not_value() -> None:
    one = contract.kv_fingerprint(P, [*BASE, (P + "secrets/x", b"1")])
    assert one == contract.kv_fingerprint(P, [*BASE, (P + "secrets/x", b"2")])


def test_the_readme_documents_every_kind_of_key() -> None:
    text = README.read_text()
    for shape in ("routes/<route>/<variant>", "routes/<route>/active", "templates/<name>", "certs/<name>",
                  "status/<node>", contract.ACCEPT_EMPTY, "acme/challenges/<token>",
                  *(f"acme/{folder}/" for folder in contract.ACME_WORK)):
        assert shape in text, shape


FINGER_KEYS = [P + "routes/r/live", P + "routes/r/active", P + "templates/t", P + "junk", P + "status/n1"]


@given(st.dictionaries(st.sampled_from(FINGER_KEYS), st.binary(max_size=8)), st.sampled_from(FINGER_KEYS),
       st.binary(max_size=8))
def test_a_moved_fingerprint_equals_a_fresh_one(pairs: dict[str, bytes], key: str, value: bytes) -> None:
    before = contract.kv_fingerprint(P, pairs.items())
    old = [(key, pairs[key])] if key in pairs else []
    assert contract.moved(before, P, old, [(key, value)]) == contract.kv_fingerprint(P, (pairs | {key: value}).items())
