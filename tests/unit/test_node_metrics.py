"""flowproxy's own metrics: names, types and values from the node's last status (HAProxy not running)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from flowproxy import runstate
from flowproxy.node.metrics import NodeCollector
from flowproxy.settings import Settings


def test_metrics_come_from_the_last_status_and_say_when_haproxy_is_down(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path).checked()
    runstate.save(settings.run_dir, runstate.LAST_STATUS, {
        "ok": True, "kv_index": 42, "last_reload": {"why": "new backend pg:live (settings other than servers)",
                                                    "kv_index": 40, "time": "2026-11-30T09:00:00Z"}})
    registry = CollectorRegistry()
    registry.register(NodeCollector(settings))
    text = generate_latest(registry).decode()
    assert "# TYPE flowproxy_haproxy_up gauge\nflowproxy_haproxy_up 0.0\n" in text
    assert "flowproxy_applied_kv_index 42.0\n" in text and "flowproxy_last_apply_ok 1.0\n" in text
    assert ('flowproxy_last_reload_info{kv_index="40",why="new backend pg:live (settings other than servers)"} 1.0'
            in text)
    assert "flowproxy_old_workers" not in text  # unknown while HAProxy is down: absent, never a made-up 0
