"""Measurements that need a live node: a real Consul agent, HAProxy, handlers run by real watches."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
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
from bench.parts import Row, fast_backend, free_port, haproxy_serving, pct
from bench.wrk import WrkResult, run_wrk
from flowproxy.backend import IdentityServer
from flowproxy.cli.demo import register_instance
from flowproxy.consul.reads import latest_index
from flowproxy.consul.store import ConsulStore
from flowproxy.haproxy.master import HAProxySocket, old_workers
from flowproxy.node.up import Node, NodeSpec, wait_for
from flowproxy.probe import fetch
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
    latest = latest_index(node.store(), P)  # routes, templates and certificates
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


def bulk_routes(store: ConsulStore, names: list[str], service: str, prefix: str = P, check: bool = True) -> None:
    ops: list[tuple[str, str, bytes | None, int | None]] = []
    for name in names:
        body = json.dumps({"service": service, "paths": [f"/{name}/"]} | ({} if check else {"check": False})).encode()
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
    master: Path | None = None  # HAProxy's master socket, to count its old workers


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


def mixed_rows(systems: Systems, folder: Path) -> list[Row]:
    """100 mixed changes on each system, a long-lived client (a WebSocket to /echo) opened every 10: how
    many reloads, and the old workers (with their resident memory) left holding those clients."""
    store = systems.node.store()
    pems = certificates(folder, ("a", "b", "c"))
    extra = IdentityServer("app-extra").start()
    tunnels = []
    for s in systems.members:
        store.put(f"{s.prefix}certs/a", pems["a"])
        store.put(f"{s.prefix}routes/echo/live", json.dumps({"service": "app", "paths": ["/echo"]}))
        store.put(f"{s.prefix}routes/echo/active", "live")
        store.put(f"{s.prefix}routes/flip/active", "blue")
        until("echo route", answers(f"{s.url}/echo", 200), 20)
        s.settle()
    before = systems.count_reloads()
    for n in range(100):
        if n % 10 == 0:
            tunnels += [open_tunnel(s.url) for s in systems.members]
        for s in systems.members:
            MIXED[n % len(MIXED)](store, s.prefix, n, pems, extra.port)
            s.settle()
    after = systems.count_reloads()
    old = {s.name: old_workers(HAProxySocket(s.master).show_proc_settled()) for s in systems.members if s.master}
    for tunnel in tunnels:
        tunnel.close()
    store.client.agent.service.deregister("app-extra")
    extra.stop()
    count = {name: after[name] - before[name] for name in after}

    def workers(name: str) -> str:
        return f"{len(old[name].pids)} / {old[name].rss_kib / 1024:.0f} MiB"

    return [Row("reloads per 100 mixed changes (new routes, removals, flips, canary start/end, instances, "
                "certificates; 1 custom template)", str(count["flowproxy"]), str(count["baseline"]), "<= 2",
                verdict(count["flowproxy"] <= 2)),
            Row("old workers / their resident memory after those 100 changes (a WebSocket opened every 10)",
                workers("flowproxy"), workers("baseline"))]


def certificates(folder: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        key, crt = folder / f"{name}.key", folder / f"{name}.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", str(key),
                        "-out", str(crt), "-subj", f"/CN={name}.example.test"], check=True, capture_output=True)
        out[name] = crt.read_bytes() + key.read_bytes()
    return out


def open_tunnel(base: str) -> socket.socket:
    """A WebSocket handshake on /echo, left open: a long-lived client of whichever worker accepted it."""
    host, _, port = base.removeprefix("http://").rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(b"GET /echo HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock


def mixed_new(store: ConsulStore, prefix: str, n: int, pems: dict[str, bytes], extra: int) -> None:
    store.put(f"{prefix}routes/mixed-{n}/live", json.dumps({"service": "app", "paths": [f"/mixed-{n}/"]}))
    store.put(f"{prefix}routes/mixed-{n}/active", "live")


def mixed_remove(store: ConsulStore, prefix: str, n: int, pems: dict[str, bytes], extra: int) -> None:
    store.delete(f"{prefix}routes/mixed-{n - 1}", recurse=True)


def mixed_canary(store: ConsulStore, prefix: str, n: int, pems: dict[str, bytes], extra: int) -> None:
    store.put(f"{prefix}routes/flip/active", "blue=90,green=10")


def mixed_canary_end(store: ConsulStore, prefix: str, n: int, pems: dict[str, bytes], extra: int) -> None:
    store.put(f"{prefix}routes/flip/active", "green")


def mixed_flip(store: ConsulStore, prefix: str, n: int, pems: dict[str, bytes], extra: int) -> None:
    store.put(f"{prefix}routes/flip/active", "blue")


def mixed_instance(store: ConsulStore, prefix: str, n: int, pems: dict[str, bytes], extra: int) -> None:
    if prefix == P:  # one registration, seen by both systems
        if n // 10 % 2 == 0:
            register_instance(store, "app", "app-extra", extra)
        else:
            store.client.agent.service.deregister("app-extra")


def mixed_cert(store: ConsulStore, prefix: str, n: int, pems: dict[str, bytes], extra: int) -> None:
    """Certificate b or c, added in even rounds of ten and removed in odd ones (a, the default, stays)."""
    name = "b" if n % 10 == 7 else "c"
    if n // 10 % 2 == 0:
        store.put(f"{prefix}certs/{name}", pems[name])
    else:
        store.delete(f"{prefix}certs/{name}")


def mixed_template(store: ConsulStore, prefix: str, n: int, pems: dict[str, bytes], extra: int) -> None:
    """Once (change 49): a route with a template of its own, which only a reload can add; else a new route."""
    if n != 49:
        mixed_new(store, prefix, n, pems, extra)
        return
    store.put(f"{prefix}templates/tagged", "backend {{ backend.name }}\n    http-response set-header X-T 1\n"
              "{% for s in backend.servers %}    server {{ s.name }} {{ s.endpoint }}\n{% endfor %}")
    intent = {"service": "app", "paths": ["/tagged/"], "template": "tagged"}
    store.put(f"{prefix}routes/tagged/live", json.dumps(intent))
    store.put(f"{prefix}routes/tagged/active", "live")


# Ten kinds of change, each a real one (never the same value written again), repeated ten times.
MIXED = [mixed_new, mixed_remove, mixed_canary, mixed_canary_end, mixed_flip, mixed_instance, mixed_new,
         mixed_cert, mixed_cert, mixed_template]


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
                System("flowproxy", url(node), P, "", lambda: reloads(node), lambda: settle(node),
                       node.settings.master_socket),
                System("baseline", classic_url, classic.PREFIX, "-classic", pipeline.reloads, pipeline.settle,
                       classic_settings.master_socket)])
            rows += latency_rows(systems, trials)
            rows += failure_rows(*reconfig_failures(systems, port, seconds))
            rows += mixed_rows(systems, base / "certs")
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
        Row("reloads per activation (a new route: intent, then its active key)", f"{small_reloads[fp]:.2f}",
            f"{small_reloads[bl]:.1f}", "0", verdict(small_reloads[fp] == 0)),
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
