"""Consul HTTP error paths, with `responses` standing in for the agent."""

from __future__ import annotations

import base64
import json

import pytest
import requests
import responses

from flowproxy.consul.store import ConsulStore
from flowproxy.errors import CasConflict, ConsulUnavailable

BASE = "http://127.0.0.1:8500"


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> ConsulStore:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "10.9.9.9:1")  # must not win over the explicit address
    return ConsulStore("127.0.0.1:8500")


ERRORS = [
    ("server-error", {"status": 500, "body": "rpc error: No cluster leader"}, "No cluster leader"),
    ("permission-denied", {"status": 403, "body": "Permission denied"}, "denied"),
    ("bad-request", {"status": 400, "body": "bad"}, "failed to list"),
    ("connection-refused", {"body": requests.ConnectionError("refused")}, "refused"),
    ("timeout", {"body": requests.Timeout("read timed out")}, "timed out"),
    ("garbage-json", {"status": 200, "body": "{not json", "headers": {"X-Consul-Index": "5"}}, "failed"),
]


@pytest.mark.parametrize(("reply", "message"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
@responses.activate
def test_read_errors_become_consul_unavailable(store: ConsulStore, reply: dict[str, object], message: str) -> None:
    responses.add(responses.GET, f"{BASE}/v1/kv/flowproxy/", **reply)  # type: ignore[arg-type]
    with pytest.raises(ConsulUnavailable) as err:
        store.read_prefix("flowproxy/")
    assert message in str(err.value) and "127.0.0.1:8500" in str(err.value)


@responses.activate
def test_read_prefix_decodes_entries(store: ConsulStore) -> None:
    body = [{"Key": "flowproxy/routes/a/active", "Value": base64.b64encode(b"live").decode(), "CreateIndex": 3,
             "ModifyIndex": 9, "Flags": 0, "LockIndex": 0}, {"Key": "flowproxy/", "Value": None}]
    responses.add(responses.GET, f"{BASE}/v1/kv/flowproxy/", json=body, headers={"X-Consul-Index": "9"})
    index, entries = store.read_prefix("flowproxy/")
    assert index == 9
    assert [(e.key, e.value, e.create_index) for e in entries] == [
        ("flowproxy/routes/a/active", b"live", 3), ("flowproxy/", b"", 0)]


@responses.activate
def test_empty_prefix_is_an_empty_list_not_an_error(store: ConsulStore) -> None:
    responses.add(responses.GET, f"{BASE}/v1/kv/flowproxy/", status=404, headers={"X-Consul-Index": "4"})
    assert store.read_prefix("flowproxy/") == (4, [])


@responses.activate
def test_cas_failure_is_a_conflict(store: ConsulStore) -> None:
    responses.add(responses.PUT, f"{BASE}/v1/kv/flowproxy/routes/a/active", body="false")
    with pytest.raises(CasConflict, match="check-and-set failed"):
        store.put("flowproxy/routes/a/active", "live", cas=7)
    assert str(responses.calls[0].request.url).endswith("cas=7")


@responses.activate
def test_txn_conflict_is_a_conflict(store: ConsulStore) -> None:
    responses.add(responses.PUT, f"{BASE}/v1/txn", status=409, json={"Errors": [{"What": "index is stale"}]})
    with pytest.raises(CasConflict):
        store.txn([("cas", "flowproxy/routes/a/live", b"{}", 0)])
    sent = json.loads(responses.calls[0].request.body or "[]")
    assert sent == [{"KV": {"Verb": "cas", "Key": "flowproxy/routes/a/live", "Value": "e30=", "Index": 0}}]


@responses.activate
def test_health_uses_service_address_then_node_address(store: ConsulStore) -> None:
    body = [{"Node": {"Node": "n1", "Address": "10.0.0.1"}, "Service": {"ID": "a", "Address": "", "Port": 80}},
            {"Node": {"Node": "n2", "Address": "10.0.0.2"}, "Service": {"ID": "b", "Address": "10.1.1.1",
                                                                         "Port": 81, "Tags": ["blue"]}}]
    responses.add(responses.GET, f"{BASE}/v1/health/service/web", json=body, headers={"X-Consul-Index": "2"})
    got = store.healthy("web")
    assert [(i.address, i.port, i.tags) for i in got] == [("10.0.0.1", 80, ()), ("10.1.1.1", 81, ("blue",))]
    assert "passing" in (responses.calls[0].request.url or "")


def test_bad_address_is_a_usage_problem() -> None:
    with pytest.raises(ConsulUnavailable, match="is not host:port"):
        ConsulStore("localhost")


@responses.activate
def test_txn_permission_denied_is_a_denial_not_a_conflict(store: ConsulStore) -> None:
    responses.add(responses.PUT, f"{BASE}/v1/txn", status=409,
                  json={"Results": None, "Errors": [{"OpIndex": 0, "What": "Permission denied"}]})
    with pytest.raises(ConsulUnavailable, match="denied a KV transaction"):
        store.txn([("cas", "flowproxy/routes/a/live", b"{}", 0)])


NOT_CONSUL = [
    ("no-index-404", "GET", "flowproxy/x", {"status": 404, "body": "flowproxy: no route for this request"}, "get"),
    ("no-index-200", "GET", "flowproxy/", {"status": 200, "json": []}, "read_prefix"),
    ("keys-not-a-list", "GET", "flowproxy/", {"status": 200, "json": {"a": 1}, "headers": {"X-Consul-Index": "3"}},
     "keys"),
    ("html-page", "GET", "flowproxy/", {"status": 200, "body": "<html>hi</html>", "headers": {"X-Consul-Index": "3"}},
     "read_prefix"),
]


@pytest.mark.parametrize(("method", "key", "reply", "call"), [c[1:] for c in NOT_CONSUL],
                         ids=[c[0] for c in NOT_CONSUL])
@responses.activate
def test_an_answer_that_is_not_consuls_is_consul_unavailable(
        store: ConsulStore, method: str, key: str, reply: dict[str, object], call: str) -> None:
    """CONSUL_HTTP_ADDR pointed at something else (the proxy port): one clear error, exit 3, no traceback."""
    responses.add(method, f"{BASE}/v1/kv/{key}", **reply)  # type: ignore[arg-type]
    with pytest.raises(ConsulUnavailable) as err:
        getattr(store, call)(key)
    assert "Consul" in str(err.value) and "127.0.0.1:8500" in str(err.value)
