"""A fleet on one machine: one write, how long until every proxy node applied it, and what each node costs
the Consul side.

    .venv/bin/python -m bench.fleet [--nodes 8] [--writes 30] [--routes 100]

One Consul server (`flowproxy node up --dev`, itself a proxy node) and N proxy nodes, each its own
`flowproxy node up --join` process on its own loopback address (127.0.0.2, .3, ...) with its own client
agent and HAProxy, as nodes of a real fleet run. Each write flips a route's `active` key on the server's
API; a node has applied it when its status key reports that write's KV index. Per node, the Consul agent's
CPU over the writes and the blocking queries its watches hold are read too. A report: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack

from bench.live import bulk_routes
from bench.parts import pct
from bench.scale import Live, cpu_seconds, node_up
from flowproxy.backend import IdentityServer
from flowproxy.cli.demo import register_instance
from flowproxy.core import contract
from flowproxy.node.up import wait_for

P = contract.DEFAULT_PREFIX


def blocking_queries(member: Live) -> int:
    """The watches this node's agent runs, each one long-poll against the servers: 1 keyprefix + 1 per
    routed service (`consul.d/` files)."""
    count = 0
    for path in (member.data / "consul.d").glob("*.json"):
        try:
            count += len(json.loads(path.read_text()).get("watches", []))
        except (OSError, ValueError):
            continue
    return count


def run(nodes: int, writes: int, routes: int) -> list[str]:
    with ExitStack() as stack:
        server = stack.enter_context(node_up("fleet-server"))
        members = [stack.enter_context(node_up(f"edge-{i}", f"127.0.0.{i + 1}", server.serf))
                   for i in range(1, nodes + 1)]
        blue, green = IdentityServer("blue-1").start(), IdentityServer("green-1").start()
        stack.callback(blue.stop)
        stack.callback(green.stop)
        store = server.store
        register_instance(store, "colors", "blue-1", blue.port, tags=("blue",))
        register_instance(store, "colors", "green-1", green.port, tags=("green",))
        bulk_routes(store, [f"r{i}" for i in range(routes)], "colors")
        for color in ("blue", "green"):
            store.put(contract.intent_key(P, "flip", color),
                      json.dumps({"service": "colors", "tags": [color], "paths": ["/flip/"]}))
        store.put(contract.active_key(P, "flip"), "blue")
        everyone = [server, *members]
        latest = store.read_prefix(contract.route_folder(P))[0]
        wait_for(lambda: all(m.applied(store) >= latest for m in everyone), 180, "the fleet's first converge")
        time.sleep(3)
        agents = {m.name: m.agent_pid() for m in everyone}
        cpu_before = {name: cpu_seconds(pid) for name, pid in agents.items()}
        started = time.perf_counter()
        firsts, lasts = [], []
        for i in range(writes):
            store.put(contract.active_key(P, "flip"), "green" if i % 2 == 0 else "blue")
            written = store.get(contract.active_key(P, "flip"))
            assert written is not None
            began = time.perf_counter()
            done: dict[str, float] = {}
            while len(done) < len(everyone) and time.perf_counter() - began < 60:
                for m in everyone:
                    if m.name not in done and m.applied(store) >= written.modify_index:
                        done[m.name] = time.perf_counter() - began
                time.sleep(0.002)
            firsts.append(min(done.values()))
            lasts.append(max(done.values()) if len(done) == len(everyone) else 60.0)
            time.sleep(0.5)
        wall = time.perf_counter() - started
        agent_cpu = [100 * (cpu_seconds(pid) - cpu_before[name]) / wall for name, pid in agents.items()]
        queries = [blocking_queries(m) for m in members]
        return [
            f"| fleet: {len(everyone)} proxy nodes ({nodes} clients + the server), {routes} routes, "
            f"{writes} writes | |",
            f"| one write -> first node applied | {spread(firsts)} |",
            f"| one write -> every node applied | {spread(lasts)} |",
            f"| Consul agent CPU per node during the writes | mean {sum(agent_cpu) / len(agent_cpu):.1f} %, "
            f"max {max(agent_cpu):.1f} % of a core (server agent {agent_cpu[0]:.1f} %) |",
            f"| blocking queries (watches) per client node | {min(queries)}-{max(queries)} |",
        ]


def spread(seconds: list[float]) -> str:
    return f"p50 {pct(seconds, 0.5) * 1000:.0f} ms, p99 {pct(seconds, 0.99) * 1000:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--writes", type=int, default=30)
    parser.add_argument("--routes", type=int, default=100)
    args = parser.parse_args()
    print("| metric | measured |\n| --- | --- |")
    for line in run(args.nodes, args.writes, args.routes):
        print(line, flush=True)


if __name__ == "__main__":
    main()
