"""The fleet as Consul sees it: every node's status key and health check, and waiting for convergence."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flowproxy.consul_io import ConsulStore
from flowproxy.errors import NotConverged
from flowproxy.selfcheck import SERVICE


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


def read_statuses(store: ConsulStore, prefix: str) -> dict[str, dict[str, Any]]:
    _, entries = store.read_prefix(prefix + "status/")
    docs: dict[str, dict[str, Any]] = {}
    for entry in entries:
        try:
            doc = json.loads(entry.value)
        except ValueError:
            doc = {"ok": False, "last_error": "status key is not JSON"}
        docs[entry.key.rsplit("/", 1)[-1]] = doc if isinstance(doc, dict) else {"ok": False}
    return docs


def latest_index(store: ConsulStore, prefix: str) -> int:
    """The index of the newest write that a node's config depends on, as the nodes themselves compute it."""
    from flowproxy.apply import read_config_kv

    return read_config_kv(store, prefix)[0]


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


def fleet_report(rows: list[NodeView], docs: dict[str, dict[str, Any]], latest: int) -> str:
    """A table of nodes, then every rejected route with its reasons. Pure."""
    if not rows:
        return "no proxy node has reported yet (no status keys, no `flowproxy` service)\n"
    converged = all(r.current and r.same and r.ok for r in rows if r.health == "passing")
    lines = [f"latest write: KV index {latest}; fleet {'converged' if converged else 'NOT converged'}",
             f"{'NODE':<18} {'HEALTH':<12} {'APPLIED':>8} {'STATE':<7} {'CONFIG':<12} {'SAME':<5} "
             f"{'UPDATED':<20} ERROR"]
    for r in rows:
        state = "current" if r.current else "STALE"
        lines.append(f"{r.node:<18} {r.health:<12} {r.kv_index:>8} {state:<7} {str(r.config_sha256 or '-')[:12]:<12} "
                     f"{'yes' if r.same else 'NO':<5} {r.time:<20} {r.last_error or ''}")
    rejected = sorted({(route, reason) for d in docs.values()
                       for route, st in (d.get("routes") or {}).items() if st.get("state") == "rejected"
                       for reason in st.get("reasons", [])})
    if rejected:
        lines += ["", "rejected routes:"] + [f"  {route}: {reason}" for route, reason in rejected]
    problems = sorted({p for d in docs.values() for p in d.get("problems") or []})
    if problems:
        lines += ["", "ignored keys:"] + [f"  {p}" for p in problems]
    return "\n".join(lines) + "\n"


def behind(store: ConsulStore, prefix: str, index: int) -> tuple[list[str], list[str]]:
    """(passing nodes that have not applied `index`, with what they last reported; nodes not passing)."""
    docs = read_statuses(store, prefix)
    waiting, ignored = [], []
    for node, (status, meta) in sorted(store.service_health(SERVICE).items()):
        name = meta.get("node", node)
        doc = docs.get(name, {})
        applied = int(doc.get("kv_index") or 0)
        if status != "passing":
            ignored.append(f"{name} {status}")
        elif applied < index:
            error = f", last error: {doc['last_error']}" if doc.get("last_error") else ""
            waiting.append(f"{name} (applied {applied}{error})")
    return waiting, ignored


def wait_converged(store: ConsulStore, prefix: str, index: int, timeout: float,
                   progress: Callable[[str], None]) -> None:
    """Return when every passing proxy node has applied `index`; raise NotConverged naming the others."""
    deadline = time.monotonic() + timeout
    while True:
        waiting, ignored = behind(store, prefix, index)
        skipped = f" (not waited for, not passing: {', '.join(ignored)})" if ignored else ""
        if not waiting:
            if ignored:
                progress(f"applied by every passing node{skipped}")
            return
        if time.monotonic() >= deadline:
            raise NotConverged(f"not applied within {timeout:.0f}s (KV index {index}): {'; '.join(waiting)}{skipped}")
        progress(f"waiting for {len(waiting)} node(s) to apply KV index {index}: {', '.join(waiting)}{skipped}")
        time.sleep(0.2)
