"""The deploy stage: make a fresh render what HAProxy runs, through the Runtime API when it can (maps,
servers, certificates, new backends in spares), else by `haproxy -c`, an atomic switch of the release
and a reload, saying why; a refused reload rolls the files back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flowproxy import telemetry
from flowproxy.core.delta import Model, Step
from flowproxy.core.render import Bundle
from flowproxy.errors import ApplyIOError, CandidateRefused, HAProxyError
from flowproxy.haproxy import release, runtime, spares
from flowproxy.haproxy.master import HAProxySocket, check_config, drain, recent_alerts
from flowproxy.haproxy.patch import Fresh, Running, patched
from flowproxy.settings import Settings

log = logging.getLogger(__name__)


def checked_release(settings: Settings, bundle: Bundle) -> Path:
    """`bundle` staged as a release folder and passed by `haproxy -c` (HAProxyError when refused). It is
    not made `current` here; unused folders are pruned like the rest."""
    folder = release.stage(settings.haproxy_dir, bundle)
    check_config(settings.haproxy_bin, folder / "haproxy.cfg", settings.haproxy_env())
    return folder


def candidate_passes(settings: Settings, bundle: Bundle) -> bool:
    try:
        checked_release(settings, bundle)
    except HAProxyError:
        return False
    return True


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
    try:
        folder = checked_release(settings, bundle)
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


def deploy_step(settings: Settings, running: Running, model: Model, step: Step) -> Running | None:
    """One incremental step made through the runtime API from what it changed, then written as a release;
    None when it takes a reload or HAProxy refused a command (the caller then runs the full apply, which
    reloads from files: that undoes whatever did run)."""
    fresh = Fresh(before={name: model.pieces.fragments[name] for name in step.before},
                  after={name: step.model.pieces.fragments[name] for name in step.after},
                  rows_before=model.pieces.rows, rows_after=step.model.pieces.rows, keys=step.keys,
                  bundle=step.model.bundle)
    patch = patched(running, fresh)
    if isinstance(patch, runtime.Reload):
        log.info("this change takes the full apply: %s", patch.why)
        return None
    after, commands = patch
    if not commands and dict(after.bundle.files) == dict(running.bundle.files):
        return running
    if not settings.master_socket.exists():
        return None
    return after if live_update(settings, running.bundle, after.bundle, commands) is None else None


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

    @property
    def path(self) -> str:
        """How the apply reached HAProxy: reload, runtime (API commands), or unchanged."""
        return "reload" if self.reload is not None else "runtime" if self.changed else "unchanged"


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
        telemetry.reloaded(why)
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
