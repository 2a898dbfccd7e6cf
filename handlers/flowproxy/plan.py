"""Plan: active routes x healthy instances -> backends, routing claims and per-route states. Pure.

Conflicts: when two active routes claim the same (domain, path type, path), the route whose `active` key
is oldest (lowest CreateIndex, then name) keeps it and the other route is rejected whole. The input is
the shared KV, so every node reaches the same verdict whatever order it looked in.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from flowproxy.model import Desired, Instance, Intent, Problem, Route

HOSTNAME_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9-]{1,63})*")
SERVER_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


@dataclass(frozen=True)
class Server:
    name: str
    address: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


@dataclass(frozen=True)
class Backend:
    name: str
    route: str
    variant: str
    key: str
    intent: Intent
    servers: tuple[Server, ...]


@dataclass(frozen=True)
class Claim:
    """One (host, path) a backend answers for. host "" = any host; "*.x.y" = one-label wildcard.

    `variant` is set on preview claims only: they answer requests that name the variant in a header.
    """

    host: str
    path_type: str
    path: str
    backend: str
    variant: str = ""

    @property
    def slot(self) -> tuple[str, str, str, str]:
        return (self.variant, self.host, self.path_type, self.path)


@dataclass(frozen=True)
class RouteState:
    route: str
    state: str  # serving | rejected | off
    variant: str | None = None
    reasons: tuple[str, ...] = ()
    instances: int = 0
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    backends: tuple[Backend, ...]
    claims: tuple[Claim, ...]
    states: tuple[RouteState, ...]
    stray: tuple[Problem, ...] = ()
    preview: tuple[Claim, ...] = ()


def backend_name(route: str, variant: str) -> str:
    # ':' cannot appear in route or variant names, so the pair maps back to exactly one intent.
    return f"{route}:{variant}"


def claims_for(intent: Intent, backend: str, variant: str = "") -> list[Claim]:
    if not intent.domains:
        return [Claim("", intent.path_type, p, backend, variant) for p in intent.paths]
    paths = intent.paths or ("/",)
    path_type = intent.path_type if intent.paths else "prefix"
    return [Claim(d, path_type, p, backend, variant) for d in intent.domains for p in paths]


def select_servers(intent: Intent, instances: list[Instance]) -> tuple[tuple[Server, ...], list[str]]:
    """Instances carrying every required tag, with a usable address, deduplicated, in a stable order."""
    servers: dict[tuple[str, int], Server] = {}
    notes: list[str] = []
    for inst in instances:
        if not set(intent.tags) <= set(inst.tags):
            continue
        if not _address_ok(inst.address) or not 0 < inst.port < 65536:
            notes.append(f"instance {inst.service_id or '?'} on node {inst.node or '?'} skipped: "
                         f"unusable address {inst.address[:80]!r} port {inst.port}")
            continue
        name = SERVER_NAME_UNSAFE.sub("_", f"{inst.address}:{inst.port}")
        servers.setdefault((inst.address, inst.port), Server(name, inst.address, inst.port))
    return tuple(servers[k] for k in sorted(servers)), notes


def _address_ok(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return bool(HOSTNAME_RE.fullmatch(address))
    return True


def make_plan(desired: Desired, health: Mapping[str, list[Instance]]) -> Plan:
    """Every valid variant gets a backend (warm for previews and flips); only active ones get public claims."""
    backends: dict[str, Backend] = {}
    notes: dict[str, list[str]] = {}
    for route in desired.routes:
        for v in route.variants:
            if v.intent is not None:
                servers, notes[v.key] = select_servers(v.intent, health.get(v.intent.service, []))
                name = backend_name(route.name, v.name)
                backends[name] = Backend(name, route.name, v.name, v.key, v.intent, servers)
    claims: dict[tuple[str, str, str, str], Claim] = {}
    preview: dict[tuple[str, str, str, str], Claim] = {}
    owners: dict[str, str] = {}
    states: dict[str, RouteState] = {}
    by_route: dict[str, list[Backend]] = {}
    for b in backends.values():
        by_route.setdefault(b.route, []).append(b)  # a scan per route made 10k routes take 2 s here alone
    for route in sorted(desired.routes, key=lambda r: (r.active_since, r.name)):
        for b in by_route.get(route.name, []):
            for c in claims_for(b.intent, b.name, b.variant):
                preview.setdefault(c.slot, c)  # same variant name, same slot: the older route keeps it
        state = _inactive_state(route)
        if state is not None:
            states[route.name] = state
            continue
        chosen = route.serving_intent()
        assert chosen is not None and chosen.intent is not None
        mine = claims_for(chosen.intent, backend_name(route.name, chosen.name))
        clashes = sorted({owners[claims[m.slot].backend] for m in mine if m.slot in claims})
        if clashes:
            states[route.name] = _conflict_state(route, chosen.name, clashes, desired.prefix)
            continue
        claims.update((c.slot, c) for c in mine)
        owners[backend_name(route.name, chosen.name)] = route.name
        count = len(backends[backend_name(route.name, chosen.name)].servers)
        states[route.name] = RouteState(route.name, "serving", chosen.name, (), count, tuple(notes[chosen.key]))
    return Plan(
        backends=tuple(backends[k] for k in sorted(backends)),
        claims=tuple(sorted(claims.values(), key=lambda c: c.slot)),
        states=tuple(states[k] for k in sorted(states)),
        stray=desired.stray,
        preview=tuple(sorted(preview.values(), key=lambda c: c.slot)),
    )


def _inactive_state(route: Route) -> RouteState | None:
    """The state of a route that will not serve, or None when its active variant is valid."""
    if route.problems:
        return RouteState(route.name, "rejected", route.active, tuple(str(p) for p in route.problems))
    if route.active is None:
        return RouteState(route.name, "off")
    chosen = route.variant(route.active)
    if chosen is None or chosen.intent is None:
        reasons = tuple(str(p) for p in chosen.problems) if chosen else ("active variant missing",)
        return RouteState(route.name, "rejected", route.active, reasons)
    return None


def _conflict_state(route: Route, variant: str, winners: list[str], prefix: str) -> RouteState:
    key = f"{prefix}routes/{route.name}/{variant}"
    owners = ", ".join(f"{prefix}routes/{w}" for w in winners)
    reason = (f"{key}: conflict: claims a (domain, path) already served by {owners}, "
              "whose active key is older; change the paths or domains, or deactivate one route")
    return RouteState(route.name, "rejected", variant, (reason,))
