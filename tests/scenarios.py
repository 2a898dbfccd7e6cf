"""Named KV + catalog scenarios shared by the golden render tests and the HAProxy routing tests."""

from __future__ import annotations

import json
from typing import Any

from flowproxy.core.model import Instance, KVEntry

P = "flowproxy/"


def routes(spec: dict[str, dict[str, Any]], templates: dict[str, str] | None = None) -> list[KVEntry]:
    """spec: route name -> intent; each route gets variant `live`, activated in name order."""
    out = []
    for i, (name, intent) in enumerate(sorted(spec.items())):
        out.append(KVEntry(f"{P}routes/{name}/live", json.dumps(intent).encode(), 1, 1))
        out.append(KVEntry(f"{P}routes/{name}/active", b"live", 100 + i, 100 + i))
    for name, body in (templates or {}).items():
        out.append(KVEntry(f"{P}templates/{name}", body.encode(), 1, 1))
    return out


# Every flavour of claim, so the routing tests can check that the most specific one wins.
PRECEDENCE = {
    "any-prefix-short": {"service": "s1", "paths": ["/a"]},
    "any-prefix-long": {"service": "s2", "paths": ["/a/b"]},
    "any-exact": {"service": "s3", "paths": ["/a/b/exact"], "path_type": "exact"},
    "any-regex": {"service": "s4", "paths": ["^/r/[0-9]+$"], "path_type": "regex"},
    "host-prefix": {"service": "s5", "domains": ["my-domain.com"], "paths": ["/a"]},
    "host-only": {"service": "s6", "domains": ["only.io"]},
    "wild": {"service": "s7", "domains": ["*.example.com"]},
    "wild-exact": {"service": "s8", "domains": ["*.example.com"], "paths": ["/w"], "path_type": "exact"},
    "exact-host-beats-wild": {"service": "s9", "domains": ["www.example.com"], "paths": ["/"]},
    "host-regex": {"service": "s10", "domains": ["api.io"], "paths": ["/v[0-9]+/"], "path_type": "regex"},
}
PRECEDENCE_HEALTH = {f"s{i}": [Instance("127.0.0.1", 10000 + i, f"s{i}-1", "n1")] for i in range(1, 11)}

# (id, Host header, path, the route that must answer; None = the default 404)
PRECEDENCE_EXPECT = [
    ("short-prefix", "x.org", "/a/z", "any-prefix-short"),
    ("prefix-is-string-prefix", "x.org", "/abc", "any-prefix-short"),
    ("longer-prefix-wins", "x.org", "/a/b/c", "any-prefix-long"),
    ("exact-beats-prefix", "x.org", "/a/b/exact", "any-exact"),
    ("exact-only-exact", "x.org", "/a/b/exact/more", "any-prefix-long"),
    ("regex", "x.org", "/r/42", "any-regex"),
    ("regex-anchored", "x.org", "/r/42/x", None),
    ("host-path-beats-path", "my-domain.com", "/a/b/c", "host-prefix"),
    ("host-with-port", "my-domain.com:8080", "/a", "host-prefix"),
    ("host-case-insensitive", "MY-DOMAIN.com", "/a", "host-prefix"),
    ("host-other-path-falls-back", "my-domain.com", "/zzz", None),
    ("host-only-any-path", "only.io", "/anything", "host-only"),
    ("wildcard", "shop.example.com", "/x", "wild"),
    ("wildcard-one-label-only", "a.b.example.com", "/x", None),
    ("wildcard-not-apex", "example.com", "/x", None),
    ("wildcard-exact-path", "shop.example.com", "/w", "wild-exact"),
    ("exact-host-beats-wildcard", "www.example.com", "/w", "exact-host-beats-wild"),
    ("host-regex", "api.io", "/v2/users", "host-regex"),
    ("host-regex-no-match-falls-to-path", "api.io", "/a", "any-prefix-short"),
    ("no-route", "x.org", "/nothing", None),
]

CUSTOM_TEMPLATE = "backend {{ backend.name }}\n    http-response set-header X-Custom {{ backend.route }}\n" \
                  "{% for s in backend.servers %}    server {{ s.name }} {{ s.endpoint }}\n{% endfor %}"

HASH = "$6$saltsalt$" + "x" * 86
EDGE: dict[str, dict[str, Any]] = {
    "web": {"service": "web", "domains": ["a.example.test"], "https_only": True, "redirect_code": 308,
            "redirect_from": ["www.a.example.test"]},
    "api": {"service": "api", "paths": ["/api"], "strip_prefix": "/api", "timeout_server": "30s",
            "auth": {"realm": "Staff only", "users": {"alice": HASH}}, "health": {"path": "/health", "interval": "5s"}},
    "old": {"service": "api", "paths": ["/old"], "rewrite": {"search": "^/old/(.*)", "replace": "/new/\\1"}},
    "db": {"service": "db", "mode": "tcp", "port": 15432, "timeout_tunnel": "1h"},
    "tls": {"service": "web", "mode": "sni", "domains": ["c.example.test", "*.d.example.test"]},
    "src": {"service": "api", "paths": ["/src"], "balance": "source"},
}
EDGE_KV = [
    *routes(EDGE),
    KVEntry(f"{P}routes/can/blue", b'{"service": "web", "tags": ["blue"], "paths": ["/can"]}', 1, 1),
    KVEntry(f"{P}routes/can/green", b'{"service": "web", "tags": ["green"], "paths": ["/can"]}', 1, 1),
    KVEntry(f"{P}routes/can/active", b"blue=90,green=10", 200, 200),
    KVEntry(f"{P}certs/site", b"-----BEGIN CERTIFICATE-----\n(test)\n", 1, 1),
]
EDGE_HEALTH = {"web": [Instance("10.0.1.1", 80, tags=("blue",)), Instance("10.0.1.2", 80, tags=("green",))],
               "api": [Instance("10.0.2.1", 8080)], "db": [Instance("10.0.3.1", 5432)]}

TOKEN = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
ACME_KV = [
    *routes({"shop": {"service": "web", "domains": ["shop.example.test"], "https_only": True,
                      "tls": {"acme": True}}}),
    KVEntry(f"{P}acme/challenges/{TOKEN}", f"{TOKEN}.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI".encode(), 1, 1),
    KVEntry(f"{P}acme/locks/acme-shop", b"", 1, 1),  # the worker's bookkeeping: no part of the config
]

SCENARIOS: dict[str, tuple[list[KVEntry], dict[str, list[Instance]]]] = {
    "empty": ([], {}),
    "walkthrough": (routes({"go-demo": {"service": "go-demo", "paths": ["/demo/hello", "/demo/person"]}}),
                    {"go-demo": [Instance("10.0.0.3", 31002), Instance("10.0.0.1", 31000),
                                 Instance("10.0.0.2", 31001)]}),
    "precedence": (routes(PRECEDENCE), PRECEDENCE_HEALTH),
    "options": (routes({"api": {"service": "api", "paths": ["/api"], "balance": "leastconn", "check": False},
                        "down": {"service": "nobody", "paths": ["/down"]}}),
                {"api": [Instance("::1", 9000), Instance("api.internal", 9001)]}),
    "templates": (routes({"kv-tpl": {"service": "s1", "paths": ["/k"], "template": "custom"},
                          "file-tpl": {"service": "s1", "paths": ["/f"], "template": "example"}},
                         {"custom": CUSTOM_TEMPLATE}), {"s1": [Instance("127.0.0.1", 9000)]}),
    "edge": (EDGE_KV, EDGE_HEALTH),
    "acme": (ACME_KV, {"web": [Instance("10.0.1.1", 80)]}),
}
