"""The dashboard's edge: reads Consul and HAProxy for core/dashboard.py, and answers the page and its API.

Served by the node process beside its metrics (node/metrics.py), behind HAProxy's metrics listener, with
the stats page's credentials. Read-only: nothing here writes to Consul or HAProxy. A document is built at
most once a second however many pages poll (each build reads the prefix and every routed service).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from flowproxy import runstate, telemetry
from flowproxy.consul import reads
from flowproxy.consul.reads import read_fleet
from flowproxy.consul.store import ConsulStore, store_for
from flowproxy.core import dashboard
from flowproxy.core.fleet import fleet_exit_code
from flowproxy.core.kv import desired_from_kv
from flowproxy.errors import FlowproxyError
from flowproxy.haproxy.spares import current_slots
from flowproxy.haproxy.traffic import local_stat, route_counts, server_states
from flowproxy.node.selfcheck import SERVICE
from flowproxy.settings import Settings

Answer = tuple[int, dict[str, str], bytes]
ASSETS = {"/dashboard": ("index.html", "text/html; charset=utf-8"),
          "/dashboard/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/dashboard/style.css": ("style.css", "text/css; charset=utf-8")}
# The page runs only its own script and style, and no value it shows can become markup or a request.
HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                      "connect-src 'self'; img-src 'self'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
FRESH = 1.0  # seconds a built document is served again


def handles(path: str) -> bool:
    return path in ASSETS or path.startswith("/api/")


class Dashboard:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.lock = threading.Lock()
        self.built: dict[str, tuple[float, bytes]] = {}
        self.documents: dict[str, Callable[[ConsulStore], dict[str, Any]]] = {
            "/api/routes": self.routes, "/api/nodes": self.nodes, "/api/changes": self.changes,
            "/api/certificates": self.certificates}

    def answer(self, path: str, authorization: str | None) -> Answer:
        if not authorized(authorization, self.settings.stats_credentials().encode()):
            return 401, {"WWW-Authenticate": 'Basic realm="flowproxy"', "Content-Type": "text/plain"}, \
                b"flowproxy: the dashboard takes the stats page's user and password\n"
        if path in ASSETS:
            name, kind = ASSETS[path]
            return 200, HEADERS | {"Content-Type": kind}, asset(name)
        if path not in self.documents:
            return 404, {"Content-Type": "application/json"}, b'{"error": "no such document"}\n'
        try:
            body = self.document(path)
        except FlowproxyError as exc:  # Consul unreachable: say so, the page shows it
            return 503, HEADERS | {"Content-Type": "application/json"}, json.dumps({"error": str(exc)}).encode()
        return 200, HEADERS | {"Content-Type": "application/json"}, body

    def document(self, path: str) -> bytes:
        with self.lock:  # one build at a time; pages polling together share it
            at, body = self.built.get(path, (0.0, b""))
            if time.monotonic() - at > FRESH:
                store = store_for(self.settings)
                try:
                    body = json.dumps(self.documents[path](store), sort_keys=True).encode()
                finally:
                    store.close()
                self.built[path] = (time.monotonic(), body)
            return body

    def routes(self, store: ConsulStore) -> dict[str, Any]:
        settings = self.settings
        index, entries = reads.read(store, settings.prefix)
        desired = desired_from_kv(settings.prefix, entries, index)
        instances = {service: store.instances(service) for service in desired.services()}
        stat = local_stat(settings.stats_socket, servers=True)
        held = current_slots(settings.current)
        last = runstate.load(settings.run_dir, runstate.LAST_STATUS)
        return dashboard.routes_doc(settings.node, desired, last, instances,
                                    servers=None if stat is None else server_states(stat, held),
                                    counts=None if stat is None else route_counts(stat, held))

    def nodes(self, store: ConsulStore) -> dict[str, Any]:
        _, latest, rows = read_fleet(store, self.settings.prefix, SERVICE)
        return dashboard.nodes_doc(latest, rows, bool(rows) and fleet_exit_code(rows, {}) == 0)

    def certificates(self, store: ConsulStore) -> dict[str, Any]:
        return dashboard.certificates_doc(reads.read_certificates(store, self.settings.prefix))

    def changes(self, _store: ConsulStore) -> dict[str, Any]:
        return dashboard.changes_doc(self.settings.node, telemetry.recent())


def asset(name: str) -> bytes:
    """One of the page's files, shipped in the package (no CDN: a node may have no internet)."""
    return resources.files("flowproxy").joinpath("web", name).read_bytes()


def authorized(header: str | None, expected: bytes) -> bool:
    """HTTP basic auth against `user:password` (compared in constant time)."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, expected)
