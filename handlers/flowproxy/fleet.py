"""Read and summarise the status keys every proxy node writes."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from flowproxy.consul_io import ConsulStore


def read_statuses(store: ConsulStore, prefix: str) -> dict[str, dict[str, Any]]:
    _, entries = store.read_prefix(prefix + "status/")
    docs: dict[str, dict[str, Any]] = {}
    for entry in entries:
        node = entry.key.rsplit("/", 1)[-1]
        try:
            doc = json.loads(entry.value)
        except ValueError:
            doc = {"ok": False, "last_error": "status key is not JSON"}
        docs[node] = doc if isinstance(doc, dict) else {"ok": False, "last_error": "status is not an object"}
    return docs


def fleet_report(docs: dict[str, dict[str, Any]]) -> str:
    """A table of nodes, then every rejected route with its reasons. Pure."""
    if not docs:
        return "no proxy node has reported yet (no status keys)\n"
    hashes = Counter(d.get("config_sha256") for d in docs.values())
    common = hashes.most_common(1)[0][0]
    lines = [f"{'NODE':<20} {'OK':<4} {'KV INDEX':>9}  {'CONFIG':<12} {'SAME':<5} {'UPDATED':<20} LAST ERROR"]
    for node in sorted(docs):
        d = docs[node]
        sha = str(d.get("config_sha256") or "-")[:12]
        same = "yes" if d.get("config_sha256") == common else "NO"
        lines.append(f"{node:<20} {'yes' if d.get('ok') else 'NO':<4} {d.get('kv_index', '-'):>9}  {sha:<12} "
                     f"{same:<5} {d.get('time', '-'):<20} {d.get('last_error') or ''}")
    rejected = sorted({(route, reason) for d in docs.values()
                       for route, st in (d.get("routes") or {}).items() if st.get("state") == "rejected"
                       for reason in st.get("reasons", [])})
    if rejected:
        lines += ["", "rejected routes:"] + [f"  {route}: {reason}" for route, reason in rejected]
    problems = sorted({p for d in docs.values() for p in d.get("problems") or []})
    if problems:
        lines += ["", "ignored keys:"] + [f"  {p}" for p in problems]
    return "\n".join(lines) + "\n"
