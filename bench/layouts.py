"""Latency by layout: `node up`, the production layout with `flowproxy node run` beside the agent and
HAProxy, and the production layout while that process is down (every watch event applied cold by
`flowproxy handle`). The same trials as the main latency rows, on one fresh node per layout."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.live import FLOWPROXY, P, System, Systems, activation, flips, live_node, ms, reloads, settle, spec, url
from bench.parts import Row
from flowproxy.backend import IdentityServer
from flowproxy.cli.demo import register_instance
from flowproxy.node.agent import install_watches
from flowproxy.node.up import Node, wait_for


@contextmanager
def production(folder: Path, daemon: bool) -> Iterator[tuple[Node, subprocess.Popen[bytes] | None]]:
    """The agent and HAProxy as the host's (children here, but no supervisor in this process), the
    watches installed as an operator would, and `flowproxy node run` as its own process when `daemon`
    (yielded with the node, so that its CPU can be read)."""
    node = Node(spec(folder, "prod", dev=True))
    proc = None
    try:
        node.start()
        node.wait_consul()
        install_watches(node.spec)
        node.store().reload_agent()
        if daemon:
            proc = subprocess.Popen([FLOWPROXY, "node", "run"], env=node.env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            wait_for((node.settings.run_dir / "apply.sock").exists, 30, "node run's applier")
        yield node, proc
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=15)
        node.stop()


def measure(node: Node, name: str, trials: int) -> list[Row]:
    store = node.store()
    servers = [IdentityServer(n).start() for n in ("app-1", "blue-1", "green-1")]
    try:
        for server, tags in zip(servers, ((), ("blue",), ("green",)), strict=True):
            register_instance(store, "app", server.name, server.port, tags=tags)
        systems = Systems(node, [System(name, url(node), P, "", lambda: reloads(node), lambda: settle(node))])
        activated, _ = activation(systems, trials, "l")
        flipped, _ = flips(systems, trials)
    finally:
        for server in servers:
            server.stop()
    return [Row(f"activation latency, layout: {name}", ms(activated[name])),
            Row(f"blue-green flip latency, layout: {name}", ms(flipped[name]))]


def layout_rows(trials: int) -> list[Row]:
    base = Path(tempfile.mkdtemp(prefix="fp-layouts-"))
    rows: list[Row] = []
    with live_node(base / "up", "up") as node:
        rows += measure(node, "node up", trials)
    with production(base / "run", daemon=True) as (node, _):
        rows += measure(node, "production, node run", trials)
    with production(base / "cold", daemon=False) as (node, _):
        rows += measure(node, "production, node run down (cold handler)", trials)
    return rows


if __name__ == "__main__":
    for row in layout_rows(10):
        print(f"| {row.metric} | {row.flowproxy} |")
