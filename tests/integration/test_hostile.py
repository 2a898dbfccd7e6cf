"""Hostile input through a real node: each bad value is rejected alone, reported everywhere, never lost.

For every case: the anchor route keeps serving through HAProxy; the reason, naming its key (and field),
is in the node's status key, `flowproxy status`, `flowproxy route list` and the handler log; every key
written reads back byte for byte; and writing a fixed value brings the route up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowproxy.backend import IdentityServer
from flowproxy.cli.demo import register_instance
from flowproxy.node.up import wait_for
from tests.harness import ProxyNode, status_of, wait_applied

FLOWPROXY = str(Path(sys.executable).parent / "flowproxy")
K = "flowproxy/routes/bad/live"
FIX = {"routes/bad/live": json.dumps({"service": "go-demo", "paths": ["/bad"]}).encode(), "routes/bad/active": b"live"}


def intent(**fields: Any) -> bytes:
    return json.dumps({"service": "go-demo", "paths": ["/bad"]} | fields).encode()


def bad(value: bytes, reason: str) -> tuple[dict[str, bytes], str, dict[str, bytes]]:
    """A bad intent at routes/bad/live, activated; the fix replaces it."""
    return {"routes/bad/live": value, "routes/bad/active": b"live"}, reason, FIX


B = b"backend {{ backend.name }}\n"


def templated(body: bytes, reason: str) -> tuple[dict[str, bytes], str, dict[str, bytes]]:
    """A bad template at templates/t, used by routes/bad/live; the fix is the plain intent."""
    writes = {"templates/t": body, "routes/bad/live": intent(template="t"), "routes/bad/active": b"live"}
    return writes, f"{K}: template: {reason}", FIX


# The template that ran a command as root on the old main: external-check behind a quoted "global".
RCE = B + b"""    option external-check
    external-check command /usr/bin/touch
    server x /tmp/flowproxy-pwned check inter 1s
"global"
    external-check
    insecure-fork-wanted
"""

# (id, keys written under the prefix, a reason that must be reported, keys that fix it)
CASES: list[tuple[str, dict[str, bytes], str, dict[str, bytes]]] = [
    ("not-json", *bad(b"{service: go-demo", f"{K}: value is not valid JSON")),
    ("raw-nul-byte", *bad(b'{"service": "go\x00demo", "paths": ["/bad"]}', f"{K}: value is not valid JSON")),
    ("not-utf8", *bad(b"\xff\xfe{}", f"{K}: value is not valid JSON")),
    ("json-list", *bad(b'["go-demo"]', f"{K}: value must be a JSON object, got list")),
    ("json-number", *bad(b"42", f"{K}: value must be a JSON object, got int")),
    ("json-null", *bad(b"null", f"{K}: value must be a JSON object, got NoneType")),
    ("empty-value", *bad(b"", f"{K}: value is not valid JSON")),
    ("unknown-field", *bad(intent(weight=5), f"{K}: weight: unknown field")),
    ("missing-service", *bad(b'{"paths": ["/bad"]}', f"{K}: service: is required")),
    ("no-paths-no-domains", *bad(b'{"service": "go-demo"}', f"{K}: at least one of paths or domains is required")),
    ("service-number", *bad(intent(service=7), f"{K}: service: must be a string, got int")),
    ("service-empty", *bad(intent(service=""), f"{K}: service: must not be empty")),
    ("service-space", *bad(intent(service="go demo"), f"{K}: service: 'go demo' is not a valid Consul service name")),
    ("service-newline", *bad(intent(service="go\nbackend x"), f"{K}: service: 'go\\nbackend x' is not")),
    ("service-non-ascii", *bad(intent(service="gö-demo"), f"{K}: service: 'gö-demo' is not")),
    ("paths-not-list", *bad(intent(paths="/bad"), f"{K}: paths: must be a list, got str")),
    ("paths-empty-list", *bad(intent(paths=[]), f"{K}: paths: must not be empty")),
    ("path-empty-string", *bad(intent(paths=[""]), f"{K}: paths[0]: must not be empty")),
    ("path-number", *bad(intent(paths=[5]), f"{K}: paths[0]: must be a string, got int")),
    ("path-no-slash", *bad(intent(paths=["bad"]), f"{K}: paths[0]: 'bad' must start with \"/\"")),
    ("path-space", *bad(intent(paths=["/bad path"]), f"{K}: paths[0]: '/bad path' has characters not allowed")),
    ("path-tab", *bad(intent(paths=["/bad\tx"]), f"{K}: paths[0]: '/bad\\tx' has characters not allowed")),
    ("path-cr", *bad(intent(paths=["/bad\r"]), f"{K}: paths[0]: '/bad\\r' has characters not allowed")),
    ("path-lf-injection", *bad(intent(paths=["/bad\nfrontend evil"]), f"{K}: paths[0]: '/bad\\nfrontend evil' has")),
    ("path-json-nul", *bad(intent(paths=["/bad\u0000"]), f"{K}: paths[0]: '/bad\\x00' has characters not allowed")),
    ("path-hash", *bad(intent(paths=["/bad#x"]), f"{K}: paths[0]: '/bad#x' has characters not allowed")),
    ("path-double-quote", *bad(intent(paths=['/bad"x']), f"{K}: paths[0]: '/bad\"x' has characters not allowed")),
    ("path-single-quote", *bad(intent(paths=["/bad'x"]), f"{K}: paths[0]: \"/bad'x\" has characters not allowed")),
    ("path-backslash", *bad(intent(paths=["/bad\\x"]), f"{K}: paths[0]: '/bad\\\\x' has characters not allowed")),
    ("path-non-ascii", *bad(intent(paths=["/café"]), f"{K}: paths[0]: '/café' has characters not allowed")),
    ("path-duplicate", *bad(intent(paths=["/bad", "/bad"]), f"{K}: paths[1]: duplicates paths[0]")),
    ("regex-invalid", *bad(intent(paths=["/(bad"], path_type="regex"), f"{K}: paths[0]: '/(bad' is not a valid regex")),
    ("regex-space", *bad(intent(paths=["/bad x"], path_type="regex"), f"{K}: paths[0]: '/bad x': regex must be")),
    ("path-type-unknown", *bad(intent(path_type="glob"), f"{K}: path_type: must be one of prefix, exact, regex")),
    ("domains-empty-list", *bad(intent(domains=[]), f"{K}: domains: must not be empty")),
    ("domain-space", *bad(intent(domains=["my domain.com"]), f"{K}: domains[0]: 'my domain.com' is not a valid")),
    ("domain-invalid", *bad(intent(domains=["-bad-.com"]), f"{K}: domains[0]: '-bad-.com' is not a valid")),
    ("domain-idn-unicode", *bad(intent(domains=["bücher.de"]), f"{K}: domains[0]: 'bücher.de' is not a valid")),
    ("domain-wildcard-middle", *bad(intent(domains=["a.*.com"]), f"{K}: domains[0]: 'a.*.com' is not a valid")),
    ("domain-port", *bad(intent(domains=["a.com:80"]), f"{K}: domains[0]: 'a.com:80' is not a valid")),
    ("tags-not-list", *bad(intent(tags="blue"), f"{K}: tags: must be a list, got str")),
    ("tag-space", *bad(intent(tags=["blue green"]), f"{K}: tags[0]: 'blue green' is not a valid tag")),
    ("tag-cr", *bad(intent(tags=["blue\r"]), f"{K}: tags[0]: 'blue\\r' is not a valid tag")),
    ("balance-unknown", *bad(intent(balance="random"), f"{K}: balance: must be one of roundrobin, leastconn, source")),
    ("check-string", *bad(intent(check="yes"), f"{K}: check: must be true or false, got 'yes'")),
    ("template-name-path", *bad(intent(template="../../etc/passwd"), f"{K}: template: '../../etc/passwd' is not")),
    ("template-name-space", *bad(intent(template="my template"), f"{K}: template: 'my template' is not")),
    ("template-missing", *bad(intent(template="nowhere"), f"{K}: template: template 'nowhere' is in neither")),
    ("too-large", *bad(intent(padding="x" * 70_000), f"{K}: value is 70")),
    ("active-missing-variant", {"routes/bad/live": intent(), "routes/bad/active": b"green"},
     "flowproxy/routes/bad/active: names variant 'green', which does not exist (variants: live)", FIX),
    ("active-junk", {"routes/bad/live": intent(), "routes/bad/active": b"live\nbackend evil"},
     "flowproxy/routes/bad/active: 'live\\nbackend evil' is not a variant name", FIX),
    ("conflict-with-older-route", {"routes/bad/live": intent(paths=["/ok"]), "routes/bad/active": b"live"},
     f"{K}: conflict: claims a (domain, path) already served by flowproxy/routes/anchor", FIX),
    ("template-fails-to-render", {"templates/broken": B + b"  {{ nothing }}\n",
                                  "routes/bad/live": intent(template="broken"), "routes/bad/active": b"live"},
     f"{K}: template: UndefinedError: 'nothing' is undefined", FIX),
    ("template-sandbox-escape", {"templates/evil": B + b"# {{ ''.__class__.__mro__ }}\n",
                                 "routes/bad/live": intent(template="evil"), "routes/bad/active": b"live"},
     f"{K}: template: SecurityError: access to attribute '__class__' of 'str' object is unsafe", FIX),
    ("template-other-section", *templated(B + b"frontend evil\n    bind :81\n",
                                          "line 2: opens another section ('frontend')")),
    ("template-unknown-keyword", *templated(B + b"    bogus_directive on\n",
                                            "line 2: 'bogus_directive' is not a backend keyword")),
    ("template-haproxy-refuses", *templated(B + b"    balance nosuchalgo\n",
                                            "haproxy -c refused fragment: config : parsing [fragment:")),
    # Read as HAProxy reads it: a quoted or escaped section keyword is still that keyword.
    ("template-quoted-global", *templated(RCE, "line 2: option 'external-check' is not allowed")),
    ("template-quoted-frontend", *templated(B + b'"frontend" evil\n  bind 127.0.0.1:1\n',
                                            "line 2: opens another section ('frontend')")),
    ("template-split-quotes", *templated(B + b"glo'bal'\n", "line 2: opens another section ('global')")),
    ("template-hex-escape", *templated(B + b"\\x67lobal\n", "line 2: opens another section ('global')")),
    ("template-conditional", *templated(B + b".if defined(HOME)\n.endif\n",
                                        "line 2: '.if' is not a backend keyword")),
    ("template-env-expansion", *templated(B + b'  http-response set-header X "${HOME}"\n',
                                          "line 2: '$' (environment expansion) is not allowed")),
    ("template-env-fetch", *templated(B + b"  http-response set-header X %[env(HOME)]\n",
                                      "line 2: '%[env(HOME)]' reads the environment, files or code")),
    ("template-lua", *templated(B + b"  http-request lua.evil\n", "line 2: 'lua.evil' reads the environment")),
    ("template-use-service", *templated(B + b"  http-request use-service prometheus-exporter\n",
                                        "line 2: 'use-service' loads files or code")),
    ("template-file-return", *templated(B + b"  http-request return status 200 file /etc/passwd\n",
                                        "line 2: 'file' loads files or code")),
    ("template-map-write", *templated(B + b"  http-request set-map(maps/path_beg.map) /x y\n",
                                      "line 2: 'set-map(maps/path_beg.map)' loads files or code")),
    ("template-stats-admin", *templated(B + b"  stats admin if TRUE\n",
                                        "line 2: 'stats' is not a backend keyword")),
    ("template-load-state", *templated(B + b"  load-server-state-from-file global\n",
                                       "line 2: 'load-server-state-from-file' is not a backend keyword")),
    # Cost: a template may not stall or crash the node, whatever it computes.
    ("template-range-bomb", *templated(B + b"{% for i in range(10**9) %}x{% endfor %}\n",
                                       "OverflowError: Range too big")),
    ("template-cpu-bomb", *templated(B + b"{% for i in range(100000) %}"
                                     b"{% for j in range(100000) %}{% endfor %}{% endfor %}\n",
                                     "rendering used more than its CPU time limit")),
    ("template-recursive-macro", *templated(b"{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
                                            "recursion too deep")),
    ("template-huge-output", *templated(B + b"# {{ 'x' * 30000000 }}\n",
                                        "output is over 65536 bytes")),
    ("template-memory-bomb", *templated(b"{{ 'x' * 10**10 }}", "used more than the memory a template may use")),
    ("json-nested-deep", *bad(b'{"service": "go-demo", "paths": ["/bad"], "x": ' + b"[" * 10_000 + b"]" * 10_000
                              + b"}", f"{K}: value nests arrays or objects too deeply")),
    ("active-weight-superscript", {"routes/bad/live": intent(), "routes/bad/active": "live=²,b=1".encode()},
     "flowproxy/routes/bad/active: 'live=²' is not variant=weight", FIX),
    # Regexes are compiled by HAProxy's PCRE2, which refuses what Python's `re` accepts.
    ("regex-posix-class", *bad(intent(paths=["/[:alpha:]"], path_type="regex"),
                               f"{K}: regex '/[:alpha:]' is refused by HAProxy's PCRE2: POSIX named classes")),
    ("rewrite-pcre-refuses", *bad(intent(rewrite={"search": "(?u)x", "replace": "/"}),
                                  f"{K}: regex '(?u)x' is refused by HAProxy's PCRE2: unrecognized character")),
    ("status-key-nested", {"status/edge-9/x": b"1"},
     "flowproxy/status/edge-9/x: key is outside the flowproxy KV contract", {}),
    ("route-name-uppercase", {"routes/Bad/live": intent()},
     "flowproxy/routes/Bad/live: route and variant names must match", {}),
    ("variant-name-space", {"routes/bad/live now": intent()},
     "flowproxy/routes/bad/live now: route and variant names must match", {}),
    ("key-outside-contract", {"config/global": b"maxconn 1"},
     "flowproxy/config/global: key is outside the flowproxy KV contract", {}),
]


@pytest.fixture(scope="module")
def anchored(proxy: ProxyNode) -> Iterator[ProxyNode]:
    """An anchor route that must keep serving through every case; `bad` routes go to go-demo."""
    anchor, demo = IdentityServer("anchor-1").start(), IdentityServer("go-demo-1").start()
    register_instance(proxy.store(), "anchor", "anchor-1", anchor.port)
    register_instance(proxy.store(), "go-demo", "go-demo-1", demo.port)
    yield proxy
    for service_id in ("anchor-1", "go-demo-1"):
        proxy.store().client.agent.service.deregister(service_id)
    anchor.stop()
    demo.stop()


@pytest.fixture
def anchor_route(anchored: ProxyNode) -> ProxyNode:
    anchored.store().put("flowproxy/routes/anchor/live", json.dumps({"service": "anchor", "paths": ["/ok"]}))
    anchored.store().put("flowproxy/routes/anchor/active", "live")
    anchored.wait_reply("/ok", 200)
    return anchored


def cli(proxy: ProxyNode, *args: str) -> str:
    """`status` and `route list` exit 9 while a route is rejected, 0 when only a key outside the contract is.
    The node's health check trails its state by up to one beat (a test's reset deletes every route), and
    `status` exits 7 meanwhile, as it should: wait for the check as a user would, then judge."""
    env = {**os.environ, **proxy.settings.env()}
    seen: list[subprocess.CompletedProcess[str]] = []

    def settled() -> bool:
        rejected = any(st.get("state") == "rejected" for st in (status_of(proxy).get("routes") or {}).values())
        seen[:] = [subprocess.run([FLOWPROXY, *args], env=env, capture_output=True, text=True, timeout=60,
                                  check=False)]
        return seen[0].returncode == (9 if rejected else 0)

    try:
        wait_for(settled, 10, f"flowproxy {' '.join(args)} to settle")
    except Exception:
        raise AssertionError(f"exit {seen[0].returncode}: {seen[0].stdout}{seen[0].stderr}") from None
    return seen[0].stdout


def reported(status: dict[str, Any]) -> list[str]:
    routes = status.get("routes") or {}
    return [r for st in routes.values() for r in st.get("reasons", [])] + list(status.get("problems") or [])


@pytest.mark.parametrize(("writes", "reason", "fix"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_alone_reported_and_never_lost(
        anchor_route: ProxyNode, writes: dict[str, bytes], reason: str, fix: dict[str, bytes]) -> None:
    proxy, store = anchor_route, anchor_route.store()
    for rel, value in writes.items():
        store.put("flowproxy/" + rel, value)
    wait_applied(proxy)
    wait_for(lambda: any(r.startswith(reason) for r in reported(status_of(proxy))), 20, f"{reason!r} reported")

    assert proxy.get("/ok").instance == "anchor-1"  # every other route keeps serving
    assert proxy.get("/bad").status == 404
    assert reason in cli(proxy, "status")
    assert reason in cli(proxy, "route", "list")
    assert reason in (proxy.settings.data_dir / "handler.log").read_text()
    for rel, value in writes.items():  # nothing in KV was changed or deleted
        entry = store.get("flowproxy/" + rel)
        assert entry is not None and entry.value == value

    for rel in writes:
        store.delete("flowproxy/" + rel)
    for rel, value in fix.items():
        store.put("flowproxy/" + rel, value)
    if fix:
        assert json.loads(proxy.wait_reply("/bad", 200).body)["instance"] == "go-demo-1"
    wait_for(lambda: not [r for r in reported(status_of(proxy)) if r.startswith(reason)], 20, "the reason to clear")


# The same mistakes made through the CLI: refused before writing, with the same words.
LINT = [
    ("path-no-slash", ["-p", "bad"], f"{K}: paths[0]: 'bad' must start with \"/\""),
    ("path-space", ["-p", "/bad path"], f"{K}: paths[0]: '/bad path' has characters not allowed"),
    ("path-hash", ["-p", "/bad#x"], f"{K}: paths[0]: '/bad#x' has characters not allowed"),
    ("regex-invalid", ["-p", "/(bad", "--path-type", "regex"], f"{K}: paths[0]: '/(bad' is not a valid regex"),
    ("domain-invalid", ["-d", "-bad-.com"], f"{K}: domains[0]: '-bad-.com' is not a valid"),
    ("tag-space", ["-p", "/bad", "-t", "blue green"], f"{K}: tags[0]: 'blue green' is not a valid tag"),
    ("template-name", ["-p", "/bad", "--template", "../x"], f"{K}: template: '../x' is not"),
    ("no-paths-no-domains", [], f"{K}: at least one of paths or domains is required"),
]


@pytest.mark.parametrize(("args", "reason"), [c[1:] for c in LINT], ids=[c[0] for c in LINT])
def test_route_put_refuses_what_the_node_would_reject(
        proxy: ProxyNode, args: list[str], reason: str, tmp_path: Path) -> None:
    env = {**os.environ, **proxy.settings.env()}
    done = subprocess.run([FLOWPROXY, "route", "put", "bad", "-v", "live", "-s", "go-demo", *args],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 4
    assert reason in done.stderr
    assert proxy.store().get(K) is None


def test_very_many_routes_are_served(anchored: ProxyNode, tmp_path: Path) -> None:
    store = anchored.store()
    ops: list[tuple[str, str, bytes | None, int | None]] = []
    for i in range(1500):
        ops.append(("set", f"flowproxy/routes/r{i}/live", intent(paths=[f"/r{i}"]), None))
        ops.append(("set", f"flowproxy/routes/r{i}/active", b"live", None))
    for start in range(0, len(ops), 64):  # Consul 1.8 caps a transaction at 64 operations
        store.txn(ops[start:start + 64])
    routes: dict[str, dict[str, Any]] = wait_applied(anchored, timeout=60)["routes"]
    assert sum(1 for st in routes.values() if st["state"] == "serving") == 1500
    for i in (0, 749, 1499):
        assert anchored.get(f"/r{i}/x").instance == "go-demo-1"
    store.delete("flowproxy/routes/", recurse=True)
    anchored.wait_reply("/r0/x", 404, timeout=60)

