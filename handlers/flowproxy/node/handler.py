"""`flowproxy handle`: the entry Consul watches call. Stdlib only until there is work to do.

Field notes: importing python-consul2 and jinja2 costs ~180 ms; a keyprefix watch also fires for every
status write of every node, and those runs find nothing to do, so they must not pay for it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from flowproxy import logs, runstate
from flowproxy.consul.payload import payload_entries
from flowproxy.core.contract import kv_fingerprint
from flowproxy.node import coalesce
from flowproxy.node.forward import HANDLE_KINDS
from flowproxy.settings import Settings

if TYPE_CHECKING:
    from flowproxy.consul.store import ConsulStore
    from flowproxy.node.events import EventView
    from flowproxy.pipeline import Warm

log = logging.getLogger(__name__)


def setup_logging(settings: Settings) -> None:
    """stderr (the agent's log, or journald) and `<data>/handler.log`, in the node's format and level."""
    logs.install(settings.log_format, settings.log_level, settings.node, file=settings.data_dir / "handler.log")


def log_file_handler(settings: Settings) -> logging.Handler | None:
    """`<data>/handler.log`, where every apply reports, whichever process ran it."""
    try:
        return logs.handler(logs.capped_file(settings.data_dir / "handler.log"), settings.log_format, settings.node,
                            settings.log_level)
    except OSError as exc:
        log.warning("cannot open %s/handler.log (%s); logging to stderr only", settings.data_dir, exc)
        return None


def handle(kind: str, payload: str, settings: Settings, *, accept_empty: bool = False,
           store: ConsulStore | None = None, index: int | None = None, warm: Warm | None = None,
           subject: str = "", view: EventView | None = None) -> int:
    """Apply if the event may change the config.

    `store`, `warm` and `view` are the warm applier's client, memos and event view, if it runs us: then an
    event is applied incrementally when it can be. `index` is the agent's CONSUL_INDEX for the payload,
    `subject` the service a service watch names, or the part of the prefix a keyprefix watch names.
    """
    from flowproxy.errors import FlowproxyError

    first = coalesce.bump(settings.run_dir)
    fresh = [True]

    def work(generation: int) -> None:
        mine, fresh[0] = fresh[0], False  # only the first run may use this event's payload; later runs read
        if mine and store is not None and warm is not None and view is not None and incremental(  # Consul afresh
                kind, payload, settings, store=store, index=index, warm=warm, subject=subject, view=view,
                generation=generation):
            return
        whole = kind == "keyprefix" and subject in ("", settings.prefix)  # a part's payload is no snapshot
        entries = payload_entries(payload) if mine and whole else None
        last = runstate.load(settings.run_dir, runstate.LAST_APPLY)
        if entries is not None and kv_fingerprint(settings.prefix, [(e[0], e[1]) for e in entries]) == \
                last.get("fingerprint"):
            # A status write or an unchanged payload: the applied config already reflects it.
            runstate.save(settings.run_dir, runstate.LAST_APPLY, last | {"generation": generation})
            return
        from flowproxy.core.model import KVEntry, Snapshot
        from flowproxy.pipeline import converge  # the heavy imports start here

        snapshot = None
        if entries is not None and index is not None:
            snapshot = Snapshot(index, tuple(KVEntry(*e) for e in entries))
        converge(settings, generation, accept_empty, store, snapshot, warm=warm)

    try:
        coalesce.drain(settings.run_dir, work, first, wait=kind == "manual")
    except FlowproxyError as exc:
        log.error("%s watch: apply failed: %s", kind, exc)
        return exc.exit_code
    return 0


def incremental(kind: str, payload: str, settings: Settings, *, store: ConsulStore, index: int | None, warm: Warm,
                subject: str, view: EventView, generation: int) -> bool:
    """Apply the event by itself (`pipeline.apply_change`); False when the full converge must."""
    from flowproxy.node.events import NOTHING, kv_change, service_change
    from flowproxy.pipeline import apply_change

    if kind == "keyprefix":
        change = kv_change(view, warm, settings.prefix, payload, index, watched=subject)
    elif kind == "service":
        change = service_change(view, warm, subject, payload, index)
    else:
        return False
    if change is NOTHING:
        last = runstate.load(settings.run_dir, runstate.LAST_APPLY)
        runstate.save(settings.run_dir, runstate.LAST_APPLY, last | {"generation": generation})
        return True
    return change is not None and apply_change(settings, store, warm, change, generation=generation,
                                                fingerprint=view.fingerprint)


def main(argv: list[str] | None = None, payload: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowproxy handle",
                                     description="Apply Consul's state to this node (called by Consul watches).")
    parser.add_argument("--kind", choices=HANDLE_KINDS, default="manual", help="which watch called (default: manual)")
    parser.add_argument("--subject", default="",
                        help="the service a service watch names, or the part of the prefix a keyprefix watch names")
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
    return handle(args.kind, payload, settings, accept_empty=args.accept_empty, subject=args.subject,
                  index=int(index) if index.isascii() and index.isdigit() else None)


if __name__ == "__main__":
    sys.exit(main())
