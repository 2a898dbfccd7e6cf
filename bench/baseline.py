"""The classic consul-template-style pipeline, for side-by-side figures only (never shipped).

One ACL line per route evaluated in order (`use_backend X if { path_beg /r }`), a full reload on every
change, and no `option idle-close-on-response`.
"""

from __future__ import annotations

from collections.abc import Sequence

HEAD = """global
    stats socket "${FP_STATS_SOCKET}" mode 600 level admin
    hard-stop-after 30s

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 10s

frontend fp_http
    bind "${FP_HTTP_BIND}"
"""


def render(routes: Sequence[tuple[str, str, Sequence[tuple[str, int]]]], check: bool = True,
           unchecked: frozenset[str] = frozenset()) -> bytes:
    """routes: (name, path prefix, [(address, port)]) -> haproxy.cfg, the way a hand-written template does it;
    servers are health-checked if `check`, except in the routes named in `unchecked`."""
    lines = [HEAD]
    lines += [f"    use_backend be_{name} if {{ path_beg {path} }}\n" for name, path, _ in routes]
    lines.append("    default_backend be_none\n\nbackend be_none\n    http-request return status 404\n")
    for name, _, servers in routes:
        lines.append(f"\nbackend be_{name}\n    balance roundrobin\n")
        option = " check" if check and name not in unchecked else ""
        lines += [f"    server s{i} {addr}:{port}{option}\n" for i, (addr, port) in enumerate(servers)]
    return "".join(lines).encode()


def minimal(address: str, port: int) -> bytes:
    """The least a hand-written HAProxy config routes with: one frontend, one backend, one server."""
    return (HEAD + f"    default_backend be_app\n\nbackend be_app\n    server s0 {address}:{port}\n").encode()
