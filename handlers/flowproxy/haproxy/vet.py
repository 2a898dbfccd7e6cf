"""The vet stage: everything in a rendered plan that HAProxy would refuse, each thing alone with its reason.

One stage, one result. Certificates (OpenSSL), custom-template fragments (`haproxy -c` each), regexes (PCRE2
as HAProxy uses it), TCP ports another program holds and health checks beyond HAProxy's open-file limit
(capacity): `haproxy -c` on the whole config would refuse it all over one of them, or HAProxy would not
start on it, which would stop every other change on the node.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from flowproxy.core.model import Problem
from flowproxy.core.plan import Plan
from flowproxy.core.render import custom_fragments, drop_backends, regexes
from flowproxy.haproxy import capacity, fragments, ports, spares
from flowproxy.haproxy import certs as cert_vet
from flowproxy.haproxy import regexes as regex_vet
from flowproxy.settings import Settings


@dataclass(frozen=True)
class Refusals:
    """What vetting refused: backends (name -> reason, its key first), certificates (a problem each, by
    name), and the TCP ports whose routes wait for another program to let go of them."""

    backends: dict[str, str] = field(default_factory=dict)
    certs: dict[str, Problem] = field(default_factory=dict)
    waiting: tuple[int, ...] = ()
    fd_limit: int = 0  # HAProxy's open-file limit as vetting read it (capacity); 0 when not read

    def __bool__(self) -> bool:
        return bool(self.backends or self.certs)

    def adding(self, backends: Mapping[str, str]) -> Refusals:
        """These refusals and more backends (the first reason for a backend wins)."""
        return dataclasses.replace(self, backends=dict(backends) | self.backends)

    def applied_to(self, plan: Plan) -> Plan:
        """The plan without what was refused: refused backends dropped (their routes rejected), refused
        certificates reported among the keys not used."""
        dropped = drop_backends(plan, self.backends)
        return dataclasses.replace(dropped, stray=dropped.stray + tuple(self.certs[n] for n in sorted(self.certs)))

    def certs_kept(self, certs: Mapping[str, bytes]) -> dict[str, bytes]:
        return {name: pem for name, pem in certs.items() if name not in self.certs}


def vet(settings: Settings, plan: Plan, certs: Mapping[str, bytes],
        custom: Mapping[str, Mapping[str, str]]) -> Refusals:
    """Everything HAProxy would refuse in this rendered plan, each backend and certificate alone."""
    keys = {b.name: b.key for b in plan.backends}
    refused_certs = cert_vet.refused(settings.prefix, certs)
    reasons = {name: f"{keys[name]}: template: {why}"
               for name, why in fragments.refused(settings, custom_fragments(plan, custom)).items()}
    by_backend = regexes(plan)
    bad = regex_vet.refused(settings, {p for patterns in by_backend.values() for p in patterns})
    for name, patterns in sorted(by_backend.items()):
        found = sorted(p for p in patterns if p in bad)
        if found:
            reasons.setdefault(name, f"{keys.get(name, name)}: regex {found[0]!r} is refused by HAProxy's "
                                     f"PCRE2: {bad[found[0]]}")
    held = ports.refused(plan, settings.tcp_host, settings.current / "haproxy.cfg")
    waiting = tuple(sorted(c.port for c in plan.claims if c.path_type == "tcp" and c.backend in held))
    refused = reasons | held
    limit = capacity.master_limit(settings.master_socket)
    return Refusals(refused | over_capacity(settings, drop_backends(plan, refused) if refused else plan, limit),
                    refused_certs, waiting, limit)


def over_capacity(settings: Settings, plan: Plan, limit: int) -> dict[str, str]:
    """Backends whose health checks HAProxy has no descriptors for under its open-file `limit` (see
    `capacity`); the running config is read only then, to keep the routes it serves."""
    threads = capacity.threads()
    if capacity.fits(plan, limit, settings.min_connections, threads):
        return {}
    try:
        running = {name.decode() for name in spares.BACKENDS.findall((settings.current / "haproxy.cfg").read_bytes())}
    except OSError:
        running = set()
    return capacity.refused(plan, limit, settings.min_connections, threads, running)
