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


OPEN = '[{"Key":"'
BETWEEN = '},{"Key":"'  # never inside an entry: a quote in a key or value is written \"


def payload_pieces(payload: str) -> list[str] | None:
    """A keyprefix payload cut into its entries' texts, undecoded; None when it is not the compact list of
    objects, `Key` first, that the agent writes (then decode it whole)."""
    text = payload.strip()
    if text in ("", "null", "[]"):
        return []
    if not (text.startswith(OPEN) and text.endswith("}]")):
        return None
    return text[len(OPEN):-2].split(BETWEEN)


def entry_of(piece: str) -> tuple[str, bytes, int, int] | None:
    """One entry's text from `payload_pieces` as (key, value, CreateIndex, ModifyIndex), or None."""
    entries = payload_entries("[" + OPEN[1:] + piece + "}]")
    return entries[0] if entries and len(entries) == 1 else None
