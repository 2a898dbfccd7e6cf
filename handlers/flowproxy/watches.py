"""Keep the agent's service watches in step with the services that active routes name."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from flowproxy.consul_io import ConsulStore

log = logging.getLogger(__name__)
SERVICES_FILE = "flowproxy-services.json"
HANDLER = ["flowproxy", "handle", "--kind"]


def service_watches(services: Iterable[str]) -> str:
    watches = [{"type": "service", "service": s, "passingonly": True, "args": [*HANDLER, "service"]}
               for s in sorted(set(services))]
    return json.dumps({"watches": watches}, indent=2, sort_keys=True) + "\n"


def prefix_watch(prefix: str) -> str:
    watch = {"type": "keyprefix", "prefix": prefix, "args": [*HANDLER, "keyprefix"]}
    return json.dumps({"watches": [watch]}, indent=2, sort_keys=True) + "\n"


def sync(watch_dir: Path, store: ConsulStore, services: Iterable[str]) -> bool:
    """Rewrite the service watches when the set changed and reload the agent; True if it did.

    The reload re-fires every watch; the handlers it starts coalesce behind the apply lock.
    """
    wanted = service_watches(services)
    path = watch_dir / SERVICES_FILE
    try:
        if path.read_text() == wanted:
            return False
    except OSError:
        pass
    watch_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(wanted)
    tmp.replace(path)
    log.info("service watches changed (%s); reloading the Consul agent", path)
    store.reload_agent()
    return True
