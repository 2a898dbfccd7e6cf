"""What this node last applied, kept in its data folder. Stdlib only (read on the lean start-up path).

Nothing here is a source of truth: a node with an empty folder rebuilds everything from Consul.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

LAST_APPLY = "last-apply.json"  # fingerprint, KV index and change generation of the last good apply
LAST_STATUS = "last-status.json"  # the status document this node last published


def kv_fingerprint(prefix: str, pairs: Iterable[tuple[str, bytes]]) -> str:
    """A digest of what an apply depends on: routes/, templates/ and certs/ keys with values, and the names
    of keys outside the contract (reported, never used, so their values do not matter). status/ is left out:
    every node writes there, and those writes drive nothing."""
    h = hashlib.sha256()
    used = (prefix + "routes/", prefix + "templates/", prefix + "certs/")
    for key, value in sorted(pairs):
        if key.startswith(used):
            h.update(key.encode() + b"\0" + hashlib.sha256(value).digest())
        elif not key.startswith(prefix + "status/") and key != prefix:
            h.update(key.encode() + b"\0")
    return h.hexdigest()


def payload_fingerprint(prefix: str, payload: str) -> str | None:
    """The fingerprint of a keyprefix watch payload (JSON list, values base64), or None if unreadable."""
    try:
        doc = json.loads(payload) if payload.strip() else None
        entries = doc or []
        pairs = [(e["Key"], base64.b64decode(e.get("Value") or "")) for e in entries]
    except (ValueError, TypeError, KeyError):
        return None
    return kv_fingerprint(prefix, pairs)


def load(run_dir: Path, name: str) -> dict[str, Any]:
    try:
        doc = json.loads((run_dir / name).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def save(run_dir: Path, name: str, doc: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{name}.{os.getpid()}"
    tmp.write_text(json.dumps(doc, sort_keys=True, indent=1))
    tmp.replace(run_dir / name)
