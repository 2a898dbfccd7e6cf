"""parse_intent: every error names its key and field; unknown fields and wrong types are errors."""

from __future__ import annotations

import json

import pytest

from flowproxy.intent import intent_to_json, parse_intent
from flowproxy.model import Intent

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
    ("domains-only", {"service": "web", "domains": ["my-domain.com", "*.example.com"]},
     Intent("web", domains=("my-domain.com", "*.example.com"))),
    ("everything", {"service": "api", "paths": ["/v1", "/v2"], "path_type": "exact", "tags": ["blue", "env=prod"],
                    "balance": "leastconn", "check": False, "template": "custom", "domains": ["api.io"]},
     Intent("api", paths=("/v1", "/v2"), domains=("api.io",), tags=("blue", "env=prod"), path_type="exact",
            balance="leastconn", check=False, template="custom")),
    ("regex", {"service": "api", "paths": ["^/api/v[0-9]+/"], "path_type": "regex"},
     Intent("api", paths=("^/api/v[0-9]+/",), path_type="regex")),
    ("localhost-domain", {"service": "api", "domains": ["localhost"]}, Intent("api", domains=("localhost",))),
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
