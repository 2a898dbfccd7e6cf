"""File descriptors: what a render asks of HAProxy, against what HAProxy may open.

HAProxy 2.6 reserves a descriptor for each health-checked server and each listener when it starts, then
two per connection (its `maxconn`, computed from what is left), and it cannot go over its hard
`RLIMIT_NOFILE`. Measured under a hard limit of 20,000: 19,700 checked servers start with a `maxconn` of
135 (a proxy in name only); 19,800 do not start at all ("Cannot raise FD limit to 20029"), which fails
the whole reload and holds up every other change. So the vet stage keeps room for the node's
`min_connections`: when the checked servers would eat into it, the routes HAProxy runs already keep
their place and the others are refused by name, with the reason and what to change.

`fits` and `refused` are pure; `master_limit` asks HAProxy's master for its pid and reads its limit.
"""

from __future__ import annotations

import os
import re
import resource
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

from flowproxy.core.plan import Backend, Plan
from flowproxy.errors import HAProxyError
from flowproxy.haproxy.master import HAProxySocket

# Listeners and sockets of every config besides TCP routes' ports: HTTP, HTTPS and its handover, preview,
# SNI, metrics, the stats socket, the node-metrics server, and HAProxy's own (measured: ~30 besides the
# listeners at 2 threads), with room to spare.
FIXED_LISTENERS = 64
# Per thread HAProxy keeps an epoll descriptor and a wake-up pipe.
PER_THREAD = 3
HARD_LIMIT = re.compile(r"^Max open files\s+\S+\s+(\S+)", re.M)
CHECKED_SERVER = re.compile(r"^\s*server\s.*\scheck(?:\s|$)", re.M)


def checked(backend: Backend) -> int:
    """The descriptors a backend's health checks reserve: one per checked server."""
    return len(backend.servers) if backend.intent.check else 0


def checks_in(fragments: Mapping[str, str], names: Iterable[str]) -> int:
    """Checked servers in these backends' rendered sections: what an incremental step adds or removes,
    counted on the few backends it touches rather than on the whole plan (~4 ms at 10,000 routes)."""
    return sum(len(CHECKED_SERVER.findall(fragments[name])) for name in names if name in fragments)


def need(plan: Plan) -> int:
    return sum(checked(b) for b in plan.backends)


def budget(plan: Plan, limit: int, min_connections: int, threads: int) -> int:
    """Descriptors left for health checks once listeners, threads and `min_connections` have theirs."""
    listeners = FIXED_LISTENERS + len({c.port for c in plan.claims if c.path_type == "tcp"})
    return limit - listeners - PER_THREAD * threads - 2 * min_connections


def fits(plan: Plan, limit: int, min_connections: int, threads: int) -> bool:
    return need(plan) <= budget(plan, limit, min_connections, threads)


def refused(plan: Plan, limit: int, min_connections: int, threads: int,
            running: Collection[str]) -> dict[str, str]:
    """Backends left out so that the rest fits: those HAProxy runs keep their place, in plan order, then
    the others in plan order; each one left out with its key and the reason."""
    room = budget(plan, limit, min_connections, threads)
    total = need(plan)
    if total <= room:
        return {}
    order = sorted(plan.backends, key=lambda b: b.name not in running)
    out: dict[str, str] = {}
    for backend in order:
        cost = checked(backend)
        if cost > room:
            out[backend.name] = (
                f"{backend.key}: node capacity: {total} health-checked servers would leave HAProxy fewer than "
                f"{min_connections} connections under its limit of {limit} open files; raise LimitNOFILE "
                "for HAProxy, lower FLOWPROXY_MIN_CONNECTIONS, or set \"check\": false on routes whose "
                "instances Consul already checks")
        else:
            room -= cost
    return out


def threads() -> int:
    """HAProxy's default thread count: the CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def master_limit(master_socket: Path) -> int:
    """The open files HAProxy's master may give its workers (see `hard_limit`)."""
    if not master_socket.exists():
        return hard_limit(None)
    try:
        return hard_limit(HAProxySocket(master_socket, timeout=2.0).show_proc().master_pid)
    except (HAProxyError, ValueError):
        return hard_limit(None)


def hard_limit(master_pid: int | None) -> int:
    """The hard open-file limit of HAProxy's master (what its workers may raise to); this process's own
    when the master is not known (the first start inherits it under `node up`)."""
    if master_pid is not None:
        try:
            found = HARD_LIMIT.search(Path(f"/proc/{master_pid}/limits").read_text())
        except OSError:
            found = None
        if found is not None and found.group(1).isdigit():
            return int(found.group(1))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return hard if hard != resource.RLIM_INFINITY else 1 << 20
