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
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.parts import free_port
from flowproxy.backend import IdentityServer
from flowproxy.cli.demo import register_instance
from flowproxy.consul.registrations import Check, Registration
from flowproxy.consul.store import ConsulStore
from flowproxy.haproxy.master import HAProxySocket, old_workers
from tests.harness import ProxyNode, node_spec, self_signed, start_node, status_of, wait_applied

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
    #13, the 30 s that `hard-stop-after 30s` gave them. A new WebSocket after each reload keeps each
    worker alive, so five old workers pile up: the node counts them and their memory (from /proc)."""
    routed = tunnel_node()
    node = routed.node
    ws, pg = Tunnel(address(node.settings.http_bind)), Tunnel(("127.0.0.1", routed.tcp_port))
    later = []
    first = time.monotonic()
    for n in range(5):
        reload_for_another_route(node, n)
        assert (ws.echo(f"ws {n}"), pg.echo(f"pg {n}")) == (f"echo-1 ws {n}", f"echo-1 pg {n}")
        later.append(Tunnel(address(node.settings.http_bind)))  # held by the worker of this config
    old = old_workers(HAProxySocket(node.settings.master_socket).show_proc_settled())
    assert len(old.pids) == 5 and old.rss_kib > 5 * 1024  # a few MiB each, even for a tiny config
    report = subprocess.run([FLOWPROXY, "status"], env=os.environ | node.settings.env(), capture_output=True,
                            text=True, timeout=30, check=False).stdout
    assert "old workers: 5, " in report and " MiB resident" in report, report
    print(f"\n5 old workers, {old.rss_kib / 1024:.0f} MiB resident in all")
    assert status_of(node)["last_reload"]["why"] == "new backend other-4:live (settings other than servers)"
    closed = []
    while time.monotonic() - first < 35:
        time.sleep(1)
        tunnels = [("ws", ws), ("pg", pg)] + [(f"later-{i}", t) for i, t in enumerate(later)]
        closed += [name for name, t in tunnels if not t.echo("tick").endswith(" tick")]
        if closed:
            break
    assert closed == [], f"{closed} closed {time.monotonic() - first:.0f} s after the first reload"
    for tunnel in [ws, pg, *later]:
        tunnel.close()


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


class TlsEcho:
    """A TLS server that echoes lines (its certificate is `pem`'s): what an SNI passthrough route carries."""

    def __init__(self, pem: Path) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(pem)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.stop = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self.echo, args=(conn,), daemon=True).start()

    def echo(self, conn: socket.socket) -> None:
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls, tls.makefile("rwb") as stream:
                while line := stream.readline():
                    stream.write(b"tls-1 " + line)
                    stream.flush()
        except OSError:
            pass  # HAProxy's TCP checks connect and leave
        finally:
            conn.close()


class TlsTunnel(Tunnel):
    """A client of an SNI passthrough route: TLS to the backend itself, through the proxy."""

    def __init__(self, address: tuple[str, int], name: str) -> None:
        raw = socket.create_connection(address, timeout=5)
        self.sock = ssl._create_unverified_context().wrap_socket(raw, server_hostname=name)
        self.reader = self.sock.makefile("rb")


class Echoes:
    """Each tunnel echoes once a second in a thread of its own; what failed, and when, is kept."""

    def __init__(self, tunnels: dict[str, Tunnel]) -> None:
        self.tunnels, self.failed, self.sent = tunnels, dict[str, str](), 0
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(n,), daemon=True) for n in tunnels]
        for thread in self.threads:
            thread.start()

    def run(self, name: str) -> None:
        while not self.done.wait(1.0) and name not in self.failed:
            answer = self.tunnels[name].echo("tick")
            self.sent += 1
            if not answer.endswith(" tick"):
                self.failed[name] = f"closed at {time.strftime('%H:%M:%S')} (answer {answer!r})"

    def stop(self) -> dict[str, str]:
        self.done.set()
        for thread in self.threads:
            thread.join()
        return self.failed


def sni_opens(address: tuple[str, int]) -> bool:
    try:
        tunnel = TlsTunnel(address, "t.example.test")
    except OSError:
        return False
    answer = tunnel.echo("hi")
    tunnel.close()
    return answer == "tls-1 hi"


def test_tunnels_stay_open_across_fifty_changes_of_other_routes(tmp_path: Path) -> None:
    """A WebSocket, a TCP session and an SNI passthrough stay open, echoing once a second, while 50 changes
    of other routes land: new routes, removals, flips, canary start and end, certificates added and
    removed, and one custom-template change, the only one that has to reload HAProxy."""
    pems = {name: self_signed(tmp_path, name) for name in ("a", "b", "c", "t")}
    node = start_node(node_spec(tmp_path / "node", "mixed", dev=True, edge=True))
    echo, tls = IdentityServer("echo-1").start(), TlsEcho(tmp_path / "t.pem")
    blue, green = IdentityServer("blue-1").start(), IdentityServer("green-1").start()
    store, p = node.store(), node.settings.prefix
    try:
        register_instance(store, "echo", "echo-1", echo.port)
        register_instance(store, "app", "blue-1", blue.port, tags=("blue",))
        register_instance(store, "app", "green-1", green.port, tags=("green",))
        store.register_service(Registration("tlsecho", "tls-1", "127.0.0.1", tls.port,
                                            check=Check(tcp=f"127.0.0.1:{tls.port}")))
        store.put(f"{p}certs/a", pems["a"])
        port = free_port()
        put_route(node, "ws", {"service": "echo", "paths": ["/echo"], "timeout_tunnel": "10m"})
        put_route(node, "pg", {"service": "echo", "mode": "tcp", "port": port, "timeout_tunnel": "10m"})
        put_route(node, "vault", {"service": "tlsecho", "mode": "sni", "domains": ["t.example.test"],
                                  "timeout_tunnel": "10m"})
        for color in ("blue", "green"):
            store.put(f"{p}routes/flip/{color}", json.dumps({"service": "app", "tags": [color], "paths": ["/flip"]}))
        store.put(f"{p}routes/flip/active", "blue")
        sni = address(str(node.settings.sni_bind))
        node.wait(lambda: opens(node.settings.http_bind) and opens(f"127.0.0.1:{port}"), "the tunnel routes")
        node.wait(lambda: sni_opens(sni), "the SNI route")
        wait_applied(node)
        tunnels = {"websocket": Tunnel(address(node.settings.http_bind)), "tcp": Tunnel(("127.0.0.1", port)),
                   "sni": TlsTunnel(sni, "t.example.test")}
        before = reloads(node)
        echoes = Echoes(tunnels)
        for n, change in enumerate(CHANGES):
            change(store, p, n, pems)
            wait_applied(node)
            time.sleep(0.2)
        failed = echoes.stop()
        reloaded = reloads(node) - before
        print(f"\n{len(CHANGES)} changes, {reloaded} reload(s), {echoes.sent} echoes")
        assert failed == {}, failed
        assert echoes.sent >= 3 * 10
        assert reloaded <= 2, f"{reloaded} reloads; the last: {status_of(node).get('last_reload')}"
        for tunnel in tunnels.values():
            tunnel.close()
    finally:
        node.stop()
        for server in (echo, blue, green):
            server.stop()
        tls.stop.set()


def new_route(store: ConsulStore, p: str, n: int, pems: dict[str, bytes]) -> None:
    store.put(f"{p}routes/new-{n}/live", json.dumps({"service": "app", "paths": [f"/new-{n}"]}))
    store.put(f"{p}routes/new-{n}/active", "live")


def remove_route(store: ConsulStore, p: str, n: int, pems: dict[str, bytes]) -> None:
    store.delete(f"{p}routes/new-{n - 1}", recurse=True)


def flip(store: ConsulStore, p: str, n: int, pems: dict[str, bytes]) -> None:
    store.put(f"{p}routes/flip/active", "green" if n % 4 < 2 else "blue")


def canary_start(store: ConsulStore, p: str, n: int, pems: dict[str, bytes]) -> None:
    store.put(f"{p}routes/flip/active", "blue=90,green=10")


def canary_end(store: ConsulStore, p: str, n: int, pems: dict[str, bytes]) -> None:
    store.put(f"{p}routes/flip/active", "green")


def cert_add(store: ConsulStore, p: str, n: int, pems: dict[str, bytes]) -> None:
    store.put(f"{p}certs/{'bc'[n % 2]}", pems["bc"[n % 2]])


def cert_remove(store: ConsulStore, p: str, n: int, pems: dict[str, bytes]) -> None:
    store.delete(f"{p}certs/{'bc'[(n - 1) % 2]}")


def custom_template(store: ConsulStore, p: str, n: int, pems: dict[str, bytes]) -> None:
    """A route with its own template: a backend section of its own, which only a reload can add."""
    store.put(f"{p}templates/tagged", "backend {{ backend.name }}\n    http-response set-header X-Tagged yes\n"
              "{% for s in backend.servers %}    server {{ s.name }} {{ s.endpoint }}\n{% endfor %}")
    store.put(f"{p}routes/tagged/live", json.dumps({"service": "app", "paths": ["/tagged"], "template": "tagged"}))
    store.put(f"{p}routes/tagged/active", "live")


# Rounds of eight kinds of change, and once, between them, the template change that must reload.
ROUND = [new_route, flip, canary_start, canary_end, cert_add, remove_route, flip, cert_remove]
CHANGES = [*ROUND * 3, custom_template, *ROUND * 4][:50]


def test_a_hundred_runtime_changes_then_a_reload_change_nothing_for_clients(
        tunnel_node: Callable[..., Routed]) -> None:
    """The files always say what runs: after 100 changes made through the runtime API alone (new routes,
    removals, flips, canary start and end, instances), a reload of those files, and then a reload of a
    fresh render for another route's sake, every route answers as before."""
    node = tunnel_node().node
    store, p = node.store(), node.settings.prefix
    servers = [IdentityServer(name).start() for name in ("blue-1", "green-1", "extra-1")]
    try:
        register_instance(store, "app", "blue-1", servers[0].port, tags=("blue",))
        register_instance(store, "app", "green-1", servers[1].port, tags=("green",))
        for color in ("blue", "green"):
            store.put(f"{p}routes/flip/{color}", json.dumps({"service": "app", "tags": [color], "paths": ["/flip"]}))
        store.put(f"{p}routes/flip/active", "blue")
        wait_applied(node)
        before = reloads(node)
        for n in range(100):
            RUNTIME_ONLY[n % len(RUNTIME_ONLY)](store, p, n, servers[2].port)
            wait_applied(node)
        assert reloads(node) == before, status_of(node).get("last_reload")
        paths = ["/flip", "/echo-none", *(f"/new-{n}" for n in range(0, 100, 5))]
        node.wait(lambda: answers(node, paths) == answers(node, paths), "answers to settle")
        seen = answers(node, paths)
        assert seen["/flip"] == (200, ("green-1",)) and seen["/new-95"] == (200, ("blue-1",))
        HAProxySocket(node.settings.master_socket).reload()
        assert answers(node, paths) == seen
        custom_template(store, p, 0, {})  # a change only a reload can make: the fresh render loads
        node.wait_reply("/tagged", 200)
        assert reloads(node) == before + 2 and answers(node, paths) == seen
    finally:
        for server in servers:
            server.stop()


def answers(node: ProxyNode, paths: list[str]) -> dict[str, tuple[int, tuple[str, ...]]]:
    """Per path: the status and the instances that answered four requests."""
    out = {}
    for path in paths:
        replies = [node.get(path) for _ in range(4)]
        out[path] = (replies[0].status, tuple(sorted({r.instance for r in replies if r.instance})))
    return out


def rt_new(store: ConsulStore, p: str, n: int, extra: int) -> None:
    store.put(f"{p}routes/new-{n}/live", json.dumps({"service": "app", "tags": ["blue"], "paths": [f"/new-{n}"]}))
    store.put(f"{p}routes/new-{n}/active", "live")


def rt_flip(store: ConsulStore, p: str, n: int, extra: int) -> None:
    store.put(f"{p}routes/flip/active", "green" if n % 10 < 5 else "blue")


def rt_canary(store: ConsulStore, p: str, n: int, extra: int) -> None:
    store.put(f"{p}routes/flip/active", "blue=50,green=50" if n % 10 < 5 else "green")


def rt_instance(store: ConsulStore, p: str, n: int, extra: int) -> None:
    if n % 10 < 5:
        register_instance(store, "app", "extra-1", extra, tags=("green",))
    else:
        store.deregister_service("extra-1")


def rt_remove(store: ConsulStore, p: str, n: int, extra: int) -> None:
    if n % 10 < 5:  # every other new route goes again
        store.delete(f"{p}routes/new-{n - 4}", recurse=True)


RUNTIME_ONLY = [rt_new, rt_flip, rt_canary, rt_instance, rt_remove]
