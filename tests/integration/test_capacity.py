"""Health checks beyond HAProxy's open files, on a real node: the route that does not fit is refused by name,
with the remedy, and every other route (before and after it) applies and serves.

The node keeps room for FLOWPROXY_MIN_CONNECTIONS connections under HAProxy's real hard limit (inherited
from this process); the test sets it so that exactly a few checked servers fit, whatever the machine's
limit, rather than lowering the limit itself (which HAProxy could not raise back for the next test).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from flowproxy.backend import IdentityServer
from flowproxy.cli.demo import register_instance
from flowproxy.haproxy import capacity
from tests.harness import ProxyNode, node_spec, start_node, status_of, wait_applied

ROOM = 4  # checked servers that fit


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyNode]:
    spec = node_spec(tmp_path_factory.mktemp("tight"), "tight-1", dev=True)
    spare = capacity.hard_limit(None) - capacity.FIXED_LISTENERS - capacity.PER_THREAD * capacity.threads()
    spec = replace(spec, settings=replace(spec.settings, min_connections=(spare - ROOM) // 2))
    node = start_node(spec)
    yield node
    node.stop()


def route(proxy: ProxyNode, name: str, service: str, **fields: Any) -> None:
    proxy.store().put(f"flowproxy/routes/{name}/live", json.dumps({"service": service, "paths": [f"/{name}"],
                                                                    **fields}))
    proxy.store().put(f"flowproxy/routes/{name}/active", "live")


def state(proxy: ProxyNode, name: str) -> dict[str, Any]:
    return dict((status_of(proxy).get("routes") or {}).get(name) or {})


def test_checks_beyond_the_open_file_limit_refuse_that_route_alone(
        tight: ProxyNode, backends: Callable[[str], IdentityServer], tmp_path: Path) -> None:
    proxy, store = tight, tight.store()
    register_instance(store, "small", "small-1", backends("small-1").port)
    for i in range(ROOM + 1):
        register_instance(store, "big", f"big-{i}", backends(f"big-{i}").port)
    route(proxy, "keep", "small")
    proxy.wait_reply("/keep", 200)

    route(proxy, "big", "big")  # ROOM + 1 checked servers on top of keep's one: does not fit
    route(proxy, "late", "small")  # written after it: fits, and must not wait for it
    wait_applied(proxy)
    proxy.wait(lambda: state(proxy, "big").get("state") == "rejected", "big to be rejected")
    (reason,) = state(proxy, "big")["reasons"]
    assert reason.startswith("flowproxy/routes/big/live: node capacity: ")
    assert "LimitNOFILE" in reason and '"check": false' in reason
    assert proxy.wait_reply("/late", 200).instance == "small-1"
    assert proxy.get("/keep").instance == "small-1"
    assert proxy.get("/big").status == 404
    assert reason in (proxy.settings.data_dir / "handler.log").read_text()

    # The remedy the reason names: the route trusts Consul's checks; it then fits and serves.
    route(proxy, "big", "big", check=False)
    assert proxy.wait_reply("/big", 200).instance.startswith("big-")
    assert state(proxy, "big").get("state") == "serving"
    assert proxy.get("/late").instance == "small-1"
