"""ACME, decided once for the fleet (core/acme.py), the CA wing's errors (ca/client.py, `responses` standing in
for a CA) and the Consul session calls the lock rests on (`responses` standing in for the agent)."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
import responses
from hypothesis import given
from hypothesis import strategies as st

from flowproxy.ca.client import CA, Account, CAError
from flowproxy.consul.store import ConsulStore
from flowproxy.core import acme
from flowproxy.core.kv import desired_from_kv
from flowproxy.core.model import KVEntry
from flowproxy.core.pem import CertFacts

P = "flowproxy/"
NOW = 1_000_000.0
WANT = acme.Wanted(acme.cert_name(("a.io",)), ("a.io",), ("web",))


def facts(names: tuple[str, ...] = ("a.io",), born: float = NOW - 10, lifetime: float = 90) -> CertFacts:
    return CertFacts(names, "Test CA", born, born + lifetime, "1")


def held(ours: bool = True, **kwargs: object) -> acme.Held:
    return acme.Held(facts(**kwargs), ours)  # type: ignore[arg-type]


FAILED = acme.State(domains=("a.io",), failures=2, next_attempt=NOW + 30, last_error="boom")
VERDICTS = [
    ("missing", None, acme.State(), "due", "no certificate yet"),
    ("fresh", held(), acme.State(), "fresh", ""),
    ("renew-at-a-third-left", held(born=NOW - 60), acme.State(), "due", "a third of its lifetime is left"),
    ("just-before-a-third", held(born=NOW - 59), acme.State(), "fresh", ""),
    ("names-changed", held(names=("b.io",)), acme.State(), "due", "its names changed"),
    ("unreadable", acme.Held(None, True), acme.State(), "due", "its certificate cannot be read"),
    ("a-users-certificate", held(ours=False), acme.State(), "blocked", "was not written by ACME"),
    ("backing-off", None, FAILED, "waiting", "after 2 failed attempt(s)"),
    ("backoff-over", None, FAILED.__class__(**{**FAILED.__dict__, "next_attempt": NOW - 1}), "due", "no certificate"),
    ("other-names-do-not-wait", None, FAILED.__class__(**{**FAILED.__dict__, "domains": ("b.io",)}), "due", ""),
]


@pytest.mark.parametrize(("found", "state", "action", "reason"), [c[1:] for c in VERDICTS],
                         ids=[c[0] for c in VERDICTS])
def test_verdicts(found: acme.Held | None, state: acme.State, action: str, reason: str) -> None:
    verdict = acme.verdict(WANT, found, state, NOW)
    assert verdict.action == action and reason in verdict.reason


BACKOFF = [
    ("first", 1, 60, 3600, None, 60),
    ("doubles", 3, 60, 3600, None, 240),
    ("capped", 20, 60, 3600, None, 3600),
    ("retry-after-wins", 1, 60, 3600, 900, 900),
]


@pytest.mark.parametrize(("failures", "retry", "cap", "after", "wait"), [c[1:] for c in BACKOFF],
                         ids=[c[0] for c in BACKOFF])
def test_backoff(failures: int, retry: float, cap: float, after: float | None, wait: float) -> None:
    assert acme.backoff(failures, retry, cap, after) == wait


def test_failures_count_up_and_success_clears_them() -> None:
    state = acme.failed(acme.State(), WANT, "e1", "connection", NOW, retry=2, retry_max=60)
    state = acme.failed(state, WANT, "e2", "connection", NOW + 5, retry=2, retry_max=60)
    assert (state.failures, state.last_error, state.next_attempt) == (2, "e2", NOW + 5 + 4)
    done = acme.issued(state, WANT, facts(), "edge-2", NOW + 9)
    assert (done.failures, done.last_error, done.next_attempt, done.issued_by) == (0, None, None, "edge-2")


def route(name: str, variants: Mapping[str, Mapping[str, object]], active: str) -> list[KVEntry]:
    entries = [KVEntry(f"{P}routes/{name}/{v}", json.dumps(doc).encode(), 1, 1) for v, doc in variants.items()]
    return [*entries, KVEntry(f"{P}routes/{name}/active", active.encode(), 2, 2)]


WEB: dict[str, object] = {"service": "web", "domains": ["b.io", "a.io"], "tls": {"acme": True}}
WANTED = [
    ("active-opts-in", route("web", {"live": WEB}, "live"), {("a.io", "b.io"): ("web",)}),
    ("staged-does-not", route("web", {"live": WEB, "old": {"service": "web", "domains": ["a.io"]}}, "old"), {}),
    ("off-does-not", route("web", {"live": WEB}, ""), {}),
    ("canary-both", route("web", {"blue": WEB, "green": WEB | {"domains": ["c.io"]}}, "blue=50,green=50"),
     {("a.io", "b.io"): ("web",), ("c.io",): ("web",)}),
    ("same-names-share", route("web", {"live": WEB}, "live") + route("api", {"live": WEB | {"paths": ["/api"]}},
                                                                     "live"), {("a.io", "b.io"): ("api", "web")}),
    ("invalid-intent-does-not", route("web", {"live": WEB | {"domains": ["*.a.io"]}}, "live"), {}),
]


@pytest.mark.parametrize(("entries", "expected"), [c[1:] for c in WANTED], ids=[c[0] for c in WANTED])
def test_wanted(entries: list[KVEntry], expected: dict[tuple[str, ...], tuple[str, ...]]) -> None:
    found = acme.wanted(desired_from_kv(P, entries))
    assert {w.domains: w.routes for w in found.values()} == expected
    assert all(name == acme.cert_name(w.domains) and name.startswith("acme-") for name, w in found.items())


@given(st.lists(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,60}[a-z0-9])?(\.[a-z0-9]{1,20}){1,3}", fullmatch=True),
                min_size=1, max_size=5))
def test_certificate_names_are_valid_kv_names_and_ignore_order(domains: list[str]) -> None:
    from flowproxy.core.intent import NAME_RE

    name = acme.cert_name(tuple(domains))
    assert NAME_RE.fullmatch(name) and name == acme.cert_name(tuple(reversed(domains)))


@given(st.binary(max_size=300) | st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=10) |
                                                 st.none()).map(lambda d: json.dumps(d).encode()))
def test_a_state_document_never_breaks_the_worker(raw: bytes) -> None:
    assert isinstance(acme.state_from(raw), acme.State)


def test_state_round_trips() -> None:
    state = acme.issued(acme.State(), WANT, facts(), "edge-1", NOW)
    assert acme.state_from(state.to_json().encode()) == state


# -- the CA wing: every failure is a CAError with the problem's type ------------------------------------
DIRECTORY = "https://ca.test/dir"
DIR_DOC = {"newNonce": "https://ca.test/nonce", "newAccount": "https://ca.test/acct",
           "newOrder": "https://ca.test/order", "revokeCert": "https://ca.test/revoke", "keyChange": "https://ca.test/kc"}


def problem(kind: str, detail: str, status: int = 400) -> dict[str, object]:
    return {"status": status, "json": {"type": f"urn:ietf:params:acme:error:{kind}", "detail": detail},
            "content_type": "application/problem+json", "headers": {"Replay-Nonce": "bm9uY2U"}}


CA_ERRORS = [
    ("rate-limited", problem("rateLimited", "too many certificates already issued", 429), "rateLimited",
     "rateLimited: too many certificates"),
    ("terms-not-agreed", problem("malformed", "must agree to terms of service"), "malformed", "terms"),
    ("server-error", {"status": 500, "body": "oops", "headers": {"Replay-Nonce": "bm9uY2U"}}, "client", "500"),
]


@pytest.mark.parametrize(("reply", "kind", "message"), [c[1:] for c in CA_ERRORS], ids=[c[0] for c in CA_ERRORS])
@responses.activate
def test_ca_refusals_are_ca_errors_with_their_type(reply: dict[str, object], kind: str, message: str) -> None:
    responses.add(responses.GET, DIRECTORY, json=DIR_DOC)
    responses.add(responses.HEAD, "https://ca.test/nonce", headers={"Replay-Nonce": "bm9uY2U"})
    responses.add(responses.POST, "https://ca.test/acct", **reply)  # type: ignore[arg-type]
    with pytest.raises(CAError) as err:
        CA(DIRECTORY).register("ops@example.test", True)
    assert err.value.kind == kind and message in str(err.value)


@responses.activate
def test_a_rate_limit_carries_the_cas_retry_after_into_the_fleets_wait() -> None:
    responses.add(responses.GET, DIRECTORY, json=DIR_DOC)
    responses.add(responses.HEAD, "https://ca.test/nonce", headers={"Replay-Nonce": "bm9uY2U"})
    limited = problem("rateLimited", "too many new registrations", 429)
    limited["headers"] = {"Replay-Nonce": "bm9uY2U", "Retry-After": "3600"}
    responses.add(responses.POST, "https://ca.test/acct", **limited)  # type: ignore[arg-type]
    with pytest.raises(CAError) as err:
        CA(DIRECTORY).register(None, True)
    assert (err.value.kind, err.value.retry_after) == ("rateLimited", 3600.0)
    state = acme.failed(acme.State(), WANT, str(err.value), err.value.kind, NOW, retry=60, retry_max=600,
                        retry_after=err.value.retry_after)
    assert state.next_attempt == NOW + 3600  # the CA's wait, over the fleet's own backoff and its cap


RETRY_AFTER = [
    ("seconds", "120", 120.0),
    ("absent", None, None),
    ("garbage", "soon", None),
    ("a-date-past", "Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
]


@pytest.mark.parametrize(("header", "seconds"), [c[1:] for c in RETRY_AFTER], ids=[c[0] for c in RETRY_AFTER])
def test_retry_after_headers(header: str | None, seconds: float | None) -> None:
    from flowproxy.ca.client import retry_after

    assert retry_after(header) == seconds


@responses.activate
def test_an_unreachable_ca_is_reported_as_such() -> None:
    import requests

    responses.add(responses.GET, DIRECTORY, body=requests.ConnectionError("connection refused"))
    with pytest.raises(CAError) as err:
        CA(DIRECTORY).register(None, True)
    assert err.value.kind == "unreachable" and "cannot reach the CA" in str(err.value)


OWNS = [
    ("same-host", "https://ca.test/order/1", True),
    ("other-host", "https://evil.test/order/1", False),
    ("other-port", "https://ca.test:8443/order/1", False),
    ("plain-http", "http://ca.test/order/1", False),
]


@pytest.mark.parametrize(("url", "owned"), [c[1:] for c in OWNS], ids=[c[0] for c in OWNS])
def test_an_order_url_from_kv_is_followed_only_to_the_ca(url: str, owned: bool) -> None:
    assert CA(DIRECTORY).owns(url) is owned


@pytest.mark.parametrize("raw", [b"", b"{}", b'{"directory": "x", "uri": "y", "key": {"kty": "nope"}}', b"\xff"],
                         ids=["empty", "no-fields", "bad-key", "not-json"])
def test_a_stored_account_that_is_not_one_is_none(raw: bytes) -> None:
    assert Account.from_json(raw) is None


# -- the Consul session the per-certificate lock rests on ---------------------------------------------
BASE = "http://127.0.0.1:8500"


@responses.activate
def test_session_lock_calls() -> None:
    store = ConsulStore("127.0.0.1:8500")
    responses.add(responses.PUT, f"{BASE}/v1/session/create", json={"ID": "s1"})
    responses.add(responses.PUT, f"{BASE}/v1/kv/flowproxy/acme/locks/a", json=False)
    responses.add(responses.PUT, f"{BASE}/v1/session/renew/s1", status=404, body="Session id 's1' not found")
    assert store.create_session("flowproxy-acme edge-1", 10) == "s1"
    created = {k.lower(): v for k, v in json.loads(responses.calls[0].request.body or b"{}").items()}
    # Consul reads these without regard to case; release (its locks freed, not deleted) is its default behavior.
    assert created["ttl"] == "10s" and created.get("behavior", "release") == "release" and created["lockdelay"] == "0s"
    assert store.acquire("flowproxy/acme/locks/a", "edge-1", "s1") is False  # another session holds it
    assert "acquire=s1" in str(responses.calls[1].request.url)
    assert store.renew_session("s1") is False  # ended: the worker makes a new one


@responses.activate
def test_a_certificate_written_by_acme_carries_its_flags() -> None:
    store = ConsulStore("127.0.0.1:8500")
    responses.add(responses.PUT, f"{BASE}/v1/kv/flowproxy/certs/acme-a", json=True)
    store.put("flowproxy/certs/acme-a", b"pem", cas=0, flags=acme.ACME_FLAG)
    url = str(responses.calls[0].request.url)
    assert f"flags={acme.ACME_FLAG}" in url and "cas=0" in url


LOOPBACK = [
    ("wildcard-v4", "0.0.0.0:80", "127.0.0.1:80"),
    ("wildcard-v6", "[::]:80", "127.0.0.1:80"),
    ("no-host", ":8080", "127.0.0.1:8080"),
    ("an-address", "10.0.0.5:80", "10.0.0.5:80"),
]


@pytest.mark.parametrize(("bind", "reached"), [c[1:] for c in LOOPBACK], ids=[c[0] for c in LOOPBACK])
def test_a_node_checks_its_own_answers_where_its_listener_is(bind: str, reached: str) -> None:
    from flowproxy.node.certifier import loopback

    assert loopback(bind) == reached


ORDER = {"url": "u", "domains": ["a.io"], "key": "k", "directory": "d", "node": "n", "placed": 1.5}


@pytest.mark.parametrize("raw", [b"", b"[]", b'{"url": 1}', json.dumps(ORDER | {"placed": "soon"}).encode(),
                                 json.dumps(ORDER | {"domains": "a.io"}).encode()],
                         ids=["empty", "list", "missing-fields", "bad-time", "domains-not-a-list"])
def test_a_stored_order_that_is_not_one_is_none(raw: bytes) -> None:
    from flowproxy.node.certifier import Order

    assert Order.from_json(raw) is None


def test_work_stops_once_the_lock_session_is_lost() -> None:
    from flowproxy.node.certifier import Certifier, LockLost
    from flowproxy.settings import Settings

    worker = Certifier(Settings(acme_directory=DIRECTORY).checked(), lambda: None)
    worker.holding()  # holds: nothing raised
    worker.lost.set()
    with pytest.raises(LockLost):
        worker.holding()
