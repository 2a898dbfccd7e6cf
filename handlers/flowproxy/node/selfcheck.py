"""A proxy node in the catalog: service `flowproxy` with a TTL check its supervisor keeps fresh.

The check passes only while HAProxy answers on the master socket and the last apply succeeded; if the
supervisor itself dies, the TTL runs out and the node turns critical on its own.
"""

from __future__ import annotations

from flowproxy import __version__, runstate
from flowproxy.consul.registrations import Check, Registration
from flowproxy.consul.store import ConsulStore
from flowproxy.errors import HAProxyError
from flowproxy.haproxy import ports
from flowproxy.haproxy.master import HAProxySocket, old_workers
from flowproxy.settings import Settings

SERVICE = "flowproxy"
TTL = "30s"  # the supervisor beats every 2 s; a loaded machine can stall it for a few


def service_id(settings: Settings) -> str:
    return f"flowproxy-{settings.node}"


def check_id(settings: Settings) -> str:
    return f"flowproxy-{settings.node}-health"


def register(store: ConsulStore, settings: Settings) -> None:
    host, _, port = settings.http_bind.rpartition(":")
    store.register_service(Registration(
        SERVICE, service_id(settings), "" if ports.wildcard(host) else host,
        int(port) if port.isascii() and port.isdigit() else 0, meta={"node": settings.node, "version": __version__},
        check=Check(ttl=TTL, status="critical", check_id=check_id(settings), name="HAProxy up and last apply ok")))


def health(settings: Settings) -> tuple[str, str]:
    """(status, output) for the node's check, from HAProxy itself and the last apply's record."""
    try:
        # Settled: the master socket blinks while the master re-executes for a reload, and a node must
        # not turn critical (and drop out of `--wait`) for that.
        info = HAProxySocket(settings.master_socket, timeout=2).show_proc_settled(timeout=5)
    except HAProxyError as exc:
        return "critical", f"HAProxy is down: {exc}"
    # No `if not info.workers` here: during a reload `show proc` can list no current worker for a moment
    # while the old one still serves, and a one-second critical made `--wait` skip a healthy node.
    last = runstate.load(settings.run_dir, runstate.LAST_STATUS)
    if last and not last.get("ok", False):
        return "critical", f"last apply failed: {last.get('last_error')}"
    workers = ", ".join(str(pid) for pid in info.workers) or "reloading"
    config = str(last.get("config_sha256"))[:12]
    return "passing", (f"HAProxy master {info.master_pid} (workers: {workers}), config {config}; "
                       f"{old_workers(info).summary()}")


def beat(store: ConsulStore, settings: Settings) -> str:
    status, output = health(settings)
    store.update_check(check_id(settings), status, output)
    return status
