"""Parse and validate one route intent (KV contract v1). Pure: bytes in, Intent or problems out.

Every value that can reach haproxy.cfg or a map file is checked against a strict character set here,
because `haproxy -c` accepts injected spaces, `#` and newlines (see shared field notes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from flowproxy.model import Intent, Problem

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
TAG_RE = re.compile(r"[A-Za-z0-9_.:=/+@-]{1,128}")
# RFC 3986 path characters minus quotes, `#` and `\`: nothing that HAProxy or a map file would reinterpret.
PATH_RE = re.compile(r"/[A-Za-z0-9\-._~!$&()*+,;=:@/%]{0,1023}")
LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN_RE = re.compile(rf"(?:\*\.)?{LABEL}(?:\.{LABEL})+|{LABEL}")
REGEX_FORBIDDEN = re.compile(r"[\s#\"'\\\x00-\x1f\x7f]|[^\x00-\x7f]")
PATH_TYPES = ("prefix", "exact", "regex")
BALANCES = ("roundrobin", "leastconn", "source")
MAX_INTENT_BYTES = 64 * 1024
MAX_LIST = 256

Checker = Callable[[Any, str], list[str]]


def _string(pattern: re.Pattern[str], what: str) -> Checker:
    def check(value: Any, _field: str) -> list[str]:
        if not isinstance(value, str):
            return [f"must be a string, got {type(value).__name__}"]
        if not value:
            return ["must not be empty"]
        if not pattern.fullmatch(value):
            return [f"{value!r} is not {what}"]
        return []

    return check


def _enum(choices: tuple[str, ...]) -> Checker:
    def check(value: Any, _field: str) -> list[str]:
        if value not in choices or not isinstance(value, str):
            return [f"must be one of {', '.join(choices)}, got {value!r}"]
        return []

    return check


def _boolean(value: Any, _field: str) -> list[str]:
    return [] if isinstance(value, bool) else [f"must be true or false, got {value!r}"]


FIELD_CHECKS: dict[str, Checker] = {
    "service": _string(SERVICE_RE, "a valid Consul service name"),
    "path_type": _enum(PATH_TYPES),
    "balance": _enum(BALANCES),
    "check": _boolean,
    "template": _string(NAME_RE, "a valid template name ([a-z0-9][a-z0-9_.-]{0,62})"),
}
LIST_FIELDS: dict[str, Checker] = {
    "tags": _string(TAG_RE, "a valid tag (letters, digits and _.:=/+@-)"),
    "domains": _string(DOMAIN_RE, "a valid domain name (lowercase, optional leading *.)"),
    "paths": lambda value, _field: [],  # checked against path_type in _check_path
}


def _check_path(value: Any, path_type: str) -> list[str]:
    if not isinstance(value, str):
        return [f"must be a string, got {type(value).__name__}"]
    if not value:
        return ["must not be empty"]
    if path_type == "regex":
        if REGEX_FORBIDDEN.search(value) or len(value) > 1024:
            return [f"{value!r}: regex must be printable ASCII without spaces, quotes, '#' or '\\'"]
        try:
            re.compile(value)
        except re.error as exc:
            return [f"{value!r} is not a valid regex: {exc}"]
        return []
    if not value.startswith("/"):
        return [f'{value!r} must start with "/"']
    if not PATH_RE.fullmatch(value):
        return [f"{value!r} has characters not allowed in a path (spaces, quotes, '#', '\\', non-ASCII)"]
    return []


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
    if not isinstance(doc, dict):
        return None, [Problem(key, f"value must be a JSON object, got {type(doc).__name__}")]
    return doc, []


def parse_intent(key: str, raw: bytes) -> tuple[Intent | None, list[Problem]]:
    """Validate one intent; returns (intent, []) or (None, every problem found)."""
    doc, problems = _load(key, raw)
    if doc is None:
        return None, problems
    known = set(FIELD_CHECKS) | set(LIST_FIELDS)
    problems += [Problem(key, "unknown field", name) for name in sorted(set(doc) - known)]
    if "service" not in doc:
        problems.append(Problem(key, "is required", "service"))
    if "paths" not in doc and "domains" not in doc:
        problems.append(Problem(key, "at least one of paths or domains is required"))
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
    return Intent(
        service=doc["service"],
        paths=tuple(doc.get("paths", ())),
        domains=tuple(doc.get("domains", ())),
        tags=tuple(doc.get("tags", ())),
        path_type=doc.get("path_type", "prefix"),
        balance=doc.get("balance", "roundrobin"),
        check=doc.get("check", True),
        template=doc.get("template"),
    )


def intent_to_json(intent: Intent) -> str:
    """The canonical JSON a CLI writes: only fields that differ from their defaults, sorted."""
    doc: dict[str, Any] = {"service": intent.service}
    for name, default in (("paths", ()), ("domains", ()), ("tags", ())):
        if getattr(intent, name) != default:
            doc[name] = list(getattr(intent, name))
    for name, default2 in (("path_type", "prefix"), ("balance", "roundrobin"), ("check", True)):
        if getattr(intent, name) != default2:
            doc[name] = getattr(intent, name)
    if intent.template is not None:
        doc["template"] = intent.template
    return json.dumps(doc, sort_keys=True)
