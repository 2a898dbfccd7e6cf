"""Turn a KV listing of the prefix into a `Desired` value: the parser of the contract `core/contract.py`
lays out (v1). Pure: every key is judged alone, and a bad one becomes a `Problem`, never an exception.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

from flowproxy.core import contract
from flowproxy.core.contract import Kind
from flowproxy.core.faults import internal_error
from flowproxy.core.intent import NAME_RE, parse_intent
from flowproxy.core.memo import Memo, remembered
from flowproxy.core.model import Desired, KVEntry, Problem, Route, Variant

ACTIVE = contract.ACTIVE
MAX_TEMPLATE_BYTES = 256 * 1024
MAX_CERT_BYTES = 256 * 1024
MAX_WEIGHT = 1000
# RFC 8555 8.3: a token is base64url (at least 128 bits of entropy), a key authorization is
# "<token>.<base64url SHA-256 thumbprint>". Nothing else may reach the challenge map HAProxy answers from.
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
THUMBPRINT_RE = re.compile(r"[A-Za-z0-9_-]{43}")


RouteKey = tuple[str, tuple[KVEntry, ...], KVEntry | None]
# The warm applier's memos (`pipeline.Warm`): a key's shape, and a route's value from its entries. An
# event at 10,000 routes re-reads them all, and nearly all are as they were (a parse: ~150 -> ~40 ms).
ShapeMemo = Memo[str, tuple[contract.Key, bool]]
RouteMemo = Memo[RouteKey, Route]


def desired_from_kv(prefix: str, entries: Iterable[KVEntry], index: int = 0, *,
                    shapes: ShapeMemo | None = None, routes_memo: RouteMemo | None = None) -> Desired:
    intents: dict[str, list[KVEntry]] = defaultdict(list)
    actives: dict[str, KVEntry] = {}
    templates: dict[str, str] = {}
    certs: dict[str, bytes] = {}
    challenges: dict[str, str] = {}
    stray: list[Problem] = []
    accept_empty = False
    for entry in sorted(entries, key=lambda e: e.key):
        key, names_ok = _shape(prefix, entry.key, shapes)
        if key.kind in (Kind.OUTSIDE, Kind.ROOT, Kind.STATUS, Kind.ACME) or contract.is_folder_marker(entry.key,
                                                                                                      entry.value):
            continue
        if key.kind is Kind.ACCEPT_EMPTY:
            accept_empty = True
        elif key.kind is Kind.ACTIVE and names_ok:
            actives[key.names[0]] = entry
        elif key.kind is Kind.INTENT and names_ok:
            intents[key.names[0]].append(entry)
        elif key.kind is Kind.CHALLENGE:
            stray += _challenge(entry, key.names[0], challenges)
        else:
            try:
                problem = _classify(entry, key, templates, certs)
            except Exception as exc:  # one key flowproxy fails on is rejected alone
                problem = Problem(entry.key, internal_error(entry.key, "reading", exc))
            stray += [problem] if problem else []
    names = sorted(set(intents) | set(actives))
    routes = tuple(_remembered_route(name, intents.get(name, []), actives.get(name), routes_memo) for name in names)
    return Desired(prefix=prefix, routes=routes, templates=templates, certs=certs, stray=tuple(stray), index=index,
                   accept_empty=accept_empty, challenges=challenges)


def _classify(entry: KVEntry, key: contract.Key, templates: dict[str, str], certs: dict[str, bytes]) -> Problem | None:
    """File a templates/ or certs/ key, or say why a key is outside the contract."""
    if key.kind is Kind.TEMPLATE:
        return _template(entry, key.names[0], templates)
    if key.kind is Kind.CERT:
        return _cert(entry, key.names[0], certs)
    return Problem(entry.key, _stray_reason(key))


def _shape(prefix: str, key: str, memo: ShapeMemo | None) -> tuple[contract.Key, bool]:
    """The key's kind and names, and whether those names are valid route and variant names."""
    def judge() -> tuple[contract.Key, bool]:
        shape = contract.classify(prefix, key)
        return shape, _names_ok(shape.names)

    return remembered(memo, prefix + "\0" + key, judge)


def _remembered_route(name: str, intent_entries: list[KVEntry], active: KVEntry | None,
                      memo: RouteMemo | None) -> Route:
    return remembered(memo, (name, tuple(intent_entries), active), lambda: _safe_route(name, intent_entries, active))


def _safe_route(name: str, intent_entries: list[KVEntry], active: KVEntry | None) -> Route:
    try:
        return _route(name, intent_entries, active)
    except Exception as exc:  # the route is rejected with the reason; every other route goes on
        key = active.key if active is not None else intent_entries[0].key
        return Route(name=name, variants=(), active=ACTIVE, active_key=key,
                     problems=(Problem(key, internal_error(key, "reading", exc)),))


def _names_ok(names: tuple[str, ...]) -> bool:
    return all(NAME_RE.fullmatch(n) for n in names)


def _stray_reason(key: contract.Key) -> str:
    if key.kind in (Kind.INTENT, Kind.ACTIVE):
        return "route and variant names must match [a-z0-9][a-z0-9_.-]{0,62}; key ignored"
    return f"key is outside the flowproxy KV contract ({contract.SHAPES}); ignored"


def _template(entry: KVEntry, name: str, into: dict[str, str]) -> Problem | None:
    if not NAME_RE.fullmatch(name):
        return Problem(entry.key, "template names must match [a-z0-9][a-z0-9_.-]{0,62}; key ignored")
    if len(entry.value) > MAX_TEMPLATE_BYTES:
        return Problem(entry.key, f"template is {len(entry.value)} bytes, at most {MAX_TEMPLATE_BYTES}; ignored")
    try:
        into[name] = entry.value.decode("utf-8")
    except UnicodeDecodeError:
        return Problem(entry.key, "template is not UTF-8 text; ignored")
    return None


def _challenge(entry: KVEntry, token: str, into: dict[str, str]) -> list[Problem]:
    """An HTTP-01 answer: `<token>.<thumbprint>` under its own token, or refused (never served)."""
    text = entry.value.decode("ascii", "replace").strip()
    head, dot, thumbprint = text.partition(".")
    if not TOKEN_RE.fullmatch(token):
        return [Problem(entry.key, "challenge tokens are 16-128 base64url characters; key ignored")]
    if head != token or not dot or not THUMBPRINT_RE.fullmatch(thumbprint):
        return [Problem(entry.key, "a challenge answer is the key authorization '<token>.<thumbprint>'; "
                                   "key ignored")]
    into[token] = text
    return []


def _cert(entry: KVEntry, name: str, into: dict[str, bytes]) -> Problem | None:
    if not NAME_RE.fullmatch(name):
        return Problem(entry.key, "certificate names must match [a-z0-9][a-z0-9_.-]{0,62}; key ignored")
    if len(entry.value) > MAX_CERT_BYTES:
        return Problem(entry.key, f"certificate is {len(entry.value)} bytes, at most {MAX_CERT_BYTES}; ignored")
    into[name] = entry.value
    return None


def _route(name: str, intent_entries: list[KVEntry], active: KVEntry | None) -> Route:
    variants = []
    for entry in intent_entries:
        try:
            intent, problems = parse_intent(entry.key, entry.value)
        except Exception as exc:  # this variant is rejected; its route's other variants still count
            intent, problems = None, [Problem(entry.key, internal_error(entry.key, "reading", exc))]
        variants.append(Variant(route=name, name=entry.key.rsplit("/", 1)[1], key=entry.key,
                                intent=intent, problems=tuple(problems)))
    if active is None:
        return Route(name=name, variants=tuple(variants))
    chosen, problems = _active_value(active, {v.name for v in variants})
    weights: tuple[tuple[str, int], ...] = ()
    if chosen is not None and "=" in chosen and not problems:
        weights, problems = parse_weights(active.key, chosen, {v.name for v in variants})
    return Route(name=name, variants=tuple(variants), active=chosen, active_key=active.key,
                 active_since=active.create_index, problems=tuple(problems), weights=weights)


def _active_value(entry: KVEntry, variants: set[str]) -> tuple[str | None, list[Problem]]:
    try:
        text = entry.value.decode("utf-8").strip()
    except UnicodeDecodeError:
        return "?", [Problem(entry.key, "value is not UTF-8 text naming a variant")]
    if not text:
        return None, []
    if "=" in text:
        return text, []  # a weighted canary, parsed by parse_weights
    if not NAME_RE.fullmatch(text):
        return text, [Problem(entry.key, f"{text[:80]!r} is not a variant name ([a-z0-9][a-z0-9_.-]{{0,62}})")]
    if text not in variants:
        known = ", ".join(sorted(variants)) or "none"
        return text, [Problem(entry.key, f"names variant {text!r}, which does not exist (variants: {known})")]
    return text, []


def parse_weights(key: str, text: str, variants: set[str]) -> tuple[tuple[tuple[str, int], ...], list[Problem]]:
    """`blue=90,green=10`: at least two known variants, whole weights 0-1000, not all zero."""
    pairs: list[tuple[str, int]] = []
    problems: list[Problem] = []
    for part in text.split(","):
        name, _, weight = part.strip().partition("=")
        if not NAME_RE.fullmatch(name) or not (weight.isascii() and weight.isdigit()) or int(weight) > MAX_WEIGHT:
            problems.append(Problem(key, f"{part.strip()[:80]!r} is not variant=weight (a whole number 0-1000)"))
        elif name not in variants:
            problems.append(Problem(key, f"names variant {name!r}, which does not exist"))
        elif name in dict(pairs):
            problems.append(Problem(key, f"names variant {name!r} twice"))
        else:
            pairs.append((name, int(weight)))
    if not problems and (len(pairs) < 2 or not any(w for _, w in pairs)):
        problems.append(Problem(key, "a canary needs at least two variants and a weight above 0"))
    return (tuple(pairs), []) if not problems else ((), problems)
