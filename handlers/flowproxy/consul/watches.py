"""The agent's watches: the config folders (shipped, `consul.d/flowproxy.json`), the routes in shards
(`core/shards.py`) and the services routes name, both kept in step by the node in its own folder."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from flowproxy.consul.store import ConsulStore
from flowproxy.core import contract, shards

log = logging.getLogger(__name__)
SERVICES_FILE = "flowproxy-services.json"
ROUTES_FILE = "flowproxy-routes.json"
ACME_FILE = "flowproxy-acme.json"  # the ACME challenges' answers, which every node serves
# Watches over the routes at most: each is a goroutine and a blocking query of the agent (and an RPC to
# a server); an agent reload re-fires every one.
MOST_SHARDS = 128
HANDLER = ["flowproxy-watch"]  # handlers/bin/flowproxy-watch: the ~3 ms entry, see its header


def service_watches(services: Iterable[str]) -> str:
    watches = [{"type": "service", "service": s, "passingonly": True, "args": [*HANDLER, "service", s]}
               for s in sorted(set(services))]
    return json.dumps({"watches": watches}, indent=2, sort_keys=True) + "\n"


def keyprefix(prefix: str) -> dict[str, object]:
    """A keyprefix watch that names what it watches: its handler compares the payload with that part."""
    return {"type": "keyprefix", "prefix": prefix, "args": [*HANDLER, "keyprefix", prefix]}


def config_watches(prefix: str) -> str:
    """What `consul.d/flowproxy.json` holds for the default prefix: the folders an apply reads besides
    the routes, and `accept-empty`. Not the whole prefix: every node's status write would wake every node."""
    prefixes = [prefix + contract.TEMPLATES, prefix + contract.CERTS, contract.accept_empty_key(prefix)]
    return json.dumps({"watches": [keyprefix(p) for p in prefixes]}, indent=2, sort_keys=True) + "\n"


def acme_watches(prefix: str) -> str:
    """The challenges' folder: an answer written by the node working on an order is served by every node.
    The node's own file (not the shipped one), so that a host upgraded in place gains it without an edit."""
    watch = keyprefix(contract.challenge_key(prefix))
    return json.dumps({"watches": [watch]}, indent=2, sort_keys=True) + "\n"


def route_watches(prefix: str, parts: Iterable[str]) -> str:
    watches = [keyprefix(contract.route_folder(prefix) + part) for part in sorted(parts)]
    return json.dumps({"watches": watches}, indent=2, sort_keys=True) + "\n"


def watched_shards(path: Path, prefix: str) -> set[str] | None:
    """The shards a routes file watches, None when there is none or it is not as `route_watches` writes."""
    folder = contract.route_folder(prefix)
    try:
        text = path.read_text()
        parts = {str(w["prefix"])[len(folder):] for w in json.loads(text)["watches"]}
        return parts if text == route_watches(prefix, parts) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def watched(path: Path) -> set[str]:
    try:
        return {w["service"] for w in json.loads(path.read_text())["watches"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def ensure_files(watch_dir: Path, prefix: str) -> None:
    """The node's watch files, before any route exists (the agent loads this folder at start): no service
    watch, and one watch over all the routes until a full apply splits it."""
    if not (watch_dir / SERVICES_FILE).exists():
        _write(watch_dir / SERVICES_FILE, service_watches(()))
    if watched_shards(watch_dir / ROUTES_FILE, prefix) is None:
        _write(watch_dir / ROUTES_FILE, route_watches(prefix, [shards.ROOT]))
    _sync_acme(watch_dir, prefix)


def sync(watch_dir: Path, store: ConsulStore, services: Iterable[str], routes: RouteShards | None = None) -> bool:
    """Make sure every routed service has a watch, and the routes' shards are fine enough (when `routes` is
    given: after a full apply); reload the agent, once, when either file changed."""
    changed = [_sync_services(watch_dir, services), routes is not None and _sync_routes(watch_dir, routes),
               routes is not None and _sync_acme(watch_dir, routes.prefix)]
    if any(changed):
        log.info("watches changed (%s); reloading the Consul agent", ", ".join(
            name for name, moved in zip((SERVICES_FILE, ROUTES_FILE, ACME_FILE), changed, strict=True) if moved))
        store.reload_agent()
    return any(changed)


@dataclass(frozen=True)
class RouteShards:
    """The route names of a full apply and how the node splits its watches over them."""

    prefix: str
    names: frozenset[str]
    size: int


def _sync_routes(watch_dir: Path, routes: RouteShards) -> bool:
    path = watch_dir / ROUTES_FILE
    current = watched_shards(path, routes.prefix)
    proposed = shards.partition(routes.names, routes.size, MOST_SHARDS)
    if current is not None and not shards.better(current, proposed, routes.names):
        return False
    _write(path, route_watches(routes.prefix, proposed))
    fullest = max(shards.loads(proposed, routes.names).values(), default=0)
    log.info("routes watched in %d part(s), the fullest with %d of %d routes", len(proposed), fullest,
             len(routes.names))
    return True


def _sync_acme(watch_dir: Path, prefix: str) -> bool:
    path = watch_dir / ACME_FILE
    text = acme_watches(prefix)
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    _write(path, text)
    return True


def _sync_services(watch_dir: Path, services: Iterable[str]) -> bool:
    """A reload re-fires every watch (the handlers coalesce behind the apply lock), and Consul 1.8 keeps the
    replaced watches' HTTP connections open for ~90 s: a reload per route change filled the agent's 200
    connections per client within a minute. So the set only grows between reloads, and watches no route
    needs any more are dropped when a reload happens anyway. An idle extra watch fires nothing.
    """
    needed = set(services)
    path = watch_dir / SERVICES_FILE
    if needed <= watched(path) and _current(path):
        return False
    _write(path, service_watches(needed))
    return True


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _current(path: Path) -> bool:
    """Whether the file is as this version writes it (an older one's watches did not name their service)."""
    try:
        return path.read_text() == service_watches(watched(path))
    except OSError:
        return False
