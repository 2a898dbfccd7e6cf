"""A keyprefix watch's payload stands in for the four KV reads only while it is Consul's latest state."""

from __future__ import annotations

import json

import pytest
import responses

from flowproxy.consul.reads import from_payload
from flowproxy.consul.store import ConsulStore
from flowproxy.core.model import KVEntry, Snapshot

BASE = "http://127.0.0.1:8500"
P = "flowproxy/"
ENTRIES = (KVEntry(P, b""), KVEntry(P + "routes/a/live", b"{}", 5, 5), KVEntry(P + "routes/a/active", b"live", 6, 6),
           KVEntry(P + "certs/site", b"PEM", 7, 7), KVEntry(P + "status/edge-1", b"{}", 9, 9),
           KVEntry(P + "junk", b"secret", 8, 8))


@pytest.mark.parametrize(("now", "used"), [(9, True), (10, False), (8, False)],
                         ids=["latest", "newer-write", "older-payload"])
@responses.activate
def test_payload_is_used_only_at_the_latest_index(now: int, used: bool) -> None:
    keys = [e.key for e in ENTRIES]
    responses.add(responses.GET, f"{BASE}/v1/kv/{P}routes/", json=keys[1:3], headers={"X-Consul-Index": "6"})
    responses.add(responses.GET, f"{BASE}/v1/kv/{P}certs/", json=keys[3:4], headers={"X-Consul-Index": "7"})
    responses.add(responses.GET, f"{BASE}/v1/kv/{P}", json=keys, headers={"X-Consul-Index": str(now)})
    got = from_payload(ConsulStore("127.0.0.1:8500"), P, Snapshot(9, ENTRIES))
    urls = [str(c.request.url) for c in responses.calls]
    assert all("keys" in url for url in urls)  # key listings only, never the values again
    if not used:
        assert got is None and len(urls) == 1
        return
    # The config's own index (certs/ at 7), not the prefix's 9, which counts every node's status writes.
    assert got == (7, [ENTRIES[1], ENTRIES[2], ENTRIES[3], KVEntry(P + "junk", b"?")])  # no status, no values of strays
    assert len(urls) == 3


def test_payload_entries_parse_the_watch_json() -> None:
    from flowproxy.consul.payload import payload_entries

    raw = json.dumps([{"Key": P + "routes/a/active", "Value": "bGl2ZQ==", "CreateIndex": 3, "ModifyIndex": 4},
                      {"Key": P + "routes/", "Value": None}])
    assert payload_entries(raw) == [(P + "routes/a/active", b"live", 3, 4), (P + "routes/", b"", 0, 0)]
    assert payload_entries("null") == [] and payload_entries("") == []
    assert payload_entries("{oops") is None and payload_entries('[{"Value": "x"}]') is None


@responses.activate
def test_a_payload_without_routes_is_judged_by_the_reads() -> None:
    """The empty-table guard compares config indexes; the prefix index also counts status writes."""
    empty = (KVEntry(P + "status/edge-1", b"{}", 9, 9), KVEntry(P + "routes/", b"", 3, 3))
    assert from_payload(ConsulStore("127.0.0.1:8500"), P, Snapshot(9, empty)) is None
    assert len(responses.calls) == 0
