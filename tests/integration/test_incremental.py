"""The warm applier applies a change by itself: real watches, a real agent and HAProxy, real requests.

A flip, an activation, a new route and an instance coming and going each reach traffic through the
incremental path (its log line says so), and the periodic full converge then finds the model's render
equal to its own, byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable

import pytest

from flowproxy.backend import IdentityServer
from flowproxy.cli.demo import register_instance
from flowproxy.consul.watches import ROUTES_FILE
from flowproxy.core.render import Bundle
from flowproxy.node.supervisor import PERIODIC
from tests.harness import ProxyNode, node_spec, start_node, status_of

P = "flowproxy/"


def incremental_lines(proxy: ProxyNode) -> list[str]:
    log = proxy.settings.data_dir / "handler.log"
    return [line for line in log.read_text().splitlines() if " incrementally: " in line] if log.exists() else []


def reaches(proxy: ProxyNode, path: str, instance: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return {proxy.get(path).instance for _ in range(4)} == {instance}
        except OSError:
            return False

    return check


def test_changes_apply_incrementally_and_equal_a_full_render(proxy: ProxyNode,
                                                             instances: Callable[..., IdentityServer]) -> None:
    instances("colors", "blue-1", ("blue",))
    instances("colors", "green-1", ("green",))
    store = proxy.store()
    for color in ("blue", "green"):
        store.put(f"{P}routes/flip/{color}", json.dumps({"service": "colors", "tags": [color], "paths": ["/flip"]}))
    store.put(f"{P}routes/flip/active", "blue")
    proxy.wait(reaches(proxy, "/flip/x", "blue-1"), "the route to serve blue")
    before = len(incremental_lines(proxy))

    store.put(f"{P}routes/flip/active", "green")  # a flip: maps only
    proxy.wait(reaches(proxy, "/flip/x", "green-1"), "the flip to green")
    store.put(f"{P}routes/new/live", json.dumps({"service": "colors", "tags": ["blue"], "paths": ["/new"]}))
    store.put(f"{P}routes/new/active", "live")  # a new backend (into a spare), then its activation
    proxy.wait(reaches(proxy, "/new/x", "blue-1"), "the new route")
    instances("colors", "green-2", ("green",))  # an instance comes: servers only
    proxy.wait(lambda: _both(proxy), "green-2 to serve")

    def logged(what: str) -> bool:  # traffic can see a change a moment before its log line is written
        return any(f"applied {what} incrementally" in line for line in incremental_lines(proxy)[before:])

    for what in ("route flip", "route new", "service colors"):
        proxy.wait(lambda what=what: logged(what), f"the incremental apply of {what}")  # type: ignore[misc]

    supervisor = proxy.node.supervisor
    # The fingerprint an incremental apply records is the one a full read of Consul computes: the
    # anti-entropy check finds nothing to do (else every check would cost a full converge).
    supervisor.last_full, supervisor.last_resync = time.monotonic(), 0.0
    assert supervisor.resync_due() == ""
    applier = supervisor.applier
    assert applier is not None and applier.warm is not None
    proved = applier.warm.proved
    supervisor.apply_now(PERIODIC).join(timeout=60)
    assert (applier.warm.diverged, applier.warm.proved) == (0, proved + 1)
    proxy.wait(lambda: _both(proxy), "green-1 and green-2 after the proof")

    # A model that went wrong (here by hand): the proof finds it, says so, and the full converge takes over.
    model = applier.warm.model
    assert model is not None
    applier.warm.model = dataclasses.replace(model, bundle=Bundle({**model.bundle.files, "maps/path_beg.map": b""}))
    supervisor.apply_now(PERIODIC).join(timeout=60)
    assert applier.warm.diverged == 1
    assert applier.warm.model is not None and applier.warm.model.bundle == model.bundle
    assert "differed from a full render" in (proxy.settings.data_dir / "handler.log").read_text()
    proxy.wait(lambda: _both(proxy), "green-1 and green-2 after the full converge")


def _both(proxy: ProxyNode) -> bool:
    try:
        return {proxy.get("/flip/x").instance for _ in range(8)} == {"green-1", "green-2"}
    except OSError:
        return False


def test_routes_watched_in_shards_apply_each_change(tmp_path_factory: pytest.TempPathFactory,
                                                    backends: Callable[[str], IdentityServer]) -> None:
    """A node that splits its routes' watch (here at 1 route a watch) sees every change: one in a shard,
    a new route in a shard no route was in, a deleted route; a status write wakes none of them."""
    base = tmp_path_factory.mktemp("shards")
    server = start_node(node_spec(base / "server", "shard-server", dev=True, proxy=False))
    edge: ProxyNode | None = None
    try:
        store = server.store()
        register_instance(store, "colors", "blue-1", backends("blue-1").port)
        for name in ("a1", "a2", "b1", "b2", "c1"):
            store.put(f"{P}routes/{name}/live", json.dumps({"service": "colors", "paths": [f"/{name}"]}))
            store.put(f"{P}routes/{name}/active", "live")
        edge = start_node(node_spec(base / "edge", "shard-edge", dev=False, join=(server.serf,), watch_shard_size=1))
        edge.wait_reply("/c1/x", 200)

        def watched() -> set[str]:
            return {w["prefix"] for w in json.loads((edge.settings.watch_dir / ROUTES_FILE).read_text())["watches"]}

        # The full apply serves first and writes the watches after: wait for the file, as an operator would.
        edge.wait(lambda: {f"{P}routes/a1", f"{P}routes/b2", f"{P}routes/c", f"{P}routes/z"} <= watched(),
                  "the routes' watch split")
        assert f"{P}routes/" not in watched() and len(watched()) == 36 - 2 + 2 * 40
        store.put(f"{P}routes/a1/live", json.dumps({"service": "colors", "paths": ["/a1", "/settled"]}))
        edge.wait_reply("/settled/x", 200)  # by whichever path: the agent reload after the split re-fired all
        before = len(incremental_lines(edge))

        def applied(route: str) -> Callable[[], bool]:
            return lambda: any(f"applied route {route} incrementally" in line
                               for line in incremental_lines(edge)[before:])

        store.put(f"{P}routes/b1/live", json.dumps({"service": "colors", "paths": ["/bee"]}))
        edge.wait_reply("/bee/x", 200, timeout=5)
        edge.wait(applied("b1"), "the incremental apply of b1")
        store.put(f"{P}routes/z1/live", json.dumps({"service": "colors", "paths": ["/zed"]}))
        store.put(f"{P}routes/z1/active", "live")
        edge.wait_reply("/zed/x", 200, timeout=5)
        edge.wait(applied("z1"), "the incremental apply of z1")
        store.delete(f"{P}routes/c1/", recurse=True)
        edge.wait_reply("/c1/x", 404, timeout=5)  # before the anti-entropy check (10 s) could find it
        store.put(f"{P}routes/Bad/live", json.dumps({"service": "colors", "paths": ["/bad"]}))  # no watch has it
        edge.wait(lambda: "routes/Bad/live" in json.dumps(status_of(edge)), "the invalid name reported", timeout=40)
        assert edge.get("/a2/x").status == 200
    finally:
        if edge is not None:
            edge.stop()
        server.stop()
