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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flowproxy import logs
from flowproxy.consul import watches
from flowproxy.consul.store import ConsulStore
from flowproxy.errors import FlowproxyError, UsageError
from flowproxy.haproxy import ports, release
from flowproxy.node.agent import NodeSpec, consul_argv, install_watches
from flowproxy.node.applier import Applier
from flowproxy.node.supervisor import Supervisor
from flowproxy.settings import Settings, ensure_stats_lock

log = logging.getLogger(__name__)
__all__ = ["Node", "NodeSpec", "ensure_bootstrap_config", "prepare", "wait_for"]


@dataclass
class Node:
    """The child processes of one proxy node; `stop()` ends everything `start()` began.

    Every duty besides the children (applier, registration, beats, retries, resync) is the Supervisor's,
    the same one `flowproxy node run` uses beside a host's own agent and HAProxy.
    """

    spec: NodeSpec
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, threading.Thread] = field(default_factory=dict)
    supervisor: Supervisor = field(init=False)

    def __post_init__(self) -> None:
        self.supervisor = Supervisor(self.settings)  # settings.consul_addr is this node's agent API

    @property
    def settings(self) -> Settings:
        return self.spec.settings

    @property
    def applier(self) -> Applier | None:
        return self.supervisor.applier

    def env(self) -> dict[str, str]:
        return self.supervisor.env()

    def start(self) -> None:
        needed = (self.settings.haproxy_bin, self.spec.consul_bin) if self.spec.proxy else (self.spec.consul_bin,)
        for binary in needed:
            if shutil.which(binary) is None:
                raise UsageError(f"{binary} is not installed or not on PATH; run `bash .ci/install`")
        if self.spec.proxy:
            refuse_taken_ports(self.settings)
            prepare(self.settings)  # the same folders and first config as `node run` / `node init`
        else:
            self.settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.settings.data_dir / "logs").mkdir(exist_ok=True)
        if self.spec.proxy:
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
        self.supervisor.start_applier()
        install_watches(self.spec)
        self.store().reload_agent()
        self.supervisor.register()
        self.tick()

    def store(self) -> ConsulStore:
        return self.supervisor.store()

    def tick(self) -> None:
        """Periodic duty: report health (before any repair, so an outage shows), revive, retry."""
        self.beat()
        self.revive()
        if self.spec.proxy:
            self.supervisor.retry_apply()

    def beat(self) -> None:
        if self.spec.proxy:
            self.supervisor.beat()

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

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        # The child's output (HAProxy's access log and alerts, the agent's log) through a pipe into a file of
        # at most 5 MB and two older ones. A session of its own: a terminal's Ctrl-C reaches only us, and we
        # stop children in order.
        read_fd, write_fd = os.pipe()
        try:
            self.procs[name] = subprocess.Popen(argv, env=env, stdout=write_fd, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.logs[name] = logs.pump(read_fd, logs.CappedFile(self.settings.data_dir / "logs" / f"{name}.log"))
        log.info("started %s (pid %s): %s", name, self.procs[name].pid, " ".join(argv))

    def start_haproxy(self) -> None:
        s = self.settings
        s.master_socket.unlink(missing_ok=True)
        # Only what the config names: no token or other secret of the node is within reach of "${...}" or
        # the env() sample fetch.
        self._spawn("haproxy", [s.haproxy_bin, "-W", "-S", f"{s.master_socket},mode,600",
                                "-f", str(s.current / "haproxy.cfg")],
                    s.haproxy_env() | {"PATH": os.environ.get("PATH", os.defpath)})
        wait_for(s.master_socket.exists, 10, "HAProxy master socket")

    def start_consul(self) -> None:
        self._spawn("consul", consul_argv(self.spec), self.env())

    def restart(self, name: str) -> None:
        """Start a dead child again: HAProxy with the last good config; the agent with its watches re-armed."""
        if name == "haproxy":
            self.start_haproxy()
        else:
            self.start_consul()
            self.arm_watches()

    def http_addr(self) -> str:
        scheme = "https://" if self.spec.tls is not None else ""
        return f"{scheme}{self.spec.client}:{self.spec.http_port}"

    def wait_consul(self, timeout: float = 30) -> None:
        def leader() -> bool:
            try:
                return bool(self.store().leader())
            except FlowproxyError:
                return False

        wait_for(leader, timeout, f"Consul agent at {self.http_addr()} with a leader")
        if self.spec.acl_master:
            # The leader creates the initial management token only after it was elected: until then that
            # token is refused (403), so a server that bootstraps ACLs is ready once the token is accepted.
            wait_for(self.master_accepted, timeout, f"Consul agent at {self.http_addr()} to accept its master token")

    def master_accepted(self) -> bool:
        store = ConsulStore(self.http_addr(), self.spec.acl_master)
        try:
            store.check_token()
        except FlowproxyError:
            return False
        finally:
            store.close()
        return True

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
        agent_up = "consul" in self.procs and self.procs["consul"].poll() is None
        self.supervisor.stop(deregister=self.spec.proxy and agent_up)
        for name, sig in (("consul", signal.SIGINT), ("haproxy", signal.SIGUSR1)):
            proc = self.procs.pop(name, None)
            if proc is not None and proc.poll() is None:
                proc.send_signal(sig)  # SIGUSR1: HAProxy lets open connections finish
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for pump in self.logs.values():
            pump.join(timeout=1)  # ends when the child's last process closes its end of the pipe
        self.logs.clear()


def refuse_taken_ports(settings: Settings) -> None:
    """Refuse to start on a listener address another program holds: HAProxy binds with SO_REUSEPORT and
    would silently share the port with another proxy (requests alternating between the two)."""
    for what, bind in (("--http", settings.http_bind), ("--https", settings.https_bind),
                       ("--sni", settings.sni_bind), ("--preview", settings.preview_bind),
                       ("--metrics", settings.metrics_bind)):
        shared = what == "--sni" and bind == settings.https_bind  # one port for both, by design
        if bind and not shared and not bind.startswith(("unix@", "abns@", "/")):
            holder = ports.bind_error(bind)
            if holder:
                raise UsageError(f"{what} {bind}: {holder}; another program (another flowproxy node?) "
                                 "listens there. Choose another address or stop it first.")


def prepare(settings: Settings) -> None:
    """Folders, a config HAProxy can start with, and the service-watch file the agent loads (possibly
    before any route exists: an agent whose -config-dir is missing does not start). Sockets (master,
    stats, the listeners a node does not open) live in these folders: owner only."""
    for folder in (settings.data_dir, settings.haproxy_dir, settings.run_dir, settings.watch_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for folder in (settings.data_dir, settings.haproxy_dir, settings.run_dir):
        folder.chmod(0o700)
    watches.ensure_files(settings.watch_dir, settings.prefix)
    ensure_stats_lock(settings.data_dir)
    ensure_bootstrap_config(settings)


def ensure_bootstrap_config(settings: Settings) -> None:
    """Give HAProxy a valid config to start with: the last good one, else an empty route table."""
    if release.read_bundle(settings.current) is not None:
        return
    from flowproxy.core.model import Desired
    from flowproxy.haproxy.deploy import checked_release
    from flowproxy.pipeline import build

    bundle = build(settings, Desired(prefix=settings.prefix, routes=()), {}).bundle
    release.activate(settings.current, checked_release(settings, bundle))


def wait_for(ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    raise FlowproxyError(f"timed out after {timeout:.0f}s waiting for {what}")
