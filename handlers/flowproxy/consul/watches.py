"""Keep the agent's service watches in step with the services that active routes name."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from flowproxy.consul.store import ConsulStore

log = logging.getLogger(__name__)
SERVICES_FILE = "flowproxy-services.json"
HANDLER = ["flowproxy-watch"]  # handlers/bin/flowproxy-watch: the ~3 ms entry, see its header


def service_watches(services: Iterable[str]) -> str:
    watches = [{"type": "service", "service": s, "passingonly": True, "args": [*HANDLER, "service", s]}
               for s in sorted(set(services))]
    return json.dumps({"watches": watches}, indent=2, sort_keys=True) + "\n"


def prefix_watch(prefix: str) -> str:
    watch = {"type": "keyprefix", "prefix": prefix, "args": [*HANDLER, "keyprefix"]}
    return json.dumps({"watches": [watch]}, indent=2, sort_keys=True) + "\n"


def watched(path: Path) -> set[str]:
    try:
        return {w["service"] for w in json.loads(path.read_text())["watches"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def ensure_file(watch_dir: Path) -> None:
    """The service-watch file, empty until a route names a service: the agent loads this folder at start."""
    path = watch_dir / SERVICES_FILE
    if not path.exists():
        watch_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(service_watches(()))


def sync(watch_dir: Path, store: ConsulStore, services: Iterable[str]) -> bool:
    """Make sure every routed service has a watch; reload the agent only when one is missing.

    A reload re-fires every watch (the handlers coalesce behind the apply lock), and Consul 1.8 keeps the
    replaced watches' HTTP connections open for ~90 s: a reload per route change filled the agent's 200
    connections per client within a minute. So the set only grows between reloads, and watches no route
    needs any more are dropped when a reload happens anyway. An idle extra watch fires nothing.
    """
    needed = set(services)
    path = watch_dir / SERVICES_FILE
    if needed <= watched(path) and _current(path):
        return False
    wanted = service_watches(needed)
    watch_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(wanted)
    tmp.replace(path)
    log.info("service watches changed (%s); reloading the Consul agent", path)
    store.reload_agent()
    return True


def _current(path: Path) -> bool:
    """Whether the file is as this version writes it (an older one's watches did not name their service)."""
    try:
        return path.read_text() == service_watches(watched(path))
    except OSError:
        return False
