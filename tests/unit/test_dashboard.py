"""The dashboard's documents (core/dashboard.py), its server states from `show stat`, and its auth check."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from flowproxy.core.dashboard import certificates_doc, routes_doc
from flowproxy.core.kv import desired_from_kv
from flowproxy.core.model import Instance, KVEntry
from flowproxy.haproxy.traffic import server_states
from flowproxy.node.dashboard import authorized

P = "flowproxy/"
BLUE = Instance("10.0.0.1", 80, "app-blue-1", "n1", ("blue",))
GREEN = Instance("10.0.0.2", 80, "app-green-1", "n2", ("green",))
INSTANCES = {"app": [(BLUE, "passing"), (GREEN, "critical")]}


def kv(**keys: Any) -> list[KVEntry]:
    """route/variant=intent dict or active text -> KV entries."""
    return [KVEntry(P + "routes/" + k.replace("__", "/"), (json.dumps(v) if isinstance(v, dict) else v).encode())
            for k, v in keys.items()]


def intent(color: str) -> dict[str, Any]:
    return {"service": "app", "tags": [color], "paths": ["/app"]}


def doc(entries: list[KVEntry], last: dict[str, Any] | None = None,
        servers: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    return routes_doc("edge-1", desired_from_kv(P, entries, 7), last or {}, INSTANCES, servers=servers,
                      counts=None)


@pytest.mark.parametrize(("active", "roles", "weights"), [
    ("blue", {"blue": "serving", "green": "staged"}, {"blue": None, "green": None}),
    ("green", {"blue": "staged", "green": "serving"}, {"blue": None, "green": None}),
    ("blue=90,green=10", {"blue": "canary", "green": "canary"}, {"blue": 90, "green": 10}),
    ("", {"blue": "staged", "green": "staged"}, {"blue": None, "green": None}),
], ids=["blue-serves", "flipped", "canary", "off"])
def test_variants_say_their_role(active: str, roles: dict[str, str], weights: dict[str, int | None]) -> None:
    route = doc(kv(app__blue=intent("blue"), app__green=intent("green"), app__active=active))["routes"][0]
    assert {v["variant"]: v["role"] for v in route["variants"]} == roles
    assert {v["variant"]: v["weight"] for v in route["variants"]} == weights


def test_instances_carry_consul_health_beside_haproxy_state() -> None:
    servers = {"app:blue": {"10.0.0.1:80": "UP"}, "app:green": {"10.0.0.2:80": "DOWN"}}
    route = doc(kv(app__blue=intent("blue"), app__green=intent("green"), app__active="blue"),
                servers=servers)["routes"][0]
    shown = {v["variant"]: v["instances"] for v in route["variants"]}
    assert shown["blue"] == [{"id": "app-blue-1", "address": "10.0.0.1:80", "node": "n1", "consul": "passing",
                              "haproxy": "UP"}]
    assert shown["green"][0]["consul"] == "critical" and shown["green"][0]["haproxy"] == "DOWN"


@pytest.mark.parametrize(("last", "state", "reasons"), [
    ({"routes": {"app": {"state": "serving", "variant": "blue"}}}, "serving", []),
    ({"routes": {"app": {"state": "rejected", "reasons": ["routes/app/blue: paths[0]: must start with \"/\""]}}},
     "rejected", ["routes/app/blue: paths[0]: must start with \"/\""]),
    ({"routes": {}, "serving_omitted": 10000}, "serving", []),  # a large table's status lists no serving route
    ({}, "pending", []),  # written after the node's last apply
], ids=["serving", "rejected-with-reason", "serving-omitted", "pending"])
def test_route_state_comes_from_the_nodes_last_apply(last: dict[str, Any], state: str, reasons: list[str]) -> None:
    route = doc(kv(app__blue=intent("blue"), app__active="blue"), last)["routes"][0]
    assert (route["state"], route["reasons"]) == (state, reasons)


def test_an_invalid_intent_shows_its_problems_and_a_stray_key_is_listed() -> None:
    entries = kv(app__blue={"service": "app", "paths": ["nope"], "colour": 1}, app__active="blue")
    entries.append(KVEntry(P + "elsewhere", b"x"))
    shown = doc(entries)
    variant = shown["routes"][0]["variants"][0]
    assert variant["role"] == "invalid" and "instances" not in variant
    assert any("paths[0]" in p for p in variant["problems"]) and any("colour" in p for p in variant["problems"])
    assert shown["problems"] and "elsewhere" in shown["problems"][0]
    assert shown["kv_index"] == 7 and shown["haproxy"] is False


def test_server_states_come_from_server_rows_and_follow_spares() -> None:
    stat = ("# pxname,svname,status,addr\n"
            "app:blue,BACKEND,UP,\napp:blue,s1,UP,10.0.0.1:80\napp:blue,s2,DOWN,10.0.0.3:80\n"
            "fp_spare_http_00,s1,no check,10.0.0.9:81\nfp_no_route,BACKEND,UP,\nfp_http,FRONTEND,OPEN,\n")
    assert server_states(stat, {"fp_spare_http_00": "new:live"}) == {
        "app:blue": {"10.0.0.1:80": "UP", "10.0.0.3:80": "DOWN"}, "new:live": {"10.0.0.9:81": "no check"}}


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(("header", "ok"), [
    (basic("ops:secret"), True),
    ("basic " + base64.b64encode(b"ops:secret").decode(), True),
    (basic("ops:wrong"), False),
    (basic("ops:secret2"), False),
    ("Bearer " + base64.b64encode(b"ops:secret").decode(), False),
    ("Basic not-base64!", False),
    ("", False),
    (None, False),
], ids=["right", "scheme-any-case", "wrong-password", "longer", "other-scheme", "garbage", "empty", "absent"])
def test_the_dashboard_takes_the_stats_credentials_only(header: str | None, ok: bool) -> None:
    assert authorized(header, b"ops:secret") is ok


def test_last_changes_are_kept_while_enabled_newest_first_and_redacted() -> None:
    from prometheus_client.registry import CollectorRegistry

    from flowproxy import telemetry

    registry = CollectorRegistry()
    telemetry.applied("reload", True, 0.2, what="before enabling")  # not kept: no node process counts
    telemetry.enable(registry)
    try:
        telemetry.applied("unchanged", True, 0.01, what="anti-entropy found nothing")  # not a change
        telemetry.applied("incremental", True, 0.012, what="route api", kv_index=9, config="ab" * 32)
        telemetry.applied("full", False, 1.5, what="Consul refused token=0badc0de-0000-4000-8000-000000000000")
        seen = telemetry.recent()[:2]
    finally:
        telemetry.disable(registry)
    assert [(c["path"], c["ok"], c["what"]) for c in seen] == [
        ("full", False, "Consul refused token=[redacted]"), ("incremental", True, "route api")]
    assert seen[1]["kv_index"] == 9 and seen[1]["ms"] == 12.0
    assert all(c["what"] not in ("before enabling", "anti-entropy found nothing") for c in telemetry.recent())


def test_the_certificates_document_lists_rows_by_name() -> None:
    rows: dict[str, dict[str, Any]] = {"b": {"issuer": "CA", "acme": False},
                                       "a": {"issuer": None, "acme": True, "last_error": "x"}}
    doc = certificates_doc(rows)
    assert [c["name"] for c in doc["certificates"]] == ["a", "b"] and doc["certificates"][0]["last_error"] == "x"
