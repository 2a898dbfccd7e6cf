"""One apply: Consul state -> plan -> render -> compare -> haproxy -c -> atomic switch -> reload -> status.

Only this module strings the pure stages and the edges together; each stage is a plain function.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowproxy.consul import watches
from flowproxy.consul.store import ConsulStore
from flowproxy.core.kv import desired_from_kv
from flowproxy.core.model import Desired, Instance, KVEntry, Snapshot
from flowproxy.core.plan import Plan, make_plan
from flowproxy.core.render import Bundle, Templates, custom_fragments, drop_backends, regexes, render
from flowproxy.core.status import applied_doc, failed_doc
from flowproxy.errors import ApplyIOError, CandidateRefused, EmptyRefused, FlowproxyError, HAProxyError
from flowproxy.haproxy import fragments, ports, release, runtime, spares
from flowproxy.haproxy import regexes as regex_vet
from flowproxy.haproxy.certs import vet_certs
from flowproxy.haproxy.isolate import find_culprits
from flowproxy.haproxy.master import HAProxySocket, check_config, drain, recent_alerts
from flowproxy.node import runstate
from flowproxy.sandbox import runner as template_sandbox
from flowproxy.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    kv_index: int
    bundle: Bundle
    plan: Plan
    reloaded: bool


def store_for(settings: Settings) -> ConsulStore:
    return ConsulStore(settings.consul_addr, settings.consul_token, tls=settings.consul_tls)


def read_config_kv(store: ConsulStore, prefix: str) -> tuple[int, list[KVEntry]]:
    """The keys a config depends on, and their index: the same on every node that reads the same state.

    Consul indexes a subtree by its newest entry or tombstone, so status writes (elsewhere under the
    prefix) do not move it; an empty subtree without tombstones answers with the whole table's index,
    hence an empty templates/ is left out. Keys outside the contract come as names only, to be reported.
    """
    routes_index, routes = store.read_prefix(prefix + "routes/")
    optional = [store.read_prefix(prefix + folder) for folder in ("templates/", "certs/")]
    known = tuple(prefix + folder for folder in ("routes/", "templates/", "certs/"))
    others = [KVEntry(key, b"?") for key in store.keys(prefix)
              if not key.startswith(known) and key != prefix and not runstate.is_status_key(prefix, key)]
    index = max([routes_index] + [i for i, entries in optional if entries])
    return index, routes + [e for _, entries in optional for e in entries] + others


def from_payload(store: ConsulStore, prefix: str, snapshot: Snapshot) -> tuple[int, list[KVEntry]] | None:
    """The watch's own payload when it is still Consul's latest state: one call instead of four reads.

    Measured at 50 routes: the four reads took 8 ms of a 16 ms converge. A payload that is not the latest
    (a newer write, or a handler that outlived an agent reload) is not used: the reads follow instead.
    The index recorded is the config subtrees' (`config_index`), the number every node reports alike.
    """
    if not any(e.key.startswith(prefix + "routes/") and e.value for e in snapshot.entries):
        # No routes: the empty-table guard needs the config's own index, and the prefix's index counts
        # status writes, which would make a restored empty table look newer than the routes it replaces.
        return None
    index, _ = store.keys_with_index(prefix)
    if index != snapshot.index:
        return None
    used = tuple(prefix + folder for folder in ("routes/", "templates/", "certs/"))
    entries = [e if e.key.startswith(used) else KVEntry(e.key, b"?") for e in snapshot.entries
               if e.key != prefix and not runstate.is_status_key(prefix, e.key)]
    return config_index(store, prefix, entries), entries


def config_index(store: ConsulStore, prefix: str, entries: list[KVEntry]) -> int:
    """The index of the newest write (or delete) that shaped the config, as `read_config_kv` computes it:
    the same on every node that applied the same state, whatever status writes happened meanwhile (the
    prefix's own index counts them, and differed from node to node)."""
    folders = ["routes/"] + [f for f in ("templates/", "certs/") if any(e.key.startswith(prefix + f) for e in entries)]
    return max(store.keys_with_index(prefix + folder)[0] for folder in folders)


def gather(settings: Settings, store: ConsulStore,
           snapshot: Snapshot | None = None) -> tuple[Desired, dict[str, list[Instance]], str]:
    """Read everything the render depends on from Consul. Any failed read raises: never render on less."""
    fresh = from_payload(store, settings.prefix, snapshot) if snapshot is not None else None
    index, entries = fresh or read_config_kv(store, settings.prefix)
    desired = desired_from_kv(settings.prefix, entries, index)
    health = {service: store.healthy(service) for service in desired.services()}
    fingerprint = runstate.kv_fingerprint(settings.prefix, [(e.key, e.value) for e in entries])
    return desired, health, fingerprint


def build(settings: Settings, desired: Desired, health: dict[str, list[Instance]],
          refuse: Mapping[str, str] | None = None) -> tuple[Bundle, Plan]:
    """plan -> render -> vet -> (drop what was refused, render once more) for this node.

    Custom templates render once, in the sandbox. Vetting judges what HAProxy would refuse, each thing
    alone with its reason: certificates, custom-template fragments, regexes (by PCRE2 as HAProxy uses
    it), and TCP ports another program holds. The rest renders again without it.
    """
    certs, refused = vet_certs(desired.prefix, desired.certs)
    plan = make_plan(dataclasses.replace(desired, stray=desired.stray + tuple(refused)), health)
    templates = Templates(settings.templates, desired.templates)
    custom = template_sandbox.render_plan(plan, templates, settings.run_dir)
    bundle, plan = render(plan, templates, certs, custom)
    refusals = vet(settings, plan, custom)
    reasons = refusals.reasons | dict(refuse or {})
    if not reasons:
        return bundle, plan
    bundle, plan = render(drop_backends(plan, reasons), templates, certs, custom)
    return bundle, dataclasses.replace(plan, waiting=refusals.waiting)


@dataclass(frozen=True)
class Refusals:
    """What vetting refused: backend name -> reason (its key first), and TCP ports waiting to be free."""

    reasons: dict[str, str]
    waiting: tuple[int, ...] = ()


def vet(settings: Settings, plan: Plan, custom: dict[str, dict[str, str]]) -> Refusals:
    """Everything HAProxy would refuse in this plan, each backend alone."""
    keys = {b.name: b.key for b in plan.backends}
    reasons = {name: f"{keys[name]}: template: {why}"
               for name, why in fragments.refused(settings, custom_fragments(plan, custom)).items()}
    by_backend = regexes(plan)
    bad = regex_vet.refused(settings, {p for patterns in by_backend.values() for p in patterns})
    for name, patterns in sorted(by_backend.items()):
        found = sorted(p for p in patterns if p in bad)
        if found:
            reasons.setdefault(name, f"{keys.get(name, name)}: regex {found[0]!r} is refused by HAProxy's "
                                     f"PCRE2: {bad[found[0]]}")
    held = ports.refused(plan, settings.tcp_host, settings.current / "haproxy.cfg")
    waiting = tuple(sorted(int(c.path) for c in plan.claims if c.path_type == "tcp" and c.backend in held))
    return Refusals(reasons | held, waiting)


def isolate_refused(settings: Settings, desired: Desired, health: dict[str, list[Instance]],
                    candidate: tuple[Bundle, Plan], refused: CandidateRefused) -> tuple[Bundle, Plan]:
    """The candidate without the backends that make `haproxy -c` refuse it, each rejected with HAProxy's
    words; raises `refused` when no backend is to blame (the node then keeps its config and retries).

    Backends that differ from the running config are suspected first: the running config passed.
    """
    bundle, plan = candidate
    current = release.read_bundle(settings.current)
    new = runtime.backend_bodies(bundle.config.decode())
    old = runtime.backend_bodies(current.config.decode()) if current is not None else {}
    everyone = sorted(new)
    changed = [name for name in everyone if old.get(name) != new[name]]

    def passes(removed: frozenset[str]) -> bool:
        candidate, _ = build(settings, desired, health, dict.fromkeys(removed, "suspect"))
        return candidate_passes(settings, candidate)

    found = find_culprits(changed, passes) if changed else None
    if found is None and changed != everyone:
        found = find_culprits(everyone, passes)
    if not found:
        raise refused
    keys = {b.name: b.key for b in plan.backends}
    words = str(refused).split(": ", 1)[-1]
    reasons = {name: f"{keys.get(name, name)}: HAProxy refuses the config with this backend: {words}"
               for name in sorted(found)}
    log.warning("haproxy -c refused the candidate; left out %s", ", ".join(sorted(found)))
    return build(settings, desired, health, reasons)


def candidate_passes(settings: Settings, bundle: Bundle) -> bool:
    """`haproxy -c` on a candidate, staged like any release (never made `current`; pruned like the rest)."""
    folder = release.stage(settings.haproxy_dir, bundle)
    try:
        check_config(settings.haproxy_bin, folder / "haproxy.cfg", settings.haproxy_env())
    except HAProxyError:
        return False
    return True


def guard_empty(settings: Settings, store: ConsulStore, desired: Desired, accept_empty: bool) -> None:
    """Refuse an empty route table unless the routes were really deleted, or an operator accepts it.

    A real delete leaves tombstones newer than what runs. A snapshot restore or an election's empty answer
    leaves none, and its refusal holds whatever happens to indexes afterwards (status writes move the
    index Consul gives an empty prefix), until `flowproxy handle --accept-empty` on the node, or the KV
    marker `<prefix>accept-empty` for the whole fleet. Peers lost whole sites to such answers.
    """
    last = runstate.load(settings.run_dir, runstate.LAST_APPLY)
    if desired.routes or accept_empty or desired.accept_empty or not last.get("routes"):
        return
    applied = int(last.get("kv_index", 0))
    deleted = store.deleted_since(settings.prefix + "routes/", applied)
    if deleted is None and _may_touch(settings, applied):  # maybe a delete that is the newest write of all:
        _touch_status(settings, store)                # move the table's index, look again
        deleted = store.deleted_since(settings.prefix + "routes/", applied)
    if deleted:
        return
    # No moving index in the words: the refusal is published as status, and a status that changed with
    # every retry would be a write, firing every node's watch, each refusing again.
    raise EmptyRefused(
        f"Consul answered no routes where {last.get('routes')} routes were applied at index "
        f"{last.get('kv_index')}, and no delete of them is recorded after that: a snapshot restore or an "
        "empty answer, not a delete. Keeping the running config. If the empty table is meant, run "
        f"`flowproxy handle --accept-empty` on this node, or write the key {settings.prefix}accept-empty for "
        "every node (delete it afterwards).")


def deploy(settings: Settings, bundle: Bundle) -> Deployed:
    """Make `bundle` (a fresh render) what runs: through the runtime API when it can (maps, servers, new
    backends in spares), else by a reload of `bundle` itself, saying why.
    """
    current = release.read_bundle(settings.current)
    change = live_change(current, bundle)
    if isinstance(change, runtime.Reload) or current is None:
        why = change.why if isinstance(change, runtime.Reload) else "first config"
    elif not change[1] and dict(current.files) == dict(change[0].files):
        return Deployed(changed=False)
    elif not settings.master_socket.exists():
        why = "HAProxy was not running"
    else:
        refused = live_update(settings, current, *change)
        if refused is None:
            return Deployed(changed=True)
        why = refused  # some commands may have run: only a reload from files is sure to undo them
    folder = release.stage(settings.haproxy_dir, bundle)
    try:
        check_config(settings.haproxy_bin, folder / "haproxy.cfg", settings.haproxy_env())
    except HAProxyError as exc:
        if not isinstance(change, runtime.Reload) and settings.master_socket.exists():
            reload_or_roll_back(settings, None, why)  # `current` still holds the last good files
        raise CandidateRefused(str(exc)) from exc
    previous = release.activate(settings.current, folder)
    if not settings.master_socket.exists():
        raise HAProxyError(f"HAProxy is not running ({settings.master_socket} is missing); the new config is "
                           "in place and loads when HAProxy starts (`flowproxy node up`)")
    reload_or_roll_back(settings, previous, why)
    release.prune(settings.haproxy_dir)
    return Deployed(changed=True, reload=why)


def live_change(current: Bundle | None, fresh: Bundle) -> tuple[Bundle, list[str]] | runtime.Reload:
    """What the runtime API would run to take HAProxy from `current` to `fresh` (new backends in spares),
    with the files that then describe it; or why only a reload will do. Pure."""
    if current is None:
        return runtime.Reload("first config")
    if dict(current.files) == dict(fresh.files):
        return fresh, []
    target = spares.place(fresh, current)
    if isinstance(target, runtime.Reload):
        return target
    commands = runtime.plan_change(current, target)
    return commands if isinstance(commands, runtime.Reload) else (target, commands)


@dataclass(frozen=True)
class Deployed:
    changed: bool
    reload: str | None = None  # why HAProxy reloaded; None when nothing changed or the runtime API did it


def live_update(settings: Settings, current: Bundle, bundle: Bundle, commands: list[str]) -> str | None:
    """Runtime API first, then the files; HAProxy's refusal when it refused a command (the caller reloads).

    Commands first because writing and fsyncing a release takes ~10 ms on this disk, a third of a flip.
    If the files then cannot be written, the inverse commands put HAProxy back on the files it loaded.
    """
    stats = HAProxySocket(settings.stats_socket)
    try:
        runtime.send(stats, commands)
    except HAProxyError as exc:
        log.warning("%s; reloading instead", exc)
        return str(exc)
    try:
        release.activate(settings.current, release.stage(settings.haproxy_dir, bundle))
    except ApplyIOError:
        runtime.send(stats, runtime.runtime_commands(bundle, current) or [])
        raise
    log.info("applied %d change(s) through the runtime API, no reload", len(commands))
    release.prune(settings.haproxy_dir)
    return None


def reload_or_roll_back(settings: Settings, previous: Path | None, why: str) -> None:
    log.info("reloading HAProxy: %s", why)
    log_file = settings.data_dir / "logs" / "haproxy.log"
    logged = log_file.stat().st_size if log_file.exists() else 0
    master = HAProxySocket(settings.master_socket)
    try:
        retired = master.reload()
        # Applied means no process of this node answers with the old config any more: the old workers
        # finish their keep-alive requests first (long-lived connections: at most drain_wait seconds).
        left = drain(master, retired, settings.drain_wait)
        if left:
            log.info("old worker(s) %s still hold long-lived connections after %.0f s; reporting the new "
                     "config as applied", ", ".join(map(str, left)), settings.drain_wait)
    except HAProxyError as exc:
        if previous is not None:
            release.activate(settings.current, previous)  # the files on disk must match what runs
        alerts = "; ".join(recent_alerts(log_file, since=logged)) or "nothing in its log"
        raise HAProxyError(f"{exc}. HAProxy said: {alerts} (see {log_file}, or the HAProxy unit's journal "
                           "under systemd); the node retries every few seconds until it loads") from exc


def converge(settings: Settings, generation: int = 0, accept_empty: bool = False,
             shared: ConsulStore | None = None, snapshot: Snapshot | None = None) -> Outcome:
    """Apply Consul's current state to this node's HAProxy and publish the node's status.

    `shared` is a long-lived client (the warm applier's); without one, a client lives for this call only.
    `snapshot` is the keyprefix watch's payload, used when it is still the latest state.
    """
    store = shared or store_for(settings)
    try:
        desired, health, fingerprint = gather(settings, store, snapshot)
        guard_empty(settings, store, desired, accept_empty)
        bundle, plan = build(settings, desired, health)
        started = time.monotonic()
        try:
            deployed = deploy(settings, bundle)
        except CandidateRefused as exc:
            bundle, plan = isolate_refused(settings, desired, health, (bundle, plan), exc)
            deployed = deploy(settings, bundle)
        watches.sync(settings.watch_dir, store, desired.services())
    except FlowproxyError as exc:
        _publish_failure(settings, store, str(exc))
        if shared is None:
            store.close()
        raise
    for state in plan.states:
        for reason in state.reasons:
            log.warning("route %s rejected: %s", state.route, reason)
    for problem in plan.stray:
        log.warning("ignored: %s", problem)
    if deployed.changed:
        log.info("applied config %s (KV index %s) in %.0f ms", bundle.config_sha256[:12], desired.index,
                 (time.monotonic() - started) * 1000)
    doc = applied_doc(settings.node, desired.index, bundle.config_sha256, bundle.digest, plan)
    _publish(settings, store, doc | {"last_reload": last_reload(settings, desired.index, deployed)})
    runstate.save(settings.run_dir, runstate.LAST_APPLY, {"fingerprint": fingerprint, "kv_index": desired.index,
                                                          "generation": generation, "routes": len(desired.routes),
                                                          "ports_held": list(plan.waiting)})
    if shared is None:
        store.close()
    return Outcome(desired.index, bundle, plan, deployed.reload is not None)


def last_reload(settings: Settings, index: int, deployed: Deployed) -> dict[str, Any] | None:
    """This apply's reload (why, at which KV index, when), else the one before it, as the status shows it."""
    if deployed.reload is None:
        previous: dict[str, Any] | None = runstate.load(settings.run_dir, runstate.LAST_STATUS).get("last_reload")
        return previous
    return {"why": deployed.reload, "kv_index": index, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _publish(settings: Settings, store: ConsulStore, doc: dict[str, Any]) -> None:
    """Write the status key when its content changed; the timestamp alone never triggers a write."""
    last = runstate.load(settings.run_dir, runstate.LAST_STATUS)
    if {k: v for k, v in last.items() if k != "time"} == doc:
        return
    stamped = doc | {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.put(settings.status_key, json.dumps(stamped, sort_keys=True))
    runstate.save(settings.run_dir, runstate.LAST_STATUS, stamped)


def _may_touch(settings: Settings, applied: int) -> bool:
    """Once per applied state: a refused restore touches once, never a fleet of nodes touching in turn."""
    if runstate.load(settings.run_dir, "empty-probe.json").get("applied") == applied:
        return False
    runstate.save(settings.run_dir, "empty-probe.json", {"applied": applied})
    return True


def _touch_status(settings: Settings, store: ConsulStore) -> None:
    """Rewrite this node's status key with a fresh check time: the one write a node may always make, and
    it moves the KV table's index, which tells a newest-write delete (its tombstone stays behind) from an
    empty prefix without tombstones (its index follows the table)."""
    last = runstate.load(settings.run_dir, runstate.LAST_STATUS)
    store.put(settings.status_key, json.dumps(last | {"checked": time.time()}, sort_keys=True))


def _publish_failure(settings: Settings, store: ConsulStore, error: str) -> None:
    last = runstate.load(settings.run_dir, runstate.LAST_STATUS)
    good = {k: v for k, v in last.items() if k not in ("time", "ok", "last_error")}
    try:
        _publish(settings, store, failed_doc(good, settings.node, error))
    except FlowproxyError as exc:
        log.error("could not write %s either: %s", settings.status_key, exc)
