"""Long-lived connections across reloads for other routes' changes (issue #13), through a real node.

A tunnel is what a WebSocket (through an HTTP route) or a database session (a TCP route) is to HAProxy:
after a reload it stays on the old worker, which lives until the node's old-worker lifetime runs out or
it has outlived the node's cap of later reloads. Each client echoes once a second, as the issue asks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.run import free_port
from flowproxy.backend import IdentityServer
from flowproxy.demo import register_instance
from flowproxy.haproxy import HAProxySocket
from tests.harness import ProxyNode, node_spec, start_node, status_of, wait_applied

FLOWPROXY = str(Path(sys.executable).parent / "flowproxy")


class Tunnel:
    """One client connection upgraded to a tunnel (`GET /echo` with `Upgrade`), then echoing lines."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=5)
        # A WebSocket handshake: HAProxy refuses an upgrade to websocket without its key (400).
        self.sock.sendall(b"GET /echo HTTP/1.1\r\nHost: tunnel.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.reader = self.sock.makefile("rb")
        head = self.reader.readline()
        assert b" 101 " in head, head
        while self.reader.readline() not in (b"\r\n", b""):
            pass

    def echo(self, text: str) -> str:
        """The backend's answer, or '' once the proxy has closed the connection."""
        try:
            self.sock.sendall(text.encode() + b"\n")
            return self.reader.readline().decode().strip()
        except OSError:
            return ""

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@dataclasses.dataclass(frozen=True)
class Routed:
    node: ProxyNode
    tcp_port: int


@pytest.fixture
def tunnel_node(tmp_path: Path) -> Iterator[Callable[..., Routed]]:
    """A node with the given settings, an echo service, an HTTP route /echo and a TCP route to it."""
    started: list[tuple[ProxyNode, IdentityServer]] = []

    def start(**settings: Any) -> Routed:
        spec = node_spec(tmp_path / f"n{len(started)}", "tunnels", dev=True)
        # drain_wait: each reload's apply waits for old workers' connections that long (default 10 s).
        spec = dataclasses.replace(spec, settings=dataclasses.replace(spec.settings, drain_wait=1.0, **settings))
        node = start_node(spec)
        backend = IdentityServer("echo-1").start()
        started.append((node, backend))
        register_instance(node.store(), "echo", "echo-1", backend.port)
        port = free_port()
        put_route(node, "ws", {"service": "echo", "paths": ["/echo"], "timeout_tunnel": "10m"})
        put_route(node, "pg", {"service": "echo", "mode": "tcp", "port": port, "timeout_tunnel": "10m"})
        node.wait(lambda: opens(node.settings.http_bind) and opens(f"127.0.0.1:{port}"), "both routes")
        return Routed(node, port)

    yield start
    for node, backend in started:
        node.stop()
        backend.stop()


def put_route(node: ProxyNode, name: str, intent: dict[str, object]) -> None:
    node.store().put(f"{node.settings.prefix}routes/{name}/live", json.dumps(intent))
    node.store().put(f"{node.settings.prefix}routes/{name}/active", "live")


def address(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    return host, int(port)


def opens(bind: str) -> bool:
    try:
        tunnel = Tunnel(address(bind))
    except (OSError, AssertionError):
        return False
    answer = tunnel.echo("hello")
    tunnel.close()
    return answer == "echo-1 hello"


def reloads(node: ProxyNode) -> int:
    return HAProxySocket(node.settings.master_socket).show_proc_settled().reloads


def reload_for_another_route(node: ProxyNode, n: int) -> None:
    """A new route with a backend setting of its own (a spare backend cannot take it): HAProxy reloads."""
    before = reloads(node)
    put_route(node, f"other-{n}", {"service": "echo", "paths": [f"/other-{n}"], "timeout_server": "30s"})
    wait_applied(node)
    assert reloads(node) > before, "the change did not reload HAProxy"


def test_tunnels_live_on_across_reloads_for_other_routes(tunnel_node: Callable[..., Routed]) -> None:
    """The default node settings: a WebSocket and a TCP session outlive five reloads and, the bug of
    #13, the 30 s that `hard-stop-after 30s` gave them; the node reports its old workers and why it
    reloaded."""
    routed = tunnel_node()
    node = routed.node
    ws, pg = Tunnel(address(node.settings.http_bind)), Tunnel(("127.0.0.1", routed.tcp_port))
    first = time.monotonic()
    for n in range(5):
        reload_for_another_route(node, n)
        assert (ws.echo(f"ws {n}"), pg.echo(f"pg {n}")) == (f"echo-1 ws {n}", f"echo-1 pg {n}")
    report = subprocess.run([FLOWPROXY, "status"], env=os.environ | node.settings.env(), capture_output=True,
                            text=True, timeout=30, check=False).stdout
    assert "old workers: " in report and " MiB resident" in report, report
    assert status_of(node)["last_reload"]["why"] == "new backend other-4:live (settings other than servers)"
    closed = []
    while time.monotonic() - first < 35:
        time.sleep(1)
        closed += [name for name, t in (("ws", ws), ("pg", pg)) if t.echo("tick") != "echo-1 tick"]
        if closed:
            break
    assert closed == [], f"closed {time.monotonic() - first:.0f} s after the first reload"
    ws.close()
    pg.close()


@pytest.mark.parametrize(("settings", "reloads_survived", "closed_within"), [
    ({"old_worker_lifetime": "3s"}, 1, (0.0, 12.0)),
    ({"max_old_workers": 2}, 2, (0.0, 8.0)),
], ids=["lifetime", "cap"])
def test_old_workers_are_bounded_by_the_node_settings(tunnel_node: Callable[..., Routed],
                                                      settings: dict[str, Any], reloads_survived: int,
                                                      closed_within: tuple[float, float]) -> None:
    """FLOWPROXY_OLD_WORKER_LIFETIME ends an old worker (and its tunnels) that long after its reload;
    FLOWPROXY_MAX_OLD_WORKERS ends one that has outlived that many later reloads."""
    node = tunnel_node(**settings).node
    tunnel = Tunnel(address(node.settings.http_bind))
    for n in range(reloads_survived):
        reload_for_another_route(node, n)
        assert tunnel.echo(f"after {n + 1}") == f"echo-1 after {n + 1}"
    if reloads_survived > 1:  # the cap: one reload more ends the oldest worker at once
        reload_for_another_route(node, reloads_survived)
    last = time.monotonic()
    while tunnel.echo("tick") == "echo-1 tick" and time.monotonic() - last < 20:
        time.sleep(0.25)
    took = time.monotonic() - last
    assert closed_within[0] <= took <= closed_within[1], f"closed {took:.1f} s after the last reload"
    tunnel.close()
