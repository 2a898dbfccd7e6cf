"""Routing precedence through a real HAProxy: the map-based table picks the most specific route."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.parts import free_port
from flowproxy.backend import IdentityServer
from flowproxy.core.kv import desired_from_kv
from flowproxy.core.model import Instance, KVEntry
from flowproxy.core.plan import make_plan
from flowproxy.core.render import Templates, render
from flowproxy.probe import fetch
from flowproxy.settings import REPO_TEMPLATES
from tests.harness import serve_bundle
from tests.scenarios import PRECEDENCE, PRECEDENCE_EXPECT, P, routes


@pytest.fixture(scope="module")
def proxy_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    servers = {route: IdentityServer(route).start() for route in PRECEDENCE}
    health = {str(intent["service"]): [Instance("127.0.0.1", servers[route].port)]
              for route, intent in PRECEDENCE.items()}
    desired = desired_from_kv(P, routes(PRECEDENCE))
    bundle, plan = render(make_plan(desired, health), Templates(REPO_TEMPLATES))
    assert all(s.state == "serving" for s in plan.states)
    node, url = serve_bundle(Path(tmp_path_factory.mktemp("routing")), bundle)
    yield url
    node.stop()
    for server in servers.values():
        server.stop()


@pytest.mark.parametrize(("host", "path", "route"), [c[1:] for c in PRECEDENCE_EXPECT],
                         ids=[c[0] for c in PRECEDENCE_EXPECT])
def test_most_specific_route_answers(proxy_url: str, host: str, path: str, route: str | None) -> None:
    reply = fetch(proxy_url + path, host)
    if route is None:
        assert reply.status == 404 and "no route" in reply.body
    else:
        assert (reply.status, reply.instance) == (200, route)


def test_backend_without_instances_answers_503(tmp_path: Path, backends: Callable[[str], IdentityServer]) -> None:
    desired = desired_from_kv(P, routes({"empty": {"service": "nobody", "paths": ["/e"]}}))
    bundle, _ = render(make_plan(desired, {}), Templates(REPO_TEMPLATES))
    node, url = serve_bundle(tmp_path, bundle)
    try:
        assert fetch(url + "/e").status == 503
        assert fetch(url + "/other").status == 404
    finally:
        node.stop()


def test_preview_listener_selects_any_variant_and_public_never_does(
        tmp_path: Path, backends: Callable[[str], IdentityServer]) -> None:
    blue, green = backends("blue-1"), backends("green-1")
    entries = [
        KVEntry(f"{P}routes/go-demo/blue", b'{"service": "go-demo", "tags": ["blue"], "paths": ["/demo"]}', 1, 1),
        KVEntry(f"{P}routes/go-demo/green", b'{"service": "go-demo", "tags": ["green"], "paths": ["/demo"]}', 2, 2),
        KVEntry(f"{P}routes/go-demo/active", b"blue", 3, 3),
    ]
    health = {"go-demo": [Instance("127.0.0.1", blue.port, tags=("blue",)),
                          Instance("127.0.0.1", green.port, tags=("green",))]}
    bundle, _ = render(make_plan(desired_from_kv(P, entries), health), Templates(REPO_TEMPLATES))
    preview_port = free_port()
    node, url = serve_bundle(tmp_path, bundle, preview=f"127.0.0.1:{preview_port}")
    preview = f"http://127.0.0.1:{preview_port}"
    try:
        assert fetch(preview + "/demo/x", variant="green").instance == "green-1"
        assert fetch(preview + "/demo/x", variant="blue").instance == "blue-1"
        assert fetch(preview + "/demo/x").instance == "blue-1"  # no header: like the public listener
        assert fetch(preview + "/demo/x", variant="purple").status == 404  # never a silent fallback
        assert fetch(url + "/demo/x", variant="green").instance == "blue-1"  # the public listener ignores it
        assert all(fetch(url + "/demo/x", variant="green").instance == "blue-1" for _ in range(20))
    finally:
        node.stop()
