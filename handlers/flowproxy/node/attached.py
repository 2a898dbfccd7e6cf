"""`flowproxy node run`: the node process of the production layout, beside the host's own Consul agent and
a systemd-managed HAProxy. It starts neither: it attaches to the agent's HTTP API (address, token or token
file, TLS from the standard Consul variables) and to HAProxy's master socket, and does every duty `node up`
does (the Supervisor's): warm applier, registration and TTL check, retries, resync, systemd notify.

HAProxy and the agent may come up before or after it, and restart under it: it waits, reports and goes on.
"""

from __future__ import annotations

import logging
import signal
import time

from flowproxy.errors import FlowproxyError
from flowproxy.node.handler import handle
from flowproxy.node.supervisor import Supervisor, notify
from flowproxy.node.up import prepare
from flowproxy.settings import Settings

log = logging.getLogger(__name__)


def run(settings: Settings, poll: float = 2.0) -> None:
    """Attach, converge, and tick until SIGTERM or SIGINT."""
    stop = {"now": False}

    def on_signal(_sig: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    prepare(settings)
    supervisor = Supervisor(settings)
    supervisor.start_applier()  # watches that fire meanwhile hand their events here
    try:
        attach(supervisor, stop)
        while not stop["now"]:
            supervisor.tick()
            time.sleep(poll)
    finally:
        supervisor.stop()


def attach(supervisor: Supervisor, stop: dict[str, bool]) -> None:
    """Wait for the agent, join the catalog, apply what Consul holds now, then tell systemd we are ready."""
    settings = supervisor.settings
    waited = False
    while not stop["now"]:
        try:
            if supervisor.store().leader():
                break
        except FlowproxyError as exc:
            if not waited:
                log.warning("waiting for the Consul agent: %s", exc)
        waited = True
        notify("WATCHDOG=1")
        time.sleep(1.0)
    supervisor.register()
    code = handle("manual", "", settings, store=supervisor.store())
    if code:
        log.warning("the first apply failed (exit %d); retrying every few seconds (see the status)", code)
    supervisor.beat()
    notify("READY=1")
    log.info("node %s attached: Consul %s, HAProxy %s; applier on %s", settings.node, settings.consul_addr,
             settings.master_socket, settings.run_dir / "apply.sock")
