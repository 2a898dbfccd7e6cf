"""The dashboard's JSON documents (`/api/routes`, `/api/nodes`, `/api/changes`), built from values. Pure.

What each document holds is part of the README ("Dashboard"); later versions only add fields. Every string
in them may come from KV (names, reasons quoting values): the page shows them as text, never as markup.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from flowproxy.core.fleet import NodeView
from flowproxy.core.model import Desired, Instance, Route, Variant
from flowproxy.core.plan import backend_name

# Instances with their worst Consul check status: service -> [(instance, passing|warning|critical|maintenance)]
Instances = Mapping[str, Sequence[tuple[Instance, str]]]
# HAProxy's view: route backend -> {address:port -> UP, DOWN, MAINT, no check, ...}
ServerStates = Mapping[str, Mapping[str, str]]


def routes_doc(node: str, desired: Desired, last: Mapping[str, Any], instances: Instances, *,
               servers: ServerStates | None, counts: Mapping[str, Mapping[str, int | str]] | None) -> dict[str, Any]:
    """Every route under the prefix, as this node sees it: its state (from the node's last apply), its
    variants and their instances (Consul's health beside HAProxy's), and its traffic on this node.
    `servers` and `counts` are None when HAProxy does not answer."""
    found = last.get("routes")
    states: Mapping[str, Any] = found if isinstance(found, dict) else {}
    omitted = bool(last.get("serving_omitted"))  # a large table's status lists only the routes not serving
    return {
        "node": node,
        "kv_index": desired.index,
        "applied_kv_index": int(last.get("kv_index") or 0),
        "config_sha256": last.get("config_sha256"),
        "ok": bool(last.get("ok")),
        "last_error": last.get("last_error"),
        "haproxy": servers is not None,
        "routes": [route_doc(r, state_of(r, states, omitted), instances, servers or {}, (counts or {}).get(r.name))
                   for r in sorted(desired.routes, key=lambda r: r.name)],
        "problems": [str(p) for p in desired.stray],
    }


def state_of(route: Route, states: Mapping[str, Any], omitted: bool) -> Mapping[str, Any]:
    found = states.get(route.name)
    if isinstance(found, dict):
        return found
    if omitted and route.serving_intent() is not None:
        return {"state": "serving", "variant": route.active}
    return {"state": "pending"}  # written after the node's last apply


def route_doc(route: Route, state: Mapping[str, Any], instances: Instances, servers: ServerStates,
              counts: Mapping[str, int | str] | None) -> dict[str, Any]:
    weights = dict(route.weights)
    return {
        "route": route.name,
        "state": str(state.get("state", "pending")),
        "active": route.active,
        "reasons": [str(r) for r in state.get("reasons") or []] + [str(p) for p in route.problems],
        "notes": [str(n) for n in state.get("notes") or []],
        "traffic": dict(counts) if counts is not None else None,
        "variants": [variant_doc(route, v, weights, instances, servers) for v in route.variants],
    }


def role(route: Route, variant: Variant, weights: Mapping[str, int]) -> str:
    """serving, canary (with a weight), staged (valid, reachable by preview), or invalid."""
    if variant.intent is None:
        return "invalid"
    if weights:
        return "canary" if variant.name in weights else "staged"
    return "serving" if variant.name == route.active else "staged"


def variant_doc(route: Route, variant: Variant, weights: Mapping[str, int], instances: Instances,
                servers: ServerStates) -> dict[str, Any]:
    intent = variant.intent
    out: dict[str, Any] = {"variant": variant.name, "key": variant.key, "role": role(route, variant, weights),
                           "weight": weights.get(variant.name), "problems": [str(p) for p in variant.problems]}
    if intent is None:
        return out
    states = servers.get(backend_name(route.name, variant.name), {})
    chosen = [(i, status) for i, status in instances.get(intent.service, ())
              if set(intent.tags) <= set(i.tags)]
    return out | {
        "service": intent.service, "tags": list(intent.tags), "mode": intent.mode, "paths": list(intent.paths),
        "domains": list(intent.domains), "port": intent.port,
        "instances": [{"id": i.service_id, "address": f"{i.address}:{i.port}", "node": i.node, "consul": status,
                       "haproxy": states.get(f"{i.address}:{i.port}")}
                      for i, status in sorted(chosen, key=lambda c: (c[0].service_id, c[0].address, c[0].port))],
    }


def nodes_doc(latest: int, rows: Sequence[NodeView], converged: bool) -> dict[str, Any]:
    """Every proxy node (fleet rows, as `flowproxy status` shows them) and whether the fleet converged."""
    return {"latest_index": latest, "converged": converged, "nodes": [dataclasses.asdict(r) for r in rows]}


def certificates_doc(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Every certificate in KV (what `flowproxy status` lists), by name."""
    return {"certificates": [{"name": name, **row} for name, row in sorted(rows.items())]}


def changes_doc(node: str, changes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """This node's last applies that changed something or failed, newest first."""
    return {"node": node, "changes": [dict(c) for c in changes]}
