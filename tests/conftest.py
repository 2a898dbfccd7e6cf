from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from flowproxy.backend import IdentityServer


@pytest.fixture
def backends() -> Iterator[Callable[[str], IdentityServer]]:
    """Start real HTTP services that answer with their own name; all stopped after the test."""
    started: list[IdentityServer] = []

    def start(name: str) -> IdentityServer:
        server = IdentityServer(name).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
