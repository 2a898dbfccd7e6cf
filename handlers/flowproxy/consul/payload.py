"""A keyprefix watch's payload, Consul's wire format. Stdlib only (read on the lean start-up path)."""

from __future__ import annotations

import base64
import json


def payload_entries(payload: str) -> list[tuple[str, bytes, int, int]] | None:
    """A keyprefix watch payload (JSON list, values base64) as (key, value, CreateIndex, ModifyIndex), or None."""
    try:
        doc = json.loads(payload) if payload.strip() else None
        return [(e["Key"], base64.b64decode(e.get("Value") or ""), int(e.get("CreateIndex", 0)),
                 int(e.get("ModifyIndex", 0))) for e in doc or []]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
