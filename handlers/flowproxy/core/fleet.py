"""The fleet as its status keys and health checks describe it: a row per node, and whether it converged.
Pure."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from flowproxy.errors import NotConverged, RejectedByNode


@dataclass(frozen=True)
class NodeView:
    node: str
    health: str  # passing | warning | critical | unregistered
    kv_index: int
    config_sha256: str | None
    ok: bool
    last_error: str | None
    time: str
    current: bool  # has applied the latest routes/templates write
    same: bool  # config equal to most nodes'


def fleet_view(docs: dict[str, dict[str, Any]], health: dict[str, tuple[str, dict[str, str]]],
               latest: int) -> list[NodeView]:
    """Pure: one row per node known from a status key or from the catalog."""
    names = sorted(set(docs) | {meta.get("node", n) for n, (_, meta) in health.items()})
    by_node = {meta.get("node", n): status for n, (status, meta) in health.items()}
    hashes = Counter(d.get("config_sha256") for d in docs.values() if d.get("config_sha256"))
    common = hashes.most_common(1)[0][0] if hashes else None
    rows = []
    for name in names:
        d = docs.get(name, {})
        rows.append(NodeView(
            node=name, health=by_node.get(name, "unregistered"), kv_index=int(d.get("kv_index") or 0),
            config_sha256=d.get("config_sha256"), ok=bool(d.get("ok")), last_error=d.get("last_error"),
            time=str(d.get("time", "-")), current=int(d.get("kv_index") or 0) >= latest,
            same=d.get("config_sha256") == common))
    return rows


def fleet_exit_code(rows: list[NodeView], docs: dict[str, dict[str, Any]]) -> int:
    """7 when a node is stale, critical, failing or differs (or none reported), 9 when a route is rejected."""
    if not rows or any(not (r.current and r.same and r.ok) or r.health not in ("passing", "maintenance")
                       for r in rows):
        return NotConverged.exit_code
    if any(st.get("state") == "rejected" for d in docs.values() for st in (d.get("routes") or {}).values()):
        return RejectedByNode.exit_code
    return 0
