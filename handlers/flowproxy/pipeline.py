"""One apply, its stages in the order data flows, each once:

    gather -> plan -> render -> vet -> (drop what was refused, render once more) -> deploy -> publish

gather reads Consul (the Consul wing), plan and render are pure (the core), vet asks OpenSSL, PCRE2,
`haproxy -c` and the ports (the HAProxy wing), deploy goes through the Runtime API or a reload, publish
writes this node's status key. Only this module strings the stages together; each is a plain function.

The warm applier also takes one event at a time incrementally (`apply_change`): the change is planned and
rendered for the routes it touches (`core/delta.py`) and deployed by commands made from what changed
(`haproxy/patch.py`), then published. The full converge stays the proof: it runs when a change is not
local, and periodically, and then compares its bytes with the model's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flowproxy import runstate, telemetry
from flowproxy.consul import reads, watches
from flowproxy.consul.store import ConsulStore, store_for
from flowproxy.core import contract
from flowproxy.core.delta import Change, Model, advance, model_of, named_services
from flowproxy.core.kv import RouteMemo, ShapeMemo, desired_from_kv
from flowproxy.core.memo import Memo
from flowproxy.core.model import Desired, Instance, KVEntry, Snapshot
from flowproxy.core.plan import Plan, make_plan
from flowproxy.core.render import BackendMemo, Bundle, Pieces, Templates, assemble, render_pieces
from flowproxy.core.status import applied_doc, failed_doc
from flowproxy.errors import CandidateRefused, EmptyRefused, FlowproxyError
from flowproxy.haproxy import capacity, release, runtime
from flowproxy.haproxy.deploy import Deployed, candidate_passes, deploy, deploy_step
from flowproxy.haproxy.isolate import find_culprits
from flowproxy.haproxy.patch import Running, running_of
from flowproxy.haproxy.vet import Refusals, vet
from flowproxy.sandbox import runner as sandbox
from flowproxy.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Warm:
    """What an applier keeps from one apply to the next: its memos of pure renders (backend fragments of
    the node's own template, the sandbox's answers for custom ones). Its owner sets its lifetime: the warm
    applier keeps one for as long as the node process runs; a handler run or a `render` makes its own."""

    backends: BackendMemo = field(default_factory=lambda: Memo(50_000))
    templates: sandbox.Answers = field(default_factory=lambda: Memo(20_000))
    shapes: ShapeMemo = field(default_factory=lambda: Memo(100_000))
    routes: RouteMemo = field(default_factory=lambda: Memo(50_000))
    # The incremental path's state (the warm applier's only): the model of the last apply, what HAProxy
    # runs, the config keys and health indexes that apply read. None until a full converge made them.
    incremental: bool = False
    model: Model | None = None
    running: Running | None = None
    running_at: str = ""  # the release `current` named when `running` was read or written
    seen: Gathered | None = None
    health_index: dict[str, int] = field(default_factory=dict)  # a service payload older than it is stale
    read_at: float = 0.0  # when the last full converge began to read Consul (monotonic)
    proved: int = 0  # full converges that found the model's render equal to theirs, of the same state
    diverged: int = 0  # and that found it differing
    checks: int = 0  # health-checked servers in the model
    check_room: int = 0  # how many HAProxy's open files leave room for (haproxy/capacity.py)


@dataclass(frozen=True)
class Built:
    """A render for this node: the files, the plan as rendered, what vetting refused in it, and the pieces
    and certificates the files were assembled from."""

    bundle: Bundle
    plan: Plan
    refusals: Refusals
    pieces: Pieces
    certs: dict[str, bytes]


@dataclass(frozen=True)
class Gathered:
    """Consul's state as one apply read it: the parsed prefix, the passing instances of every service a
    route names, the config keys' fingerprint, and the keys and health indexes an incremental event is
    compared with."""

    desired: Desired
    health: dict[str, list[Instance]]
    fingerprint: str
    entries: dict[str, KVEntry]
    health_index: dict[str, int]


def gather(settings: Settings, store: ConsulStore, snapshot: Snapshot | None = None,
           warm: Warm | None = None) -> Gathered:
    """Read everything the render depends on from Consul. Any failed read raises: never render on less."""
    index, entries = reads.read(store, settings.prefix, snapshot)
    desired = desired_from_kv(settings.prefix, entries, index, shapes=warm.shapes if warm else None,
                              routes_memo=warm.routes if warm else None)
    answers = {service: store.healthy_at(service) for service in desired.services()}
    fingerprint = contract.kv_fingerprint(settings.prefix, [(e.key, e.value) for e in entries])
    return Gathered(desired, {s: a[1] for s, a in answers.items()}, fingerprint, {e.key: e for e in entries},
                    {s: a[0] for s, a in answers.items()})


def build(settings: Settings, desired: Desired, health: Mapping[str, list[Instance]],
          refuse: Mapping[str, str] | None = None, warm: Warm | None = None) -> Built:
    """plan -> render -> vet -> (drop what was refused, render once more) for this node.

    Custom templates render once, in the sandbox; their answers serve both renders. `refuse` names
    backends to leave out besides what vetting refuses (the suspects `isolate_refused` tries).
    """
    warm = warm or Warm()
    plan = make_plan(desired, health)
    templates = Templates(settings.templates, desired.templates)
    custom = sandbox.render_plan(plan, templates, settings.cache_dir, warm.templates)
    pieces = render_pieces(plan, templates, custom, warm.backends)
    refusals = vet(settings, pieces.plan, desired.certs, custom).adding(refuse or {})
    if refusals:
        pieces = render_pieces(refusals.applied_to(pieces.plan), templates, custom, warm.backends)
    certs = refusals.certs_kept(desired.certs)
    return Built(assemble(pieces, templates, certs), pieces.plan, refusals, pieces, certs)


def isolate_refused(settings: Settings, desired: Desired, health: dict[str, list[Instance]],
                    candidate: Built, refused: CandidateRefused, *, warm: Warm | None = None) -> Built:
    """The candidate without the backends that make `haproxy -c` refuse it, each rejected with HAProxy's
    words; raises `refused` when no backend is to blame (the node then keeps its config and retries).

    Backends that differ from the running config are suspected first: the running config passed.
    """
    current = release.read_bundle(settings.current)
    new = runtime.backend_bodies(candidate.bundle.config.decode())
    old = runtime.backend_bodies(current.config.decode()) if current is not None else {}
    everyone = sorted(new)
    changed = [name for name in everyone if old.get(name) != new[name]]

    def passes(removed: frozenset[str]) -> bool:
        suspects = dict.fromkeys(removed, "suspect")
        return candidate_passes(settings, build(settings, desired, health, suspects, warm).bundle)

    found = find_culprits(changed, passes) if changed else None
    if found is None and changed != everyone:
        found = find_culprits(everyone, passes)
    if not found:
        raise refused
    keys = {b.name: b.key for b in candidate.plan.backends}
    words = str(refused).split(": ", 1)[-1]
    reasons = {name: f"{keys.get(name, name)}: HAProxy refuses the config with this backend: {words}"
               for name in sorted(found)}
    log.warning("haproxy -c refused the candidate; left out %s", ", ".join(sorted(found)))
    return build(settings, desired, health, reasons, warm)


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
    deleted = reads.routes_deleted_since(store, settings.prefix, applied)
    if deleted is None and _may_touch(settings, applied):  # maybe a delete that is the newest write of all:
        _touch_status(settings, store)                # move the table's index, look again
        deleted = reads.routes_deleted_since(store, settings.prefix, applied)
    if deleted:
        return
    # No moving index in the words: the refusal is published as status, and a status that changed with
    # every retry would be a write, firing every node's watch, each refusing again.
    marker = contract.accept_empty_key(settings.prefix)
    raise EmptyRefused(
        f"Consul answered no routes where {last.get('routes')} routes were applied at index "
        f"{last.get('kv_index')}, and no delete of them is recorded after that: a snapshot restore or an "
        "empty answer, not a delete. Keeping the running config. If the empty table is meant, run "
        f"`flowproxy handle --accept-empty` on this node, or write the key {marker} for "
        "every node (delete it afterwards).")


def converge(settings: Settings, generation: int = 0, accept_empty: bool = False,
             shared: ConsulStore | None = None, snapshot: Snapshot | None = None, *,
             warm: Warm | None = None) -> None:
    """Apply Consul's current state to this node's HAProxy and publish the node's status.

    `shared` is a long-lived client and `warm` the memos (the warm applier's); without them, both live for
    this call only.
    `snapshot` is the keyprefix watch's payload, used when it is still the latest state.
    """
    store = shared or store_for(settings)
    begun = time.monotonic()
    try:
        warm = warm or Warm()
        warm.read_at = begun
        seen = gather(settings, store, snapshot, warm)
        desired, health = seen.desired, seen.health
        guard_empty(settings, store, desired, accept_empty)
        built = build(settings, desired, health, warm=warm)
        started = time.monotonic()
        try:
            deployed = deploy(settings, built.bundle)
        except CandidateRefused as exc:
            built = isolate_refused(settings, desired, health, built, exc, warm=warm)
            deployed = deploy(settings, built.bundle)
        sync_watches(settings, store, seen)
        publish(settings, store, desired, built, deployed, started=started)
        what = f"full apply, reload: {deployed.reload}" if deployed.reload else "full apply"
        telemetry.applied(deployed.path, True, time.monotonic() - begun, what=what, kv_index=desired.index,
                          config=built.bundle.config_sha256)
    except FlowproxyError as exc:
        telemetry.applied("full", False, time.monotonic() - begun, what=str(exc))
        warm = warm or Warm()
        warm.model = warm.running = warm.seen = None  # the next event goes the full way
        _publish_failure(settings, store, str(exc))
        raise
    finally:
        if shared is None:
            store.close()
    if warm.incremental:
        keep_model(settings, warm, seen, built)
    _save_applied(settings, seen.fingerprint, desired, generation, built.refusals.waiting)


def keep_model(settings: Settings, warm: Warm, seen: Gathered, built: Built) -> None:
    """Make this full apply the warm applier's model, after comparing it with the model it replaces."""
    old = warm.model
    desired, health = seen.desired, seen.health
    if old is not None:
        compare(warm, old, seen, built)
    warm.model = model_of(desired, health, built.pieces, built.bundle,
                          templates=Templates(settings.templates, desired.templates), certs=built.certs)
    warm.seen, warm.running, warm.health_index = seen, None, dict(seen.health_index)
    # The limit vetting read for this very build (a build without vetting, none: asked now).
    limit = built.refusals.fd_limit or capacity.master_limit(settings.master_socket)
    warm.checks = capacity.need(built.plan)
    warm.check_room = capacity.budget(built.plan, limit, settings.min_connections, capacity.threads())


def compare(warm: Warm, model: Model, seen: Gathered, built: Built) -> bool | None:
    """Whether the model's render equals a full build of the same state, byte for byte (counted in `warm`,
    a difference logged as an error); None when they are not of the same state."""
    if model.desired != seen.desired or {s: model.health.get(s) for s in seen.health} != seen.health:
        return None
    if dict(model.bundle.files) == dict(built.bundle.files):
        warm.proved += 1
        return True
    warm.diverged += 1
    differ = sorted(n for n in built.bundle.files if model.bundle.files.get(n) != built.bundle.files[n])
    log.error("the incremental model differed from a full render of the same state (%s); the full render "
              "is applied. Please report this.", ", ".join(differ[:5]))
    return False


def sync_watches(settings: Settings, store: ConsulStore, seen: Gathered) -> None:
    """The agent's watches for what a full read found: every service routes name, and the routes in shards."""
    names = contract.route_names(settings.prefix, seen.entries)
    watches.sync(settings.watch_dir, store, seen.desired.services(),
                 watches.RouteShards(settings.prefix, names, settings.watch_shard_size))


def prove(settings: Settings, warm: Warm, model: Model) -> bool | None:
    """The periodic proof: read Consul and build in full, without applying (events go on meanwhile), and
    compare with `model`. True when the model is a full render of Consul's state now, False when it is
    of that state but renders other bytes, None when it is not of that state (the state moved, or a
    watch missed an event). Unless True, the caller runs the full converge."""
    store = store_for(settings)
    try:
        seen = gather(settings, store, None, warm)
        sync_watches(settings, store, seen)  # a table grown by incremental applies is split here
        if not seen.desired.routes:
            return None  # the empty-table guard is the full converge's to judge
        return compare(warm, model, seen, build(settings, seen.desired, seen.health, warm=warm))
    finally:
        store.close()


def apply_change(settings: Settings, store: ConsulStore, warm: Warm, change: Change, *, generation: int,
                 fingerprint: str) -> bool:
    """One event's change, planned, rendered and deployed for what it touches alone, then published with
    `fingerprint` (the config keys' after the change). False when it cannot be (not local, or not something
    the runtime API can make): the caller converges."""
    started = time.monotonic()
    model = warm.model
    if model is None:
        return False
    # The changed routes' services are read now, as the full apply reads them: their watch may lag. Only
    # instances that differ from the model's join the change (which then re-plans every route naming them).
    answers = {service: store.healthy_at(service) for service in sorted(named_services(change))}
    warm.health_index |= {s: max(a[0], warm.health_index.get(s, 0)) for s, a in answers.items()}
    moved = {s: a[1] for s, a in answers.items() if model.health.get(s) != a[1]}
    if moved:
        change = dataclasses.replace(change, health=dict(change.health) | moved)
    templates = Templates(settings.templates, model.desired.templates)
    step = advance(model, change, templates, warm.backends)
    if step is None:
        return False
    added = (capacity.checks_in(step.model.pieces.fragments, step.after)
             - capacity.checks_in(model.pieces.fragments, step.before))
    if added > 0 and warm.checks + added > warm.check_room:
        return False  # the full build's vet stage judges which routes fit
    running = warm.running if warm.running is not None and warm.running_at == _current(settings) else None
    running = running or deploy_running(settings)
    if running is None:
        return False
    try:
        after = deploy_step(settings, running, model, step)
    except FlowproxyError:
        warm.model = warm.running = None
        raise
    if after is None:
        return False
    warm.model, warm.running, warm.running_at = step.model, after, _current(settings)
    warm.checks += added
    desired = step.model.desired
    if set(step.model.users) - set(model.users):
        watches.sync(settings.watch_dir, store, step.model.users)
    what = [f"route {name}" for name in sorted(change.routes)] + [f"service {s}" for s in sorted(change.health)]
    log.info("applied %s incrementally: config %s (KV index %s) in %.0f ms", ", ".join(what),
             step.model.bundle.config_sha256[:12], desired.index, (time.monotonic() - started) * 1000)
    telemetry.applied("incremental", True, time.monotonic() - started, what=", ".join(what), kv_index=desired.index,
                      config=step.model.bundle.config_sha256)
    built = Built(step.model.bundle, step.model.pieces.plan, Refusals(), step.model.pieces, {})
    publish(settings, store, desired, built, Deployed(changed=False), started=started)
    waiting = runstate.load(settings.run_dir, runstate.LAST_APPLY).get("ports_waiting", [])
    _save_applied(settings, fingerprint, desired, generation, tuple(waiting))
    return True


def deploy_running(settings: Settings) -> Running | None:
    """What HAProxy runs, read from the current release (once per full apply: ~40 ms at 10,000 routes)."""
    current = release.read_bundle(settings.current)
    return running_of(current) if current is not None else None


def _current(settings: Settings) -> str:
    """The release `current` names: another process's apply (`flowproxy handle`) moves it."""
    try:
        return os.readlink(settings.current)
    except OSError:
        return ""


def _save_applied(settings: Settings, fingerprint: str, desired: Desired, generation: int,
                  waiting: tuple[int, ...]) -> None:
    runstate.save(settings.run_dir, runstate.LAST_APPLY, {"fingerprint": fingerprint, "kv_index": desired.index,
                                                          "generation": generation, "routes": len(desired.routes),
                                                          "ports_waiting": list(waiting)})


def publish(settings: Settings, store: ConsulStore, desired: Desired, built: Built, deployed: Deployed, *,
            started: float) -> None:
    """The log lines of this apply, and this node's status key (written only when its content changed)."""
    bundle, plan = built.bundle, built.plan
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


def last_reload(settings: Settings, index: int, deployed: Deployed) -> dict[str, Any] | None:
    """This apply's reload (why, at which KV index, when), else the one before it, as the status shows it."""
    if deployed.reload is None:
        previous: dict[str, Any] | None = runstate.load(settings.run_dir, runstate.LAST_STATUS).get("last_reload")
        return previous
    return {"why": deployed.reload, "kv_index": index, "time": _now()}


def _publish(settings: Settings, store: ConsulStore, doc: dict[str, Any]) -> None:
    """Write the status key when its content changed; the timestamp alone never triggers a write."""
    last = runstate.load(settings.run_dir, runstate.LAST_STATUS)
    if {k: v for k, v in last.items() if k != "time"} == doc:
        return
    stamped = doc | {"time": _now()}
    store.put(settings.status_key, json.dumps(stamped, sort_keys=True))
    runstate.save(settings.run_dir, runstate.LAST_STATUS, stamped)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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
