"""`flowproxy handle`: the entry Consul watches call. Stdlib only until there is work to do.

Field notes: importing python-consul2 and jinja2 costs ~180 ms; a keyprefix watch also fires for every
status write of every node, and those runs find nothing to do, so they must not pay for it.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
from typing import TYPE_CHECKING

from flowproxy import runstate
from flowproxy.consul.payload import payload_entries
from flowproxy.core.contract import kv_fingerprint
from flowproxy.node import coalesce
from flowproxy.node.forward import HANDLE_KINDS
from flowproxy.redact import RedactFilter
from flowproxy.settings import Settings

if TYPE_CHECKING:
    from flowproxy.consul.store import ConsulStore
    from flowproxy.pipeline import Warm

log = logging.getLogger(__name__)


def setup_logging(settings: Settings) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(log_format(settings))
    err.addFilter(RedactFilter())
    root.addHandler(err)
    log_file = log_file_handler(settings)
    if log_file is not None:
        root.addHandler(log_file)


def log_format(settings: Settings) -> logging.Formatter:
    return logging.Formatter(f"%(asctime)s {settings.node} %(levelname)s %(name)s: %(message)s")


def log_file_handler(settings: Settings) -> logging.Handler | None:
    """`<data>/handler.log`, where every apply reports, whichever process ran it."""
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        log_file = logging.handlers.RotatingFileHandler(settings.data_dir / "handler.log",
                                                        maxBytes=5_000_000, backupCount=2)
    except OSError as exc:
        log.warning("cannot open %s/handler.log (%s); logging to stderr only", settings.data_dir, exc)
        return None
    log_file.setFormatter(log_format(settings))
    log_file.addFilter(RedactFilter())
    return log_file


def handle(kind: str, payload: str, settings: Settings, *, accept_empty: bool = False,
           store: ConsulStore | None = None, index: int | None = None, warm: Warm | None = None) -> int:
    """Apply if the event may change the config.

    `store` and `warm` are the warm applier's client and memos, if it runs us; `index` is the agent's
    CONSUL_INDEX for the payload.
    """
    from flowproxy.errors import FlowproxyError

    first = coalesce.bump(settings.run_dir)
    entries = payload_entries(payload) if kind == "keyprefix" else None
    skip = None if entries is None else kv_fingerprint(settings.prefix, [(e[0], e[1]) for e in entries])

    def work(generation: int) -> None:
        nonlocal skip, entries
        last = runstate.load(settings.run_dir, runstate.LAST_APPLY)
        # Only the first run may use this event's payload; runs for later events read Consul afresh.
        mine, skip, entries = (skip, entries), None, None
        if mine[0] is not None and mine[0] == last.get("fingerprint"):
            # A status write or an unchanged payload: the applied config already reflects it.
            runstate.save(settings.run_dir, runstate.LAST_APPLY, last | {"generation": generation})
            return
        from flowproxy.core.model import KVEntry, Snapshot
        from flowproxy.pipeline import converge  # the heavy imports start here

        snapshot = None
        if mine[1] is not None and index is not None:
            snapshot = Snapshot(index, tuple(KVEntry(*e) for e in mine[1]))
        converge(settings, generation, accept_empty, store, snapshot, warm=warm)

    try:
        coalesce.drain(settings.run_dir, work, first, wait=kind == "manual")
    except FlowproxyError as exc:
        log.error("%s watch: apply failed: %s", kind, exc)
        return exc.exit_code
    return 0


def main(argv: list[str] | None = None, payload: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowproxy handle",
                                     description="Apply Consul's state to this node (called by Consul watches).")
    parser.add_argument("--kind", choices=HANDLE_KINDS, default="manual", help="which watch called (default: manual)")
    parser.add_argument("--accept-empty", action="store_true",
                        help="apply an empty route table even if it is not newer than the running one")
    args = parser.parse_args(argv)
    if payload is None:
        payload = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    index = os.environ.get("CONSUL_INDEX", "")
    try:
        settings = Settings.from_env()
    except Exception as exc:  # a broken environment must still be reported, whatever it is
        print(f"flowproxy handle: bad settings: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings)
    return handle(args.kind, payload, settings, accept_empty=args.accept_empty,
                  index=int(index) if index.isascii() and index.isdigit() else None)


if __name__ == "__main__":
    sys.exit(main())
