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
from fractions import Fraction

from flowproxy.core import contract
from flowproxy.core.faults import internal_error
from flowproxy.core.model import Desired, Instance, Intent, Problem, Route

HOSTNAME_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9-]{1,63})*")


Slot = tuple[str, str, str, str, int]  # (preview variant, host, path type, path, port): one route each


@dataclass(frozen=True)
class Server:
    """One instance a backend sends requests to (`core/naming.py` spells it for HAProxy)."""

    address: str
    port: int
    variant: str = ""  # canary backends: the variant whose instance this is
    share: Fraction | None = None  # canary backends: this instance's part of the route's requests


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
    port: int = 0  # TCP routes: the port they claim (their path is empty)

    @property
    def slot(self) -> Slot:
        return (self.variant, self.host, self.path_type, self.path, self.port)


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
    # HTTP-01: whether any valid intent opts into ACME (the frontend then answers challenges, and keeps the
    # step while the route lives, so a renewal changes map rows only), and the answers, token -> key auth.
    acme: bool = False
    challenges: tuple[tuple[str, str], ...] = ()


def backend_name(route: str, variant: str) -> str:
    # ':' cannot appear in route or variant names, so the pair maps back to exactly one intent.
    return f"{route}:{variant}"


def canary_name(route: str) -> str:
    return f"{route}::canary"


def claims_for(intent: Intent, backend: str, variant: str = "") -> list[Claim]:
    """What a backend answers for. TCP routes claim their port, SNI routes their names; neither previews."""
    if intent.mode != "http":
        if variant:
            return []
        if intent.mode == "tcp":
            return [Claim("", "tcp", "", backend, port=intent.port or 0)]
        return [Claim(d, "sni", "", backend) for d in intent.domains]
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
        servers.setdefault((inst.address, inst.port), Server(inst.address, inst.port))
    return tuple(servers[k] for k in sorted(servers)), notes


def _address_ok(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return bool(HOSTNAME_RE.fullmatch(address))
    return True


def warm_backends(desired: Desired, health: Mapping[str, list[Instance]]) -> tuple[dict[str, Backend],
                                                                                 dict[str, list[str]]]:
    """A backend per valid variant, and the notes on skipped instances per intent key."""
    backends: dict[str, Backend] = {}
    notes: dict[str, list[str]] = {}
    # Variants that name the same service and tags get the same servers: select them once.
    selected: dict[tuple[str, tuple[str, ...]], tuple[tuple[Server, ...], list[str]]] = {}
    for route in desired.routes:
        for v in route.variants:
            if v.intent is not None:
                which = (v.intent.service, v.intent.tags)
                if which not in selected:
                    selected[which] = select_servers(v.intent, health.get(v.intent.service, []))
                servers, notes[v.key] = selected[which]
                name = backend_name(route.name, v.name)
                backends[name] = Backend(name, route.name, v.name, v.key, v.intent, servers)
    return backends, notes


def make_plan(desired: Desired, health: Mapping[str, list[Instance]]) -> Plan:
    """Every valid variant gets a backend (warm for previews and flips); only active ones get public claims."""
    backends, notes = warm_backends(desired, health)
    claims: dict[Slot, Claim] = {}
    preview: dict[Slot, Claim] = {}
    owners: dict[str, str] = {}
    states: dict[str, RouteState] = {}
    by_route: dict[str, list[Backend]] = {}
    for b in backends.values():
        by_route.setdefault(b.route, []).append(b)  # a scan per route made 10k routes take 2 s here alone
    for route in sorted(desired.routes, key=lambda r: (r.active_since, r.name)):
        for b in by_route.get(route.name, []):
            for c in claims_for(b.intent, b.name, b.variant):
                preview.setdefault(c.slot, c)  # same variant name, same slot: the older route keeps it
        try:
            states[route.name] = _serve(route, backends, claims, owners=owners, notes=notes, prefix=desired.prefix)
        except Exception as exc:  # a bug met by one route rejects that route, never the plan
            key = route.active_key or (route.variants[0].key if route.variants else route.name)
            states[route.name] = RouteState(route.name, "rejected", route.active,
                                            (internal_error(key, "planning", exc),))
    return Plan(
        backends=tuple(backends[k] for k in sorted(backends)),
        claims=tuple(sorted(claims.values(), key=lambda c: c.slot)),
        states=tuple(states[k] for k in sorted(states)),
        stray=desired.stray,
        preview=tuple(sorted(preview.values(), key=lambda c: c.slot)),
        acme=any(v.intent is not None and v.intent.acme for r in desired.routes for v in r.variants),
        challenges=tuple(sorted(desired.challenges.items())),
    )


def _serve(route: Route, backends: dict[str, Backend], claims: dict[Slot, Claim], *,
           owners: dict[str, str], notes: Mapping[str, list[str]], prefix: str) -> RouteState:
    """Give an active route its public claims, unless another route holds one already; its state."""
    state = _inactive_state(route)
    if state is not None:
        return state
    serving = canary_backend(route, backends) if route.weights else serving_backend(route, backends)
    backends[serving.name] = serving
    mine = claims_for(serving.intent, serving.name)
    clashes = sorted({owners[claims[m.slot].backend] for m in mine if m.slot in claims})
    if clashes:
        return _conflict_state(route, route.active or "", clashes, prefix)
    claims.update((c.slot, c) for c in mine)
    owners[serving.name] = route.name
    names = {name for name, _ in route.weights} or {route.active or ""}
    keys = [v.key for v in route.variants if v.name in names]
    route_notes = tuple(n for k in keys for n in notes[k])
    if not serving.servers:  # serving, but every request gets HAProxy's 503 until an instance passes
        route_notes += (f"service {serving.intent.service!r} has no passing instance"
                        + (f" with tags {', '.join(serving.intent.tags)}" if serving.intent.tags else "")
                        + ": the route answers 503",)
    return RouteState(route.name, "serving", route.active, (), len(serving.servers), route_notes)


def serving_backend(route: Route, backends: Mapping[str, Backend]) -> Backend:
    chosen = route.serving_intent()
    assert chosen is not None
    return backends[backend_name(route.name, chosen.name)]


def canary_backend(route: Route, backends: Mapping[str, Backend]) -> Backend:
    """One backend with every weighted variant's instances: HAProxy splits by server weight.

    A variant's weight is shared among its instances, so `blue=90,green=10` sends 90 % of requests to
    blue however many instances each color runs. The first variant's intent supplies routing and options.
    """
    total = sum(w for _, w in route.weights)
    parts = [(backends[backend_name(route.name, name)], weight) for name, weight in route.weights]
    servers = []
    for backend, weight in parts:
        for s in backend.servers:
            servers.append(Server(s.address, s.port, backend.variant, Fraction(weight, total * len(backend.servers))))
    first = parts[0][0]
    return Backend(canary_name(route.name), route.name, "", route.active_key, first.intent, tuple(servers))


def wanted(route: Route) -> tuple[list[Claim], list[Claim]]:
    """The public claims `route` asks for (whether it wins them or not), and its variants' preview claims.

    What `make_plan` decides over; the incremental planner (`core/delta.py`) counts them to know when a
    change to one route can touch another's verdict.
    """
    preview = [c for v in route.variants if v.intent is not None
               for c in claims_for(v.intent, backend_name(route.name, v.name), v.name)]
    if _inactive_state(route) is not None:
        return [], preview
    if route.weights:
        first = route.variant(route.weights[0][0])
        assert first is not None and first.intent is not None
        return claims_for(first.intent, canary_name(route.name)), preview
    chosen = route.serving_intent()
    assert chosen is not None and chosen.intent is not None
    return claims_for(chosen.intent, backend_name(route.name, chosen.name)), preview


def _inactive_state(route: Route) -> RouteState | None:
    """The state of a route that will not serve, or None when its active variant(s) are valid."""
    if route.problems:
        return RouteState(route.name, "rejected", route.active, tuple(str(p) for p in route.problems))
    if route.active is None:
        return RouteState(route.name, "off")
    if route.weights:
        return _canary_state(route)
    chosen = route.variant(route.active)
    if chosen is None or chosen.intent is None:
        reasons = tuple(str(p) for p in chosen.problems) if chosen else ("active variant missing",)
        return RouteState(route.name, "rejected", route.active, reasons)
    return None


def _conflict_state(route: Route, variant: str, winners: list[str], prefix: str) -> RouteState:
    key = contract.intent_key(prefix, route.name, variant)
    owners = ", ".join(contract.route_folder(prefix) + w for w in winners)
    reason = (f"{key}: conflict: claims a (domain, path) already served by {owners}, "
              "whose active key is older; change the paths or domains, or deactivate one route")
    return RouteState(route.name, "rejected", variant, (reason,))


def _canary_state(route: Route) -> RouteState | None:
    """A canary serves when every weighted variant is valid and they route the very same requests."""
    variants = [route.variant(name) for name, _ in route.weights]
    reasons = [str(p) for v in variants if v is not None for p in v.problems]
    intents = [v.intent for v in variants if v is not None and v.intent is not None]
    if not reasons and len(intents) == len(variants):
        shapes = {(i.mode, i.port, i.paths, i.domains, i.path_type) for i in intents}
        if len(shapes) == 1:
            return None
        reasons.append(f"{route.active_key}: canary variants must have the same mode, port, paths, domains "
                       "and path_type")
    return RouteState(route.name, "rejected", route.active, tuple(reasons) or ("canary variant missing",))
