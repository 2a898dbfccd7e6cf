"""What a node process counts about its own work: applies, reloads, watch events, the newest KV index seen.

Counted where the work happens (the pipeline, the warm applier), kept by prometheus-client in the node
process (`node up`, `node run`) that serves them (node/metrics.py). Off until that process calls `enable`:
a cold `flowproxy handle` (the node process down) counts nothing and pays nothing, and like every
Prometheus counter these start again at zero when the node process does.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flowproxy.redact import redact

if TYPE_CHECKING:  # imported by `enable` only: a cold handler's apply imports this module and pays nothing
    from prometheus_client import Counter, Gauge, Histogram
    from prometheus_client.registry import CollectorRegistry

# Reload reasons are free text (they name backends); their metric label is one of these few kinds.
REASONS = (
    ("first", re.compile(r"^first config")),
    ("new_backend", re.compile(r"^new backend ")),
    ("backend_gone", re.compile(r"^backend \S+ goes")),
    ("backend_settings", re.compile(r"^backend \S+: ")),
    ("section", re.compile(r"^section |^sections? ")),
    ("regex_map", re.compile(r"regex map")),
    ("map_file", re.compile(r"^new file |^maps/")),
    ("certificates", re.compile(r"certificate|crt-list")),
    ("runtime_limits", re.compile(r"runtime commands|runtime API")),
)
PATHS = ("incremental", "runtime", "reload", "unchanged", "full")
BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def reason_kind(why: str) -> str:
    return next((kind for kind, pattern in REASONS if pattern.search(why)), "other")


@dataclass
class _Metrics:
    applies: Counter
    duration: Histogram
    reloads: Counter
    events: Counter
    last_success: Gauge
    seen_index: Gauge
    registry: CollectorRegistry
    newest: int = 0  # the index seen_index shows


# The node process's metrics once enabled: one set in production. (Tests run several nodes in one process:
# each then counts every node's work.)
_enabled: list[_Metrics] = []
_lock = threading.Lock()
# The node process's last applies that changed something or failed, newest last (the dashboard's "last
# changes"): like the counters, kept only while enabled and lost with the process.
RECENT = 50
_recent: deque[dict[str, Any]] = deque(maxlen=RECENT)


def enable(registry: CollectorRegistry) -> None:
    """Count from now on, into `registry` too (the node process's metrics server's)."""
    from prometheus_client import Counter, Gauge, Histogram

    metrics = _Metrics(
        Counter("flowproxy_applies", "Applies by path (incremental, runtime, reload, unchanged; full when it "
                "failed before deploying) and result (ok, failed)", ["path", "result"], registry=registry),
        Histogram("flowproxy_apply_duration_seconds", "Seconds an apply took, from reading Consul to serving",
                  ["path"], buckets=BUCKETS, registry=registry),
        Counter("flowproxy_reloads", "HAProxy reloads this node process made, by kind of reason", ["reason"],
                registry=registry),
        Counter("flowproxy_watch_events", "Watch events the node process received, by kind", ["kind"],
                registry=registry),
        Gauge("flowproxy_last_apply_success_timestamp_seconds", "When the last apply succeeded (Unix time)",
              registry=registry),
        Gauge("flowproxy_kv_index_seen", "The newest Consul index a keyprefix watch event carried",
              registry=registry),
        registry,
    )
    for path in PATHS:
        metrics.applies.labels(path, "ok")
        metrics.applies.labels(path, "failed")
    with _lock:
        _enabled.append(metrics)


def disable(registry: CollectorRegistry) -> None:
    """Stop counting into `registry` (its server stopped)."""
    with _lock:
        _enabled[:] = [m for m in _enabled if m.registry is not registry]


def applied(path: str, ok: bool, seconds: float, *, what: str = "", kv_index: int = 0, config: str = "") -> None:
    """One apply: its path, result and duration; `what` it changed (or why it failed), at which KV index,
    to which config."""
    for metrics in list(_enabled):
        metrics.applies.labels(path, "ok" if ok else "failed").inc()
        metrics.duration.labels(path).observe(seconds)
        if ok:
            metrics.last_success.set(time.time())
    if _enabled and path != "unchanged":
        with _lock:
            # An error's text may quote a request: redacted like every log line.
            _recent.append({"time": time.time(), "path": path, "ok": ok, "what": redact(what), "kv_index": kv_index,
                            "config_sha256": config, "ms": round(seconds * 1000, 1)})


def recent() -> list[dict[str, Any]]:
    """The last applies that changed something or failed, newest first."""
    with _lock:
        return list(reversed(_recent))


def reloaded(why: str) -> None:
    for metrics in list(_enabled):
        metrics.reloads.labels(reason_kind(why)).inc()


def event(kind: str, index: int | None) -> None:
    for metrics in list(_enabled):
        metrics.events.labels(kind).inc()
        if index is not None:
            with _lock:  # events arrive on several threads; the gauge only moves forward
                if index > metrics.newest:
                    metrics.newest = index
                    metrics.seen_index.set(index)
