"""Render a Plan into a Bundle: haproxy.cfg plus the map files it routes with. Pure given the templates.

Routing lives in map files so the per-request cost stays flat in the number of routes (field notes:
one ACL per route fell to 483 req/s at 10k routes, map lookups held 60k req/s).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flowproxy import __version__
from flowproxy.core.acme import CHALLENGE_PATH
from flowproxy.core.faults import internal_error
from flowproxy.core.fragment_rules import fragment_errors
from flowproxy.core.memo import Memo, remembered
from flowproxy.core.naming import endpoint, server_name, weight
from flowproxy.core.option_fields import REDIRECT_CODES
from flowproxy.core.plan import Backend, Claim, Plan, RouteState
from flowproxy.core.render_options import (
    OPTION_MAPS,
    backend_lines,
    server_options,
    tcp_frontends,
    userlists,
    with_backend_lines,
)

PUBLIC_MAPS = ("host_exact", "host_reg", "host_beg", "path_exact", "path_reg", "path_beg")
MAP_FILES = PUBLIC_MAPS + tuple(f"preview_{name}" for name in PUBLIC_MAPS) + OPTION_MAPS + ("acme", "slots")
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

    # Cached: a 10,000-route config is ~1.6 MB, hashed by status, release and comparison alike. (A frozen
    # dataclass allows cached_property, which writes the instance's __dict__; equality is unchanged.)
    @functools.cached_property
    def config_sha256(self) -> str:
        return hashlib.sha256(self.config).hexdigest()

    @functools.cached_property
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
    pieces = render_pieces(plan, templates, custom, memo)
    return assemble(pieces, templates, certs), pieces.plan


Rows = Mapping[str, Mapping[str, str]]  # map file ("maps/x.map") -> key -> value


@dataclass(frozen=True)
class Pieces:
    """A render before assembly: the plan as rendered, each backend's finished text, each map file's rows.
    The incremental path (`core/delta.py`) changes pieces of one route and assembles again."""

    plan: Plan
    fragments: Mapping[str, str]
    rows: Rows


def render_pieces(plan: Plan, templates: Templates, custom: Mapping[str, Mapping[str, str]] | None = None,
                  memo: BackendMemo | None = None) -> Pieces:
    """Each backend's fragment and the map rows; a backend whose template fails is dropped, its route rejected."""
    env = environment(templates.folder)
    fragments: dict[str, str] = {}
    failed: dict[str, str] = {}
    for backend in plan.backends:
        try:
            fragments[backend.name] = render_backend(env, backend, custom or {}, memo)
        except (jinja2.TemplateError, ValueError) as exc:
            failed[backend.name] = f"{backend.key}: template: {exc}"
        except Exception as exc:  # a bug met by one backend must not take the others down
            failed[backend.name] = internal_error(backend.key, "rendering", exc)
    if failed:
        plan = drop_backends(plan, failed)
    rows = map_rows(plan.claims, plan.preview, plan.backends)
    rows[map_path("acme")] = {CHALLENGE_PATH + token: answer for token, answer in plan.challenges}
    return Pieces(plan, fragments, rows)


def assemble(pieces: Pieces, templates: Templates, certs: Mapping[str, bytes] | None = None) -> Bundle:
    """The files HAProxy loads, from the pieces: haproxy.cfg, the maps, the certificates and their list."""
    plan = pieces.plan
    cfg = config_text(environment(templates.folder), plan, certs, [pieces.fragments[b.name] for b in plan.backends],
                      frontend_maps(pieces.rows))
    files = {"haproxy.cfg": cfg.encode()} | {name: map_text(name, rows) for name, rows in pieces.rows.items()}
    files[SLOTS_MAP] = b""  # which spare holds which backend: none in a fresh render (see spares.py)
    # HAProxy reads a PEM whose last line lacks its newline, but not the next file appended to it.
    files |= {f"certs/{name}.pem": pem if pem.endswith(b"\n") else pem + b"\n"
              for name, pem in sorted((certs or {}).items())}
    if certs:
        files[CRT_LIST] = "".join(f"certs/{name}.pem\n" for name in sorted(certs)).encode()
    return Bundle(files)


def config_text(env: jinja2.Environment, plan: Plan, certs: Mapping[str, bytes] | None, fragments: list[str],
                uses: frozenset[str]) -> str:
    return env.get_template("haproxy.cfg.j2").render(
        version=__version__, fragments=fragments, maps={name: map_path(name) for name in MAP_FILES},
        tcp=tcp_frontends(plan.claims), userlists=userlists(plan), https=bool(certs), codes=REDIRECT_CODES,
        spares=SPARES, crt_list=CRT_LIST, uses=uses, hosts=any(name.startswith("host_") for name in uses),
        acme=plan.acme, challenge_path=CHALLENGE_PATH)


# The maps the public frontend looks up on every request: each has its step only while it holds rows,
# but for the prefix paths, the default kind, whose step stays so that a node's first route, or its last
# going, changes only map rows (no reload).
FRONTEND_MAPS = (*PUBLIC_MAPS, "https_only", "redirect_from")
ALWAYS_LOOKED_UP = frozenset({"path_beg"})


def frontend_maps(rows: Rows) -> frozenset[str]:
    """The public frontend's maps that it looks up: a step on an empty map would cost every request for
    nothing (~0.3-1 us each of HAProxy's ~20), so the template leaves it out, and the first row (or the
    last going) means a new config, a reload."""
    return ALWAYS_LOOKED_UP | frozenset(name for name in FRONTEND_MAPS if rows.get(map_path(name)))


@dataclass(frozen=True)
class Splice:
    """haproxy.cfg around its backend fragments: the text before, between two and after them. With it,
    a changed fragment costs a join of strings rather than a render of every backend by the template."""

    head: str
    between: str
    tail: str
    empty: str  # the text without any backend (the loop's own separators go too)

    def join(self, fragments: list[str]) -> str:
        return self.head + self.between.join(fragments) + self.tail if fragments else self.empty


def sources(templates: Templates) -> tuple[jinja2.Template, ...]:
    """The node's own templates as loaded now: a file edited on disk loads as a new object (the loader
    compares modification times), so a model rendered with other objects is stale."""
    env = environment(templates.folder)
    return env.get_template("haproxy.cfg.j2"), env.get_template("backend.cfg.j2")


def splice_of(templates: Templates, pieces: Pieces, certs: Mapping[str, bytes] | None) -> Splice | None:
    """The splice of haproxy.cfg.j2 for this plan's other sections, or None when the template does more with
    its fragments than write each one the same way (a node's own template may): seen from renders with
    sentinels, two and three of them."""
    env, plan, uses = environment(templates.folder), pieces.plan, frontend_maps(pieces.rows)
    marks = ["\0fp-splice-a\0", "\0fp-splice-b\0", "\0fp-splice-c\0"]
    two, three = config_text(env, plan, certs, marks[:2], uses), config_text(env, plan, certs, marks, uses)
    if two.count(marks[0]) != 1 or two.count(marks[1]) != 1:
        return None
    head, rest = two.split(marks[0])
    between, tail = rest.split(marks[1])
    found = Splice(head, between, tail, config_text(env, plan, certs, [], uses))
    return found if found.join(marks) == three and marks[0] not in head + between + tail else None


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


def map_path(name: str) -> str:
    return f"maps/{name}.map"


def map_rows(claims: Iterable[Claim], preview: Iterable[Claim],
             backends: Iterable[Backend]) -> dict[str, dict[str, str]]:
    """Every map file's rows for these claims and backends (the whole plan's, or one route's).

    Routing maps are keyed host+path (or path); preview keys start with `<variant>~` (no name holds a
    `~`). Option maps: https_only backend -> code, redirect_from domain -> code/target, sni name -> backend.
    A key taken stays with its first owner, as HAProxy's first match would.
    """
    rows: dict[str, dict[str, str]] = {map_path(name): {} for name in MAP_FILES if name != "slots"}
    kinds = {"exact": "exact", "prefix": "beg", "regex": "reg"}
    public = list(claims)
    for prefix, group in (("", public), ("preview_", preview)):
        for c in group:
            if c.path_type in kinds:
                scope = "host" if c.host else "path"
                rows[map_path(f"{prefix}{scope}_{kinds[c.path_type]}")].setdefault(map_key(c), c.backend)
            elif c.path_type == "sni" and not prefix:
                rows[map_path("sni")].setdefault(c.host, c.backend)
    serving = {c.backend for c in public}
    for b in (b for b in backends if b.name in serving):
        if b.intent.https_only:
            rows[map_path("https_only")][b.name] = str(b.intent.redirect_code)
        for domain in b.intent.redirect_from:
            rows[map_path("redirect_from")].setdefault(domain, f"{b.intent.redirect_code}/{b.intent.domains[0]}")
    return rows


def map_splice(name: str, text: bytes, rows: Mapping[str, str], changed: Iterable[str]) -> bytes:
    """`map_text(name, rows)`, made from `text` (the file of rows that differ only in the `changed` keys)."""
    spliced = None if name.endswith("_reg.map") else splice_rows(text, {k: rows.get(k) for k in changed})
    return map_text(name, rows) if spliced is None else spliced


def splice_rows(text: bytes, changes: Mapping[str, str | None]) -> bytes | None:
    """A map file in key order with the rows of `changes` set (None: removed), each found by bisection
    in the text: at 10,000 rows ~10 us a row, where sorting them all again takes ~5 ms. None when a key
    could not be a row (a space or newline in it)."""
    if any(" " in key or "\n" in key for key in changes):
        return None
    for key, value in sorted(changes.items()):
        start, end = _row_at(text, key.encode())
        row = b"" if value is None else f"{key} {value}\n".encode()
        text = text[:start] + row + text[end:]
    return text


def _row_at(text: bytes, key: bytes) -> tuple[int, int]:
    """Where the row of `key` is in a map file sorted by key (start, end), or where it would go (start,
    start). Bisection over byte offsets, each probe moved back to the start of its line."""
    lo, hi = 0, len(text)  # both at the start of a line; the row is at or after lo and before hi
    while lo < hi:
        mid = text.rfind(b"\n", lo, (lo + hi) // 2) + 1 or lo  # no newline in [lo, middle): lo's line
        end = text.find(b"\n", mid) + 1 or len(text)
        probe = text[mid:end].split(b" ", 1)[0]
        if probe == key:
            return mid, end
        if probe < key:
            lo = end
        else:
            hi = mid
    return lo, lo


def map_text(name: str, rows: Mapping[str, str]) -> bytes:
    """A map file: map_reg takes the first match in file order, so longer (more specific) patterns first;
    the others in key order."""
    regex = name.endswith("_reg.map")
    order = sorted(rows.items(), key=lambda e: (-len(e[0]), e[0])) if regex else sorted(rows.items())
    return "".join(f"{k} {v}\n" for k, v in order).encode()
