"""`flowproxy node up`: a complete proxy node (Consul agent + HAProxy master-worker) as child processes.

`--dev` runs the agent as a single bootstrapped server with a data folder rather than `consul -dev`:
field notes say -dev agents without a data_dir drop API-registered services on `consul reload`, and the
handler reloads the agent whenever the set of routed services changes.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from flowproxy import coalesce, ports, release, runstate, selfcheck
from flowproxy.agent import consul_argv, install_watches
from flowproxy.applier import Applier
from flowproxy.consul_io import ConsulStore
from flowproxy.errors import FlowproxyError, UsageError
from flowproxy.settings import Settings

log = logging.getLogger(__name__)
REPO_CONSUL_D = Path(__file__).resolve().parents[2] / "consul.d"
RETRY_EVERY = 5.0
RESYNC_EVERY = 10.0
# Full converge even when nothing looks changed: a `service` watch was seen (1 run in ~4 of the fleet test)
# not to fire for a deregistration on its own agent, leaving that node on a stale instance list. A no-op
# converge costs ~0.3 s of CPU, so every 20 s is ~1.5% of a core.
FULL_RESYNC_EVERY = 20.0


@dataclass(frozen=True)
class NodeSpec:
    settings: Settings
    bind: str = "127.0.0.1"
    http_port: int = 8500
    serf_port: int = 8301
    server_port: int = 8300
    join: tuple[str, ...] = ()
    dev: bool = False
    consul_bin: str = "consul"
    consul_d: Path = REPO_CONSUL_D
    proxy: bool = True  # False: a bare Consul agent (a cluster's server), no HAProxy, no watches
    acl: bool = False  # ACLs on, default deny; the node's token serves its watches and the agent itself
    acl_master: str | None = None  # a server's initial management token (bootstrap)


@dataclass
class Node:
    """The child processes of one proxy node; `stop()` ends everything `start()` began."""

    spec: NodeSpec
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, IO[bytes]] = field(default_factory=dict)
    retry: subprocess.Popen[bytes] | None = None
    last_retry: float = 0.0
    last_resync: float = 0.0
    last_full: float = field(default_factory=time.monotonic)
    applier: Applier | None = None
    _store: ConsulStore | None = None

    @property
    def settings(self) -> Settings:
        return self.spec.settings

    def env(self) -> dict[str, str]:
        # The agent passes its environment to watch handlers: put this interpreter's `flowproxy` on PATH.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return {**os.environ, **self.settings.env(), "PATH": path}

    def start(self) -> None:
        needed = (self.settings.haproxy_bin, self.spec.consul_bin) if self.spec.proxy else (self.spec.consul_bin,)
        for binary in needed:
            if shutil.which(binary) is None:
                raise UsageError(f"{binary} is not installed or not on PATH; run `bash .ci/install`")
        for folder in (self.settings.data_dir, self.settings.haproxy_dir):
            # Sockets (master, stats, the preview listener when off) live here: owner only.
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700)
        (self.settings.data_dir / "logs").mkdir(exist_ok=True)
        if self.spec.proxy:
            ensure_bootstrap_config(self.settings)
            self.start_haproxy()
        self.start_consul()

    def arm_watches(self, timeout: float = 30) -> None:
        """Install the watch config once the agent knows a leader, then reload it, and join the catalog.

        Field notes: watches that start before the agent has joined fail and back off 5 s x failures^2;
        installing them only after the join took a fresh node from ~30 s to ~0.4 s to serve.
        """
        self.wait_consul(timeout)
        if not self.spec.proxy:
            return
        if self.applier is None:
            self.applier = Applier(self.settings)
            self.applier.start()  # before the watches: their first events find it listening
        install_watches(self.spec)
        store = self.store()
        store.reload_agent()
        selfcheck.register(store, self.settings)
        self.tick()

    def store(self) -> ConsulStore:
        """One client for the node's lifetime: the supervisor calls Consul every tick."""
        if self._store is None:
            self._store = ConsulStore(self.http_addr(), self.settings.consul_token)
        return self._store

    def tick(self) -> None:
        """Periodic duty: report health (before any repair, so an outage shows), revive, retry."""
        self.beat()
        self.revive()
        self.retry_apply()

    def beat(self) -> None:
        if not self.spec.proxy:
            return
        try:
            selfcheck.beat(self.store(), self.settings)
        except FlowproxyError as exc:
            log.warning("could not update this node's health check: %s", exc)

    def revive(self) -> None:
        """Restart HAProxy (with the last good config) or the agent when either died."""
        for name, proc in list(self.procs.items()):
            if proc.poll() is not None:
                log.error("%s exited with %s; restarting it (see %s/logs/%s.log)", name, proc.returncode,
                          self.settings.data_dir, name)
                try:
                    self.restart(name)
                except FlowproxyError as exc:
                    log.error("restarting %s failed: %s; trying again on the next tick", name, exc)

    def retry_apply(self) -> None:
        """Run the handler when an apply is due that no watch event will bring (see `apply_due`)."""
        if not self.spec.proxy or (self.retry is not None and self.retry.poll() is None):
            return
        if time.monotonic() - self.last_retry < RETRY_EVERY:
            return
        why = apply_due(self.settings) or self.resync_due()
        if why:
            self.last_retry = time.monotonic()
            log.info("an apply is due (%s); running the handler", why)
            self.retry = subprocess.Popen([sys.executable, "-m", "flowproxy.handler"], env=self.env(),
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)

    def resync_due(self) -> str:
        """Anti-entropy: a full converge every FULL_RESYNC_EVERY seconds, and every RESYNC_EVERY seconds a
        check whether what Consul holds differs from what was applied (the fingerprint of the config keys).

        Watches can miss an event: a snapshot restore 0.3 s after a write left a node on the old routes
        with no watch firing. Any difference, forwards or backwards, means the node must apply again.
        Contents, not indexes: an apply from a watch payload records the whole prefix's index.
        """
        if time.monotonic() - self.last_full >= FULL_RESYNC_EVERY:
            self.last_full = time.monotonic()
            return "the periodic full resync"
        if time.monotonic() - self.last_resync < RESYNC_EVERY:
            return ""
        self.last_resync = time.monotonic()
        from flowproxy.apply import read_config_kv

        try:
            _, entries = read_config_kv(self.store(), self.settings.prefix)
        except FlowproxyError:
            return ""  # the agent is away; beat() has said so
        last = runstate.load(self.settings.run_dir, runstate.LAST_APPLY)
        held = runstate.kv_fingerprint(self.settings.prefix, [(e.key, e.value) for e in entries])
        return "Consul holds config keys other than those last applied" if last.get("fingerprint") != held else ""

    def _spawn(self, name: str, argv: list[str]) -> None:
        logfile = open(self.settings.data_dir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - lives with the child
        self.logs[name] = logfile
        # A session of its own: a terminal's Ctrl-C reaches only us, and we stop children in order.
        self.procs[name] = subprocess.Popen(argv, env=self.env(), stdout=logfile, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("started %s (pid %s): %s", name, self.procs[name].pid, " ".join(argv))

    def start_haproxy(self) -> None:
        s = self.settings
        s.master_socket.unlink(missing_ok=True)
        self._spawn("haproxy", [s.haproxy_bin, "-W", "-S", f"{s.master_socket},mode,600",
                                "-f", str(s.current / "haproxy.cfg")])
        wait_for(s.master_socket.exists, 10, "HAProxy master socket")

    def start_consul(self) -> None:
        self._spawn("consul", consul_argv(self.spec))

    def restart(self, name: str) -> None:
        """Start a dead child again: HAProxy with the last good config; the agent with its watches re-armed."""
        if name == "haproxy":
            self.start_haproxy()
        else:
            self.start_consul()
            self.arm_watches()

    def http_addr(self) -> str:
        return f"{self.spec.bind}:{self.spec.http_port}"

    def wait_consul(self, timeout: float = 30) -> None:
        url = f"http://{self.http_addr()}/v1/status/leader"
        wait_for(lambda: _http_ok(url, want_body=True), timeout, f"Consul agent at {self.http_addr()} with a leader")

    def supervise(self, poll: float = 2.0) -> None:
        """Tick until SIGINT or SIGTERM."""
        stop = {"now": False}

        def on_signal(_sig: int, _frame: object) -> None:
            stop["now"] = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop["now"]:
            self.tick()
            time.sleep(poll)

    def stop(self) -> None:
        """Stop applying, leave the catalog, stop the agent (a graceful leave), then HAProxy with a soft stop."""
        if self.applier is not None:
            self.applier.stop()  # the leave below fires watches that must not apply against a dying agent
            self.applier = None
        if self.spec.proxy and "consul" in self.procs and self.procs["consul"].poll() is None:
            try:
                self.store().deregister_service(selfcheck.service_id(self.settings))
            except FlowproxyError as exc:
                log.warning("could not deregister this node: %s", exc)
        for name, sig in (("consul", signal.SIGINT), ("haproxy", signal.SIGUSR1)):
            proc = self.procs.pop(name, None)
            if proc is not None and proc.poll() is None:
                proc.send_signal(sig)  # SIGUSR1: HAProxy lets open connections finish
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.retry is not None and self.retry.poll() is None:
            self.retry.kill()
        for logfile in self.logs.values():
            logfile.close()
        self.logs.clear()
        if self._store is not None:
            self._store.close()
            self._store = None


def apply_due(settings: Settings) -> str:
    """Why an apply is due that no watch event will bring, or "" when none is."""
    last = runstate.load(settings.run_dir, runstate.LAST_APPLY)
    if not runstate.load(settings.run_dir, runstate.LAST_STATUS).get("ok", True):
        return "the last apply failed"
    if coalesce.generation(settings.run_dir) > int(last.get("generation", 0)):
        return "a change found the apply lock taken and left it to the next apply"
    freed = ports.freed(settings.tcp_host, last.get("ports_held", []))
    return f"port(s) {', '.join(map(str, freed))} that TCP routes wait for are free now" if freed else ""


def ensure_bootstrap_config(settings: Settings) -> None:
    """Give HAProxy a valid config to start with: the last good one, else an empty route table."""
    if release.read_bundle(settings.current) is not None:
        return
    from flowproxy.apply import build
    from flowproxy.haproxy import check_config
    from flowproxy.model import Desired

    bundle, _ = build(settings, Desired(prefix=settings.prefix, routes=()), {})
    folder = release.stage(settings.haproxy_dir, bundle)
    check_config(settings.haproxy_bin, folder / "haproxy.cfg", settings.haproxy_env())
    release.activate(settings.current, folder)


def wait_for(ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    raise FlowproxyError(f"timed out after {timeout:.0f}s waiting for {what}")


def _http_ok(url: str, want_body: bool = False) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            body = resp.read()
            return resp.status == 200 and (not want_body or body.strip() not in (b"", b'""'))
    except OSError:
        return False
