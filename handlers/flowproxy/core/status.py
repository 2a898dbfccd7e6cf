"""Build the JSON document a node writes to <prefix>status/<node>. Pure."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from flowproxy import __version__
from flowproxy.core.plan import Plan

# Consul refuses KV values over 512 KiB; at 10,000 routes the full document is ~940 KB.
BUDGET = 256 * 1024


def route_states(plan: Plan) -> dict[str, dict[str, Any]]:
    return {
        s.route: {"state": s.state, "variant": s.variant, "reasons": list(s.reasons),
                  "instances": s.instances, "notes": list(s.notes)}
        for s in plan.states
    }


def applied_doc(node: str, kv_index: int, config_sha256: str, bundle_sha256: str, plan: Plan) -> dict[str, Any]:
    return fit({
        "node": node,
        "version": __version__,
        "ok": True,
        "kv_index": kv_index,
        "config_sha256": config_sha256,
        "bundle_sha256": bundle_sha256,
        "routes": route_states(plan),
        "problems": [str(p) for p in plan.stray],
        "last_error": None,
    })


def fit(doc: dict[str, Any]) -> dict[str, Any]:
    """Over the budget, leave serving routes out (counted); rejected and off routes keep every detail."""
    if len(json.dumps(doc)) <= BUDGET:
        return doc
    routes = doc["routes"]
    counts = Counter(st["state"] for st in routes.values())
    kept = {name: st for name, st in routes.items() if st["state"] != "serving"}
    return doc | {"routes": kept, "serving_omitted": counts["serving"], "counts": dict(counts)}


def failed_doc(previous: dict[str, Any], node: str, error: str) -> dict[str, Any]:
    """Keep what still serves (index, hash, routes of the last good apply) and say why the new one failed."""
    base = previous or {"node": node, "version": __version__, "kv_index": 0, "config_sha256": None,
                        "bundle_sha256": None, "routes": {}, "problems": []}
    return base | {"ok": False, "last_error": error}
