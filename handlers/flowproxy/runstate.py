"""What this node last applied, kept in its data folder. Stdlib only (read on the lean start-up path).

Nothing here is a source of truth: a node with an empty folder rebuilds everything from Consul.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LAST_APPLY = "last-apply.json"  # fingerprint, KV index and change generation of the last good apply
LAST_STATUS = "last-status.json"  # the status document this node last published
ACME = "acme.json"  # the ACME worker's last look at the certificates (node/certifier.py; the metrics read it)


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
