"""Certificates from a real ACME CA (Debian's pebble), once for a fleet of three `flowproxy node up`
processes, each on its own loopback address and the HTTP port pebble validates on.

What a user would check: every node serves a certificate for the name that chains to pebble's root, and
the CA saw one order; a short-lived certificate renews on every node without a reload and without a second
order in flight; the node working on an order is killed (`kill -9`) while the CA validates, and another
node finishes that same order; a name the CA cannot validate is reported with the CA's reason, tried again
with growing waits, while every other route keeps serving; a CA that forgot the account gets a new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.parts import free_port
from flowproxy.backend import IdentityServer
from flowproxy.cli.demo import register_instance
from flowproxy.consul.store import ConsulStore
from flowproxy.core import acme
from flowproxy.node.up import wait_for
from tests.acme_ca import Pebble, start_pebble
from tests.harness import need

FLOWPROXY = str(Path(sys.executable).parent / "flowproxy")
VALIDITY = 60  # seconds: renewed when 20 are left
P = "flowproxy/"


@dataclass
class Edge:
    """One `flowproxy node up` process (its Consul agent and HAProxy are its children)."""

    name: str
    address: str  # 127.0.0.N: its HTTP listener is <address>:<the fleet's HTTP port>
    http: str
    https: str
    data: Path
    consul_port: int
    serf: str
    proc: subprocess.Popen[str]

    def store(self) -> ConsulStore:
        return ConsulStore(f"127.0.0.1:{self.consul_port}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """kill -9 of the node process alone: its agent and HAProxy live on, as on a host whose flowproxy
        crashed."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for pid in orphans(self.data):  # what a killed node process left running
            with_signal(pid, signal.SIGKILL)


def orphans(data: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(data) in cmdline:
                found.append(int(entry.name))
    return found


def with_signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@dataclass
class Fleet:
    ca: Pebble
    edges: list[Edge]
    http_port: int
    backend: IdentityServer

    def store(self) -> ConsulStore:
        return next(e for e in self.edges if e.name == "edge-1").store()

    def route(self, name: str, domain: str) -> None:
        store = self.store()
        intent = {"service": "shop", "domains": [domain], "tls": {"acme": True}}
        store.put(f"{P}routes/{name}/live", json.dumps(intent))
        store.put(f"{P}routes/{name}/active", "live")

    def state(self, domain: str) -> acme.State:
        entry = self.store().get(f"{P}acme/state/{acme.cert_name((domain,))}")
        return acme.state_from(entry.value if entry else None)

    def order_url(self, domain: str) -> str | None:
        entry = self.store().get(f"{P}acme/orders/{acme.cert_name((domain,))}")
        return json.loads(entry.value)["url"] if entry else None


def start_edge(folder: Path, n: int, http_port: int, ca: Pebble, join: str | None) -> Edge:
    address = f"127.0.0.{n + 1}"
    consul_port, serf = free_port(), free_port()
    data = folder / f"edge-{n}"
    https = f"{address}:{free_port()}"
    args = [FLOWPROXY, "--data-dir", str(data), "--node", f"edge-{n}", "node", "up",
            *(["--join", join] if join else ["--dev"]),
            "--http", f"{address}:{http_port}", "--https", https,
            "--consul-http-port", str(consul_port), "--serf-port", str(serf), "--server-port", str(free_port()),
            "--acme-directory", ca.directory, "--acme-ca-bundle", str(ca.ca_bundle), "--acme-agree-tos",
            "--acme-email", "ops@example.test"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "FLOWPROXY_"))}
    env |= {"FLOWPROXY_ACME_RETRY": "2", "FLOWPROXY_ACME_RETRY_MAX": "16"}
    log = (folder / f"edge-{n}.out").open("w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return Edge(f"edge-{n}", address, f"{address}:{http_port}", https, data, consul_port, f"127.0.0.1:{serf}", proc)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    need("haproxy")
    need("consul")
    folder = tmp_path_factory.mktemp("acme")
    http_port = free_port()
    ca = start_pebble(folder / "ca", http_port, VALIDITY)
    edges: list[Edge] = []
    backend = IdentityServer("shop-1").start()
    try:
        edges.append(start_edge(folder, 1, http_port, ca, None))
        wait_for(lambda: leader(edges[0]), 60, "edge-1's Consul")
        for n in (2, 3):
            edges.append(start_edge(folder, n, http_port, ca, edges[0].serf))
        fleet = Fleet(ca, edges, http_port, backend)
        wait_for(lambda: all(status(fleet, e.name).get("ok") for e in edges), 90, "three nodes to report")
        register_instance(fleet.store(), "shop", "shop-1", backend.port)
        yield fleet
    finally:
        for edge in edges:
            edge.stop()
        backend.stop()
        ca.stop()


def leader(edge: Edge) -> bool:
    try:
        return bool(edge.store().leader())
    except Exception:
        return False


def status(fleet: Fleet, node: str) -> dict[str, Any]:
    try:
        entry = fleet.store().get(f"{P}status/{node}")
    except Exception:
        return {}
    return json.loads(entry.value) if entry else {}


def served(edge: Edge, domain: str, root: str) -> dict[str, Any] | None:
    """The certificate `edge` serves for `domain`, verified against pebble's root; None when it serves none
    that verifies (yet)."""
    context = ssl.create_default_context(cadata=root)
    host, port = edge.https.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=3) as raw, \
                context.wrap_socket(raw, server_hostname=domain) as tls:
            return tls.getpeercert()
    except (OSError, ssl.SSLError):
        return None


def flowproxy_status(edge: Edge) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONSUL_HTTP_ADDR": f"127.0.0.1:{edge.consul_port}"}
    return subprocess.run([FLOWPROXY, "status"], env=env, capture_output=True, text=True, timeout=60, check=False)


def serial_of(edge: Edge, domain: str, root: str) -> str | None:
    cert = served(edge, domain, root)
    return str(cert["serialNumber"]).lower().lstrip("0") if cert else None


def wait_all_serve(fleet: Fleet, edges: list[Edge], domain: str, timeout: float, not_serial: str | None = None) -> str:
    root = fleet.ca.root()
    seen: list[str | None] = []

    def same() -> bool:
        seen[:] = [serial_of(e, domain, root) for e in edges]
        return seen[0] is not None and seen[0] != not_serial and len(set(seen)) == 1

    try:
        wait_for(same, timeout, f"every node to serve one certificate for {domain}")
    except Exception:
        raise AssertionError(f"serials seen: {seen}; state: {fleet.state(domain)}; "
                             f"pebble: {fleet.ca.lines()[-8:]}") from None
    return str(seen[0])


def test_one_route_gets_one_certificate_served_by_every_node(fleet: Fleet) -> None:
    domain = "shop.example.test"
    fleet.ca.point(domain, fleet.edges[2].address)  # the CA reaches edge-3, whichever node placed the order
    began = time.monotonic()
    fleet.route("shop", domain)
    serial = wait_all_serve(fleet, fleet.edges, domain, 60)
    took = time.monotonic() - began
    state = fleet.state(domain)
    assert state.orders == 1 and state.failures == 0 and state.serial == serial
    assert fleet.ca.orders() == fleet.ca.issued() and len(fleet.ca.orders()) == 1  # the CA saw one order
    assert state.issuer and state.issuer.startswith("Pebble Intermediate")
    # HTTP still routes (the challenge step answers only challenge paths), and status shows the certificate.
    out = flowproxy_status(fleet.edges[0])
    assert acme.cert_name((domain,)) in out.stdout and "Pebble Intermediate" in out.stdout, out.stdout
    print(f"\nACME: every node served the certificate {took:.1f} s after the route was written")


def test_a_short_lived_certificate_renews_without_reload_or_overlap(fleet: Fleet) -> None:
    domain = "shop.example.test"
    root = fleet.ca.root()
    first = serial_of(fleet.edges[0], domain, root)
    assert first is not None, "the first test issues it"
    reloads = {e.name: status(fleet, e.name).get("last_reload") for e in fleet.edges}
    renewed = wait_all_serve(fleet, fleet.edges, domain, VALIDITY, not_serial=first)
    assert renewed != first
    assert {e.name: status(fleet, e.name).get("last_reload") for e in fleet.edges} == reloads  # no reload
    events = [(kind, order) for kind, order in fleet.ca.events()]
    in_flight = 0
    for kind, _ in events:  # orders one after another: each issued before the next was placed
        in_flight += {"added": 1, "issued": -1, "invalid": -1}[kind]
        assert in_flight <= 1, events
    assert fleet.state(domain).orders >= 2


def test_the_node_working_on_an_order_dies_and_another_finishes_it(fleet: Fleet) -> None:
    domain = "pay.example.test"
    gate = Gate(f"127.0.0.9:{fleet.http_port}")
    fleet.ca.point(domain, "127.0.0.9")
    try:
        fleet.route("pay", domain)
        wait_for(gate.asked.is_set, 60, "the CA to validate pay.example.test (through the gate)")
        lock = fleet.store().get(f"{P}acme/locks/{acme.cert_name((domain,))}")
        holder = lock.value.decode() if lock else ""
        url = fleet.order_url(domain)
        assert holder and url, (holder, url)
        dead = next(e for e in fleet.edges if e.name == holder)
        dead.kill()  # mid-order: the CA is validating the answer it published
        others = [e for e in fleet.edges if e is not dead]
        gate.release(others[0].http)  # the CA's request reaches another node, which serves the answer from KV
        wait_all_serve(fleet, others, domain, 90)
        state = fleet.state(domain)
        assert state.issued_by != holder and state.issued_by in {e.name for e in others}
        order_id = url.rsplit("/", 1)[-1]
        assert order_id in fleet.ca.issued()  # the same order, finished by the node that took over
        assert state.orders == 1, state
    finally:
        gate.close()


def test_a_name_the_ca_rejects_is_reported_and_retried_while_others_serve(fleet: Fleet) -> None:
    domain = "broken.example.test"
    fleet.ca.point(domain, "127.0.0.10")  # nobody listens there: the CA cannot validate
    fleet.route("broken", domain)
    alive = [e for e in fleet.edges if e.alive()]
    seen: list[acme.State] = []

    def retried() -> bool:
        seen[:] = [fleet.state(domain)]
        return seen[0].failures >= 3

    wait_for(retried, 90, "three failed attempts")
    state = seen[0]
    assert state.last_error and "connection" in state.last_error.lower(), state.last_error
    assert state.last_error_type == "connection"
    assert state.next_attempt and state.last_attempt and state.next_attempt - state.last_attempt >= 2 * 2 - 0.5
    out = flowproxy_status(alive[0])
    assert acme.cert_name((domain,)) in out.stdout and "connection" in out.stdout, out.stdout
    root = fleet.ca.root()
    for edge in alive:  # every other route keeps serving, over HTTPS with its certificate
        assert serial_of(edge, "shop.example.test", root) is not None
        assert serial_of(edge, "pay.example.test", root) is not None


def test_a_ca_that_forgot_the_account_gets_a_new_one(fleet: Fleet) -> None:
    """A reset CA (a wiped staging CA; here pebble restarted) answers the stored account with
    accountDoesNotExist: the fleet registers anew and goes on, and what it serves keeps serving."""
    key = f"{P}acme/accounts/{acme.account_id(fleet.ca.directory)}"
    before = fleet.store().get(key)
    assert before is not None
    fleet.ca.restart()
    alive = [e for e in fleet.edges if e.alive()]
    domain = "fresh.example.test"
    fleet.ca.point(domain, alive[-1].address)
    fleet.route("fresh", domain)
    wait_all_serve(fleet, alive, domain, 90)  # chained to the new root
    after = fleet.store().get(key)
    assert after is not None and json.loads(after.value)["uri"] != json.loads(before.value)["uri"]
    assert fleet.state(domain).failures == 0


class Gate:
    """A listener at the address the CA resolves a name to: it holds the CA's validation request until
    released, then forwards it to a node's HTTP listener (the node the test chooses)."""

    def __init__(self, bind: str) -> None:
        host, port = bind.rsplit(":", 1)
        self.server = socket.create_server((host, int(port)))
        self.asked = threading.Event()
        self._open = threading.Event()
        self.target = ""
        threading.Thread(target=self._serve, daemon=True).start()

    def release(self, target: str) -> None:
        self.target = target
        self._open.set()

    def close(self) -> None:
        self._open.set()
        self.server.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._forward, args=(conn,), daemon=True).start()

    def _forward(self, conn: socket.socket) -> None:
        with conn:
            request = conn.recv(65536)
            self.asked.set()
            self._open.wait(60)
            if not self.target:
                return
            host, port = self.target.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=10) as upstream:
                upstream.sendall(request)
                while chunk := upstream.recv(65536):
                    conn.sendall(chunk)
