"""Measurements that need a live node: a real Consul agent, HAProxy, handlers run by real watches."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import baseline, classic
from bench.run import Row, fast_backend, free_port, haproxy_serving, pct
from bench.wrk import WrkResult, run_wrk
from flowproxy.backend import IdentityServer
from flowproxy.consul_io import ConsulStore
from flowproxy.demo import fetch, register_instance
from flowproxy.haproxy import HAProxySocket
from flowproxy.node import Node, NodeSpec, wait_for
from flowproxy.settings import Settings

FLOWPROXY = str(Path(sys.executable).parent / "flowproxy")
P = "flowproxy/"


def spec(folder: Path, name: str, dev: bool, join: tuple[str, ...] = ()) -> NodeSpec:
    http = free_port()
    settings = Settings(node=name, data_dir=folder, consul_addr=f"127.0.0.1:{http}",
                        http_bind=f"127.0.0.1:{free_port()}").checked()
    return NodeSpec(settings=settings, http_port=http, serf_port=free_port(), server_port=free_port(), dev=dev,
                    join=join)


@contextmanager
def live_node(folder: Path, name: str = "bench", dev: bool = True, join: tuple[str, ...] = ()) -> Iterator[Node]:
    node = Node(spec(folder, name, dev, join))
    try:
        node.start()
        node.arm_watches()
        yield node
    finally:
        node.stop()


def url(node: Node) -> str:
    return f"http://{node.settings.http_bind}"


def reloads(node: Node) -> int:
    return HAProxySocket(node.settings.master_socket).show_proc_settled().reloads


def applied(node: Node) -> int:
    entry = node.store().get(node.settings.status_key)
    return int(json.loads(entry.value).get("kv_index", 0)) if entry else 0


def settle(node: Node, timeout: float = 120) -> None:
    latest = node.store().read_prefix(P + "routes/")[0]
    wait_for(lambda: applied(node) >= latest, timeout, f"the node to apply index {latest}")


def until(check: str, probe: Callable[[], bool], timeout: float = 10) -> float:
    """Seconds until `probe()` is true, polling every millisecond."""
    started = time.perf_counter()
    deadline = started + timeout
    while time.perf_counter() < deadline:
        try:
            if probe():
                return time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.001)
    raise TimeoutError(check)


def answers(address: str, status: int) -> Callable[[], bool]:
    return lambda: fetch(address).status == status


def reaches(address: str, instance: str, tries: int = 1) -> Callable[[], bool]:
    """True once one of `tries` requests lands on `instance` (round robin spreads them)."""
    return lambda: any(fetch(address).instance == instance for _ in range(tries))


def avoids(address: str, instance: str) -> Callable[[], bool]:
    return lambda: all(fetch(address).instance != instance for _ in range(3))


def quiet() -> None:
    """Trials start on an idle node: each change's status write and deregistration fire watch events of
    their own, and a trial started while those run measures the queue behind them, not one change."""
    time.sleep(0.3)


def bulk_routes(store: ConsulStore, names: list[str], service: str, prefix: str = P) -> None:
    ops: list[tuple[str, str, bytes | None, int | None]] = []
    for name in names:
        body = json.dumps({"service": service, "paths": [f"/{name}/"]}).encode()
        ops.append(("set", f"{prefix}routes/{name}/live", body, None))
        ops.append(("set", f"{prefix}routes/{name}/active", b"live", None))
    for start in range(0, len(ops), 64):  # Consul 1.8 caps a transaction at 64 operations
        store.txn(ops[start:start + 64])


@dataclass(frozen=True)
class System:
    """One pipeline under test: where it serves, the KV prefix and service suffix only it watches."""

    name: str
    url: str
    prefix: str
    suffix: str
    reloads: Callable[[], int]
    settle: Callable[[], None]


@dataclass
class Systems:
    """flowproxy's node and the classic pipeline, on one Consul, each with keys and services of its own:
    a trial changes one system at a time, so neither pays for the other's work on the shared 2 cores."""

    node: Node
    members: list[System]

    def count_reloads(self) -> dict[str, int]:
        return {s.name: s.reloads() for s in self.members}


Trials = tuple[dict[str, list[float]], dict[str, float]]


def since(started: float, check: str, probe: Callable[[], bool], timeout: float = 20) -> float:
    until(check, probe, timeout)
    return time.perf_counter() - started


def collect(systems: Systems, trials: int, trial: Callable[[System, int], float]) -> Trials:
    """Run each trial on each system in turn; per system, the latencies and the reloads per trial."""
    times: dict[str, list[float]] = {s.name: [] for s in systems.members}
    before = systems.count_reloads()
    for t in range(trials):
        for system in systems.members:
            quiet()
            times[system.name].append(trial(system, t))
    for system in systems.members:
        system.settle()
    after = systems.count_reloads()
    return times, {name: (after[name] - before[name]) / trials for name in after}


def activation(systems: Systems, trials: int, tag: str) -> Trials:
    store = systems.node.store()

    def trial(s: System, t: int) -> float:
        # The trailing slash matters: `/a1` is a string prefix of `/a10/x`, so an already active route
        # would answer and the trial would measure nothing.
        store.put(f"{s.prefix}routes/{tag}{t}/live", json.dumps({"service": "app", "paths": [f"/{tag}{t}/"]}))
        s.settle()
        start = time.perf_counter()
        store.put(f"{s.prefix}routes/{tag}{t}/active", "live")
        return since(start, "activation", answers(f"{s.url}/{tag}{t}/x", 200))

    return collect(systems, trials, trial)


def flips(systems: Systems, trials: int) -> Trials:
    store = systems.node.store()
    for s in systems.members:
        for color in ("blue", "green"):
            intent = {"service": "app", "tags": [color], "paths": ["/flip"]}
            store.put(f"{s.prefix}routes/flip/{color}", json.dumps(intent))
        store.put(f"{s.prefix}routes/flip/active", "blue")
        until("blue", reaches(f"{s.url}/flip", "blue-1"), 20)

    def trial(s: System, t: int) -> float:
        color = "green" if t % 2 == 0 else "blue"
        start = time.perf_counter()
        store.put(f"{s.prefix}routes/flip/active", color)
        return since(start, "flip", reaches(f"{s.url}/flip", f"{color}-1"))

    return collect(systems, trials, trial)


def membership(systems: Systems, trials: int) -> Trials:
    store = systems.node.store()
    first = {s.name: IdentityServer(f"m{s.suffix}-0").start() for s in systems.members}
    for s in systems.members:
        intent = {"service": f"members{s.suffix}", "paths": ["/members"]}
        store.put(f"{s.prefix}routes/members/live", json.dumps(intent))
        store.put(f"{s.prefix}routes/members/active", "live")
        register_instance(store, f"members{s.suffix}", f"m{s.suffix}-0", first[s.name].port)
        until("first member", answers(f"{s.url}/members", 200), 20)

    def trial(s: System, t: int) -> float:
        name = f"m{s.suffix}-{t + 1}"
        server = IdentityServer(name).start()
        start = time.perf_counter()
        register_instance(store, f"members{s.suffix}", name, server.port)
        took = since(start, "member", reaches(f"{s.url}/members", name, t + 2))
        store.client.agent.service.deregister(name)
        until("member gone", avoids(f"{s.url}/members", name), 20)
        server.stop()
        return took

    result = collect(systems, trials, trial)
    for s in systems.members:
        store.client.agent.service.deregister(f"m{s.suffix}-0")
        first[s.name].stop()
    return result


def full_apply(node: Node) -> tuple[float, float]:
    """One full apply run by hand after a change that needs a reload: wall seconds, handler peak RSS in MB."""
    lock = os.open(node.settings.run_dir / "apply.lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # the watch handlers leave the change to us
    # A new balance algorithm changes a backend, not just a map: render, haproxy -c and a confirmed reload.
    entry = node.store().get(f"{P}routes/r0/live")
    balance = "roundrobin" if entry and b"leastconn" in entry.value else "leastconn"
    node.store().put(f"{P}routes/r0/live", json.dumps({"service": "app", "paths": ["/r0/"], "balance": balance}))
    time.sleep(0.5)
    os.close(lock)
    env = {**os.environ, **node.settings.env()}
    started = time.perf_counter()
    proc = subprocess.Popen([FLOWPROXY, "handle"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - started, usage.ru_maxrss / 1024


def worker_rss_mb(node: Node) -> float:
    pid = HAProxySocket(node.settings.master_socket).show_proc().workers[0]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def reconfig_failures(systems: Systems, port: int, seconds: int) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """wrk on both systems while 50 reconfigurations land on each, keep-alive then `Connection: close`.

    Changes alternate: a new path (a map change for flowproxy), then a new balance algorithm (a reload for
    flowproxy too), so both kinds happen under load. Returns failed requests and reloads per system.
    """
    store = systems.node.store()
    register_instance(store, "fast", "fast-1", port)
    for s in systems.members:
        store.put(f"{s.prefix}routes/hot/live", json.dumps({"service": "fast", "paths": ["/hot"]}))
        store.put(f"{s.prefix}routes/hot/active", "live")
        until("hot route", answers(f"{s.url}/hot", 200), 20)
    failed: dict[str, dict[str, int]] = {s.name: {} for s in systems.members}
    before = systems.count_reloads()
    for close in (False, True):
        results: dict[str, WrkResult] = {}

        def load_one(s: System, into: dict[str, WrkResult] = results, c: bool = close) -> None:
            into[s.name] = run_wrk(f"{s.url}/hot", seconds + 4, close=c)

        loads = [threading.Thread(target=load_one, args=(s,)) for s in systems.members]
        for load in loads:
            load.start()
        time.sleep(1)
        balance, paths = "roundrobin", ["/hot"]
        for i in range(50):
            if i % 2:
                balance = "leastconn" if balance == "roundrobin" else "roundrobin"
            else:
                paths = [*paths, f"/extra{close}{i}"]
            for s in systems.members:
                intent = {"service": "fast", "paths": paths, "balance": balance}
                store.put(f"{s.prefix}routes/hot/live", json.dumps(intent))
            time.sleep(seconds / 50)
        for load in loads:
            load.join()
        for name, result in results.items():
            failed[name]["close" if close else "keep-alive"] = result.failed
    for s in systems.members:
        s.settle()
    after = systems.count_reloads()
    return failed, {name: after[name] - before[name] for name in after}


def ms(values: list[float]) -> str:
    return f"p50 {pct(values, 0.5) * 1000:.0f} ms, p95 {pct(values, 0.95) * 1000:.0f} ms"


def verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def live_rows(trials: int, seconds: int) -> list[Row]:
    base = Path(tempfile.mkdtemp(prefix="fp-live-"))
    rows: list[Row] = []
    try:
        with live_node(base / "a") as node, fast_backend() as port, \
                haproxy_serving({"haproxy.cfg": baseline.render([])}) as (classic_url, classic_settings), \
                classic.running(node.http_addr(), classic_settings, ("app", "members-classic", "fast")) as pipeline:
            store = node.store()
            backend = IdentityServer("app-1").start()
            blue, green = IdentityServer("blue-1").start(), IdentityServer("green-1").start()
            register_instance(store, "app", "app-1", backend.port)
            register_instance(store, "app", "blue-1", blue.port, tags=("blue",))
            register_instance(store, "app", "green-1", green.port, tags=("green",))
            systems = Systems(node, [
                System("flowproxy", url(node), P, "", lambda: reloads(node), lambda: settle(node)),
                System("baseline", classic_url, classic.PREFIX, "-classic", pipeline.reloads, pipeline.settle)])
            rows += latency_rows(systems, trials)
            rows += failure_rows(*reconfig_failures(systems, port, seconds))
            took = fresh_node(base / "b", node)
            rows.append(Row("fresh node, 1,000 routes: agent start -> all serving", f"{took:.2f} s", target="<= 5 s",
                            verdict=verdict(took <= 5)))
            for server in (backend, blue, green):
                server.stop()
            rows += scale_rows(base, port)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rows


def failure_rows(failed: dict[str, dict[str, int]], reloaded: dict[str, int]) -> list[Row]:
    def cell(name: str) -> str:
        return f"{failed[name]['keep-alive']} / {failed[name]['close']}"

    return [Row("failed requests, 50 reconfigurations (keep-alive / close)", cell("flowproxy"), cell("baseline"),
                "0 / 0", verdict(not any(failed["flowproxy"].values()))),
            Row("reloads during those 100 changes", str(reloaded["flowproxy"]), str(reloaded["baseline"]))]


def latency_rows(systems: Systems, trials: int) -> list[Row]:
    small, small_reloads = activation(systems, trials, "a")
    flip, flip_reloads = flips(systems, trials)
    member, member_reloads = membership(systems, min(trials, 20))
    for s in systems.members:
        bulk_routes(systems.node.store(), [f"o{i}" for i in range(1000)], "app", s.prefix)
        s.settle()
    large, _ = activation(systems, min(trials, 20), "b")
    fp, bl = "flowproxy", "baseline"
    return [
        Row("activation latency, small config", ms(small[fp]), ms(small[bl]), "p50 <= 100, p95 <= 250",
            verdict(pct(small[fp], 0.5) <= 0.1 and pct(small[fp], 0.95) <= 0.25)),
        Row("activation latency, 1,000 other routes", ms(large[fp]), ms(large[bl])),
        Row("blue-green flip latency", ms(flip[fp]), ms(flip[bl]), "p50 <= 30", verdict(pct(flip[fp], 0.5) <= 0.03)),
        Row("reloads per flip", f"{flip_reloads[fp]:.1f}", f"{flip_reloads[bl]:.1f}", "0",
            verdict(flip_reloads[fp] == 0)),
        Row("membership change latency", ms(member[fp]), ms(member[bl]), "p50 <= 50",
            verdict(pct(member[fp], 0.5) <= 0.05)),
        Row("reloads per membership change (add + remove)", f"{member_reloads[fp]:.1f}",
            f"{member_reloads[bl]:.1f}", "0", verdict(member_reloads[fp] == 0)),
        Row("reloads per activation", f"{small_reloads[fp]:.1f}", f"{small_reloads[bl]:.1f}"),
    ]


def scale_rows(base: Path, port: int) -> list[Row]:
    """A fresh node per size, each route with one instance: one full apply run by hand after a change."""
    rows = []
    for n in (10, 100, 1000, 10_000):
        with live_node(base / f"scale-{n}", f"scale-{n}") as node:
            register_instance(node.store(), "app", "app-1", port)
            bulk_routes(node.store(), [f"r{i}" for i in range(n)], "app")
            settle(node, timeout=300)
            wall, rss = full_apply(node)
            settle(node, timeout=300)
            ok = wall <= 2 and rss <= 150
            rows.append(Row(f"full apply, {n:,} routes: time / handler peak RSS / HAProxy worker RSS",
                            f"{wall:.2f} s / {rss:.0f} MB / {worker_rss_mb(node):.0f} MB",
                            target="<= 2 s / <= 150 MB" if n == 10_000 else "-",
                            verdict=verdict(ok) if n == 10_000 else "-"))
    return rows


def fresh_node(folder: Path, server: Node) -> float:
    """A new node joins the cluster (1,000+ routes in KV) with an empty folder: agent start -> serving all."""
    started = time.perf_counter()
    with live_node(folder, "fresh", dev=False, join=(f"127.0.0.1:{server.spec.serf_port}",)) as fresh:
        latest = fresh.store().read_prefix(P + "routes/")[0]
        wait_for(lambda: applied(fresh) >= latest and fetch(f"{url(fresh)}/o999/x").status == 200, 60, "fresh node")
        return time.perf_counter() - started
