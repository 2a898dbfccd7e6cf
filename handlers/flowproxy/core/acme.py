"""Certificates from an ACME CA, decided once for the fleet. Pure: what is wanted, what is due, when to
try again, and the documents the ACME worker (`node/certifier.py`) keeps in KV.

- A certificate is wanted for the `domains` of every active variant whose intent says `"tls": {"acme":
  true}`; one per set of names, named `acme-<first name>-<hash of the set>` (routes with the same names
  share it), stored as `certs/<name>` with Consul flags ACME_FLAG, so a key a user wrote under that name is
  never overwritten.
- It is due when missing, when its names changed, or when a third of its lifetime is left.
- A failed attempt waits `retry * 2**(failures-1)` seconds (at most `retry_max`, at least the CA's
  Retry-After) before the next, fleet-wide: the state lives in KV `acme/state/<name>`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from flowproxy.core.model import Desired
from flowproxy.core.pem import CertFacts
from flowproxy.core.pem import facts as pem_facts

ACME_FLAG = 0x41434D45  # "ACME": Consul KV flags of a certs/<name> key the ACME worker wrote
CERT_PREFIX = "acme-"
RENEW_WHEN_LEFT = 1 / 3  # of the lifetime
CHALLENGE_PATH = "/.well-known/acme-challenge/"  # RFC 8555 8.3: where HTTP-01 answers are fetched


@dataclass(frozen=True)
class Wanted:
    name: str
    domains: tuple[str, ...]  # sorted
    routes: tuple[str, ...]  # the routes that ask for it, sorted


def cert_name(domains: tuple[str, ...]) -> str:
    """`acme-<first name>-<8 hex of the set>`: readable, and within certs/' 63 characters."""
    names = sorted(set(domains))
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:8]
    return f"{CERT_PREFIX}{names[0][:44].rstrip('.-')}-{digest}"


def account_id(directory: str) -> str:
    """The name of a directory's account under acme/accounts/: one account per CA for the whole fleet."""
    return hashlib.sha256(directory.encode()).hexdigest()[:16]


def wanted(desired: Desired) -> dict[str, Wanted]:
    """The certificates the active routes ask for, by name."""
    asked: dict[tuple[str, ...], set[str]] = {}
    for route in desired.routes:
        if route.problems:
            continue
        serving = {v for v, _ in route.weights} if route.weights else {route.active} if route.active else set()
        for variant in route.variants:
            intent = variant.intent
            if variant.name in serving and intent is not None and intent.acme and intent.domains:
                asked.setdefault(tuple(sorted(set(intent.domains))), set()).add(route.name)
    out = {}
    for domains, routes in asked.items():
        name = cert_name(domains)
        out[name] = Wanted(name, domains, tuple(sorted(routes)))
    return out


@dataclass(frozen=True)
class State:
    """KV `acme/state/<name>`: what the fleet knows of one certificate's issuance (written by the node that
    holds its lock; read by every node, `flowproxy status` and the metrics)."""

    domains: tuple[str, ...] = ()
    issuer: str | None = None
    not_after: float | None = None
    serial: str | None = None
    issued_at: float | None = None
    issued_by: str | None = None  # node
    orders: int = 0  # orders placed for it, ever
    failures: int = 0  # consecutive failed attempts
    last_error: str | None = None
    last_error_type: str | None = None  # the ACME problem type's last part (rateLimited, connection, ...)
    last_attempt: float | None = None
    next_attempt: float | None = None  # no node tries before this (backoff)
    working: str | None = None  # what the holder is doing now, for status
    routes: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def state_from(raw: bytes | None) -> State:
    """A state document; a missing or unreadable one is a fresh state (the worker rewrites it)."""
    if not raw:
        return State()
    try:
        doc = json.loads(raw)
        known = {k: v for k, v in doc.items() if k in State.__dataclass_fields__}
        for name in ("domains", "routes"):
            known[name] = tuple(str(d) for d in known.get(name) or ())
        return State(**known)
    except (ValueError, TypeError, AttributeError):
        return State()


@dataclass(frozen=True)
class Held:
    """What KV `certs/<name>` holds now."""

    facts: CertFacts | None
    ours: bool  # written by an ACME worker (its flags)


@dataclass(frozen=True)
class Verdict:
    action: str  # fresh | due | waiting | blocked
    reason: str = ""


def verdict(want: Wanted, held: Held | None, state: State, now: float) -> Verdict:
    """What to do about one wanted certificate now."""
    if held is not None and not held.ours:
        return Verdict("blocked", f"certs/{want.name} was not written by ACME; it is served as it is and "
                                  "never overwritten (delete it to let ACME issue one)")
    reason = _due_reason(want, held, now)
    if reason is None:
        return Verdict("fresh")
    retry = state.next_attempt or 0.0
    if state.failures and now < retry and tuple(state.domains) == want.domains:
        return Verdict("waiting", f"{reason}; after {state.failures} failed attempt(s), next at {iso(retry)}")
    return Verdict("due", reason)


def _due_reason(want: Wanted, held: Held | None, now: float) -> str | None:
    if held is None:
        return "no certificate yet"
    if held.facts is None:
        return "its certificate cannot be read"
    if tuple(sorted(set(held.facts.names))) != want.domains:
        return "its names changed"
    if now >= renew_at(held.facts):
        return "a third of its lifetime is left"
    return None


def renew_at(facts: CertFacts) -> float:
    return facts.not_after - facts.lifetime * RENEW_WHEN_LEFT


def backoff(failures: int, retry: float, retry_max: float, retry_after: float | None = None) -> float:
    """Seconds to wait after the `failures`-th failure in a row: doubling from `retry`, at most `retry_max`,
    and never sooner than the CA asked (Retry-After, e.g. on a rate limit)."""
    wait = min(retry * math.pow(2, max(0, failures - 1)), retry_max)
    return max(wait, retry_after or 0.0)


def failed(state: State, want: Wanted, error: str, error_type: str, now: float, *, retry: float,
           retry_max: float, retry_after: float | None = None) -> State:
    failures = state.failures + 1 if tuple(state.domains) == want.domains else 1
    return replace(state, domains=want.domains, routes=want.routes, failures=failures, last_error=error,
                   last_error_type=error_type, last_attempt=now, working=None,
                   next_attempt=now + backoff(failures, retry, retry_max, retry_after))


def issued(state: State, want: Wanted, facts: CertFacts, node: str, now: float) -> State:
    return replace(state, domains=want.domains, routes=want.routes, issuer=facts.issuer, not_after=facts.not_after,
                   serial=facts.serial, issued_at=now, issued_by=node, failures=0, last_error=None,
                   last_error_type=None, last_attempt=now, next_attempt=None, working=None)


def iso(when: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_rows(states: Mapping[str, State], certs: Mapping[str, bytes],
                wanted_names: frozenset[str]) -> dict[str, dict[str, Any]]:
    """One row per certificate (`certs/<name>`: its PEM), served or wanted: issuer and expiry from the PEM,
    ACME's last error and next attempt from its state (what `flowproxy status` and the metrics show)."""
    rows: dict[str, dict[str, Any]] = {}
    for name in sorted(set(certs) | set(wanted_names) | set(states)):
        facts, state = (pem_facts(certs[name]) if name in certs else None), states.get(name)
        rows[name] = {
            "issuer": facts.issuer if facts else None,
            "not_after": iso(facts.not_after) if facts else None,
            "names": list(facts.names) if facts else list(state.domains if state else ()),
            "acme": name in wanted_names or state is not None,
            "last_error": state.last_error if state else None,
            "failures": state.failures if state else 0,
            "next_attempt": iso(state.next_attempt) if state and state.next_attempt else None,
        }
    return rows
