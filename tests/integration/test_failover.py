"""Step 9: a destroyed node, restarted with no local state, or a new node, converges on identical bytes."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flowproxy.backend import IdentityServer
from flowproxy.cli.demo import register_instance
from tests.harness import ProxyNode, node_spec, start_node, wait_applied


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ProxyNode]:
    node = start_node(node_spec(tmp_path / "server", "edge-server", dev=True))
    yield node
    node.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def converged_copy(spec_dir: Path, name: str, join: str) -> tuple[ProxyNode, float]:
    started = time.monotonic()
    node = start_node(node_spec(spec_dir, name, dev=False, join=(join,)))
    node.wait_reply("/demo/hello", 200, timeout=30)
    return node, time.monotonic() - started


def test_destroyed_node_and_new_node_serve_byte_identical_config(
        server: ProxyNode, tmp_path: Path, backends: Callable[[str], IdentityServer]) -> None:
    store = server.store()
    for i in (1, 2):
        register_instance(store, "go-demo", f"go-demo-{i}", backends(f"go-demo-{i}").port)
    store.put("flowproxy/routes/go-demo/live", json.dumps({"service": "go-demo", "paths": ["/demo"]}))
    store.put("flowproxy/routes/go-demo/active", "live")
    server.wait_reply("/demo/hello", 200)

    # A node may serve a route added since its last reload from a spare backend (spares.py), so its file
    # can differ in where that backend sits; what every node renders from KV, and reports, is the same
    # config, byte for byte.
    edge, _ = converged_copy(tmp_path / "edge", "edge-2", server.serf)
    try:
        before = wait_applied(edge)
        assert before["config_sha256"] == wait_applied(server)["config_sha256"]
        edge.stop()
        shutil.rmtree(tmp_path / "edge")  # destroyed: nothing left on local disk
        edge, took = converged_copy(tmp_path / "edge", "edge-2", server.serf)
        after = wait_applied(edge)
        assert after["config_sha256"] == before["config_sha256"]
        assert after["bundle_sha256"] == before["bundle_sha256"]
        assert took < 30
        late, _ = converged_copy(tmp_path / "late", "edge-3", server.serf)
        try:
            assert wait_applied(late)["bundle_sha256"] == before["bundle_sha256"]
        finally:
            late.stop()
    finally:
        edge.stop()
