"""The warm applier: `node up` serves watch events in its own process, where every import is loaded.

A watch handler process connects to `<data>/run/apply.sock`, sends `<kind> <CONSUL_INDEX>\\n<payload>` and
half-closes; the applier runs the same coalesced apply as the handler would (same lock, same counter, so a
handler applying in-process and the applier never overlap) and answers with the exit code. Measured: a flip through the
handler process took ~180 ms, nearly all of it imports and a fresh Consul connection.
"""

from __future__ import annotations

import logging
import socketserver
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flowproxy import logs, telemetry
from flowproxy.consul.store import ConsulStore
from flowproxy.node.forward import KINDS, SOCKET_NAME
from flowproxy.node.handler import handle, log_file_handler
from flowproxy.settings import Settings

if TYPE_CHECKING:
    from flowproxy.node.events import EventView
    from flowproxy.pipeline import Warm

log = logging.getLogger(__name__)
THREAD = "flowproxy-applier"


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    applier: Applier


class _Request(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        threading.current_thread().name = THREAD  # its records go to handler.log, like a handler process's
        head, _, payload = self.rfile.read().partition(b"\n")
        kind, index, subject = [*head.decode(errors="replace").split(" ", 2), "", ""][:3]
        number = int(index) if index.isascii() and index.isdigit() else None
        code = self.server.applier.run(kind, payload.decode(errors="replace"), number, subject)
        self.wfile.write(str(code).encode())


class Applier:
    """One listening socket and one Consul client, both owned by the supervisor."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path: Path = settings.run_dir / SOCKET_NAME
        self.store: ConsulStore | None = None
        self.warm: Warm | None = None  # the memos of this process's applies, made on the first event
        self.view: EventView | None = None  # what its events are compared with (node/events.py)
        # One event at a time, each with its own payload, in the order they take this lock: the file lock
        # (coalesce.py) would make every event that finds another applying wait for a full converge.
        self._serial = threading.Lock()
        self.proof_cpu = 0.0  # CPU seconds of the last periodic proof's child process
        self._moved = False  # the last periodic proof found Consul's state apart from the model's
        self._server: _Server | None = None
        self._log: logging.Handler | None = None
        self._level = logging.NOTSET

    def run(self, kind: str, payload: str, index: int | None = None, subject: str = "") -> int:
        """Apply one event; `subject` is the service a service watch names. Without `index` (the
        supervisor's retries and periodic proof) the apply is a full converge, reading Consul afresh."""
        if kind not in KINDS:
            log.error("applier: unknown watch kind %r from %s; expected one of %s", kind, self.path, KINDS)
            return 2
        arrived = time.monotonic()
        telemetry.event(kind, index if kind == "keyprefix" else None)  # a service's index is not the KV's
        try:
            with self._serial:
                if self.warm is None:
                    from flowproxy.node.events import EventView
                    from flowproxy.pipeline import Warm

                    self.warm, self.view = Warm(incremental=True), EventView()
                if index is not None and self.warm.read_at > arrived:
                    return 0  # a full read of Consul began after this event came: what it says is applied
                return handle(kind, payload, self.settings, store=self.store, index=index, warm=self.warm,
                              subject=subject, view=self.view)
        except Exception:  # a bug must not kill the listener; the tick's retry will apply again
            log.exception("applier: the %s event failed unexpectedly", kind)
            return 1

    def applying(self) -> bool:
        """Whether an event or a converge is being applied now."""
        return self._serial.locked()

    def prove(self) -> int:
        """The periodic full converge, its reading and rendering done in a child process (node/proof.py):
        at 10,000 routes that is ~1 s of Python, which would hold up every event arriving meanwhile. Only
        when the model is not a full render of Consul's state now does a full converge run, in turn with
        the events. The child's CPU seconds are left in `proof_cpu` for the supervisor's budget."""
        from flowproxy.errors import FlowproxyError
        from flowproxy.node import proof

        try:
            with self._serial:  # forked while no event is half-applied (see node/proof.py)
                warm = self.warm
                model = warm.model if warm is not None else None
                child = proof.start(self.settings, warm, model) if warm is not None and model is not None else None
            self.proof_cpu, proved = 0.0, None
            if child is not None and warm is not None:  # (warm is not None whenever child is: for the types)
                proved, self.proof_cpu = proof.outcome(child, warm)
            with self._serial:
                if warm is not None and model is not None and (proved is None or warm.model is not model):
                    # Consul's state moved while the proof read it, or an event moved the model: writes keep
                    # coming and their events apply them, so the next proof judges. A watch that missed an
                    # event leaves the state apart twice in a row, which converges.
                    moved, self._moved = self._moved, True
                    if not moved:
                        return 0
                    log.info("the periodic proof found Consul's state apart from the model's twice in a row; "
                             "converging in full")
                elif proved:
                    self._moved = False
                    return 0  # equal: nothing to apply
                elif warm is not None and proved is False:
                    warm.model = None  # wrong: no event may build on it; the converge makes a new one
        except FlowproxyError as exc:
            log.warning("the periodic proof could not read or render: %s; converging in full", exc)
        except Exception:  # a bug in the proof must not stop the full converge that follows
            log.exception("the periodic proof failed unexpectedly; converging in full")
        return self.run("service", "")

    def start(self) -> None:
        if self._server is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        server = _Server(str(self.path), _Request)
        # Owner only: the socket makes this node apply on demand. (Its folder is 0700 as well; a umask
        # would be simpler but is process-wide, and the supervisor's tick thread writes files meanwhile.)
        self.path.chmod(0o600)
        server.applier = self
        settings = self.settings
        self.store = ConsulStore(settings.consul_addr, settings.consul_token, tls=settings.consul_tls)
        self._server = server
        self._open_log()
        threading.Thread(target=server.serve_forever, name="applier", daemon=True).start()
        log.info("applier listening on %s", self.path)

    def _open_log(self) -> None:
        target = str(self.settings.data_dir / "handler.log")
        if any(getattr(h, "baseFilename", None) == target for h in logging.getLogger().handlers):
            return  # the process logs there already (`node run`)
        self._log = log_file_handler(self.settings)
        if self._log is None:
            return
        self._log.addFilter(lambda record: record.threadName == THREAD)
        logging.getLogger().addHandler(self._log)
        package = logging.getLogger("flowproxy")
        self._level = package.level  # given back by stop(): the applier owns what it changed, no longer
        level = logs.level_of(self.settings.log_level)
        if package.getEffectiveLevel() > level:
            package.setLevel(level)  # what a handler process logs, at the level it logs it

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        self.path.unlink(missing_ok=True)
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._log is not None:
            logging.getLogger().removeHandler(self._log)
            logging.getLogger("flowproxy").setLevel(self._level)
            self._log.close()
            self._log = None
