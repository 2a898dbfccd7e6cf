"""Service registrations as values: what callers say, turned into the agent API's JSON here only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Check:
    """One check: `http` (a URL), `tcp` (host:port) or `ttl` (a duration the owner must beat within)."""

    http: str | None = None
    tcp: str | None = None
    ttl: str | None = None
    interval: str = "1s"
    # Consul's own default. A dead instance refuses or answers 503 at once, so this bounds only a slow answer;
    # at 1 s a busy 2-core host flapped healthy instances critical and back, a route change nobody asked for.
    timeout: str = "10s"
    status: str | None = None  # the status it starts in (Consul's default: critical)
    check_id: str | None = None
    name: str | None = None

    def payload(self) -> dict[str, Any]:
        if self.ttl is not None:
            out: dict[str, Any] = {"TTL": self.ttl}
        else:
            out = {"Interval": self.interval, "Timeout": self.timeout} | (
                {"HTTP": self.http} if self.http is not None else {"TCP": self.tcp})
        optional = {"Status": self.status, "CheckID": self.check_id, "Name": self.name}
        return out | {k: v for k, v in optional.items() if v is not None}


@dataclass(frozen=True)
class Registration:
    name: str
    id: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)
    check: Check | None = None

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Name": self.name, "ID": self.id, "Address": self.address, "Port": self.port,
                               "Tags": list(self.tags)}
        if self.meta:
            out["Meta"] = dict(self.meta)
        if self.check is not None:
            out["Check"] = self.check.payload()
        return out
