"""ports: a TCP route whose new port another program holds is refused alone, with real sockets."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowproxy.core.kv import desired_from_kv
from flowproxy.core.model import KVEntry
from flowproxy.core.plan import Plan, make_plan
from flowproxy.haproxy import ports

P = "flowproxy/"


@pytest.fixture
def held() -> Iterator[int]:
    """A port another program listens on."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield int(listener.getsockname()[1])


def free() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tcp_plan(port: int) -> Plan:
    entries = [KVEntry(f"{P}routes/db/live", json.dumps({"service": "db", "mode": "tcp", "port": port}).encode()),
               KVEntry(f"{P}routes/db/active", b"live", 3, 3),
               KVEntry(f"{P}routes/web/live", json.dumps({"service": "web", "paths": ["/"]}).encode()),
               KVEntry(f"{P}routes/web/active", b"live", 4, 4)]
    return make_plan(desired_from_kv(P, entries), {})


def test_a_held_new_port_refuses_its_route_with_the_key_and_port(held: int, tmp_path: Path) -> None:
    reasons = ports.refused(tcp_plan(held), "127.0.0.1", tmp_path / "no-config-yet.cfg")
    assert reasons == {"db:live": f"flowproxy/routes/db/live: port {held} on 127.0.0.1 is held by another "
                                  "program; the route is served once the port is free"}


def test_a_port_the_running_config_listens_on_is_not_tried(held: int, tmp_path: Path) -> None:
    (tmp_path / "haproxy.cfg").write_text(f"frontend fp_tcp_{held}\n    mode tcp\n")
    assert ports.refused(tcp_plan(held), "127.0.0.1", tmp_path / "haproxy.cfg") == {}


def test_a_free_port_passes_and_is_reported_freed(tmp_path: Path) -> None:
    port = free()
    assert ports.refused(tcp_plan(port), "127.0.0.1", tmp_path / "haproxy.cfg") == {}
    assert ports.freed("127.0.0.1", [port]) == [port]


def test_a_held_port_is_not_freed_until_its_holder_closes() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = int(listener.getsockname()[1])
        assert ports.freed("127.0.0.1", [port]) == []
    assert ports.freed("127.0.0.1", [port]) == [port]


@pytest.mark.parametrize(("text", "expected"), [
    ("frontend fp_tcp_5432\n    mode tcp\n", {5432}),
    ("frontend fp_http\nfrontend fp_tcp_1\nfrontend fp_tcp_65535\n", {1, 65535}),
    ("    # frontend fp_tcp_80 in a comment\n", set()),
], ids=["one", "several", "not-a-section"])
def test_listening_reads_the_running_config(tmp_path: Path, text: str, expected: set[int]) -> None:
    (tmp_path / "haproxy.cfg").write_text(text)
    assert ports.listening(tmp_path / "haproxy.cfg") == expected


def test_listening_without_a_config_is_empty(tmp_path: Path) -> None:
    assert ports.listening(tmp_path / "missing.cfg") == set()
