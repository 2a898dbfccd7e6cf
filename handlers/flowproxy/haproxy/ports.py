"""Vet the ports TCP routes ask for before HAProxy has to bind them. An edge: it binds sockets.

`haproxy -c` never binds, so a port another program holds passes the check and then fails the reload,
and that failed reload would keep every other change on the node from landing. Such a route is refused
alone instead, and the node tries again as soon as the port is free (see `supervisor.apply_due`).

Only ports the running config does not listen on yet are tried: HAProxy's own listeners would look taken
(and may belong to another user). The probe binds as HAProxy does (SO_REUSEADDR), so it fails exactly
when HAProxy's bind would: a listener, or a connection using that local port, of another program.
"""

from __future__ import annotations

import errno
import re
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flowproxy.core.plan import Plan

# the listener name in templates/haproxy.cfg.j2: one `frontend fp_tcp_<port>` per TCP route
LISTENING = re.compile(r"^frontend fp_tcp_(\d+)$", re.MULTILINE)


def listening(cfg: Path) -> set[int]:
    """The TCP route ports of the config HAProxy runs (none when there is no config yet)."""
    try:
        return {int(port) for port in LISTENING.findall(cfg.read_text())}
    except OSError:
        return set()


def held_elsewhere(host: str, port: int) -> bool:
    """True when binding host:port fails because something holds it; other bind errors are HAProxy's to
    report (a port below 1024 may be open to HAProxy's master but not to this process)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def refused(plan: Plan, host: str, running_cfg: Path) -> dict[str, str]:
    """backend name -> reason, for each TCP route whose new port another program holds."""
    wanted = [(c.port, c.backend) for c in plan.claims if c.path_type == "tcp"]
    if not wanted:
        return {}  # the common case: no need to read a config of megabytes at 10k routes
    running = listening(running_cfg)
    keys = {b.name: b.key for b in plan.backends}
    out = {}
    for port, backend in wanted:
        if port not in running and held_elsewhere(host, port):
            out[backend] = (f"{keys[backend]}: port {port} on {host} is held by another program; "
                            "the route is served once the port is free")
    return out


def freed(host: str, ports: Iterable[int]) -> list[int]:
    """The ports, among those a route waits for, that are free now."""
    return [port for port in ports if not held_elsewhere(host, port)]


def wildcard(host: str) -> bool:
    """Whether a listen address's host means every address (``, `*`, `0.0.0.0`, `[::]`)."""
    return host.strip("[]") in ("", "*", "0.0.0.0", "::")


def bind_error(bind: str) -> str:
    """Why a listener address (`host:port`, `[v6]:port`, `:port`) cannot be bound now, or ""."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if host == "*":
        host = "0.0.0.0"
    if not (port.isascii() and port.isdigit()):
        return ""  # not a TCP address: HAProxy judges it
    return "the address is already in use" if held_elsewhere(host, int(port)) else ""
