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
        elif not is_status_key(prefix, key) and key != prefix:
            h.update(key.encode() + b"\0")
    return h.hexdigest()


def is_status_key(prefix: str, key: str) -> bool:
    """`<prefix>status/<node>` (or the folder itself): what nodes write. Anything deeper is a stray key."""
    rest = key[len(prefix) + len("status/"):] if key.startswith(prefix + "status/") else None
    return rest is not None and "/" not in rest


def payload_entries(payload: str) -> list[tuple[str, bytes, int, int]] | None:
    """A keyprefix watch payload (JSON list, values base64) as (key, value, CreateIndex, ModifyIndex), or None."""
    try:
        doc = json.loads(payload) if payload.strip() else None
        return [(e["Key"], base64.b64decode(e.get("Value") or ""), int(e.get("CreateIndex", 0)),
                 int(e.get("ModifyIndex", 0))) for e in doc or []]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


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
