"""Watch events as changes for the incremental path (`pipeline.apply_change`), or None for the full converge.

A keyprefix event carries the whole part its watch names (a shard of the routes, a config folder, or the
whole prefix as older watch files have it: at 10,000 routes ~4 MB of JSON, ~95 ms to decode entry by
entry); it is compared with the keys of that part the last apply saw, entry by entry as Consul wrote them,
so only the entries that changed are decoded (~15 ms for the whole prefix). A service event carries that service's
passing instances; it is older than what was applied when its index is lower than that of the apply's
own read of the service: then it changes nothing.
Deletions, new keys outside the routes and everything but route keys take the full converge, as does any
payload not in the shape Consul writes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from flowproxy.consul.payload import entry_of, payload_pieces
from flowproxy.consul.store import instances_in
from flowproxy.core import contract
from flowproxy.core.contract import Kind
from flowproxy.core.delta import Change
from flowproxy.core.intent import NAME_RE
from flowproxy.core.kv import desired_from_kv
from flowproxy.core.model import KVEntry
from flowproxy.pipeline import Gathered, Warm

NOTHING = Change()  # the event changes nothing that was applied


@dataclass
class EventView:
    """What the applier's keyprefix events are compared with: the keys as of its last apply (with the full
    read that started them, and in order, to count a part's), their fingerprint, the routes' keys by route,
    and each watched part's decoded entries."""

    basis: Gathered | None = None
    fingerprint: str = ""  # of the keys below, as `contract.kv_fingerprint` computes it
    keys: dict[str, KVEntry] = field(default_factory=dict)
    ordered: list[str] = field(default_factory=list)
    routes: dict[str, set[str]] = field(default_factory=dict)
    decoded: dict[str, dict[str, KVEntry]] = field(default_factory=dict)

    def follow(self, warm: Warm) -> bool:
        """Start again from the warm applier's last full read when it is newer; False when there is none."""
        if warm.seen is None or warm.model is None:
            return False
        if self.basis is not warm.seen:
            self.basis = warm.seen
            self.fingerprint = warm.seen.fingerprint
            self.keys = dict(warm.seen.entries)
            self.ordered = sorted(self.keys)
            self.routes = {}
            for key in self.keys:
                route = contract.route_of(warm.model.desired.prefix, key)
                if route is not None:
                    self.routes.setdefault(route, set()).add(key)
        return True

    def under(self, part: str) -> int:
        """How many of the keys start with `part`."""
        return bisect.bisect_left(self.ordered, part + "\U0010ffff") - bisect.bisect_left(self.ordered, part)

    def add(self, entry: KVEntry, route: str) -> None:
        if entry.key not in self.keys:
            bisect.insort(self.ordered, entry.key)
        self.keys[entry.key] = entry
        self.routes.setdefault(route, set()).add(entry.key)


def kv_change(view: EventView, warm: Warm, prefix: str, payload: str, index: int | None, *,
              watched: str = "") -> Change | None:
    """The routes a keyprefix payload changed, parsed; NOTHING; or None for the full converge. `watched`
    is the part of the prefix the watch names (the whole prefix when empty)."""
    part = watched or prefix
    if index is None or not part.startswith(prefix) or not view.follow(warm) or warm.model is None:
        return None
    current = _entries(view, part, payload)
    changed = None if current is None else _changed(view, prefix, part, current)
    if not isinstance(changed, list):
        return changed
    routes = _route_names(prefix, changed)
    if not routes:
        return NOTHING if routes is not None else None
    before = [(e.key, view.keys[e.key].value) for e in changed if e.key in view.keys]
    view.fingerprint = contract.moved(view.fingerprint, prefix, before, [(e.key, e.value) for e in changed])
    for entry in changed:
        view.add(entry, routes[entry.key])
    names = set(routes.values())
    parsed = {r.name: r for r in desired_from_kv(prefix, [view.keys[k] for n in names for k in view.routes[n]]).routes}
    newest = max([warm.model.desired.index, *(e.modify_index for e in changed)])
    return Change(routes={name: parsed.get(name) for name in names}, index=newest)


def _changed(view: EventView, prefix: str, part: str, current: dict[str, KVEntry]) -> list[KVEntry] | Change | None:
    """The entries of `part` that differ from those applied; NOTHING for a payload older than what was
    applied (an entry older than the one applied: a payload is told by its entries, not its index); None
    when a key went (its tombstone moves the index this node reports: a full read knows it)."""
    changed: list[KVEntry] = []
    ignored = 0
    for key, entry in current.items():
        if contract.ignored(prefix, key):
            ignored += 1
            continue
        known = view.keys.get(key)
        if known is entry or (known is not None and not contract.in_config(prefix, key)):
            continue  # a key outside the contract counts by name only
        if known == entry:
            view.keys[key] = entry  # the same entry as another object: compared by identity next time
        elif known is not None and entry.modify_index < known.modify_index:
            return NOTHING
        else:
            changed.append(entry)
    if len(current) - ignored != view.under(part) + sum(e.key not in view.keys for e in changed):
        return None
    return changed


def _route_names(prefix: str, changed: list[KVEntry]) -> dict[str, str] | None:
    """The route of each changed key; None when anything else changed (templates, certificates, keys
    outside the contract: the full converge)."""
    routes = {}
    for entry in changed:
        shape = contract.classify(prefix, entry.key)
        if shape.kind not in (Kind.INTENT, Kind.ACTIVE) or not all(map(NAME_RE.fullmatch, shape.names)):
            return None
        routes[entry.key] = shape.names[0]
    return routes


def _entries(view: EventView, part: str, payload: str) -> dict[str, KVEntry] | None:
    """The payload's entries by key, each entry's text decoded only when `part` did not bring it before."""
    pieces = payload_pieces(payload)
    if pieces is None:
        return None
    decoded: dict[str, KVEntry] = {}
    out: dict[str, KVEntry] = {}
    before = view.decoded.get(part, {})
    for piece in pieces:
        entry = before.get(piece)
        if entry is None:
            fields = entry_of(piece)
            if fields is None:
                return None
            entry = KVEntry(*fields)
        decoded[piece] = entry
        out[entry.key] = entry
    view.decoded[part] = decoded
    return out


def service_change(view: EventView, warm: Warm, service: str, payload: str, index: int | None) -> Change | None:
    """The instances a service payload brings; NOTHING; or None for the full converge."""
    if index is None or not view.follow(warm) or warm.model is None:
        return None
    parsed = instances_in(payload)
    if parsed is None or not (service or parsed[0]):
        return None
    name, instances = service or parsed[0], parsed[1]
    if name not in warm.model.users or index < warm.health_index.get(name, 0):
        return NOTHING  # no route names it, or an answer older than the one applied
    warm.health_index[name] = index
    if warm.model.health.get(name) == instances:
        return NOTHING
    return Change(health={name: instances})
