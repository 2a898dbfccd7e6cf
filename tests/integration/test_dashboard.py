"""The dashboard of a real node, in a real browser (Debian's chromium, headless), and its JSON API on its own:
a route appears after its activation, a rejected intent shows its reason, a killed instance turns
unhealthy, a flip moves the serving variant. Screenshots are kept in test-artifacts/dashboard/."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from flowproxy.backend import IdentityServer
from flowproxy.cli.demo import register_instance
from flowproxy.node.up import wait_for
from tests.harness import ProxyNode, need, node_spec, self_signed, start_node, status_of, wait_applied

AUTH = "ops:stats-secret"  # node_spec(edge=True)'s stats credentials
ARTIFACTS = Path(os.environ.get("FLOWPROXY_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
VOID = {"meta", "link", "input", "br", "img", "hr"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element] = field(default_factory=list)
    parts: list[str | Element] = field(default_factory=list)  # text and children, in document order

    def all_text(self) -> str:
        return "".join(p if isinstance(p, str) else p.all_text() for p in self.parts)

    def find(self, **attrs: str) -> list[Element]:
        """Every element below whose attributes include these (data_route= means data-route=)."""
        wanted = {k.replace("_", "-"): v for k, v in attrs.items()}
        found = [c for c in self.children if all(c.attrs.get(k) == v for k, v in wanted.items())]
        return found + [e for c in self.children for e in c.find(**attrs)]


class Tree(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.root = Element("root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(element)
        self.stack[-1].parts.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_endtag(self, tag: str) -> None:
        while len(self.stack) > 1 and self.stack.pop().tag != tag:
            pass

    def handle_data(self, data: str) -> None:
        self.stack[-1].parts.append(data)


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-dev-shm-usage", f"--user-data-dir={ARTIFACTS / '.chromium'}",
                           "--virtual-time-budget=5000", *args],
                          capture_output=True, text=True, timeout=90, check=False)


def page(node: ProxyNode) -> Element:
    """The dashboard as the browser built it, its script run and its first poll drawn."""
    done = chromium("--dump-dom", f"http://{AUTH}@{node.settings.metrics_bind}/dashboard")
    assert done.returncode == 0, done.stderr[-2000:]
    tree = Tree()
    tree.feed(done.stdout)
    return tree.root


def shows(node: ProxyNode, seen: Callable[[Element], bool], what: str, timeout: float = 30) -> Element:
    last: list[Element] = []

    def check() -> bool:
        last[:] = [page(node)]
        return seen(last[0])

    wait_for(check, timeout, f"the dashboard to show {what}")
    return last[0]


def screenshot(node: ProxyNode, name: str) -> Path:
    path = ARTIFACTS / "dashboard" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = chromium(f"--screenshot={path}", "--window-size=1400,1000", "--hide-scrollbars",
                    f"http://{AUTH}@{node.settings.metrics_bind}/dashboard")
    assert done.returncode == 0 and path.stat().st_size > 10_000, done.stderr[-2000:]
    return path


def api(node: ProxyNode, path: str, auth: str | None = AUTH) -> tuple[int, dict[str, str], Any]:
    """Status, headers (lower-case names) and body (parsed when JSON) of a GET on the node's metrics listener."""
    request = urllib.request.Request(f"http://{node.settings.metrics_bind}{path}")
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            status, headers, body = answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as exc:
        status, headers, body = exc.code, exc.headers, exc.read()
    found = {name.lower(): value for name, value in headers.items()}  # HAProxy sends them lower-case
    return status, found, json.loads(body) if found.get("content-type") == "application/json" else body


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyNode]:
    node = start_node(node_spec(tmp_path_factory.mktemp("dash"), "dash-1", dev=True, edge=True))
    yield node
    node.stop()


def route_row(root: Element, route: str) -> Element | None:
    rows = root.find(data_route=route, data_state="serving") + root.find(data_route=route, data_state="rejected")
    return next((r for r in rows if r.attrs.get("role") == "row"), None)


def serving_variant(root: Element, route: str) -> str | None:
    row = route_row(root, route)
    chosen = row.find(data_role="serving") if row else []
    return chosen[0].attrs["data-variant"] if chosen else None


def test_the_dashboard_follows_routes_health_and_flips(
        dash: ProxyNode, backends: Callable[[str], IdentityServer]) -> None:
    store = dash.store()
    blue, green = backends("shop-blue-1"), backends("shop-green-1")
    register_instance(store, "shop", "shop-blue-1", blue.port, tags=("blue",))
    register_instance(store, "shop", "shop-green-1", green.port, tags=("green",))
    for color in ("blue", "green"):
        store.put(f"flowproxy/routes/shop/{color}", json.dumps({"service": "shop", "tags": [color],
                                                                "paths": ["/shop"]}))
    store.put("flowproxy/routes/shop/active", "blue")
    dash.wait_reply("/shop", 200)
    root = shows(dash, lambda r: serving_variant(r, "shop") == "blue", "route shop serving blue")
    row = route_row(root, "shop")
    assert row is not None
    blue_seen = row.find(data_instance="shop-blue-1")[0]
    assert blue_seen.attrs["data-consul"] == "passing"
    screenshot(dash, "1-shop-serving-blue")

    store.put("flowproxy/routes/bad/live", json.dumps({"service": "shop", "paths": ["no-slash"]}))
    store.put("flowproxy/routes/bad/active", "live")
    wait_applied(dash)
    root = shows(dash, lambda r: bool(r.find(id="rejected")[0].find(data_route="bad")), "route bad rejected")
    reason = root.find(id="rejected")[0].find(data_route="bad")[0].all_text()
    assert reason == "bad: flowproxy/routes/bad/live: paths[0]: 'no-slash' must start with \"/\"", reason

    blue.stop()  # killed: critical in Consul, then out of HAProxy's backend (or DOWN there, if its check saw first)
    shows(dash, lambda r: any(i.attrs["data-consul"] == "critical" and not i.attrs["data-haproxy"].startswith("UP")
                              for i in r.find(data_instance="shop-blue-1")), "shop-blue-1 critical, not UP")
    store.put("flowproxy/routes/shop/active", "green")
    dash.wait(lambda: dash.get("/shop").instance == "shop-green-1", "the flip to green")
    shows(dash, lambda r: serving_variant(r, "shop") == "green", "shop flipped to green")
    screenshot(dash, "2-shop-flipped-bad-rejected")


def test_the_api_documents_routes_nodes_and_changes(dash: ProxyNode, backends: Callable[[str], IdentityServer]) -> None:
    store = dash.store()
    register_instance(store, "docs", "docs-1", backends("docs-1").port)
    store.put("flowproxy/routes/docs/live", json.dumps({"service": "docs", "paths": ["/docs"]}))
    store.put("flowproxy/routes/docs/active", "live")
    dash.wait_reply("/docs", 200)
    applied = wait_applied(dash)

    def counted() -> bool:
        routes = {r["route"]: r for r in api(dash, "/api/routes")[2]["routes"]}
        return int(((routes.get("docs") or {}).get("traffic") or {}).get("requests", 0)) >= 1
    wait_for(counted, 20, "the docs route's requests to be counted")
    status, headers, doc = api(dash, "/api/routes")
    assert status == 200 and headers["content-type"] == "application/json"
    assert "script-src 'self'" in headers["content-security-policy"] and headers["server"] == "flowproxy"
    docs = next(r for r in doc["routes"] if r["route"] == "docs")
    assert docs["state"] == "serving" and docs["variants"][0]["instances"][0]["haproxy"].startswith("UP")
    assert doc["node"] == "dash-1" and doc["applied_kv_index"] >= applied["kv_index"]

    status, _, nodes = api(dash, "/api/nodes")
    assert status == 200 and [n["node"] for n in nodes["nodes"]] == ["dash-1"]

    def as_status_says() -> bool:  # later applies (health checks settling) may move both; they meet
        row = api(dash, "/api/nodes")[2]["nodes"][0]
        return bool(row["config_sha256"] == status_of(dash)["config_sha256"] and row["current"])
    wait_for(as_status_says, 20, "the nodes document to show the node's status")
    status, _, changes = api(dash, "/api/changes")
    assert status == 200 and changes["changes"] and all(c["ok"] in (True, False) for c in changes["changes"])


def test_certificates_show_their_issuer_and_expiry(dash: ProxyNode, tmp_path: Path) -> None:
    pem = self_signed(tmp_path, "site")
    dash.store().put("flowproxy/certs/site", pem)
    expires = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", str(tmp_path / "site.crt")],
                             capture_output=True, text=True, check=True).stdout.strip().split("=", 1)[1]
    status, _, doc = api(dash, "/api/certificates")
    assert status == 200
    site = next(c for c in doc["certificates"] if c["name"] == "site")
    assert site["issuer"] == "site.example.test" and site["names"] == ["site.example.test"] and not site["acme"]
    assert site["not_after"][:10] == time.strftime("%Y-%m-%d", time.strptime(expires, "%b %d %H:%M:%S %Y %Z"))
    root = shows(dash, lambda r: bool(r.find(data_certificate="site")), "the certificate listed")
    assert "site.example.test" in root.find(data_certificate="site")[0].all_text()


@pytest.mark.parametrize(("path", "auth", "status"), [
    ("/dashboard", None, 401),
    ("/api/routes", None, 401),
    ("/api/routes", "ops:wrong", 401),
    ("/api/nothing", AUTH, 404),
    ("/dashboard/app.js", AUTH, 200),
    ("/stats", None, 401),  # HAProxy's own page: the same credentials
], ids=["page-no-auth", "api-no-auth", "api-wrong-password", "unknown-document", "asset", "stats-page"])
def test_the_dashboard_asks_for_the_stats_credentials(dash: ProxyNode, path: str, auth: str | None,
                                                      status: int) -> None:
    assert api(dash, path, auth)[0] == status
