"""flowproxy's own log on a real node in JSON: one event a line with the node's name, secrets redacted,
and no INFO line while nothing happens."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from flowproxy.backend import IdentityServer
from flowproxy.cli.demo import register_instance
from tests.harness import ProxyNode, node_spec, start_node, wait_applied


@pytest.fixture(scope="module")
def json_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyNode]:
    spec = node_spec(tmp_path_factory.mktemp("jsonlog"), "logs-1", dev=True)
    node = start_node(replace(spec, settings=replace(spec.settings, log_format="json", access_log_format="json")))
    yield node
    node.stop()


def events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]  # every line is one JSON event


def test_json_events_with_the_node_name_and_quiet_at_rest(
        json_node: ProxyNode, backends: Callable[[str], IdentityServer]) -> None:
    proxy, store = json_node, json_node.store()
    register_instance(store, "site", "site-1", backends("site-1").port)
    store.put("flowproxy/routes/site/live", json.dumps({"service": "site", "paths": ["/site"]}))
    store.put("flowproxy/routes/site/active", "live")
    proxy.wait_reply("/site", 200)
    store.put("flowproxy/routes/bad/live", json.dumps({"service": "site", "paths": ["nope"]}))
    store.put("flowproxy/routes/bad/active", "live")
    wait_applied(proxy)
    log = proxy.settings.data_dir / "handler.log"
    proxy.wait(lambda: any("routes/bad/live" in e["message"] for e in events(log)), "the rejection logged")

    seen = events(log)
    assert seen and all(e["node"] == "logs-1" and e["level"] in ("DEBUG", "INFO", "WARNING", "ERROR")
                        and e["time"] and e["logger"].startswith("flowproxy") for e in seen)
    assert any(e["level"] == "INFO" and e["message"].startswith("applied ") for e in seen)
    (rejected,) = {e["message"] for e in seen if e["level"] == "WARNING" and "routes/bad/live" in e["message"]}
    assert "paths[0]" in rejected

    # At rest: the node's ticks, health checks and anti-entropy checks run, and log nothing at INFO.
    count = len(events(log))
    time.sleep(12)
    quiet = events(log)[count:]
    assert [e for e in quiet if e["level"] in ("INFO", "WARNING", "ERROR")] == []


def test_json_access_log_lines(json_node: ProxyNode, backends: Callable[[str], IdentityServer]) -> None:
    """HAProxy's access log in JSON: every line an object; a request names its route, variant and status,
    the client's plain X-Request-ID is kept and a hostile one replaced."""
    proxy, store = json_node, json_node.store()
    register_instance(store, "api", "api-1", backends("api-1").port)
    store.put("flowproxy/routes/api/blue", json.dumps({"service": "api", "paths": ["/api"]}))
    store.put("flowproxy/routes/api/active", "blue")
    proxy.wait_reply("/api/users", 200)
    for rid in ("trace-42", 'bad" route="forged'):
        request = urllib.request.Request(f"{proxy.url}/api/users", headers={"X-Request-ID": rid})
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert answer.status == 200
    log = proxy.settings.data_dir / "logs" / "haproxy.log"

    def requests() -> list[dict[str, Any]]:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("{")]
        return [doc for doc in map(json.loads, lines) if doc["type"] == "http" and doc["route"] == "api"]

    proxy.wait(lambda: len(requests()) >= 3, "three access lines for /api")
    first, kept, replaced = requests()[-3:]
    assert (first["variant"], first["status"], first["path"], first["method"]) == ("blue", 200, "/api/users", "GET")
    assert first["backend"] == "api:blue" or first["backend"].startswith("fp_spare_http_")  # added since a reload
    assert first["frontend"] == "fp_http"
    assert isinstance(first["t_total"], int) and first["termination"] == "--"
    assert kept["request_id"] == "trace-42"
    assert replaced["request_id"] != 'bad" route="forged' and len(replaced["request_id"]) == 36
