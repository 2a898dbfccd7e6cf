"""The runtime commands and running files of one incremental step, made from what changed. Pure.

`deploy.live_change` compares whole files (at 10,000 routes: ~20 ms for a map, ~230 ms when a backend
comes); an incremental step (`core/delta.py`) already knows which backends and map keys changed, so the
commands here are made from those alone, against the running config kept in memory as sections (one
parse per full apply). The rules are `runtime.py`'s and `spares.py`'s: server lines of a running backend
(or of the spare that holds it) come and go with `add server`/`del server`, a new backend that fits a
free spare goes there, map rows are `add`/`set`/`del map`; anything else is a `Reload`, and the caller
runs the full apply instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flowproxy.core.render import SLOTS_MAP, SPARES, Bundle, splice_rows
from flowproxy.haproxy import spares
from flowproxy.haproxy.runtime import Reload, backend_change, finish, map_commands, sections


@dataclass(frozen=True)
class Running:
    """What HAProxy runs: the current release's files, its config as section texts in order, and which
    backends sit in spares."""

    bundle: Bundle
    texts: Mapping[str, str]  # section head line -> the section's text, head included
    order: tuple[str, ...]
    held: Mapping[str, str]  # spare -> the backend it holds (maps/slots.map)


def running_of(bundle: Bundle) -> Running | None:
    """The running bundle cut into sections; None when the cut would not give its config back exactly."""
    config = bundle.config.decode()
    texts: dict[str, str] = {}
    order = []
    for head, body in sections(config):
        text = "".join(line + "\n" for line in ([head] if head else []) + body)
        if head in texts:
            return None
        texts[head] = text
        order.append(head)
    if "".join(texts[h] for h in order) != config:
        return None
    return Running(bundle, texts, tuple(order), spares.slots(bundle.files.get(SLOTS_MAP, b"")))


@dataclass(frozen=True)
class Fresh:
    """One step of fresh renders: the backends and map rows before and after, the maps that changed."""

    before: Mapping[str, str]  # backend -> fragment, for the backends of the routes involved
    after: Mapping[str, str]
    rows_before: Mapping[str, Mapping[str, str]]  # map file -> key -> value (the whole files)
    rows_after: Mapping[str, Mapping[str, str]]
    keys: Mapping[str, frozenset[str]]  # map file -> the keys whose rows changed
    bundle: Bundle  # the fresh render after the step


def patched(running: Running, fresh: Fresh) -> tuple[Running, list[str]] | Reload:
    """The running state after the step and the commands that take HAProxy there, or why a reload."""
    gone = sorted(set(fresh.before) - set(fresh.after))
    if gone:
        return Reload(f"backend {gone[0]} goes")
    texts = dict(running.texts)
    held = dict(running.held)
    servers: list[str] = []
    config = False
    for name in sorted(fresh.after):
        if fresh.before.get(name) == fresh.after[name]:
            continue
        change = _backend(texts, held, name, fresh.before.get(name), fresh.after[name])
        if isinstance(change, Reload):
            return change
        servers += change
        config = True
    assigned = {backend: spare for spare, backend in held.items()}
    maps: list[str] = []
    files = dict(running.bundle.files)
    for name, keys in sorted(fresh.keys.items()):
        if name.endswith("_reg.map"):
            return Reload(f"{name} changed (a regex map is matched in file order)")
        before = _renamed(fresh.rows_before[name], keys, {b: s for s, b in running.held.items()})
        after = _renamed(fresh.rows_after[name], keys, assigned)
        maps += map_commands(name, before, after)
        # The running file already names spares; its changed rows alone are set (a backend's spare is kept
        # from its placement to the next full apply, so no other row's name moves).
        changes: dict[str, str | None] = {k: None for k in before}
        changes.update(after)
        spliced = splice_rows(files[name], changes) if name in files else None
        files[name] = spares.rename(fresh.bundle.files[name], assigned) if spliced is None else spliced
    if held != running.held:
        maps += map_commands(SLOTS_MAP, dict(running.held), held)
        files[SLOTS_MAP] = "".join(f"{spare} {backend}\n" for spare, backend in sorted(held.items())).encode()
    if config:
        files["haproxy.cfg"] = "".join(texts[h] for h in running.order).encode()
    commands = finish(servers, maps)
    if isinstance(commands, Reload):
        return commands
    return Running(Bundle(files), texts, running.order, held), commands


def _backend(texts: dict[str, str], held: dict[str, str], name: str, before: str | None,
             after: str) -> list[str] | Reload:
    """Commands for one backend's new fragment, in its own section or in the spare that holds (or takes) it;
    `texts` and `held` are updated."""
    head = f"backend {name}"
    if head in texts:
        if before is None or not texts[head].startswith(before):
            return Reload(f"backend {name}: the running section is not the last render's")
        text, target = after + texts[head][len(before):], name  # the fragment, then the blank line after it
    else:
        spare = next((s for s, b in held.items() if b == name), None)
        if spare is None:
            if before is not None:
                return Reload(f"backend {name} is neither in the running config nor in a spare")
            spare = _free_spare(texts, held, after)
            if spare is None:
                return Reload(f"new backend {name} (no spare backend fits it)")
            held[spare] = name
        head = f"backend {spare}"
        text, target = spares.keep(head, _body(texts[head]), _body(after)), spare
    change = backend_change(target, _body(texts[head]), _body(text))
    texts[head] = text
    return change


def _free_spare(texts: Mapping[str, str], held: Mapping[str, str], fragment: str) -> str | None:
    mode = spares.fit(_body(fragment))
    return next((s for s, m in SPARES if m == mode and s not in held and f"backend {s}" in texts), None)


def _body(text: str) -> list[str]:
    return text.splitlines()[1:]


def _renamed(rows: Mapping[str, str], keys: frozenset[str], assigned: Mapping[str, str]) -> dict[str, str]:
    """The rows of `keys` as HAProxy holds them: a backend in a spare is named by its spare."""
    return {assigned.get(k, k): assigned.get(rows[k], rows[k]) for k in keys if k in rows}
