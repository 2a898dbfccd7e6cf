"""The fleet as Consul sees it: every node's status key and health check, and waiting for convergence."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flowproxy.consul.reads import read_statuses
from flowproxy.consul.store import ConsulStore
from flowproxy.core.fleet import NodeView, fleet_exit_code
from flowproxy.errors import NotConverged, RejectedByNode
from flowproxy.node.selfcheck import SERVICE


def fleet_report(rows: list[NodeView], docs: dict[str, dict[str, Any]], latest: int) -> str:
    """A table of nodes, then every rejected route with its reasons. Pure."""
    if not rows:
        return "no proxy node has reported yet (no status keys, no `flowproxy` service)\n"
    converged = fleet_exit_code(rows, {}) == 0
    lines = [f"latest write: KV index {latest}; fleet {'converged' if converged else 'NOT converged'}",
             f"{'NODE':<18} {'HEALTH':<12} {'APPLIED':>8} {'STATE':<7} {'CONFIG':<12} {'SAME':<5} "
             f"{'UPDATED':<20} ERROR"]
    for r in rows:
        state = "current" if r.current else "STALE"
        lines.append(f"{r.node:<18} {r.health:<12} {r.kv_index:>8} {state:<7} {str(r.config_sha256 or '-')[:12]:<12} "
                     f"{'yes' if r.same else 'NO':<5} {r.time:<20} {r.last_error or ''}")
    reloads = [(r.node, last) for r in rows if isinstance(last := docs.get(r.node, {}).get("last_reload"), dict)]
    if reloads:
        lines += ["", "last HAProxy reload (every other change went through the runtime API):"]
        lines += [f"  {node}: KV index {last.get('kv_index')} at {last.get('time')}: {last.get('why')}"
                  for node, last in reloads]
    rejected = sorted({(route, reason) for d in docs.values()
                       for route, st in (d.get("routes") or {}).items() if st.get("state") == "rejected"
                       for reason in st.get("reasons", [])})
    if rejected:
        lines += ["", "rejected routes:"] + [f"  {route}: {reason}" for route, reason in rejected]
    notes = sorted({(route, note) for d in docs.values() for route, st in (d.get("routes") or {}).items()
                    for note in st.get("notes") or []})
    if notes:
        lines += ["", "notes:"] + [f"  {route}: {note}" for route, note in notes]
    problems = sorted({p for d in docs.values() for p in d.get("problems") or []})
    if problems:
        lines += ["", "ignored keys:"] + [f"  {p}" for p in problems]
    return "\n".join(lines) + "\n"


def certificates_report(rows: dict[str, dict[str, Any]]) -> str:
    """A line per certificate: issuer, expiry and, for ACME's, the last error and next attempt. Pure."""
    if not rows:
        return ""
    lines = ["certificates:", f"  {'NAME':<40} {'ISSUER':<32} {'EXPIRES':<20} ACME"]
    for name, row in rows.items():
        acme = "-"
        if row.get("acme"):
            acme = "ok" if not row.get("last_error") else (
                f"{row['last_error']} ({row.get('failures', 0)} failed; next {row.get('next_attempt') or '-'})")
        lines.append(f"  {name:<40} {str(row.get('issuer') or '-')[:32]:<32} {row.get('not_after') or '-'!s:<20} "
                     f"{acme}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class WaitPolicy:
    """Which nodes `--wait` waits for. Passing and warning nodes must apply; so must critical ones (a
    node's check is critical while its HAProxy is down or its last apply failed, which is exactly when a
    deploy must not be told "done"), unless `ignore_critical`; nodes in maintenance (`consul maint`) are
    left out and named; nodes with a status key but no catalog entry are gone and named. Fewer than
    `min_nodes` nodes to wait for is a failure: with no node at all nothing was applied anywhere."""

    min_nodes: int = 1
    ignore_critical: bool = False


@dataclass(frozen=True)
class Verdict:
    applied: list[str]
    waiting: list[str]  # must apply, have not (yet): "name (applied N, last error ...)"
    skipped: list[str]  # not waited for, with why
    rejected: list[str]  # "name: reason" for the written route


def judge(members: dict[str, str], docs: dict[str, dict[str, Any]], index: int, policy: WaitPolicy,
          route: str | None = None) -> Verdict:
    """Pure: where a write stands on every node. `members`: node name -> health from the catalog."""
    applied, waiting, skipped, rejected = [], [], [], []
    for name, health in sorted(members.items()):
        doc = docs.get(name, {})
        if health == "maintenance" or (health == "critical" and policy.ignore_critical):
            skipped.append(f"{name} ({health})")
            continue
        done = int(doc.get("kv_index") or 0)
        if done < index:
            error = f", last error: {doc['last_error']}" if doc.get("last_error") else ""
            never = " (never reported)" if not doc else f" (applied {done}{error})"
            waiting.append(f"{name}{never}" + (f", {health}" if health != "passing" else ""))
            continue
        applied.append(name)
        state = (doc.get("routes") or {}).get(route or "") or {}
        if route and state.get("state") == "rejected":
            rejected += [f"{name}: {reason}" for reason in state.get("reasons") or ["rejected"]]
    skipped += [f"{name} (gone: a status key, no catalog entry)" for name in sorted(set(docs) - set(members))]
    return Verdict(applied, waiting, skipped, rejected)


def members(store: ConsulStore) -> dict[str, str]:
    """Every registered proxy node by name, with its health (passing, warning, critical, maintenance)."""
    return {meta.get("node", node): status for node, (status, meta) in store.service_health(SERVICE).items()}


def wait_converged(store: ConsulStore, prefix: str, index: int, timeout: float, progress: Callable[[str], None], *,
                   policy: WaitPolicy = WaitPolicy(), route: str | None = None) -> str:
    """Return a summary once every node the policy names has applied `index`; raise NotConverged naming
    the others, or RejectedByNode once every node has answered (or time is up) and any rejected `route`."""
    deadline = time.monotonic() + timeout
    while True:
        verdict = judge(members(store), read_statuses(store, prefix), index, policy, route)
        skipped = f"; not waited for: {', '.join(verdict.skipped)}" if verdict.skipped else ""
        out_of_time = time.monotonic() >= deadline
        if verdict.rejected and (out_of_time or not verdict.waiting):
            # Every node's verdict, not the first one's: nodes can disagree (their local templates differ).
            pending = f"; not applied yet: {', '.join(verdict.waiting)}" if verdict.waiting else ""
            raise RejectedByNode(f"applied, but rejected: {'; '.join(verdict.rejected)}{pending}{skipped}")
        enough = len(verdict.applied) >= policy.min_nodes
        if not verdict.waiting and enough:
            return f"{len(verdict.applied)} proxy node(s) applied KV index {index}{skipped}"
        if out_of_time:
            if verdict.waiting:
                raise NotConverged(f"not applied within {timeout:.0f}s (KV index {index}): "
                                   f"{'; '.join(verdict.waiting)}{skipped}")
            raise NotConverged(f"{len(verdict.applied)} proxy node(s) applied KV index {index}, fewer than "
                               f"--min-nodes {policy.min_nodes}: no node registered as service `{SERVICE}` "
                               f"to wait for{skipped}")
        progress(f"waiting for {len(verdict.waiting)} node(s) to apply KV index {index}: "
                 f"{', '.join(verdict.waiting) or 'none registered yet'}{skipped}")
        time.sleep(0.2)
