"""flowproxy benchmark: real Consul, real HAProxy, real load (wrk), all on loopback, bounded, self-stopping.

    .venv/bin/python -m bench.run [--quick]

Prints one table and writes BENCHMARKS.md. A report, never a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

from bench import baseline
from bench.parts import ROOT, P, Row, fast_backend, haproxy_serving
from bench.wrk import run_wrk
from flowproxy.core.kv import desired_from_kv
from flowproxy.core.model import Instance, KVEntry
from flowproxy.core.plan import make_plan
from flowproxy.core.render import Templates, render
from flowproxy.settings import REPO_TEMPLATES


def route_entries(n: int, service: str = "app", check: bool = True) -> list[KVEntry]:
    out = []
    for i in range(n):
        # A trailing slash: without it `/r9` is a prefix of `/r9999`, and ACL order would pick the wrong route.
        body = json.dumps({"service": service, "paths": [f"/r{i}/"]} | ({} if check else {"check": False})).encode()
        out.append(KVEntry(f"{P}routes/r{i}/live", body, 1, 1))
        out.append(KVEntry(f"{P}routes/r{i}/active", b"live", 2 + i, 2 + i))
    return out


def hand_written(port: int, seconds: int) -> float:
    """Requests/s through a minimal hand-written config (one frontend, one backend): what routing costs over."""
    with haproxy_serving({"haproxy.cfg": baseline.minimal("127.0.0.1", port)}) as (url, _):
        return run_wrk(f"{url}/r0/x", seconds, connections=16).rps


def throughput(n: int, port: int, seconds: int, check: bool = False) -> tuple[float, float]:
    """Requests/s through flowproxy's map routing and through the baseline's ACL lines, hitting the last route.

    Health checks are off for both unless asked: on this one 2-core machine 10,000 checked servers send
    5,000 checks/s through the cores that also run wrk and the backend, which measures checks, not routing.
    """
    health = {"app": [Instance("127.0.0.1", port)]}
    plan = make_plan(desired_from_kv(P, route_entries(n, check=check)), health)
    bundle, _ = render(plan, Templates(REPO_TEMPLATES))
    with haproxy_serving(dict(bundle.files)) as (url, _):
        ours = run_wrk(f"{url}/r{n - 1}/x", seconds, connections=16).rps
    cfg = baseline.render([(f"r{i}", f"/r{i}/", [("127.0.0.1", port)]) for i in range(n)], check)
    with haproxy_serving({"haproxy.cfg": cfg}) as (url, _):
        theirs = run_wrk(f"{url}/r{n - 1}/x", seconds, connections=16).rps
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer trials and shorter loads (a smoke run)")
    args = parser.parse_args()
    seconds, trials, rounds = (3, 15, 1) if args.quick else (8, 50, 5)
    with fast_backend() as port:
        rows = throughput_rows(port, seconds, rounds)
    from bench.layouts import layout_rows
    from bench.live import live_rows

    rows += live_rows(trials, seconds)
    rows += layout_rows(min(trials, 30))
    report(rows, args.quick)


def throughput_rows(port: int, seconds: int, rounds: int) -> list[Row]:
    """Medians over rounds; the ratio is the median of each round's own 10,000/10 ratio.

    Everything shares 2 cores, so single 8 s runs move by +-20 % with the scheduler: a ratio taken within
    one round, 10 and 10,000 routes measured back to back, cancels the drift that a ratio of medians keeps.
    """
    runs = [(throughput(10, port, seconds), throughput(10_000, port, seconds), hand_written(port, seconds))
            for _ in range(rounds)]
    checked = throughput(10_000, port, seconds, check=True)
    small = (statistics.median(r[0][0] for r in runs), statistics.median(r[0][1] for r in runs))
    large = (statistics.median(r[1][0] for r in runs), statistics.median(r[1][1] for r in runs))
    ours = statistics.median(r[1][0] / r[0][0] for r in runs)
    theirs = statistics.median(r[1][1] / r[0][1] for r in runs)
    minimal = statistics.median(r[2] for r in runs)
    large_vs = (statistics.median(r[1][0] / r[2] for r in runs), statistics.median(r[1][1] / r[2] for r in runs))
    small_vs = (statistics.median(r[0][0] / r[2] for r in runs), statistics.median(r[0][1] / r[2] for r in runs))
    return [
        Row("routing throughput, minimal hand-written config: one frontend, one backend (req/s)",
            f"{minimal:,.0f}", f"{minimal:,.0f}"),
        Row("throughput at 10,000 routes / minimal hand-written config", f"{large_vs[0]:.2f}", f"{large_vs[1]:.2f}",
            ">= 0.90", "pass" if large_vs[0] >= 0.9 else "FAIL"),
        Row("throughput at 10 routes / minimal hand-written config", f"{small_vs[0]:.2f}", f"{small_vs[1]:.2f}"),
        Row("routing throughput, 10 routes (req/s)", f"{small[0]:,.0f}", f"{small[1]:,.0f}"),
        Row("routing throughput, 10,000 routes (req/s)", f"{large[0]:,.0f}", f"{large[1]:,.0f}"),
        Row("throughput at 10,000 / at 10 routes", f"{ours:.2f}", f"{theirs:.2f}", ">= 0.90",
            "pass" if ours >= 0.9 else "FAIL"),
        Row("routing throughput, 10,000 routes, every server health-checked (req/s)",
            f"{checked[0]:,.0f}", f"{checked[1]:,.0f}"),
    ]


def report(rows: list[Row], quick: bool) -> None:
    def first_line(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.split("\n")[0]

    versions = {"haproxy": first_line("haproxy", "-v"), "consul": first_line("consul", "version"),
                "python": platform.python_version()}
    head = "| metric | flowproxy | baseline | target | verdict |\n| --- | --- | --- | --- | --- |\n"
    table = head + "".join(f"| {r.metric} | {r.flowproxy} | {r.baseline} | {r.target} | {r.verdict} |\n" for r in rows)
    print(table)
    machine = f"{os.cpu_count()} cores, {platform.machine()}, {platform.system()} {platform.release()}"
    text = (f"# Benchmarks\n\nMeasured by `.venv/bin/python -m bench.run{' --quick' if quick else ''}` on "
            f"{time.strftime('%Y-%m-%d')}: {machine}; {versions['haproxy']}; {versions['consul']}; "
            f"Python {versions['python']}.\n\n{table}\n")
    (ROOT / "BENCHMARKS.md").write_text(text + (ROOT / "bench" / "NOTES.md").read_text())


if __name__ == "__main__":
    main()

