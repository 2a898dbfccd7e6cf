"""`flowproxy demo`: a dev node, three `go-demo` instances at ports nobody chose, and the walkthrough."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

from flowproxy.consul.registrations import Check, Registration
from flowproxy.consul.store import ConsulStore
from flowproxy.core import contract
from flowproxy.node.up import Node, NodeSpec, wait_for
from flowproxy.probe import Reply, fetch


def register_instance(store: ConsulStore, service: str, instance_id: str, port: int, *, tags: tuple[str, ...] = (),
                      address: str = "127.0.0.1", check_interval: str = "1s") -> None:
    """Register like an agent service definition would: with an HTTP check on the instance's /health."""
    store.register_service(Registration(service, instance_id, address, port, tags, check=Check(
        http=f"http://{address}:{port}/health", interval=check_interval, status="passing")))


def wait_status(url: str, status: int, timeout: float = 15, host: str | None = None) -> Reply:
    last: list[Reply] = []

    def ready() -> bool:
        try:
            last[:] = [fetch(url, host)]
        except OSError:
            return False
        return last[0].status == status

    wait_for(ready, timeout, f"{url} to answer {status}")
    return last[0]


def start_backend(name: str) -> tuple[subprocess.Popen[str], int]:
    # A session of its own: Ctrl-C reaches the demo, which stops its backends in order.
    proc = subprocess.Popen([sys.executable, "-m", "flowproxy.backend", "--name", name],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "<name> listening on 127.0.0.1:<port>"
    return proc, int(line.rsplit(":", 1)[1])


def step(title: str, command: str = "") -> None:
    click.secho(f"\n== {title}", bold=True)
    if command:
        click.echo(f"   $ {command}")


def walkthrough(store: ConsulStore, proxy: str, ports: list[int], prefix: str = contract.DEFAULT_PREFIX) -> None:
    live, active = contract.intent_key(prefix, "go-demo", "live"), contract.active_key(prefix, "go-demo")
    intent = '{"service":"go-demo","paths":["/demo"]}'
    step("1. go-demo registers in Consul at a port nobody chose", f"(instance go-demo-1 on port {ports[0]})")
    register_instance(store, "go-demo", "go-demo-1", ports[0])
    step("2. Stage an intent: nothing changes yet", f"consul kv put {live} '{intent}'")
    store.put(live, intent)
    time.sleep(1)
    click.echo(f"   GET /demo/hello -> {fetch(proxy + '/demo/hello').status} (no route yet)")
    step("3. Activate after post-deployment tests", f"consul kv put {active} live")
    store.put(active, "live")
    reply = wait_status(proxy + "/demo/hello", 200)
    click.echo(f"   GET /demo/hello -> {reply.status} {reply.body.strip()}")
    step(f"4. Scale go-demo to 3 instances: picked up with no write to {prefix}")
    for i, port in enumerate(ports[1:], start=2):
        register_instance(store, "go-demo", f"go-demo-{i}", port)
    wait_for(lambda: len({fetch(proxy + "/demo/hello").instance for _ in range(6)}) == 3, 15, "three instances")
    seen = collections.Counter(fetch(proxy + "/demo/hello").instance for _ in range(9))
    click.echo(f"   9 requests spread over: {dict(sorted(seen.items()))}")
    scoped = json.dumps({"service": "go-demo", "paths": ["/demo/hello", "/demo/person"], "domains": ["my-domain.com"]})
    step("5-6. Several paths and a domain", f"consul kv put {live} '{scoped}'")
    store.put(live, scoped)
    wait_status(proxy + "/demo/hello", 404)
    for host in ("my-domain.com", "other.com"):
        click.echo(f"   GET /demo/person Host: {host} -> {fetch(proxy + '/demo/person', host).status}")
    store.put(live, intent)
    wait_status(proxy + "/demo/hello", 200)
    step("7. Switch the route off (variants stay)", f"consul kv delete {active}")
    store.delete(active)
    click.echo(f"   GET /demo/hello -> {wait_status(proxy + '/demo/hello', 404).status} (documented default)")
    store.put(active, "live")
    wait_status(proxy + "/demo/hello", 200)
    click.echo("   ... and back on: GET /demo/hello -> 200")


def run_demo(spec: NodeSpec, keep_running: bool) -> None:
    shutil.rmtree(spec.settings.data_dir, ignore_errors=True)
    node = Node(spec)
    backends: list[subprocess.Popen[str]] = []
    try:
        node.start()
        node.arm_watches()
        ports = []
        for i in range(1, 4):
            proc, port = start_backend(f"go-demo-{i}")
            backends.append(proc)
            ports.append(port)
        store = node.store()
        proxy = f"http://{spec.settings.http_bind}"
        walkthrough(store, proxy, ports, spec.settings.prefix)
        click.secho(f"\nThe walkthrough worked. Proxy: {proxy}   Consul: http://{node.http_addr()}", fg="green")
        if keep_running:
            cli = Path(sys.executable).parent / "flowproxy"
            click.echo(f"Try: curl -i {proxy}/demo/hello   |   CONSUL_HTTP_ADDR={node.http_addr()} "
                       f"{cli} status   |   Ctrl-C stops everything")
            click.echo(dashboard_hint(spec.settings.metrics_bind, spec.settings.stats_auth))
            node.supervise()
    finally:
        for proc in backends:
            proc.terminate()
            proc.wait(timeout=10)
        node.stop()


def dashboard_hint(metrics_bind: str | None, stats_auth: str | None) -> str:
    if metrics_bind and stats_auth:
        user = stats_auth.split(":", 1)[0]
        return f"Dashboard: http://{metrics_bind}/dashboard (user {user}, the --stats-auth password)"
    return ("Dashboard: start the demo with --metrics 127.0.0.1:9101 --stats-auth ops:<password>, then open "
            "http://127.0.0.1:9101/dashboard")
