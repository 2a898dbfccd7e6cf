"""Immutable values passed between the pure stages."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class KVEntry:
    key: str
    value: bytes
    create_index: int = 0
    modify_index: int = 0
    flags: int = 0  # Consul's opaque flags: the ACME worker marks the certificates it wrote (core/acme.py)


@dataclass(frozen=True)
class Snapshot:
    """A keyprefix watch's payload and the index it was taken at (the agent's CONSUL_INDEX)."""

    index: int
    entries: tuple[KVEntry, ...]


@dataclass(frozen=True)
class Problem:
    """One validation failure, always tied to the KV key (and field) it came from."""

    key: str
    message: str
    field: str = ""

    def __str__(self) -> str:
        return f"{self.key}: {self.field}: {self.message}" if self.field else f"{self.key}: {self.message}"


@dataclass(frozen=True)
class Auth:
    realm: str
    users: tuple[tuple[str, str], ...]  # (name, crypt hash), sorted


@dataclass(frozen=True)
class Intent:
    service: str
    paths: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    path_type: str = "prefix"
    balance: str = "roundrobin"
    check: bool = True
    template: str | None = None
    mode: str = "http"
    port: int | None = None
    https_only: bool = False
    redirect_code: int = 301
    redirect_from: tuple[str, ...] = ()
    auth: Auth | None = None
    strip_prefix: str | None = None
    rewrite: tuple[str, str] | None = None  # (search regex, replacement)
    timeout_server: str | None = None
    timeout_tunnel: str | None = None
    health_path: str | None = None
    health_interval: str | None = None
    acme: bool = False  # "tls": {"acme": true}: the route's domains get a certificate from the node's ACME CA


@dataclass(frozen=True)
class Variant:
    route: str
    name: str
    key: str
    intent: Intent | None
    problems: tuple[Problem, ...] = ()


@dataclass(frozen=True)
class Route:
    name: str
    variants: tuple[Variant, ...]
    active: str | None = None
    active_key: str = ""
    # Conflicts go to the route that has been active longest; the active key's CreateIndex says which,
    # identically on every node, and survives blue-green flips (they update the key, not recreate it).
    active_since: int = 0
    problems: tuple[Problem, ...] = ()
    # A weighted canary (`blue=90,green=10`): `active` keeps the text, this the parsed (variant, weight).
    weights: tuple[tuple[str, int], ...] = ()

    def variant(self, name: str) -> Variant | None:
        return self._by_name.get(name)

    @functools.cached_property
    def _by_name(self) -> dict[str, Variant]:
        # A scan per lookup was 60 ms of a 10,000-route plan. (cached_property writes the instance's
        # __dict__ directly, which a frozen dataclass allows; it is not a field: equality is unchanged.)
        return {v.name: v for v in reversed(self.variants)}

    def serving_intent(self) -> Variant | None:
        """The active variant when it exists and is valid; None otherwise."""
        if self.active is None or self.problems:
            return None
        found = self.variant(self.active)
        return found if found is not None and found.intent is not None else None


@dataclass(frozen=True)
class Instance:
    address: str
    port: int
    service_id: str = ""
    node: str = ""
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Desired:
    """Everything the KV prefix says, parsed: routes, custom templates and keys outside the contract."""

    prefix: str
    routes: tuple[Route, ...]
    templates: dict[str, str] = field(default_factory=dict)
    certs: dict[str, bytes] = field(default_factory=dict)  # certs/<name>: PEM, not yet vetted
    stray: tuple[Problem, ...] = ()
    index: int = 0
    accept_empty: bool = False  # the key <prefix>accept-empty: an operator accepts an empty route table
    challenges: dict[str, str] = field(default_factory=dict)  # acme/challenges/<token>: key authorization

    def services(self) -> tuple[str, ...]:
        """Services named by any valid intent, active or staged: previews and flips need them warm."""
        names = {v.intent.service for r in self.routes for v in r.variants if v.intent is not None}
        return tuple(sorted(names))
