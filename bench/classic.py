"""The classic pipeline, live: consul-template's loop against the same Consul, for the latency cells.

Blocking queries on the routes and on each routed service; any change renders the whole config with one
ACL line per route (`bench/baseline.py`) and reloads HAProxy, as consul-template with a reload command
does (each reload confirmed, so none is lost). Routes are read with flowproxy's own parser, so both
systems serve the same intents. Bench code only, never shipped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench import baseline
from flowproxy.consul.store import ConsulStore
from flowproxy.core.kv import desired_from_kv
from flowproxy.core.model import Desired, KVEntry
from flowproxy.errors import HAProxyError
from flowproxy.haproxy.master import HAProxySocket
from flowproxy.settings import Settings

PREFIX = "classic/"  # its own keys, so a trial changes one system at a time


class Classic:
    def __init__(self, consul_addr: str, settings: Settings, services: tuple[str, ...]) -> None:
        self.store = ConsulStore(consul_addr)
        self.settings = settings
        self.services = services
        self.entries: list[KVEntry] = []
        self.health: dict[str, list[tuple[str, int, tuple[str, ...]]]] = {s: [] for s in services}
        self.changed = threading.Event()
        self.busy = threading.Event()
        self.last = b""
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.kv_index = 0  # the routes' index it has read (after marking the change)

    # A blocking query that times out answers with the same index: consul-template renders only when the
    # index moved, and so does this (else it re-parses and re-renders every table each 2 s for nothing).
    def watch_kv(self) -> None:
        index = 0
        while not self.stopped.is_set():
            try:
                seen, data = self.store.client.kv.get(PREFIX + "routes/", recurse=True, index=index, wait="2s")
            except Exception:  # the agent is going away with the benchmark
                self.stopped.wait(0.2)
                continue
            if seen == index:
                continue
            index = seen
            with self.lock:
                self.entries = [KVEntry(d["Key"], d["Value"] or b"", d["CreateIndex"], d["ModifyIndex"])
                                for d in data or []]
            self.changed.set()
            self.kv_index = int(seen)

    def watch_service(self, service: str) -> None:
        index = 0
        while not self.stopped.is_set():
            try:
                seen, data = self.store.client.health.service(service, passing=True, index=index, wait="2s")
            except Exception:
                self.stopped.wait(0.2)
                continue
            if seen == index:
                continue
            index = seen
            with self.lock:
                self.health[service] = [_instance(d) for d in data]
            self.changed.set()

    def render_loop(self) -> None:
        while not self.stopped.is_set():
            if not self.changed.wait(0.5):
                continue
            self.busy.set()
            self.changed.clear()
            self.apply_once()
            self.busy.clear()

    def apply_once(self) -> None:
        with self.lock:
            desired, health = desired_from_kv(PREFIX, self.entries), dict(self.health)
        cfg = render(desired, health)
        if cfg == self.last:
            return
        path = self.settings.current / "haproxy.cfg"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(cfg)
        tmp.replace(path)
        try:
            # Confirmed with `show proc`: a fire-and-forget reload sent while the last one runs is
            # dropped (field notes), which would leave the baseline stale rather than slow.
            HAProxySocket(self.settings.master_socket).reload()
            self.last = cfg
        except HAProxyError:
            self.changed.set()  # try again, as consul-template retries a failed command

    def settle(self) -> None:
        """Wait until the last change was rendered and its reload confirmed."""
        deadline = time.monotonic() + 300  # 10,000 routes: a render and reload of seconds, maybe retried
        while time.monotonic() < deadline and (self.changed.is_set() or self.busy.is_set()):
            time.sleep(0.01)
        time.sleep(0.05)

    def applied(self, index: int) -> bool:
        """Whether the routes at `index` were read and rendered (and any reload confirmed)."""
        return self.kv_index >= index and not self.changed.is_set() and not self.busy.is_set()

    def reloads(self) -> int:
        return HAProxySocket(self.settings.master_socket).show_proc_settled().reloads


def _instance(doc: dict[str, Any]) -> tuple[str, int, tuple[str, ...]]:
    svc = doc["Service"]
    return svc["Address"] or doc["Node"]["Address"], int(svc["Port"]), tuple(svc.get("Tags") or ())


def render(desired: Desired, health: dict[str, list[tuple[str, int, tuple[str, ...]]]]) -> bytes:
    """Serving routes in name order, one ACL line per path, as a hand-written template lists them."""
    routes, unchecked = [], set()
    for route in desired.routes:
        chosen = route.serving_intent()
        if chosen is None or chosen.intent is None:
            continue
        intent = chosen.intent
        servers = [(a, p) for a, p, tags in health.get(intent.service, []) if set(intent.tags) <= set(tags)]
        names = [f"{route.name}_{i}" for i in range(len(intent.paths))]
        routes += [(name, path, servers) for name, path in zip(names, intent.paths, strict=True)]
        unchecked |= set() if intent.check else set(names)
    return baseline.render(routes, unchecked=frozenset(unchecked))


@contextmanager
def running(consul_addr: str, settings: Settings, services: tuple[str, ...]) -> Iterator[Classic]:
    classic = Classic(consul_addr, settings, services)
    loops = [classic.watch_kv, classic.render_loop] + [lambda s=s: classic.watch_service(s) for s in services]
    threads = [threading.Thread(target=loop, daemon=True, name="classic") for loop in loops]
    for thread in threads:
        thread.start()
    try:
        yield classic
    finally:
        classic.stopped.set()
        for thread in threads:
            thread.join(timeout=5)
        classic.store.close()
