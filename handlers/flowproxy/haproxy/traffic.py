"""Per-route request and error counts from HAProxy's `show stat`. Parsing is pure; asking is an edge.

Counts are this node's, since its worker started (a reload starts them again), and live only in HAProxy:
nothing is written to Consul, where they would change on every request.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping
from pathlib import Path

from flowproxy.errors import HAProxyError
from flowproxy.haproxy.master import HAProxySocket

COUNTS = {"requests": "stot", "4xx": "hrsp_4xx", "5xx": "hrsp_5xx", "conn_errors": "econ", "resp_errors": "eresp"}


def route_counts(show_stat: str, slots: Mapping[str, str] | None = None) -> dict[str, dict[str, int | str]]:
    """route -> {variant, requests, 4xx, 5xx, conn_errors, resp_errors}, from the BACKEND rows.

    A route's warm variants are added up; `variant` names the one that took the most requests. `slots`
    names the backend each spare holds (a route added since the last reload is served from a spare).
    """
    totals: dict[str, dict[str, int]] = {}
    busiest: dict[str, tuple[int, str]] = {}
    for backend, row in route_rows(show_stat, slots):
        if row.get("svname") != "BACKEND":
            continue
        route, _, variant = backend.partition(":")
        counts = {name: int(row.get(column) or 0) for name, column in COUNTS.items()}
        into = totals.setdefault(route, dict.fromkeys(COUNTS, 0))
        for name, value in counts.items():
            into[name] += value
        busiest[route] = max(busiest.get(route, (-1, "")), (counts["requests"], variant.lstrip(":")))
    return {route: {"variant": busiest[route][1], **totals[route]} for route in sorted(totals)}


def server_states(show_stat: str, slots: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """route backend -> {server address:port -> HAProxy's state of it: UP, DOWN, MAINT, no check, ...}."""
    out: dict[str, dict[str, str]] = {}
    for backend, row in route_rows(show_stat, slots):
        if row.get("svname") not in ("BACKEND", "FRONTEND") and row.get("addr"):
            out.setdefault(backend, {})[row["addr"]] = row.get("status", "")
    return out


def route_rows(show_stat: str, slots: Mapping[str, str] | None) -> Iterator[tuple[str, dict[str, str]]]:
    """`show stat` rows of route backends, each with its backend's name (a spare's is the one it holds)."""
    for row in csv.DictReader(io.StringIO(show_stat.lstrip("# "))):
        backend = row.get("pxname", "")
        backend = (slots or {}).get(backend, backend)
        if ":" in backend:  # flowproxy's own backends (fp_no_route...) have no colon
            yield backend, row


def local_stat(stats_socket: Path, servers: bool = False) -> str | None:
    """`show stat` of this node's HAProxy (backend rows, and with `servers` their servers' too: ~10x the
    text on a large table), or None when it is not reachable from here."""
    if not stats_socket.exists():
        return None
    try:
        return HAProxySocket(stats_socket).command(f"show stat -1 {6 if servers else 2} -1")
    except HAProxyError:
        return None


def local_counts(stats_socket: Path, slots: Mapping[str, str]) -> dict[str, dict[str, int | str]] | None:
    """This node's counts, or None when its HAProxy is not reachable from here."""
    stat = local_stat(stats_socket)
    return None if stat is None else route_counts(stat, slots)


def counts_report(counts: dict[str, dict[str, int | str]]) -> str:
    head = f"{'route':<24} {'variant':<12} {'requests':>9} {'4xx':>6} {'5xx':>6} {'conn err':>9} {'resp err':>9}\n"
    rows = [f"{route:<24} {c['variant']!s:<12} {c['requests']:>9} {c['4xx']:>6} {c['5xx']:>6} "
            f"{c['conn_errors']:>9} {c['resp_errors']:>9}\n" for route, c in counts.items()]
    return "traffic on this node (HAProxy runtime API, since the last reload):\n" + head + "".join(rows)
