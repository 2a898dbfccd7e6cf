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

from flowproxy.backend import IdentityServer
from flowproxy.core.render import Bundle
from flowproxy.node.supervisor import PERIODIC
from tests.harness import ProxyNode

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
