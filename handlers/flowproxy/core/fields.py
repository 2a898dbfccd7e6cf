"""Checkers for single intent values. Pure. Each returns a list of messages, empty when the value is fine.

Every value that can reach haproxy.cfg or a map file is checked against a strict character set, because
`haproxy -c` accepts injected spaces, `#` and newlines (see shared field notes).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
TAG_RE = re.compile(r"[A-Za-z0-9_.:=/+@-]{1,128}")
# RFC 3986 path characters minus quotes, `#` and `\`: nothing that HAProxy or a map file would reinterpret.
PATH_RE = re.compile(r"/[A-Za-z0-9\-._~!$&()*+,;=:@/%]{0,1023}")
LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
DOMAIN_RE = re.compile(rf"(?:\*\.)?{LABEL}(?:\.{LABEL})+|{LABEL}")
EXACT_DOMAIN_RE = re.compile(rf"{LABEL}(?:\.{LABEL})+|{LABEL}")
REGEX_FORBIDDEN = re.compile(r"[\s#\"'\\\x00-\x1f\x7f]|[^\x00-\x7f]")
# Rewrite patterns may use backslash escapes (\d, \1): they are rendered in single quotes, where HAProxy
# takes every character literally, so only quotes, whitespace and control characters stay out.
REWRITE_FORBIDDEN = re.compile(r"[\s#\"'\x00-\x1f\x7f]|[^\x00-\x7f]")
DURATION_RE = re.compile(r"[1-9][0-9]{0,6}(?:ms|s|m|h)")

Checker = Callable[[Any, str], list[str]]


def string(pattern: re.Pattern[str], what: str) -> Checker:
    def check(value: Any, _field: str) -> list[str]:
        if not isinstance(value, str):
            return [f"must be a string, got {type(value).__name__}"]
        if not value:
            return ["must not be empty"]
        if not pattern.fullmatch(value):
            return [f"{value!r} is not {what}"]
        return []

    return check


def enum(choices: tuple[Any, ...]) -> Checker:
    def check(value: Any, _field: str) -> list[str]:
        if value not in choices or type(value) is not type(choices[0]):
            return [f"must be one of {', '.join(map(str, choices))}, got {value!r}"]
        return []

    return check


def boolean(value: Any, _field: str) -> list[str]:
    return [] if isinstance(value, bool) else [f"must be true or false, got {value!r}"]


def integer(low: int, high: int) -> Checker:
    def check(value: Any, _field: str) -> list[str]:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            return [f"must be a whole number from {low} to {high}, got {value!r}"]
        return []

    return check


def regex(value: Any, forbidden: re.Pattern[str] = REGEX_FORBIDDEN) -> list[str]:
    if not isinstance(value, str):
        return [f"must be a string, got {type(value).__name__}"]
    if not value:
        return ["must not be empty"]
    if forbidden.search(value) or len(value) > 1024:
        also = "" if forbidden is REWRITE_FORBIDDEN else " or '\\'"
        return [f"{value!r}: regex must be printable ASCII without spaces, quotes, '#'{also}"]
    try:
        re.compile(value)
    except re.error as exc:
        return [f"{value!r} is not a valid regex: {exc}"]
    return []


def path(value: Any) -> list[str]:
    if not isinstance(value, str):
        return [f"must be a string, got {type(value).__name__}"]
    if not value:
        return ["must not be empty"]
    if not value.startswith("/"):
        return [f'{value!r} must start with "/"']
    if not PATH_RE.fullmatch(value):
        return [f"{value!r} has characters not allowed in a path (spaces, quotes, '#', '\\', non-ASCII)"]
    return []


def obj(value: Any, known: dict[str, Checker], required: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Check a JSON object field by field; (sub-field, message) pairs, unknown sub-fields included."""
    if not isinstance(value, dict):
        return [("", f"must be a JSON object, got {type(value).__name__}")]
    found = [(name, "unknown field") for name in sorted(set(value) - set(known))]
    found += [(name, "is required") for name in required if name not in value]
    for name, check in known.items():
        if name in value:
            found += [(name, msg) for msg in check(value[name], name)]
    return found
