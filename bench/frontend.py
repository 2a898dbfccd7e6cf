"""Where a request's time goes in HAProxy: its worker's CPU per request through flowproxy's public frontend,
through variants of it with parts left out, and through a minimal hand-written config.

    .venv/bin/python -m bench.frontend [--routes 10000] [--seconds 4] [--rounds 3]

Each config serves the same fast backend (checks off) and takes a bounded wrk load on the last route;
the worker's CPU time (from /proc) divided by the requests it served is steadier than requests/s on a
machine where wrk, the backend and HAProxy share 2 cores. Medians over rounds. A report: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics

from bench import baseline
from bench.parts import P, fast_backend, haproxy_serving
from bench.run import route_entries
from bench.scale import cpu_seconds
from bench.wrk import run_wrk
from flowproxy.core.kv import desired_from_kv
from flowproxy.core.model import Instance, KVEntry
from flowproxy.core.plan import make_plan
from flowproxy.core.render import Templates, render
from flowproxy.haproxy.master import HAProxySocket
from flowproxy.settings import REPO_TEMPLATES

# What each variant leaves out of the public frontend (lines matching any pattern).
VARIANTS: dict[str, list[str]] = {
    "flowproxy as rendered (prefix routes only: one lookup step)": [],
    "without forwardfor, x-forwarded-proto, del-header": [r"forwardfor", r"x-forwarded-proto", r"del-header"],
}


def without(config: str, patterns: list[str]) -> str:
    out, public = [], False
    for line in config.split("\n"):
        if line.startswith("frontend "):
            public = line.strip() == "frontend fp_http"
        if not (public and any(re.search(p, line) for p in patterns)):
            out.append(line)
    return "\n".join(out)


def per_request(files: dict[str, bytes], url_path: str, seconds: int, access_log: str = "off") -> tuple[float, float]:
    """HAProxy's CPU per request (us) and the requests/s wrk saw."""
    with haproxy_serving(files, access_log) as (url, settings):
        workers = HAProxySocket(settings.master_socket).show_proc_settled().workers
        before = sum(cpu_seconds(w) for w in workers)
        result = run_wrk(f"{url}{url_path}", seconds, connections=16)
        used = sum(cpu_seconds(w) for w in workers) - before
    return used / max(result.requests, 1) * 1e6, result.rps


# Routes of other kinds besides the prefix routes: their steps in the public frontend are then rendered.
EVERY_KIND = [KVEntry(f"{P}routes/{name}/{key}", value.encode(), 1, 1) for name, intent in (
    ("k-exact", {"service": "app", "paths": ["/k-exact"], "path_type": "exact"}),
    ("k-regex", {"service": "app", "paths": ["^/k-regex/[0-9]+$"], "path_type": "regex"}),
    ("k-host", {"service": "app", "domains": ["k.example", "*.k.example"], "paths": ["/"], "https_only": True,
                "redirect_from": ["www.k.example"]}),
) for key, value in (("live", json.dumps(intent)), ("active", "live"))]


def rendered(entries: list[KVEntry], port: int) -> dict[str, bytes]:
    plan = make_plan(desired_from_kv(P, entries), {"app": [Instance("127.0.0.1", port)]})
    bundle, _ = render(plan, Templates(REPO_TEMPLATES))
    return dict(bundle.files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routes", type=int, default=10_000)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n = args.routes
    with fast_backend() as port:
        files = rendered(route_entries(n, check=False), port)
        config = files["haproxy.cfg"].decode()
        configs = {name: files | {"haproxy.cfg": without(config, patterns).encode()}
                   for name, patterns in VARIANTS.items()}
        many = "flowproxy with an exact, a regex and a domain route (https_only, redirect_from): 5 more steps"
        configs[many] = rendered(route_entries(n, check=False) + EVERY_KIND, port)
        configs["minimal hand-written: one frontend, one backend"] = {
            "haproxy.cfg": baseline.minimal("127.0.0.1", port)}
        logged = "flowproxy as rendered, with its access log (text, through `node up`'s capped file)"
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in [*configs, logged]}
        for _ in range(args.rounds):
            for name, served in configs.items():
                runs[name].append(per_request(served, f"/r{n - 1}/x", args.seconds))
            runs[logged].append(per_request(files, f"/r{n - 1}/x", args.seconds, access_log="stdout"))
    least = statistics.median(r[0] for r in runs["minimal hand-written: one frontend, one backend"])
    print(f"| config ({n:,} routes) | HAProxy CPU per request | over minimal | requests/s |\n| --- | --- | --- | --- |")
    for name, found in runs.items():
        cpu = statistics.median(r[0] for r in found)
        print(f"| {name} | {cpu:.1f} us | +{cpu - least:.1f} us | {statistics.median(r[1] for r in found):,.0f} |")


if __name__ == "__main__":
    main()
