"""Real processes for integration tests: free loopback ports, HAProxy, Consul-backed proxy nodes."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from bench.parts import free_port
from flowproxy.consul.store import ConsulStore
from flowproxy.core.render import Bundle
from flowproxy.errors import FlowproxyError
from flowproxy.haproxy import release
from flowproxy.haproxy.master import HAProxySocket
from flowproxy.node.up import Node, NodeSpec, wait_for
from flowproxy.probe import Reply, fetch
from flowproxy.settings import Settings

# The least-privilege ACL policies the README documents: a proxy node's token, and an operator's.
NODE_RULES = """
key_prefix "flowproxy/" { policy = "read" }
key_prefix "flowproxy/status/" { policy = "write" }
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
service "flowproxy" { policy = "write" }
agent_prefix "" { policy = "write" }
node_prefix "edge-" { policy = "write" }
key_prefix "flowproxy/acme/" { policy = "write" }
key_prefix "flowproxy/certs/acme-" { policy = "write" }
session_prefix "edge-" { policy = "write" }
"""
OPERATOR_RULES = """
key_prefix "flowproxy/" { policy = "read" }
key_prefix "flowproxy/routes/" { policy = "write" }
key_prefix "flowproxy/acme/accounts/" { policy = "deny" }
key_prefix "flowproxy/acme/orders/" { policy = "deny" }
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
"""


def self_signed(folder: Path, name: str) -> bytes:
    """A self-signed certificate for <name>.example.test made by openssl; writes <name>.pem (cert and key)
    into `folder` and returns its bytes."""
    import subprocess

    need("openssl")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.crt"),
                    "-subj", f"/CN={name}.example.test", "-addext", f"subjectAltName=DNS:{name}.example.test"],
                   check=True, capture_output=True)
    pem = (folder / f"{name}.crt").read_bytes() + (folder / f"{name}.key").read_bytes()
    (folder / f"{name}.pem").write_bytes(pem)
    return pem


def need(binary: str) -> str:
    """The binary's path; under CI a missing real part fails the run instead of skipping."""
    path = shutil.which(binary)
    if path is None:
        message = f"{binary} is not installed (run `bash .ci/install`)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def node_spec(data_dir: Path, name: str, *, dev: bool, join: tuple[str, ...] = (), proxy: bool = True,
              preview: bool = False, templates: Path | None = None, token: str | None = None,
              acl_master: str | None = None, edge: bool = False, watch_shard_size: int | None = None) -> NodeSpec:
    """edge: open HTTPS, SNI and metrics listeners on loopback ports too, with a stats password."""
    http_port = free_port()
    settings = Settings(node=name, data_dir=data_dir, consul_addr=f"127.0.0.1:{http_port}",
                        http_bind=f"127.0.0.1:{free_port()}",
                        preview_bind=f"127.0.0.1:{free_port()}" if preview else None).checked()
    if edge:
        settings = replace(settings, https_bind=f"127.0.0.1:{free_port()}", sni_bind=f"127.0.0.1:{free_port()}",
                           metrics_bind=f"127.0.0.1:{free_port()}", stats_auth="ops:stats-secret")
    if templates is not None:
        settings = replace(settings, templates=templates)
    settings = replace(settings, consul_token=token)
    if watch_shard_size is not None:
        settings = replace(settings, watch_shard_size=watch_shard_size)
    return NodeSpec(settings=settings, http_port=http_port, serf_port=free_port(), server_port=free_port(),
                    join=join, dev=dev, proxy=proxy, acl=bool(token or acl_master), acl_master=acl_master)


class Pause:
    """The supervisor's pause switch. Once `set()` returns no tick runs, not even one that began before it
    (it is waited for): a test that kills a child right after pausing must not race a tick that restarts it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()

    def set(self) -> None:
        self._event.set()
        with self._lock:  # a tick in flight finishes first
            pass

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    @contextlib.contextmanager
    def unless_paused(self) -> Iterator[bool]:
        """Held for one tick: True when it may run."""
        with self._lock:
            yield not self._event.is_set()


@dataclass
class ProxyNode:
    """A running proxy node (Consul agent + HAProxy) and the ways a test talks to it.

    A thread calls `tick()` every second, as `node up`'s supervisor does: health check, stranded applies.
    """

    node: Node
    ticking: threading.Event = field(default_factory=threading.Event)
    paused: Pause = field(default_factory=Pause)

    def __post_init__(self) -> None:
        def run() -> None:
            while not self.ticking.wait(1.0):
                with self.paused.unless_paused() as running:
                    if running:
                        self.node.tick()

        threading.Thread(target=run, daemon=True, name=f"tick-{self.settings.node}").start()

    @property
    def settings(self) -> Settings:
        return self.node.settings

    @property
    def url(self) -> str:
        return f"http://{self.settings.http_bind}"

    @property
    def serf(self) -> str:
        return f"127.0.0.1:{self.node.spec.serf_port}"

    def store(self) -> ConsulStore:
        return self.node.store()

    def get(self, path: str, host: str | None = None) -> Reply:
        return fetch(self.url + path, host)

    def config(self) -> bytes:
        return (self.settings.current / "haproxy.cfg").read_bytes()

    def public_routes(self) -> str:
        """What the public listener routes on: every map file except the preview ones (and the spares' list)."""
        maps = sorted((self.settings.current / "maps").glob("*.map"))
        return "".join(p.read_text() for p in maps if not p.name.startswith("preview_") and p.name != "slots.map")

    def running_backend(self, name: str) -> str:
        """The backend HAProxy serves `name` from: its own, or the spare holding it since the last reload."""
        from flowproxy.haproxy.spares import slots

        held = slots((self.settings.current / "maps" / "slots.map").read_bytes())
        return next((spare for spare, backend in held.items() if backend == name), name)

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 20) -> None:
        try:
            wait_for(check, timeout, what)
        except FlowproxyError as exc:
            raise AssertionError(f"{exc}\n{self.diagnosis()}") from None

    def diagnosis(self) -> str:
        """What a timed-out wait needs to be understood: the apply log's tail and HAProxy's servers."""
        log = self.settings.data_dir / "handler.log"
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else ["(no handler.log)"]
        try:
            servers = HAProxySocket(self.settings.stats_socket).command("show servers state")
        except FlowproxyError as exc:
            servers = str(exc)
        return "handler.log:\n  " + "\n  ".join(tail) + "\nshow servers state:\n" + servers

    def wait_reply(self, path: str, status: int, host: str | None = None, timeout: float = 20) -> Reply:
        seen: list[Reply] = []

        def ok() -> bool:
            try:
                seen[:] = [self.get(path, host)]
            except OSError:
                return False  # not listening (yet): a restart in progress
            return seen[0].status == status

        try:
            wait_for(ok, timeout, f"{path} to answer {status}")
        except Exception:
            raise AssertionError(f"{path} (Host {host}) never answered {status}; last: {seen}") from None
        return seen[0]

    def stop(self) -> None:
        self.ticking.set()
        self.node.stop()


def start_node(spec: NodeSpec) -> ProxyNode:
    need("consul")
    if spec.proxy:
        need("haproxy")
    node = Node(spec)
    try:
        node.start()
        node.arm_watches()
    except BaseException:
        node.stop()
        raise
    return ProxyNode(node)


def serve_bundle(data_dir: Path, bundle: Bundle, preview: str | None = None) -> tuple[Node, str]:
    """HAProxy alone, serving a rendered bundle; returns the node (for stop()) and the proxy URL."""
    need("haproxy")
    settings = Settings(node="solo", data_dir=data_dir, http_bind=f"127.0.0.1:{free_port()}",
                        preview_bind=preview).checked()
    release.activate(settings.current, release.stage(settings.haproxy_dir, bundle))
    node = Node(NodeSpec(settings=settings))
    node.settings.data_dir.joinpath("logs").mkdir(parents=True, exist_ok=True)
    node.start_haproxy()
    return node, f"http://{settings.http_bind}"


def status_of(proxy: ProxyNode) -> dict[str, Any]:
    """The node's status document; {} while there is none or its agent is down (waits poll this)."""
    import json

    from flowproxy.errors import ConsulUnavailable

    try:
        entry = proxy.store().get(proxy.settings.status_key)
    except ConsulUnavailable:
        return {}
    return json.loads(entry.value) if entry else {}


def wait_applied(proxy: ProxyNode, timeout: float = 20) -> dict[str, Any]:
    """Wait until the node's status reports a KV index at least as new as every write made so far."""
    index, _ = proxy.store().read_prefix(proxy.settings.prefix + "routes/")
    seen: list[dict[str, Any]] = []

    def applied() -> bool:
        seen[:] = [status_of(proxy)]
        return int(str(seen[0].get("kv_index", 0))) >= index

    wait_for(applied, timeout, f"{proxy.settings.node} to apply KV index {index}")
    return seen[0]


def reset(proxy: ProxyNode, service_ids: list[str]) -> None:
    """Remove what a test wrote: its routes, templates and service registrations."""
    store = proxy.store()
    for folder in ("routes/", "templates/", "certs/", "acme/"):
        store.delete(proxy.settings.prefix + folder, recurse=True)
    for service_id in service_ids:
        store.client.agent.service.deregister(service_id)
