"""HAProxy's spelling of the plan's values: server names, endpoints and weights. The plan speaks in
routes and instances; only the renderer (and its helpers) turns them into HAProxy's words."""

from __future__ import annotations

import re

from flowproxy.core.plan import Server

SERVER_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")
WEIGHT_SCALE = 256  # HAProxy's server weights run 0-256


def server_name(server: Server) -> str:
    """`address:port` with anything HAProxy would not take in a name replaced; a canary's servers carry
    their variant first, so blue's and green's instance on one address stay two servers."""
    name = SERVER_NAME_UNSAFE.sub("_", f"{server.address}:{server.port}")
    return f"{server.variant}_{name}" if server.variant else name


def endpoint(server: Server) -> str:
    return f"[{server.address}]:{server.port}" if ":" in server.address else f"{server.address}:{server.port}"


def weight(server: Server) -> int | None:
    """A canary server's share of its route's traffic on HAProxy's scale: 0 only for a weight of 0, else
    at least 1 (a variant at 1 of 1000 must still get some requests)."""
    if server.share is None:
        return None
    return 0 if server.share == 0 else max(1, round(WEIGHT_SCALE * server.share))
