"""One real HTTP request to a listener, as a client sees it (the demo's walkthrough, the ACME worker's check
that its own listener serves a challenge answer). Stdlib only."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    status: int
    body: str
    instance: str


def fetch(url: str, host: str | None = None, timeout: float = 5, variant: str | None = None) -> Reply:
    """One real HTTP request; error statuses are answers too."""
    headers = ({"Host": host} if host else {}) | ({"X-Flowproxy-Variant": variant} if variant else {})
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Reply(resp.status, resp.read().decode(), resp.headers.get("X-Instance", ""))
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.read().decode(errors="replace"), exc.headers.get("X-Instance", ""))
