"""The production edge of issue #6 through a real node: real HAProxy, real TLS, real clients and backends."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.parts import free_port
from flowproxy.backend import IdentityServer
from flowproxy.cli.demo import register_instance
from flowproxy.consul.registrations import Check, Registration
from flowproxy.core.render import SLOTS_MAP
from flowproxy.haproxy.master import HAProxySocket
from flowproxy.haproxy.spares import slots
from tests.harness import ProxyNode, need, node_spec, reset, self_signed, start_node, status_of, wait_applied

FLOWPROXY = str(Path(sys.executable).parent / "flowproxy")


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: str


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyNode]:
    node = start_node(node_spec(tmp_path_factory.mktemp("edge"), "edge-tls", dev=True, edge=True))
    yield node
    node.stop()


@pytest.fixture
def serve(edge: ProxyNode) -> Iterator[Callable[..., IdentityServer]]:
    """A real backend registered in Consul; the test's routes, certificates and services go afterwards."""
    started: list[IdentityServer] = []

    def add(service: str, name: str, tags: tuple[str, ...] = ()) -> IdentityServer:
        server = IdentityServer(name).start()
        started.append(server)
        register_instance(edge.store(), service, name, server.port, tags=tags)
        return server

    yield add
    reset(edge, [s.name for s in started])
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Self-signed certificates made by openssl: a.example.test, b.example.test, c.example.test."""
    folder = tmp_path_factory.mktemp("certs")
    for name in ("a", "b", "c"):
        self_signed(folder, name)
    return folder


def put(node: ProxyNode, rel: str, value: str | bytes) -> None:
    node.store().put(node.settings.prefix + rel, value)


def route(node: ProxyNode, name: str, intent: dict[str, object], active: str = "live") -> None:
    put(node, f"routes/{name}/live", json.dumps(intent))
    put(node, f"routes/{name}/active", active)


def address(bind: str | None) -> tuple[str, int]:
    assert bind is not None
    host, _, port = bind.rpartition(":")
    return host, int(port)


def get(bind: str | None, path: str, host: str, *, sni: str | None = None, cafile: Path | None = None,
        headers: dict[str, str] | None = None) -> Answer:
    """One request that follows no redirect; over TLS when `sni` is given (verified against `cafile`)."""
    addr = address(bind)
    conn = http.client.HTTPConnection(*addr, timeout=5)
    if sni is not None:
        context = ssl.create_default_context(cafile=str(cafile)) if cafile else ssl._create_unverified_context()
        conn.sock = context.wrap_socket(socket.create_connection(addr, timeout=5), server_hostname=sni)
    conn.request("GET", path, headers={"Host": host} | (headers or {}))
    resp = conn.getresponse()
    answer = Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode(errors="replace"))
    conn.close()
    return answer


def route_status(node: ProxyNode, route: str) -> dict[str, Any]:
    """The route's entry in the node's status document; {} until the node has written one."""
    entry = (status_of(node).get("routes") or {}).get(route)
    return entry if isinstance(entry, dict) else {}


def until(node: ProxyNode, probe: Callable[[], bool], what: str) -> None:
    """`probe` passes, and the node reports the writes so far applied. The first answer of a reloaded
    config can come while the old worker still accepts (HAProxy hands the listeners over, a few ms);
    "applied" is said only once no old worker accepts, which is what the next request may rely on."""
    def safe() -> bool:
        try:
            return probe()
        except OSError:
            return False

    node.wait(safe, what)
    wait_applied(node)


def test_tls_by_sni_from_kv_certificates_and_a_bad_pem_refused_alone(
        edge: ProxyNode, serve: Callable[..., IdentityServer], certs: Path) -> None:
    serve("site", "site-1")
    route(edge, "site", {"service": "site", "domains": ["a.example.test", "b.example.test"]})
    put(edge, "certs/a", (certs / "a.pem").read_bytes())
    put(edge, "certs/b", (certs / "b.pem").read_bytes())
    put(edge, "certs/broken", (certs / "a.crt").read_bytes() + (certs / "b.key").read_bytes())
    for name in ("a", "b"):  # each name gets its own certificate, verified by a real TLS client
        def served(n: str = name) -> bool:
            host = f"{n}.example.test"
            return get(edge.settings.https_bind, "/x", host, sni=host, cafile=certs / f"{n}.crt").status == 200

        until(edge, served, f"HTTPS for {name}")
    refused = "flowproxy/certs/broken: the private key does not match the certificate; certificate not served"
    # wait_applied follows routes/ only; the certificate writes came after the route's
    until(edge, lambda: refused in status_of(edge).get("problems", []), "the refused PEM reported")
    folder = edge.settings.current / "certs"
    assert sorted(p.name for p in folder.iterdir()) == ["a.pem", "b.pem"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in folder.iterdir())
    assert get(edge.settings.http_bind, "/x", "a.example.test").status == 200  # plain HTTP still answers


def served_serial(bind: str | None, name: str) -> int:
    """The serial number of the certificate HAProxy presents for `name` (unverified: it is what we read)."""
    context = ssl._create_unverified_context()
    with context.wrap_socket(socket.create_connection(address(bind), timeout=5), server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    text = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-serial"], input=der,
                          capture_output=True, check=True).stdout.decode()
    return int(text.strip().split("=")[1], 16)


def test_a_renewed_certificate_is_served_without_a_reload(
        edge: ProxyNode, serve: Callable[..., IdentityServer], certs: Path, tmp_path: Path) -> None:
    serve("site", "site-1")
    route(edge, "site", {"service": "site", "domains": ["a.example.test"]})
    put(edge, "certs/a", (certs / "a.pem").read_bytes())
    until(edge, lambda: get(edge.settings.https_bind, "/", "a.example.test", sni="a.example.test",
                            cafile=certs / "a.crt").status == 200, "HTTPS with the first certificate")
    first = served_serial(edge.settings.https_bind, "a.example.test")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3", "-keyout",
                    str(tmp_path / "k"), "-out", str(tmp_path / "c"), "-subj", "/CN=a.example.test", "-addext",
                    "subjectAltName=DNS:a.example.test"], check=True, capture_output=True)
    renewed = (tmp_path / "c").read_bytes() + b"\n" + (tmp_path / "k").read_bytes()  # a blank line between
    before = HAProxySocket(edge.settings.master_socket).show_proc()
    put(edge, "certs/a", renewed)
    until(edge, lambda: served_serial(edge.settings.https_bind, "a.example.test") != first, "the renewed cert")
    assert get(edge.settings.https_bind, "/", "a.example.test", sni="a.example.test",
               cafile=tmp_path / "c").status == 200  # verified against the new certificate
    after = HAProxySocket(edge.settings.master_socket).show_proc()
    assert (after.reloads, after.workers) == (before.reloads, before.workers)  # the same worker serves it
    assert (edge.settings.current / "certs" / "a.pem").read_bytes() == renewed  # the files say what runs


def test_https_only_redirects_plain_http_with_the_route_code(
        edge: ProxyNode, serve: Callable[..., IdentityServer], certs: Path) -> None:
    serve("site", "site-1")
    put(edge, "certs/a", (certs / "a.pem").read_bytes())
    route(edge, "site", {"service": "site", "domains": ["a.example.test"], "https_only": True, "redirect_code": 308})
    until(edge, lambda: get(edge.settings.http_bind, "/p?q=1", "a.example.test").status == 308, "the redirect")
    moved = get(edge.settings.http_bind, "/p?q=1", "a.example.test")
    assert moved.headers["location"] == "https://a.example.test/p?q=1"
    secure = get(edge.settings.https_bind, "/p?q=1", "a.example.test", sni="a.example.test", cafile=certs / "a.crt")
    assert secure.status == 200 and json.loads(secure.body)["path"] == "/p?q=1"


def test_redirect_from_sends_other_domains_to_the_first_keeping_path_and_query(
        edge: ProxyNode, serve: Callable[..., IdentityServer]) -> None:
    serve("site", "site-1")
    route(edge, "site", {"service": "site", "domains": ["a.example.test"], "redirect_from": ["www.a.example.test"]})
    until(edge, lambda: get(edge.settings.http_bind, "/", "www.a.example.test").status == 301, "the redirect")
    moved = get(edge.settings.http_bind, "/deep/path?x=1&y=2", "www.a.example.test")
    assert (moved.status, moved.headers["location"]) == (301, "http://a.example.test/deep/path?x=1&y=2")
    assert get(edge.settings.http_bind, "/deep", "a.example.test").status == 200


def crypt_hash(password: str) -> str:
    need("openssl")
    done = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


def test_basic_auth_from_hashed_passwords(edge: ProxyNode, serve: Callable[..., IdentityServer]) -> None:
    serve("site", "site-1")
    digest = crypt_hash("s3cret-pass")
    route(edge, "admin", {"service": "site", "paths": ["/admin"], "auth": {"realm": "Staff only",
                                                                           "users": {"alice": digest}}})
    until(edge, lambda: get(edge.settings.http_bind, "/admin", "x").status == 401, "auth to be asked for")
    refused = get(edge.settings.http_bind, "/admin", "x")
    assert refused.headers["www-authenticate"] == 'Basic realm="Staff only"'
    import base64

    def basic(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    assert get(edge.settings.http_bind, "/admin", "x", headers=basic("alice", "wrong")).status == 401
    assert get(edge.settings.http_bind, "/admin", "x", headers=basic("alice", "s3cret-pass")).status == 200
    assert digest in edge.config().decode() and "s3cret-pass" not in edge.config().decode()


REWRITES = [
    ("strip-deep", {"strip_prefix": "/api"}, "/api/v1/users?id=3", "/v1/users?id=3"),
    ("strip-bare", {"strip_prefix": "/api"}, "/api", "/"),
    ("rewrite", {"rewrite": {"search": "^/api/old/(.*)", "replace": "/new/\\1"}}, "/api/old/thing", "/new/thing"),
    ("rewrite-miss", {"rewrite": {"search": "^/api/old/(.*)", "replace": "/new/\\1"}}, "/api/keep", "/api/keep"),
]


@pytest.mark.parametrize(("extra", "sent", "seen"), [c[1:] for c in REWRITES], ids=[c[0] for c in REWRITES])
def test_path_rewrites_before_forwarding(edge: ProxyNode, serve: Callable[..., IdentityServer],
                                         extra: dict[str, object], sent: str, seen: str) -> None:
    serve("site", "site-1")
    route(edge, "api", {"service": "site", "paths": ["/api"]} | extra)
    until(edge, lambda: get(edge.settings.http_bind, sent, "x").status == 200, "the route")
    assert json.loads(get(edge.settings.http_bind, sent, "x").body)["path"] == seen


def check_status(edge: ProxyNode, backend: str) -> str:
    stat = HAProxySocket(edge.settings.stats_socket).command("show stat")
    rows = [line.split(",") for line in stat.splitlines()]
    head = rows[0]
    return next(r[head.index("check_status")] for r in rows[1:] if r[:1] == [backend] and r[1] != "BACKEND")


def test_timeouts_and_http_health_checks(edge: ProxyNode, serve: Callable[..., IdentityServer]) -> None:
    serve("site", "site-1")
    route(edge, "ok", {"service": "site", "paths": ["/ok"], "timeout_server": "7s", "timeout_tunnel": "1h",
                       "health": {"path": "/health", "interval": "500ms"}})
    route(edge, "bad", {"service": "site", "paths": ["/bad"], "health": {"path": "/status/500", "interval": "500ms"}})
    wait_applied(edge)
    config = edge.config().decode()
    assert "    timeout server 7s\n    timeout tunnel 1h\n" in config
    assert "check inter 500ms fall 2 rise 1" in config
    until(edge, lambda: check_status(edge, "ok:live") == "L7OK", "the HTTP check on /health to pass")
    until(edge, lambda: check_status(edge, "bad:live") == "L7STS", "the HTTP check on /status/500 to fail")
    until(edge, lambda: get(edge.settings.http_bind, "/bad", "x").status == 503, "the failing route to answer 503")
    assert get(edge.settings.http_bind, "/ok", "x").status == 200


def test_timeout_server_cuts_a_slow_backend(edge: ProxyNode, serve: Callable[..., IdentityServer]) -> None:
    serve("site", "site-1")
    route(edge, "slow", {"service": "site", "paths": ["/sleep"], "timeout_server": "1s"})
    until(edge, lambda: get(edge.settings.http_bind, "/sleep/10", "x").status == 200, "the route")
    assert get(edge.settings.http_bind, "/sleep/300", "x").status == 200
    assert get(edge.settings.http_bind, "/sleep/2500", "x").status == 504  # HAProxy's gateway timeout, after 1 s


def test_tcp_route_listens_on_its_own_port(edge: ProxyNode, serve: Callable[..., IdentityServer]) -> None:
    serve("db", "db-1")  # an HTTP server, spoken to over a plain TCP route
    port = free_port()
    route(edge, "db", {"service": "db", "mode": "tcp", "port": port})
    until(edge, lambda: get(f"{edge.settings.tcp_host}:{port}", "/q", "x").status == 200, "the TCP route")
    assert json.loads(get(f"{edge.settings.tcp_host}:{port}", "/q", "x").body)["instance"] == "db-1"


def test_tcp_route_on_a_held_port_waits_alone_and_serves_once_freed(
        edge: ProxyNode, serve: Callable[..., IdentityServer]) -> None:
    serve("db", "db-1")
    serve("site", "site-1")
    holder = socket.create_server((edge.settings.tcp_host, 0))  # another program on the port the route wants
    port = int(holder.getsockname()[1])
    route(edge, "db", {"service": "db", "mode": "tcp", "port": port})
    route(edge, "later", {"service": "site", "paths": ["/later"]})  # a change after it still lands
    until(edge, lambda: get(edge.settings.http_bind, "/later", "x").status == 200, "the HTTP route")
    reason = f"flowproxy/routes/db/live: port {port} on {edge.settings.tcp_host} is held by another program"
    until(edge, lambda: any(r.startswith(reason) for r in route_status(edge, "db").get("reasons", [])),
          "the held port reported on the TCP route")  # traffic moves first, the status a moment later
    assert status_of(edge)["ok"] is True  # the node applied everything else
    holder.close()
    until(edge, lambda: get(f"{edge.settings.tcp_host}:{port}", "/q", "x").status == 200, "the TCP route, freed")


@contextlib.contextmanager
def tls_app(node: ProxyNode, pem: Path) -> Iterator[int]:
    """A TLS server registered as tlsapp-1, with `pem`'s certificate: only passthrough shows a client that."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pem)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def answer(conn: socket.socket) -> None:
        conn.settimeout(5)  # a peer that goes quiet costs its own thread, never the next client
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(4096)
                tls.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\ntls-backend\n")
        except OSError:
            pass  # HAProxy's TCP checks connect and leave
        finally:
            conn.close()

    def serve_forever() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve_forever, daemon=True).start()
    port = int(listener.getsockname()[1])
    # A TCP check: an HTTP check would speak plain HTTP to a TLS server, fail, and take the instance out.
    node.store().register_service(Registration("tlsapp", "tlsapp-1", "127.0.0.1", port,
                                               check=Check(tcp=f"127.0.0.1:{port}")))
    try:
        yield port
    finally:
        stop.set()
        listener.close()
        node.store().client.agent.service.deregister("tlsapp-1")


def checked_in(node: ProxyNode, service_id: str) -> bool:
    """Consul's own check of the instance has run and passed (not just its initial status)."""
    return any(c["ServiceID"] == service_id and c["Status"] == "passing" and c["Output"]
               for c in node.store().client.agent.checks().values())


@pytest.fixture
def tls_backend(edge: ProxyNode, certs: Path) -> Iterator[int]:
    with tls_app(edge, certs / "c.pem") as port:
        yield port


def test_sni_passthrough_reaches_the_backend_tls(edge: ProxyNode, tls_backend: int, certs: Path) -> None:
    route(edge, "tls", {"service": "tlsapp", "mode": "sni", "domains": ["c.example.test"]})
    until(edge, lambda: checked_in(edge, "tlsapp-1"), "Consul's own check to pass the TLS backend")
    until(edge, lambda: get(edge.settings.sni_bind, "/", "c.example.test", sni="c.example.test",
                            cafile=certs / "c.crt").body == "tls-backend\n", "passthrough to the TLS backend")
    with pytest.raises(OSError):  # an unknown name has nowhere to go: the connection is closed
        get(edge.settings.sni_bind, "/", "z.example.test", sni="z.example.test")


def test_one_port_passes_claimed_names_through_and_terminates_the_rest(
        tmp_path_factory: pytest.TempPathFactory, certs: Path) -> None:
    spec = node_spec(tmp_path_factory.mktemp("shared"), "edge-shared", dev=True, edge=True)
    spec = dataclasses.replace(spec, settings=dataclasses.replace(spec.settings, sni_bind=spec.settings.https_bind))
    node = start_node(spec)
    site = IdentityServer("site-1").start()
    try:
        register_instance(node.store(), "site", "site-1", site.port)
        put(node, "certs/a", (certs / "a.pem").read_bytes())
        route(node, "site", {"service": "site", "domains": ["a.example.test"]})
        with tls_app(node, certs / "c.pem"):
            route(node, "tls", {"service": "tlsapp", "mode": "sni", "domains": ["c.example.test"]})
            until(node, lambda: checked_in(node, "tlsapp-1"), "Consul's own check to pass the TLS backend")
            until(node, lambda: get(node.settings.https_bind, "/", "c.example.test", sni="c.example.test",
                                    cafile=certs / "c.crt").body == "tls-backend\n", "passthrough on the shared port")
            until(node, lambda: get(node.settings.https_bind, "/t", "a.example.test", sni="a.example.test",
                                    cafile=certs / "a.crt").status == 200, "termination on the shared port")
            doc = json.loads(get(node.settings.https_bind, "/t", "a.example.test", sni="a.example.test",
                                 cafile=certs / "a.crt").body)
            assert (doc["instance"], doc["forwarded_for"]) == ("site-1", "127.0.0.1")  # PROXY kept the client
    finally:
        site.stop()
        node.stop()


@pytest.mark.parametrize(("weights", "green_share"), [("blue=90,green=10", 0.10), ("blue=50,green=50", 0.50)],
                         ids=["ninety-ten", "even"])
def test_weighted_canary_splits_traffic(edge: ProxyNode, serve: Callable[..., IdentityServer], weights: str,
                                        green_share: float) -> None:
    serve("app", "blue-1", ("blue",))
    serve("app", "blue-2", ("blue",))
    serve("app", "green-1", ("green",))
    for color in ("blue", "green"):
        put(edge, f"routes/can/{color}", json.dumps({"service": "app", "tags": [color], "paths": ["/can"]}))
    put(edge, "routes/can/active", weights)
    until(edge, lambda: {"blue-1", "blue-2", "green-1"} <= {get(edge.settings.http_bind, "/can", "x").headers.get(
        "x-instance", "") for _ in range(20)}, "all three instances in the canary")
    seen = collections.Counter(get(edge.settings.http_bind, "/can", "x").headers["x-instance"] for _ in range(1000))
    green = seen["green-1"] / 1000
    print(f"canary {weights}: {dict(seen)}")
    assert abs(green - green_share) <= 0.03, seen  # smooth weighted round robin: within 3 points of the weight
    until(edge, lambda: route_status(edge, "can").get("variant") == weights, "the canary weights in the status")


def test_metrics_stats_page_and_per_route_counts(edge: ProxyNode, serve: Callable[..., IdentityServer]) -> None:
    serve("site", "site-1")
    route(edge, "counted", {"service": "site", "paths": ["/counted"]})
    until(edge, lambda: get(edge.settings.http_bind, "/counted", "x").status == 200, "the route")
    for _ in range(9):
        get(edge.settings.http_bind, "/counted", "x")
    metrics = get(edge.settings.metrics_bind, "/metrics", "x")
    # A route added since the last reload is served from a spare backend, named so in HAProxy's metrics
    # until the next reload; maps/slots.map says which (README: Metrics).
    held = {route: spare for spare, route in slots((edge.settings.current / SLOTS_MAP).read_bytes()).items()}
    proxy = held.get("counted:live", "counted:live")
    assert metrics.status == 200 and f'haproxy_backend_http_requests_total{{proxy="{proxy}"}}' in metrics.body
    assert get(edge.settings.metrics_bind, "/stats", "x").status == 401
    import base64

    auth = {"Authorization": "Basic " + base64.b64encode(b"ops:stats-secret").decode()}
    assert get(edge.settings.metrics_bind, "/stats", "x", headers=auth).status == 200
    env = {**os.environ, "CONSUL_HTTP_ADDR": edge.node.http_addr(), "FLOWPROXY_DATA_DIR": str(edge.settings.data_dir)}
    report = subprocess.run([FLOWPROXY, "status", "--json"], env=env, capture_output=True, text=True, timeout=60,
                            check=True)
    counted = json.loads(report.stdout)["traffic"]["counted"]
    assert counted["variant"] == "live" and counted["requests"] >= 10 and counted["5xx"] == 0


def test_canary_weights_move_without_a_reload(edge: ProxyNode, serve: Callable[..., IdentityServer]) -> None:
    serve("app", "blue-1", ("blue",))
    serve("app", "green-1", ("green",))
    for color in ("blue", "green"):
        put(edge, f"routes/can/{color}", json.dumps({"service": "app", "tags": [color], "paths": ["/can"]}))
    put(edge, "routes/can/active", "blue=90,green=10")
    until(edge, lambda: status_of(edge).get("routes", {}).get("can", {}).get("variant") == "blue=90,green=10",
          "the canary")
    wait_applied(edge)
    master = HAProxySocket(edge.settings.master_socket)
    before = master.show_proc_settled()
    put(edge, "routes/can/active", "blue=50,green=50")
    until(edge, lambda: status_of(edge).get("routes", {}).get("can", {}).get("variant") == "blue=50,green=50",
          "the new weights")
    seen = collections.Counter(get(edge.settings.http_bind, "/can", "x").headers["x-instance"] for _ in range(200))
    assert seen == {"blue-1": 100, "green-1": 100}, seen  # smooth weighted round robin at 50/50: exact
    after = master.show_proc_settled()
    assert (after.reloads, after.workers) == (before.reloads, before.workers)


def test_flowproxy_metrics_beside_haproxys(edge: ProxyNode, serve: Callable[..., IdentityServer],
                                          tmp_path: Path) -> None:
    """`/metrics/flowproxy` on the metrics listener: the node's reloads (and why), old workers and their
    memory, the applied index, certificates' expiry; scraped as Prometheus would, the numbers move."""
    serve("site", "site-1")

    def scrape() -> dict[str, str]:
        answer = get(edge.settings.metrics_bind, "/metrics/flowproxy", "x")
        assert answer.status == 200 and answer.headers["content-type"].startswith("text/plain; version=")
        lines = (line.rsplit(" ", 1) for line in answer.body.splitlines() if line and not line.startswith("#"))
        return dict(lines)

    before = scrape()
    assert before["flowproxy_haproxy_up"] == "1.0" and "flowproxy_old_workers_resident_bytes" in before
    route(edge, "own", {"service": "site", "paths": ["/own"], "timeout_server": "5s"})  # a reload
    until(edge, lambda: get(edge.settings.http_bind, "/own", "x").status == 200, "the route")
    status = wait_applied(edge)
    after = scrape()
    assert float(after["flowproxy_haproxy_reloads_total"]) > float(before["flowproxy_haproxy_reloads_total"])
    assert float(after["flowproxy_applied_kv_index"]) == status["kv_index"]
    why = 'flowproxy_last_reload_info{kv_index="%d",why="new backend own:live (settings other than servers)"}'
    assert why % status["last_reload"]["kv_index"] in after

    def number(metrics: dict[str, str], name: str) -> float:
        return float(metrics.get(name, "0"))

    # flowproxy's own work, counted by the node process: the reload and its kind, the apply, its time.
    assert number(after, 'flowproxy_reloads_total{reason="new_backend"}') > number(
        before, 'flowproxy_reloads_total{reason="new_backend"}')
    assert number(after, 'flowproxy_applies_total{path="reload",result="ok"}') > number(
        before, 'flowproxy_applies_total{path="reload",result="ok"}')
    assert number(after, 'flowproxy_apply_duration_seconds_count{path="reload"}') > number(
        before, 'flowproxy_apply_duration_seconds_count{path="reload"}')
    assert number(after, 'flowproxy_watch_events_total{kind="keyprefix"}') > number(
        before, 'flowproxy_watch_events_total{kind="keyprefix"}')
    assert number(after, "flowproxy_last_apply_success_timestamp_seconds") > number(
        before, "flowproxy_last_apply_success_timestamp_seconds")
    assert number(after, "flowproxy_kv_index_seen") >= max(1.0, number(before, "flowproxy_kv_index_seen"))
    assert number(after, "flowproxy_rejected_routes") == 0

    # An instance joining an existing route: the incremental path, no reload.
    serve("site", "site-2")
    until(edge, lambda: number(scrape(), 'flowproxy_applies_total{path="incremental",result="ok"}') > number(
        after, 'flowproxy_applies_total{path="incremental",result="ok"}'), "an incremental apply counted")
    put(edge, "routes/broken/live", json.dumps({"service": "site", "paths": ["no-slash"]}))
    put(edge, "routes/broken/active", "live")
    until(edge, lambda: number(scrape(), "flowproxy_rejected_routes") == 1, "the rejected route counted")

    # A certificate served from KV: its expiry, as openssl reads it.
    put(edge, "certs/expiry", self_signed(tmp_path, "expiry"))
    ends = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", str(tmp_path / "expiry.crt")],
                          capture_output=True, text=True, check=True).stdout.split("=", 1)[1].strip()
    expected = datetime.datetime.strptime(ends, "%b %d %H:%M:%S %Y %Z").replace(tzinfo=datetime.UTC).timestamp()
    gauge = 'flowproxy_certificate_expiry_timestamp_seconds{certificate="expiry"}'
    until(edge, lambda: number(scrape(), gauge) == expected, "the certificate's expiry")
    edge.store().delete(edge.settings.prefix + "certs/expiry")


ACCESS_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def access_log(node: ProxyNode, kind: str) -> list[dict[str, str]]:
    """HAProxy's access lines of one kind (http, tcp, sni) in `node up`'s capped log, fields by name."""
    text = (node.settings.data_dir / "logs" / "haproxy.log").read_text(errors="replace")
    return [{key: value.strip('"') for key, value in ACCESS_FIELD.findall(line)}
            for line in text.splitlines() if line.startswith(f"type={kind} ")]


def logged(node: ProxyNode, kind: str, **fields: str) -> dict[str, str]:
    """The last access line of `kind` with these fields, once HAProxy wrote one."""
    found: list[dict[str, str]] = []

    def seen() -> bool:
        found[:] = [line for line in access_log(node, kind) if fields.items() <= line.items()]
        return bool(found)

    until(node, seen, f"a {kind} access line with {fields}")
    return found[-1]


def test_access_log_names_route_variant_and_instance_for_http_tcp_and_sni(
        edge: ProxyNode, serve: Callable[..., IdentityServer], tls_backend: int, certs: Path) -> None:
    instance = serve("logged", "logged-1")
    route(edge, "logged", {"service": "logged", "paths": ["/logged"]})
    until(edge, lambda: get(edge.settings.http_bind, "/logged/x?secret=1", "x").status == 200, "the route")
    http = logged(edge, "http", route="logged", path="/logged/x", status="200")
    assert http["variant"] == "live" and http["status"] == "200"
    assert http["backend"] == "logged:live" or http["backend"].startswith("fp_spare_http_")  # added since a reload
    assert http["server"] == f"127.0.0.1:{instance.port}" and http["frontend"] == "fp_http"
    assert http["client"].startswith("127.0.0.1:") and http["method"] == "GET" and http["termination"] == "--"
    assert int(http["bytes_out"]) > 0 and int(http["t_total"]) >= 0
    assert re.fullmatch(r"[0-9a-f-]{36}", http["request_id"])  # a UUID: the client sent none
    assert "secret" not in json.dumps(access_log(edge, "http"))  # the query string is not logged

    port = free_port()
    route(edge, "plain", {"service": "logged", "mode": "tcp", "port": port})
    until(edge, lambda: get(f"{edge.settings.tcp_host}:{port}", "/q", "x").status == 200, "the TCP route")
    tcp = logged(edge, "tcp", route="plain", termination="--")
    assert tcp["variant"] == "live" and tcp["frontend"] == f"fp_tcp_{port}" and int(tcp["bytes_in"]) > 0

    route(edge, "tls", {"service": "tlsapp", "mode": "sni", "domains": ["c.example.test"]})
    until(edge, lambda: checked_in(edge, "tlsapp-1"), "Consul's own check to pass the TLS backend")
    until(edge, lambda: get(edge.settings.sni_bind, "/", "c.example.test", sni="c.example.test",
                            cafile=certs / "c.crt").body == "tls-backend\n", "passthrough to the TLS backend")
    sni = logged(edge, "sni", route="tls", sni="c.example.test", termination="--")
    assert sni["frontend"] == "fp_sni" and sni["server"] == f"127.0.0.1:{tls_backend}" and int(sni["bytes_out"]) > 0
