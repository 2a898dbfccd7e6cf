"""Parse and validate one route intent (KV contract v1). Pure: bytes in, Intent or problems out.

Every value that can reach haproxy.cfg or a map file is checked against a strict character set here,
because `haproxy -c` accepts injected spaces, `#` and newlines (see shared field notes).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

from flowproxy.core.fields import (
    DOMAIN_RE,
    NAME_RE,
    SERVICE_RE,
    TAG_RE,
    Checker,
    boolean,
    enum,
    path,
    regex,
    string,
)
from flowproxy.core.model import Auth, Intent, Problem
from flowproxy.core.option_fields import OPTION_FIELDS, OPTION_LIST_FIELDS, option_rules

__all__ = ["BALANCES", "NAME_RE", "PATH_TYPES", "intent_to_json", "parse_intent"]
PATH_TYPES = ("prefix", "exact", "regex")
BALANCES = ("roundrobin", "leastconn", "source")
MAX_INTENT_BYTES = 64 * 1024
MAX_LIST = 256

FIELD_CHECKS: dict[str, Checker] = {
    "service": string(SERVICE_RE, "a valid Consul service name"),
    "path_type": enum(PATH_TYPES),
    "balance": enum(BALANCES),
    "check": boolean,
    "template": string(NAME_RE, "a valid template name ([a-z0-9][a-z0-9_.-]{0,62})"),
} | OPTION_FIELDS
LIST_FIELDS: dict[str, Checker] = {
    "tags": string(TAG_RE, "a valid tag (letters, digits and _.:=/+@-)"),
    "domains": string(DOMAIN_RE, "a valid domain name (lowercase, optional leading *.)"),
    "paths": lambda value, _field: [],  # checked against path_type in _check_path
} | OPTION_LIST_FIELDS


def _check_path(value: Any, path_type: str) -> list[str]:
    return regex(value) if path_type == "regex" else path(value)


def _check_list(name: str, value: Any, path_type: str) -> list[tuple[str, str]]:
    if not isinstance(value, list):
        return [(name, f"must be a list, got {type(value).__name__}")]
    if not value:
        return [(name, "must not be empty (omit the field instead)")]
    if len(value) > MAX_LIST:
        return [(name, f"has {len(value)} items, at most {MAX_LIST} are allowed")]
    found: list[tuple[str, str]] = []
    seen: dict[Any, int] = {}
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        errors = _check_path(item, path_type) if name == "paths" else LIST_FIELDS[name](item, where)
        found += [(where, e) for e in errors]
        if errors:
            continue
        if item in seen:
            found.append((where, f"duplicates {name}[{seen[item]}]"))
        seen.setdefault(item, i)
    return found


def _load(key: str, raw: bytes) -> tuple[dict[str, Any] | None, list[Problem]]:
    if len(raw) > MAX_INTENT_BYTES:
        return None, [Problem(key, f"value is {len(raw)} bytes, at most {MAX_INTENT_BYTES} are allowed")]
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return None, [Problem(key, f"value is not valid JSON: {exc}")]
    except RecursionError:
        return None, [Problem(key, "value nests arrays or objects too deeply")]
    if not isinstance(doc, dict):
        return None, [Problem(key, f"value must be a JSON object, got {type(doc).__name__}")]
    return doc, []


def parse_intent(key: str, raw: bytes) -> tuple[Intent | None, list[Problem]]:
    """Validate one intent; returns (intent, []) or (None, every problem found)."""
    intent, problems = _parse(key, raw)
    return intent, list(problems)


@functools.lru_cache(maxsize=32768)
def _parse(key: str, raw: bytes) -> tuple[Intent | None, tuple[Problem, ...]]:
    # Cached: the warm applier parses every intent on every change, and they rarely change (1,000 routes:
    # ~10 ms a run). Both sides are immutable, so a cached answer is the answer.
    intent, problems = _validate(key, raw)
    return intent, tuple(problems)


def _validate(key: str, raw: bytes) -> tuple[Intent | None, list[Problem]]:
    doc, problems = _load(key, raw)
    if doc is None:
        return None, problems
    known = set(FIELD_CHECKS) | set(LIST_FIELDS)
    problems += [Problem(key, "unknown field", name) for name in sorted(set(doc) - known)]
    if "service" not in doc:
        problems.append(Problem(key, "is required", "service"))
    if "paths" not in doc and "domains" not in doc and doc.get("mode", "http") == "http":
        problems.append(Problem(key, "at least one of paths or domains is required"))
    problems += [Problem(key, msg, where) for where, msg in option_rules(doc)]
    for name, check in FIELD_CHECKS.items():
        if name in doc:
            problems += [Problem(key, msg, name) for msg in check(doc[name], name)]
    path_type = doc.get("path_type", "prefix")
    path_type = path_type if path_type in PATH_TYPES else "prefix"
    for name in LIST_FIELDS:
        if name in doc:
            problems += [Problem(key, msg, where) for where, msg in _check_list(name, doc[name], path_type)]
    if problems:
        return None, problems
    return _build(doc), []


def _build(doc: dict[str, Any]) -> Intent:
    """The Intent of a validated document: simple fields by their own names (lists become tuples), the
    structured ones (auth, rewrite, health) spelled out."""
    auth, rewrite, health = doc.get("auth"), doc.get("rewrite"), doc.get("health", {})
    tls = doc.get("tls", {})
    simple: dict[str, Any] = {name: tuple(doc[name]) if isinstance(doc[name], list) else doc[name]
                              for name in SIMPLE if name in doc}
    return Intent(
        service=doc["service"],
        **simple,
        auth=Auth(auth.get("realm", "restricted"), tuple(sorted(auth["users"].items()))) if auth else None,
        rewrite=(rewrite["search"], rewrite["replace"]) if rewrite else None,
        health_path=health.get("path"),
        health_interval=health.get("interval"),
        acme=tls.get("acme", False),
    )


DEFAULTS = Intent(service="")
STRUCTURED = ("service", "auth", "rewrite", "health_path", "health_interval", "acme")
# Every other Intent field is simple: its JSON name is its name, its value a scalar or a list. A new simple
# field is declared in model.Intent and checked in option_fields; nothing here changes.
SIMPLE = tuple(f.name for f in dataclasses.fields(Intent) if f.name not in STRUCTURED)


def intent_to_json(intent: Intent) -> str:
    """The canonical JSON a CLI writes: only fields that differ from their defaults, sorted."""
    doc: dict[str, Any] = {"service": intent.service}
    for name in SIMPLE:
        value = getattr(intent, name)
        if value != getattr(DEFAULTS, name):
            doc[name] = list(value) if isinstance(value, tuple) else value
    if intent.auth is not None:
        doc["auth"] = {"realm": intent.auth.realm, "users": dict(intent.auth.users)}
    if intent.rewrite is not None:
        doc["rewrite"] = {"search": intent.rewrite[0], "replace": intent.rewrite[1]}
    health = {"path": intent.health_path, "interval": intent.health_interval}
    if any(health.values()):
        doc["health"] = {k: v for k, v in health.items() if v}
    if intent.acme:
        doc["tls"] = {"acme": True}
    return json.dumps(doc, sort_keys=True)
