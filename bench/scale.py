"""Cost in the size of the work: one change at a small and at a large route table, and a node at rest.

    .venv/bin/python -m bench.scale [--routes 10,10000] [--trials 15] [--rest 60] [--layout up|production]
                                    [--baseline] [--bulk-checks on|off]

Each size gets its own node: `flowproxy node up --dev` started as users start it (its own process: its
CPU is read from /proc), or with `--layout production` the production layout (the agent and HAProxy as
the host's, the watches installed as an operator does, `flowproxy node run` as its own process); a real
Consul agent and HAProxy, and real HTTP instances, all on loopback. The table
says, per size: activation, flip and membership-change latency (KV or catalog write -> first request
that shows it), and at rest the CPU of the flowproxy process and of HAProxy's workers. A report, never a
test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.live import FLOWPROXY, answers, avoids, bulk_routes, reaches, until
from bench.parts import free_port, pct
from flowproxy.backend import IdentityServer
from flowproxy.cli.demo import register_instance
from flowproxy.consul.reads import latest_index
from flowproxy.consul.store import ConsulStore
from flowproxy.core import contract
from flowproxy.errors import FlowproxyError
from flowproxy.haproxy.master import HAProxySocket
from flowproxy.node.up import wait_for

P = contract.DEFAULT_PREFIX
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Live:
    """A `flowproxy node up` process: its data folder, its own agent's API, where it serves."""

    name: str
    proc: subprocess.Popen[bytes]
    data: Path
    store: ConsulStore
    proxy: str
    serf: str
    consul: str = ""  # its agent's HTTP address

    def applied(self, reader: ConsulStore | None = None) -> int:
        """The KV index this node's status key reports (read through `reader`, default its own agent)."""
        entry = (reader or self.store).get(contract.status_key(P, self.name))
        return int(json.loads(entry.value).get("kv_index", 0)) if entry else 0

    def settle(self, timeout: float = 300) -> None:
        latest = latest_index(self.store, P)
        wait_for(lambda: self.applied() >= latest, timeout, f"the node to apply index {latest}")

    def agent_pid(self) -> int:
        """The Consul agent this node started (its child)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        for pid in children:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "consul":
                return int(pid)
        raise RuntimeError(f"{self.name}: no consul child")


@contextmanager
def node_up(name: str = "scale", address: str = "127.0.0.1", join: str | None = None,
            extra: tuple[str, ...] = ()) -> Iterator[Live]:
    """`flowproxy node up` as users start it: `--dev` (its own Consul server), or joining `join`; `extra`
    options after those."""
    data = Path(tempfile.mkdtemp(prefix=f"fp-{name}-"))
    http, proxy, serf = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "FLOWPROXY_"))}
    proc = subprocess.Popen([FLOWPROXY, "--data-dir", str(data), "--node", name, "node", "up", "--bind", address,
                             "--http", f"{address}:{proxy}", "--consul-http-port", str(http),
                             "--serf-port", str(serf), "--server-port", str(free_port()),
                             *(["--join", join] if join else ["--dev"]), *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    store = ConsulStore(f"127.0.0.1:{http}")
    live = Live(name, proc, data, store, f"http://{address}:{proxy}", f"{address}:{serf}", f"127.0.0.1:{http}")
    try:
        wait_for(lambda: first_apply(live), 90, f"{name}'s first apply")
        yield live
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        store.close()
        shutil.rmtree(data, ignore_errors=True)


@contextmanager
def production_node(name: str = "scale") -> Iterator[Live]:
    """The production layout (`bench.layouts.production`), with `node run` as the flowproxy process."""
    from bench.layouts import production
    from bench.live import url

    folder = Path(tempfile.mkdtemp(prefix=f"fp-{name}-production-"))
    try:
        with production(folder, daemon=True) as (node, proc):
            assert proc is not None
            live = Live(node.settings.node, proc, node.settings.data_dir, node.store(), url(node), "",
                        node.settings.consul_addr)
            wait_for(lambda: first_apply(live), 90, f"{name}'s first apply")
            yield live
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def first_apply(live: Live) -> bool:
    try:
        return live.store.get(contract.status_key(P, live.name)) is not None
    except FlowproxyError:
        return False  # the agent is still starting


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime, and with `children` those of the children it has waited for: flowproxy's periodic
    proof runs in a child process, and `haproxy -c` in another."""
    fields = [int(f) for f in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:15]]
    return sum(fields if children else fields[:2]) / TICKS


def at_rest(live: Live, seconds: float) -> tuple[float, float]:
    """Percent of one core: the flowproxy process, HAProxy's current workers."""
    workers = HAProxySocket(live.data / "haproxy" / "master.sock").show_proc_settled().workers
    pids = [live.proc.pid, *workers]
    before = [cpu_seconds(pid, pid == live.proc.pid) for pid in pids]
    time.sleep(seconds)
    used = [cpu_seconds(pid, pid == live.proc.pid) - b for pid, b in zip(pids, before, strict=True)]
    return 100 * used[0] / seconds, 100 * sum(used[1:]) / seconds


@dataclass(frozen=True)
class Target:
    """One system under trial: flowproxy's node, or the classic pipeline beside it on the same Consul (its
    own KV prefix, services and HAProxy), each with the same routes and the same changes."""

    name: str
    store: ConsulStore
    prefix: str
    suffix: str  # of its services and instance ids
    proxy: str
    settle: Callable[[], None]


def flowproxy_target(live: Live) -> Target:
    return Target("flowproxy", live.store, P, "", live.proxy, live.settle)


@contextmanager
def classic_target(live: Live) -> Iterator[Target]:
    """The consul-template-style pipeline (bench/classic.py) on `live`'s agent, with an HAProxy of its own."""
    from bench import baseline, classic
    from bench.parts import haproxy_serving

    services = ("app-classic", "colors-classic", "member-classic")
    with haproxy_serving({"haproxy.cfg": baseline.render([])}) as (url, settings), \
            classic.running(live.consul, settings, services) as pipeline:
        def settle() -> None:
            latest = latest_index(live.store, classic.PREFIX)
            wait_for(lambda: pipeline.applied(latest), 300, f"the classic pipeline to apply index {latest}")

        yield Target("baseline", live.store, classic.PREFIX, "-classic", url, settle)


@dataclass(frozen=True)
class Servers:
    blue: IdentityServer
    green: IdentityServer
    member: IdentityServer
    extra: IdentityServer


def prepare(target: Target, n: int, servers: Servers, bulk_checks: bool = True) -> None:
    """n routes on one instance each (HAProxy-checked if `bulk_checks`, else trusting Consul's checks), a
    blue/green route and a route for membership changes (both always HAProxy-checked)."""
    store, x, prefix = target.store, target.suffix, target.prefix
    register_instance(store, f"app{x}", f"app-1{x}", servers.blue.port)
    register_instance(store, f"colors{x}", f"blue-1{x}", servers.blue.port, tags=("blue",))
    register_instance(store, f"colors{x}", f"green-1{x}", servers.green.port, tags=("green",))
    register_instance(store, f"member{x}", f"member-1{x}", servers.member.port)
    bulk_routes(store, [f"r{i}" for i in range(n)], f"app{x}", prefix, check=bulk_checks)
    for color in ("blue", "green"):
        store.put(contract.intent_key(prefix, "flip", color),
                  json.dumps({"service": f"colors{x}", "tags": [color], "paths": ["/flip/"]}))
    store.put(contract.active_key(prefix, "flip"), "blue")
    store.put(contract.intent_key(prefix, "m", "live"), json.dumps({"service": f"member{x}", "paths": ["/m/"]}))
    store.put(contract.active_key(prefix, "m"), "live")
    target.settle()
    wait_for(answers(f"{target.proxy}/flip/x", 200), 120, f"{target.name}'s flip route")
    time.sleep(2)


def measure(target: Target, count: int, servers: Servers) -> dict[str, list[float]]:
    """Seconds from each write to the first request that shows it: activation, flip, membership."""
    store, x, prefix, proxy = target.store, target.suffix, target.prefix, target.proxy
    out: dict[str, list[float]] = {"activation": [], "flip": [], "membership": []}
    for i in range(count):
        intent = {"service": f"app{x}", "paths": [f"/t{i}/"]}
        store.put(contract.intent_key(prefix, f"t{i}", "live"), json.dumps(intent))
        target.settle()
        time.sleep(0.3)
        store.put(contract.active_key(prefix, f"t{i}"), "live")
        out["activation"].append(until("activation", answers(f"{proxy}/t{i}/x", 200), 60))
        target.settle()
        time.sleep(0.3)
        color = "green" if i % 2 == 0 else "blue"
        store.put(contract.active_key(prefix, "flip"), color)
        out["flip"].append(until("flip", reaches(f"{proxy}/flip/x", f"{color}-1"), 60))
        target.settle()
        time.sleep(0.3)
        register_instance(store, f"member{x}", f"member-2{x}", servers.extra.port)
        out["membership"].append(until("membership", reaches(f"{proxy}/m/x", "member-2", tries=4), 60))
        store.deregister_service(f"member-2{x}")
        until("member-2 gone", avoids(f"{proxy}/m/x", "member-2"), 60)
        time.sleep(0.3)
    return out


def trials(live: Live, n: int, count: int, rest: float, *, baseline: bool = False,
           bulk_checks: bool = True) -> dict[str, str]:
    servers = Servers(*(IdentityServer(name).start() for name in ("blue-1", "green-1", "member-1", "member-2")))
    try:
        ours = flowproxy_target(live)
        prepare(ours, n, servers, bulk_checks)
        seen = measure(ours, count, servers)
        time.sleep(5)
        flowproxy_cpu, haproxy_cpu = at_rest(live, rest)
        cells = {metric: summary(values) for metric, values in seen.items()}
        cells |= {"at rest, flowproxy": f"{flowproxy_cpu:.1f} % of a core",
                  "at rest, HAProxy workers": f"{haproxy_cpu:.1f} % of a core"}
        if baseline:
            with classic_target(live) as theirs:
                prepare(theirs, n, servers, bulk_checks)
                cells |= {f"{metric}, baseline": summary(values)
                          for metric, values in measure(theirs, count, servers).items()}
    finally:
        for server in (servers.blue, servers.green, servers.member, servers.extra):
            server.stop()
    return cells


def summary(seconds: list[float]) -> str:
    return f"p50 {pct(seconds, 0.5) * 1000:.0f} ms, p95 {pct(seconds, 0.95) * 1000:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routes", default="10,10000")
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--rest", type=float, default=60.0)
    parser.add_argument("--layout", choices=("up", "production"), default="up")
    parser.add_argument("--baseline", action="store_true",
                        help="the same trials on the classic consul-template-style pipeline, beside the node")
    parser.add_argument("--bulk-checks", choices=("on", "off"), default="on",
                        help='off: the table\'s routes say "check": false (Consul\'s checks alone decide)')
    args = parser.parse_args()
    start = production_node if args.layout == "production" else node_up
    sizes = [int(n) for n in args.routes.split(",")]
    columns: dict[int, dict[str, str]] = {}
    for n in sizes:
        with start() as live:
            columns[n] = trials(live, n, args.trials, args.rest, baseline=args.baseline,
                                bulk_checks=args.bulk_checks == "on")
        print(f"{n:,} routes: {columns[n]}", flush=True)
    print(f"\n| metric (layout {args.layout}, {args.trials} trials, bulk checks {args.bulk_checks}; at rest over "
          f"{args.rest:.0f} s) | "
          + " | ".join(f"{n:,} routes" for n in sizes) + " |")
    print("| --- |" + " --- |" * len(sizes))
    for metric in columns[sizes[0]]:
        print(f"| {metric} | " + " | ".join(columns[n][metric] for n in sizes) + " |")


if __name__ == "__main__":
    main()
