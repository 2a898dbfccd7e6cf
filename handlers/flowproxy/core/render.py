"""Render a Plan into a Bundle: haproxy.cfg plus the map files it routes with. Pure given the templates.

Routing lives in map files so the per-request cost stays flat in the number of routes (field notes:
one ACL per route fell to 483 req/s at 10k routes, map lookups held 60k req/s).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flowproxy import __version__
from flowproxy.core.faults import internal_error
from flowproxy.core.fragment_rules import fragment_errors
from flowproxy.core.memo import Memo, remembered
from flowproxy.core.naming import endpoint, server_name, weight
from flowproxy.core.option_fields import REDIRECT_CODES
from flowproxy.core.plan import Backend, Claim, Plan, RouteState
from flowproxy.core.render_options import (
    OPTION_MAPS,
    backend_lines,
    option_maps,
    server_options,
    tcp_frontends,
    userlists,
    with_backend_lines,
)

PUBLIC_MAPS = ("host_exact", "host_reg", "host_beg", "path_exact", "path_reg", "path_beg")
MAP_FILES = PUBLIC_MAPS + tuple(f"preview_{name}" for name in PUBLIC_MAPS) + OPTION_MAPS + ("slots",)
SLOTS_MAP = "maps/slots.map"
CRT_LIST = "certs.list"  # the certificates HAProxy serves, in order: the first is for clients without SNI
# Empty backends a route added between reloads is served from (see spares.py): 64 HTTP, 16 TCP. Measured
# with HAProxy 2.6: an empty backend costs a worker ~11 KiB, so these ~0.9 MiB; the 65th new HTTP route
# since the last reload is a reload, which frees them all.
SPARES: tuple[tuple[str, str], ...] = tuple((f"fp_spare_http_{n:02d}", "http") for n in range(64)) + tuple(
    (f"fp_spare_tcp_{n:02d}", "tcp") for n in range(16))


@dataclass(frozen=True)
class Bundle:
    """Every file HAProxy loads, by path relative to the config's folder."""

    files: Mapping[str, bytes]

    @property
    def config(self) -> bytes:
        return self.files["haproxy.cfg"]

    @property
    def config_sha256(self) -> str:
        return hashlib.sha256(self.config).hexdigest()

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        return h.hexdigest()


@dataclass(frozen=True)
class Templates:
    """Where templates come from: the node's folder and the KV prefix's templates/ keys."""

    folder: Path
    from_kv: Mapping[str, str] = dataclasses.field(default_factory=dict)


@functools.lru_cache(maxsize=8)
def environment(folder: Path) -> jinja2.Environment:
    # Sandboxed even for the node's own folder: templates from KV share the data, so they share the rules.
    # Cached: compiling haproxy.cfg.j2 took half of a warm applier's 30 ms converge; the loader still
    # notices edited files (auto_reload compares mtimes).
    return ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader(str(folder)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(plan: Plan, templates: Templates, certs: Mapping[str, bytes] | None = None,
           custom: Mapping[str, Mapping[str, str]] | None = None,
           memo: BackendMemo | None = None) -> tuple[Bundle, Plan]:
    """Render the bundle; routes whose custom template failed are dropped and marked rejected.

    `certs` are PEM files by name (the vet stage refuses bad ones); with any, the HTTPS listener serves
    them by SNI. `custom` holds what the sandbox answered for each backend with a custom template
    (`sandbox.runner.render_plan`).
    """
    env = environment(templates.folder)
    fragments: list[str] = []
    failed: dict[str, str] = {}
    for backend in plan.backends:
        try:
            fragments.append(render_backend(env, backend, custom or {}, memo))
        except (jinja2.TemplateError, ValueError) as exc:
            failed[backend.name] = f"{backend.key}: template: {exc}"
        except Exception as exc:  # a bug met by one backend must not take the others down
            failed[backend.name] = internal_error(backend.key, "rendering", exc)
    if failed:
        plan = drop_backends(plan, failed)
    maps = render_maps(plan.claims) | render_maps(plan.preview, "preview_") | option_maps(plan)
    cfg = env.get_template("haproxy.cfg.j2").render(
        version=__version__, fragments=fragments, maps={name: f"maps/{name}.map" for name in MAP_FILES},
        tcp=tcp_frontends(plan.claims), userlists=userlists(plan), https=bool(certs), codes=REDIRECT_CODES,
        spares=SPARES, crt_list=CRT_LIST)
    files = {"haproxy.cfg": cfg.encode()} | {f"maps/{n}.map": body.encode() for n, body in maps.items()}
    files[SLOTS_MAP] = b""  # which spare holds which backend: none in a fresh render (see spares.py)
    # HAProxy reads a PEM whose last line lacks its newline, but not the next file appended to it.
    files |= {f"certs/{name}.pem": pem if pem.endswith(b"\n") else pem + b"\n"
              for name, pem in sorted((certs or {}).items())}
    if certs:
        files[CRT_LIST] = "".join(f"certs/{name}.pem\n" for name in sorted(certs)).encode()
    return Bundle(files), plan


def backend_data(backend: Backend) -> dict[str, Any]:
    """The data every backend template gets, default or custom."""
    intent = backend.intent
    return {
        "name": backend.name, "route": backend.route, "variant": backend.variant, "key": backend.key,
        "service": intent.service, "balance": intent.balance, "check": intent.check,
        "tags": list(intent.tags), "paths": list(intent.paths), "domains": list(intent.domains),
        "path_type": intent.path_type,
        "mode": intent.mode,
        "servers": [{"name": server_name(s), "address": s.address, "port": s.port, "endpoint": endpoint(s),
                     "weight": weight(s), "options": server_options(backend, s)} for s in backend.servers],
    }


BackendMemo = Memo[tuple[jinja2.Template, Backend], str]


def render_backend(env: jinja2.Environment, backend: Backend, custom: Mapping[str, Mapping[str, str]],
                   memo: BackendMemo | None = None) -> str:
    if backend.intent.template is not None:
        answer = custom.get(backend.name)
        if answer is None:
            raise ValueError(f"template {backend.intent.template!r} was not rendered")
        if "error" in answer:
            raise ValueError(answer["error"])
        return _finish(answer["text"], backend, untrusted=True)
    # Cached by template object and backend value (both immutable; an edited file loads as a new
    # template object): the default template rendered 1,000 backends in ~20 ms on every change.
    template = env.get_template("backend.cfg.j2")

    def fresh() -> str:
        return _finish(template.render(backend=backend_data(backend)), backend)

    return remembered(memo, (template, backend), fresh)


def _finish(text: str, backend: Backend, untrusted: bool = False) -> str:
    """The fragment with flowproxy's own backend lines. A custom template's output (KV: untrusted) must pass
    the fragment rules; the node's own backend.cfg.j2 only gets its header checked (tokenizing 10,000
    trusted backends cost a cold full apply a second)."""
    if untrusted:
        errors = fragment_errors(text, backend.name)
        if errors:
            raise ValueError("; ".join(errors[:5]))
    elif not text.startswith(f"backend {backend.name}\n"):
        raise ValueError(f"rendered text must start with 'backend {backend.name}'")
    return with_backend_lines(text if text.endswith("\n") else text + "\n", backend_lines(backend))


def custom_fragments(plan: Plan, custom: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """The finished text of every backend with a custom template that rendered and passed the rules
    (they need their own `haproxy -c`); the others were rejected by render()."""
    out = {}
    for backend in plan.backends:
        answer = custom.get(backend.name)
        if backend.intent.template is not None and answer is not None and "text" in answer:
            try:
                out[backend.name] = _finish(answer["text"], backend, untrusted=True)
            except ValueError:
                continue
    return out


def drop_backends(plan: Plan, failed: Mapping[str, str]) -> Plan:
    """Remove the failed backends; a route whose serving backend failed (a variant's or its canary's,
    whichever the public claims name) is rejected with that backend's reason."""
    serving = {c.backend for c in plan.claims}
    routes = {b.route: failed[b.name] for b in plan.backends if b.name in failed and b.name in serving}

    def state(s: RouteState) -> RouteState:
        if s.state == "serving" and s.route in routes:
            return RouteState(s.route, "rejected", s.variant, (routes[s.route],))
        return s

    return dataclasses.replace(
        plan,
        backends=tuple(b for b in plan.backends if b.name not in failed),
        claims=tuple(c for c in plan.claims if c.backend not in failed),
        preview=tuple(c for c in plan.preview if c.backend not in failed),
        states=tuple(state(s) for s in plan.states),
    )


def key_regex(literal_prefix: str, path_regex: str) -> str:
    """A regex over prefix+path: the literal prefix, then the path regex (a leading ^ anchors at the path)."""
    literal = "".join(f"[{ch}]" if ch in ".*~" else ch for ch in literal_prefix)
    if path_regex.startswith("^"):
        return f"^{literal}(?:{path_regex[1:]})"
    return f"^{literal}(?=/).*?(?:{path_regex})"


def map_key(c: Claim) -> str:
    """The claim's key in its map file: host+path, or a regex over them for regex paths."""
    literal = f"{c.variant}~{c.host}" if c.variant else c.host
    if c.path_type == "regex" and literal:
        return key_regex(literal, c.path)
    return literal + c.path


def regexes(plan: Plan) -> dict[str, set[str]]:
    """Every regex HAProxy will compile, by backend: regex map keys (public and preview) and rewrites."""
    out: dict[str, set[str]] = {}
    for c in plan.claims + plan.preview:
        if c.path_type == "regex":
            out.setdefault(c.backend, set()).add(map_key(c))
    for b in plan.backends:
        if b.intent.rewrite is not None:
            out.setdefault(b.name, set()).add(b.intent.rewrite[0])
    return out


def render_maps(claims: tuple[Claim, ...], prefix: str = "") -> dict[str, str]:
    """Map files keyed host+path (or path); preview keys start with `<variant>~` (no name holds a `~`)."""
    rows: dict[str, list[tuple[str, str]]] = {prefix + name: [] for name in PUBLIC_MAPS}
    for c in (c for c in claims if c.path_type in ("exact", "prefix", "regex")):
        scope = "host" if c.host else "path"
        kind = {"exact": "exact", "prefix": "beg", "regex": "reg"}[c.path_type]
        rows[f"{prefix}{scope}_{kind}"].append((map_key(c), c.backend))
    out = {}
    for name, entries in rows.items():
        # map_reg takes the first match in file order: longer (more specific) patterns first.
        order = sorted(entries, key=lambda e: (-len(e[0]), e[0])) if name.endswith("_reg") else sorted(entries)
        out[name] = "".join(f"{k} {v}\n" for k, v in order)
    return out


