"""What the optional intent fields add to the config: backend lines, user lists, redirect and SNI maps. Pure.

Per-route behaviour lives in the route's own backend section (auth, rewrites, timeouts, checks), which
HAProxy evaluates only for requests routed there, or in map files looked up once per request (HTTPS-only,
redirects, SNI): the per-request cost stays flat in the number of routes, as with routing itself.
"""

from __future__ import annotations

import re

from flowproxy.core.naming import weight
from flowproxy.core.plan import Backend, Claim, Plan, Server

OPTION_MAPS = ("https_only", "redirect_from", "sni")
REGEX_SPECIAL = re.compile(r"([.^$*+?()\[\]{}|\\])")


def userlist_name(backend: str) -> str:
    return f"fp_users_{backend}"


def backend_lines(backend: Backend) -> list[str]:
    """Lines flowproxy puts right after `backend <name>`, whatever template renders the rest.

    They come from the intent, not the template, so a custom template cannot drop a route's auth.
    """
    i = backend.intent
    lines = ["mode tcp"] if i.mode != "http" else []
    lines += [f"timeout server {i.timeout_server}"] if i.timeout_server else []
    lines += [f"timeout tunnel {i.timeout_tunnel}"] if i.timeout_tunnel else []
    if i.health_path:
        lines += ["option httpchk", f"http-check send meth GET uri {i.health_path}"]
    if i.auth is not None:
        lines.append(f'http-request auth realm "{i.auth.realm}" unless {{ http_auth({userlist_name(backend.name)}) }}')
    if i.strip_prefix:
        prefix = REGEX_SPECIAL.sub(r"\\\1", i.strip_prefix.rstrip("/"))
        lines += [f"http-request replace-path '^{prefix}/?$' '/'", f"http-request replace-path '^{prefix}(/.*)$' '\\1'"]
    if i.rewrite is not None:
        lines.append(f"http-request replace-path '{i.rewrite[0]}' '{i.rewrite[1]}'")
    return lines


def server_options(backend: Backend, server: Server) -> str:
    """The words after `server <name> <endpoint>`, spelled out in full (see backend.cfg.j2)."""
    share = weight(server)
    words = [f"weight {share}"] if share is not None else []
    if backend.intent.check:
        words.append(f"check inter {backend.intent.health_interval or '2s'} fall 2 rise 1")
    return " ".join(words)


def with_backend_lines(text: str, lines: list[str]) -> str:
    if not lines:
        return text
    head, _, rest = text.partition("\n")
    return head + "\n" + "".join(f"    {line}\n" for line in lines) + rest


def userlists(plan: Plan) -> list[tuple[str, list[tuple[str, str]]]]:
    return [(userlist_name(b.name), list(b.intent.auth.users)) for b in plan.backends if b.intent.auth is not None]


def tcp_frontends(claims: tuple[Claim, ...]) -> list[tuple[int, str]]:
    return sorted((c.port, c.backend) for c in claims if c.path_type == "tcp")
