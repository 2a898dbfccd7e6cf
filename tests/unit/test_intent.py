"""parse_intent: every error names its key and field; unknown fields and wrong types are errors."""

from __future__ import annotations

import json

import pytest

from flowproxy.core.intent import intent_to_json, parse_intent
from flowproxy.core.model import Auth, Intent

KEY = "flowproxy/routes/api/blue"

# (id, raw value, expected messages: each must appear in the problems, in this order)
ERRORS = [
    ("not-json", b"{nope", [f"{KEY}: value is not valid JSON"]),
    ("not-utf8", b"\xff\xfe", [f"{KEY}: value is not valid JSON"]),
    ("json-list", b"[1, 2]", [f"{KEY}: value must be a JSON object, got list"]),
    ("json-string", b'"x"', [f"{KEY}: value must be a JSON object, got str"]),
    ("json-null", b"null", [f"{KEY}: value must be a JSON object, got NoneType"]),
    ("empty-object", b"{}", [f"{KEY}: service: is required", f"{KEY}: at least one of paths or domains"]),
    ("missing-service", b'{"paths": ["/a"]}', [f"{KEY}: service: is required"]),
    ("no-paths-no-domains", b'{"service": "api"}', [f"{KEY}: at least one of paths or domains is required"]),
    ("unknown-field", b'{"service": "api", "paths": ["/a"], "colour": "red"}', [f"{KEY}: colour: unknown field"]),
    ("service-int", b'{"service": 5, "paths": ["/a"]}', [f"{KEY}: service: must be a string, got int"]),
    ("service-empty", b'{"service": "", "paths": ["/a"]}', [f"{KEY}: service: must not be empty"]),
    ("service-space", b'{"service": "a b", "paths": ["/a"]}', [f"{KEY}: service: 'a b' is not a valid Consul"]),
    ("paths-string", b'{"service": "api", "paths": "/a"}', [f"{KEY}: paths: must be a list, got str"]),
    ("paths-empty", b'{"service": "api", "paths": []}', [f"{KEY}: paths: must not be empty"]),
    ("path-no-slash", b'{"service": "api", "paths": ["a"]}', [f'{KEY}: paths[0]: \'a\' must start with "/"']),
    ("path-empty", b'{"service": "api", "paths": [""]}', [f"{KEY}: paths[0]: must not be empty"]),
    ("path-int", b'{"service": "api", "paths": [1]}', [f"{KEY}: paths[0]: must be a string, got int"]),
    ("path-space", b'{"service": "api", "paths": ["/a b"]}', [f"{KEY}: paths[0]: '/a b' has characters"]),
    ("path-hash", b'{"service": "api", "paths": ["/a#b"]}', [f"{KEY}: paths[0]: '/a#b' has characters"]),
    ("path-newline", b'{"service": "api", "paths": ["/a\\nb"]}', [f"{KEY}: paths[0]:"]),
    ("path-quote", b'{"service": "api", "paths": ["/a\\"b"]}', [f"{KEY}: paths[0]:"]),
    ("path-non-ascii", '{"service": "api", "paths": ["/é"]}'.encode(), [f"{KEY}: paths[0]:"]),
    ("path-duplicate", b'{"service": "api", "paths": ["/a", "/a"]}', [f"{KEY}: paths[1]: duplicates paths[0]"]),
    ("regex-invalid", b'{"service": "api", "paths": ["/(a"], "path_type": "regex"}',
     [f"{KEY}: paths[0]: '/(a' is not a valid regex"]),
    ("regex-space", b'{"service": "api", "paths": ["/a b"], "path_type": "regex"}', [f"{KEY}: paths[0]:"]),
    ("path-type-bad", b'{"service": "api", "paths": ["/a"], "path_type": "glob"}',
     [f"{KEY}: path_type: must be one of prefix, exact, regex, got 'glob'"]),
    ("domain-bad", b'{"service": "api", "domains": ["exa mple.com"]}',
     [f"{KEY}: domains[0]: 'exa mple.com' is not"]),
    ("domain-upper", b'{"service": "api", "domains": ["Example.com"]}', [f"{KEY}: domains[0]:"]),
    ("domain-wild-middle", b'{"service": "api", "domains": ["a.*.com"]}', [f"{KEY}: domains[0]:"]),
    ("domain-wild-tld", b'{"service": "api", "domains": ["*.com"]}', [f"{KEY}: domains[0]:"]),
    ("balance-bad", b'{"service": "api", "paths": ["/a"], "balance": "random"}', [f"{KEY}: balance: must be one of"]),
    ("check-string", b'{"service": "api", "paths": ["/a"], "check": "yes"}', [f"{KEY}: check: must be true or false"]),
    ("check-int", b'{"service": "api", "paths": ["/a"], "check": 1}', [f"{KEY}: check: must be true or false"]),
    ("tags-bad", b'{"service": "api", "paths": ["/a"], "tags": ["a b"]}',
     [f"{KEY}: tags[0]: 'a b' is not a valid tag"]),
    ("template-bad", b'{"service": "api", "paths": ["/a"], "template": "../x"}', [f"{KEY}: template: '../x' is not"]),
    ("too-big", json.dumps({"service": "a", "paths": ["/a"], "x": "y" * 70000}).encode(), [f"{KEY}: value is 70"]),
    ("many-errors", b'{"service": 1, "paths": ["a", "/b c"], "zz": 1}',
     [f"{KEY}: zz: unknown field", f"{KEY}: service: must be a string", f"{KEY}: paths[0]:", f"{KEY}: paths[1]:"]),
]
HASH = "$6$saltsalt$" + "x" * 86
EDGE_ERRORS = [
    ("mode-bad", {"mode": "udp"}, [f"{KEY}: mode: must be one of http, tcp, sni, got 'udp'"]),
    ("tcp-needs-port", {"mode": "tcp", "paths": None}, [f"{KEY}: port: is required with mode tcp"]),
    ("tcp-no-paths", {"mode": "tcp", "port": 5432}, [f"{KEY}: paths: is not allowed with mode tcp"]),
    ("port-range", {"mode": "tcp", "port": 70000, "paths": None},
     [f"{KEY}: port: must be a whole number from 1 to 65535, got 70000"]),
    ("port-bool", {"mode": "tcp", "port": True, "paths": None}, [f"{KEY}: port: must be a whole number"]),
    ("port-on-http", {"port": 8080}, [f"{KEY}: port: is not allowed with mode http"]),
    ("sni-needs-domains", {"mode": "sni"}, [f"{KEY}: domains: is required with mode sni",
                                            f"{KEY}: paths: is not allowed with mode sni"]),
    ("sni-no-auth", {"mode": "sni", "paths": None, "domains": ["a.io"], "auth": {"users": {"a": HASH}}},
     [f"{KEY}: auth: is not allowed with mode sni"]),
    ("https-only-string", {"https_only": "yes"}, [f"{KEY}: https_only: must be true or false"]),
    ("redirect-code", {"redirect_code": 300}, [f"{KEY}: redirect_code: must be one of 301, 302, 303, 307, 308"]),
    ("redirect-code-string", {"redirect_code": "301"}, [f"{KEY}: redirect_code: must be one of"]),
    ("redirect-from-needs-domains", {"redirect_from": ["www.a.io"]},
     [f"{KEY}: redirect_from: needs domains: requests are redirected to the first one"]),
    ("redirect-from-wildcard", {"domains": ["a.io"], "redirect_from": ["*.a.io"]},
     [f"{KEY}: redirect_from[0]: '*.a.io' is not a domain name (lowercase, no wildcard)"]),
    ("redirect-from-self", {"domains": ["a.io"], "redirect_from": ["a.io"]},
     [f"{KEY}: redirect_from: 'a.io' is also in domains"]),
    ("auth-plain-password", {"auth": {"users": {"alice": "secret"}}},
     [f"{KEY}: auth: users: alice: must be a crypt(3) hash ($6$, $5$, $y$ or $2b$), never a plain password"]),
    ("auth-md5", {"auth": {"users": {"alice": "$1$salt$abcdefghijklmnopqrstuv"}}}, [f"{KEY}: auth: users: alice:"]),
    ("auth-no-users", {"auth": {"realm": "x"}}, [f"{KEY}: auth: users: is required"]),
    ("auth-empty-users", {"auth": {"users": {}}}, [f"{KEY}: auth: users: must be a non-empty JSON object"]),
    ("auth-bad-user", {"auth": {"users": {"a b": HASH}}}, [f"{KEY}: auth: users: 'a b': user names are"]),
    ("auth-realm-quote", {"auth": {"realm": 'a"b', "users": {"a": HASH}}}, [f"{KEY}: auth: realm: 'a\"b' is not"]),
    ("auth-unknown", {"auth": {"users": {"a": HASH}, "salt": 1}}, [f"{KEY}: auth: salt: unknown field"]),
    ("auth-not-object", {"auth": "alice"}, [f"{KEY}: auth: must be a JSON object, got str"]),
    ("strip-no-slash", {"strip_prefix": "api"}, [f'{KEY}: strip_prefix: \'api\' must start with "/"']),
    ("rewrite-missing", {"rewrite": {"search": "^/a"}}, [f"{KEY}: rewrite: replace: is required"]),
    ("rewrite-bad-regex", {"rewrite": {"search": "^/(a", "replace": "/b"}},
     [f"{KEY}: rewrite: search: '^/(a' is not a valid regex"]),
    ("rewrite-space", {"rewrite": {"search": "^/a b", "replace": "/b"}}, [f"{KEY}: rewrite: search:"]),
    ("rewrite-percent", {"rewrite": {"search": "^/a", "replace": "/%[src]"}}, [f"{KEY}: rewrite: replace:"]),
    ("rewrite-quote", {"rewrite": {"search": "^/a'", "replace": "/b"}}, [f"{KEY}: rewrite: search:"]),
    ("timeout-bad", {"timeout_server": "30"}, [f"{KEY}: timeout_server: '30' is not a duration"]),
    ("timeout-tunnel-bad", {"timeout_tunnel": "1 h"}, [f"{KEY}: timeout_tunnel:"]),
    ("health-path", {"health": {"path": "health"}}, [f'{KEY}: health: path: \'health\' must start with "/"']),
    ("health-interval", {"health": {"interval": "fast"}}, [f"{KEY}: health: interval:"]),
    ("health-path-on-tcp", {"mode": "tcp", "port": 1, "paths": None, "health": {"path": "/h"}},
     [f"{KEY}: health.path: HTTP checks need mode http, not tcp"]),
    ("tls-not-object", {"domains": ["a.io"], "tls": True}, [f"{KEY}: tls: must be a JSON object, got bool"]),
    ("tls-unknown", {"domains": ["a.io"], "tls": {"acme": True, "ca": "x"}}, [f"{KEY}: tls: ca: unknown field"]),
    ("tls-acme-string", {"domains": ["a.io"], "tls": {"acme": "yes"}}, [f"{KEY}: tls: acme: must be true or false"]),
    ("acme-needs-domains", {"tls": {"acme": True}}, [f"{KEY}: tls.acme: needs domains"]),
    ("acme-no-wildcard", {"domains": ["a.io", "*.b.io"], "tls": {"acme": True}},
     [f"{KEY}: tls.acme: '*.b.io': HTTP-01 cannot prove a wildcard name"]),
    ("acme-not-on-sni", {"mode": "sni", "paths": None, "domains": ["a.io"], "tls": {"acme": True}},
     [f"{KEY}: tls.acme: certificates for mode sni routes are the service's own"]),
]


@pytest.mark.parametrize(("extra", "expected"), [(x, e) for _, x, e in EDGE_ERRORS], ids=[i for i, _, _ in EDGE_ERRORS])
def test_edge_fields_reject_with_key_and_field(extra: dict[str, object], expected: list[str]) -> None:
    doc = {k: v for k, v in ({"service": "api", "paths": ["/a"]} | extra).items() if v is not None}
    test_rejects_with_key_and_field(json.dumps(doc).encode(), expected)


@pytest.mark.parametrize(("raw", "expected"), [(r, e) for _, r, e in ERRORS], ids=[i for i, _, _ in ERRORS])
def test_rejects_with_key_and_field(raw: bytes, expected: list[str]) -> None:
    intent, problems = parse_intent(KEY, raw)
    assert intent is None
    messages = [str(p) for p in problems]
    for want in expected:
        assert any(m.startswith(want) for m in messages), f"{want!r} not in {messages}"
    assert all(m.startswith(KEY + ": ") for m in messages)


ACCEPTED = [
    ("minimal", {"service": "go-demo", "paths": ["/demo"]}, Intent("go-demo", paths=("/demo",))),
    ("acme", {"service": "web", "domains": ["a.io", "www.a.io"], "tls": {"acme": True}},
     Intent("web", domains=("a.io", "www.a.io"), acme=True)),
    ("acme-off", {"service": "web", "domains": ["*.a.io"], "tls": {"acme": False}}, Intent("web", domains=("*.a.io",))),
    ("domains-only", {"service": "web", "domains": ["my-domain.com", "*.example.com"]},
     Intent("web", domains=("my-domain.com", "*.example.com"))),
    ("everything", {"service": "api", "paths": ["/v1", "/v2"], "path_type": "exact", "tags": ["blue", "env=prod"],
                    "balance": "leastconn", "check": False, "template": "custom", "domains": ["api.io"]},
     Intent("api", paths=("/v1", "/v2"), domains=("api.io",), tags=("blue", "env=prod"), path_type="exact",
            balance="leastconn", check=False, template="custom")),
    ("regex", {"service": "api", "paths": ["^/api/v[0-9]+/"], "path_type": "regex"},
     Intent("api", paths=("^/api/v[0-9]+/",), path_type="regex")),
    ("localhost-domain", {"service": "api", "domains": ["localhost"]}, Intent("api", domains=("localhost",))),
    ("tcp", {"service": "db", "mode": "tcp", "port": 5432, "timeout_tunnel": "1h"},
     Intent("db", mode="tcp", port=5432, timeout_tunnel="1h")),
    ("sni", {"service": "tls", "mode": "sni", "domains": ["a.io", "*.b.io"]},
     Intent("tls", mode="sni", domains=("a.io", "*.b.io"))),
    ("edge-http", {"service": "web", "domains": ["a.io"], "https_only": True, "redirect_code": 308,
                   "redirect_from": ["www.a.io"], "auth": {"realm": "Staff only", "users": {"bob": HASH, "al": HASH}},
                   "strip_prefix": "/api", "rewrite": {"search": "^/old/(\\d+)", "replace": "/new/\\1"},
                   "timeout_server": "30s", "health": {"path": "/health", "interval": "5s"}},
     Intent("web", domains=("a.io",), https_only=True, redirect_code=308, redirect_from=("www.a.io",),
            auth=Auth("Staff only", (("al", HASH), ("bob", HASH))), strip_prefix="/api",
            rewrite=("^/old/(\\d+)", "/new/\\1"), timeout_server="30s", health_path="/health",
            health_interval="5s")),
]


@pytest.mark.parametrize(("doc", "expected"), [(d, e) for _, d, e in ACCEPTED], ids=[i for i, _, _ in ACCEPTED])
def test_accepts(doc: dict[str, object], expected: Intent) -> None:
    intent, problems = parse_intent(KEY, json.dumps(doc).encode())
    assert problems == []
    assert intent == expected


@pytest.mark.parametrize("intent", [e for _, _, e in ACCEPTED], ids=[i for i, _, _ in ACCEPTED])
def test_canonical_json_round_trips(intent: Intent) -> None:
    again, problems = parse_intent(KEY, intent_to_json(intent).encode())
    assert problems == [] and again == intent
