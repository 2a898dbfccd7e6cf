from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from flowproxy.backend import IdentityServer
from flowproxy.cli.demo import register_instance
from tests.harness import ProxyNode, node_spec, reset, start_node


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyNode]:
    """One dev proxy node (Consul server + HAProxy) per test module."""
    node = start_node(node_spec(tmp_path_factory.mktemp("node"), "edge-1", dev=True))
    yield node
    node.stop()


@pytest.fixture
def instances(proxy: ProxyNode, backends: Callable[[str], IdentityServer]) -> Iterator[
        Callable[..., IdentityServer]]:
    """Start a real backend and register it in Consul with an HTTP check; cleaned up after the test."""
    ids: list[str] = []

    def add(service: str, name: str, tags: tuple[str, ...] = ()) -> IdentityServer:
        server = backends(name)
        register_instance(proxy.store(), service, name, server.port, tags=tags)
        ids.append(name)
        return server

    yield add
    reset(proxy, ids)


@pytest.fixture(autouse=True)
def clean_kv(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests on the shared node start from an empty route table."""
    yield
    if "proxy" in request.fixturenames:
        reset(request.getfixturevalue("proxy"), [])
