"""Where a node's full apply and memory bend: 10,000 and 30,000 routes (no target; a report).

    .venv/bin/python -m bench.knee [--routes 10000,30000] [--trials 3]

Each size gets its own `flowproxy node up --dev` (as `bench.scale` starts it), routes `r0` ... written in
transactions, HAProxy health checks off (at 30,000 checked servers this machine's 2 cores measure checks).
Then a change only a reload can make (route `r0`'s balance algorithm) is written `--trials` times: the time
from the write to the node's status reporting it (read Consul, plan, render, `haproxy -c`, switch,
reload confirmed), the node process's resident memory (now and its peak: the warm applier holds the
model), and HAProxy's workers' resident memory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.live import bulk_routes
from bench.scale import Live, P, node_up
from flowproxy.backend import IdentityServer
from flowproxy.cli.demo import register_instance
from flowproxy.core import contract
from flowproxy.haproxy.master import HAProxySocket


def memory_mb(pid: int) -> tuple[int, int]:
    """Resident memory now and at its peak, in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def full_applies(live: Live, trials: int) -> list[float]:
    times = []
    for trial in range(trials):
        balance = "leastconn" if trial % 2 == 0 else "roundrobin"
        began = time.monotonic()
        live.store.put(contract.intent_key(P, "r0", "live"),
                       json.dumps({"service": "app", "paths": ["/r0/"], "check": False, "balance": balance}))
        live.settle(timeout=900)
        times.append(time.monotonic() - began)
        time.sleep(2)
    return times


def measure(n: int, trials: int) -> str:
    with node_up() as live:
        app = IdentityServer("app-1").start()
        try:
            register_instance(live.store, "app", "app-1", app.port)
            began = time.monotonic()
            bulk_routes(live.store, [f"r{i}" for i in range(n)], "app", check=False)
            live.settle(timeout=900)
            loaded = time.monotonic() - began
            time.sleep(3)
            times = full_applies(live, trials)
            node = memory_mb(live.proc.pid)
            workers = HAProxySocket(live.data / "haproxy" / "master.sock").show_proc_settled().workers
            haproxy = max(memory_mb(w)[0] for w in workers)
        finally:
            app.stop()
    applies = ", ".join(f"{t:.1f}" for t in sorted(times))
    return (f"| {n:,} | {loaded:.0f} s | {applies} s | {node[0]} / {node[1]} MB | {haproxy} MB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routes", default="10000,30000")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    print(f"| routes | all written -> applied | full apply with reload ({args.trials} trials) | "
          "node process RSS / peak | HAProxy worker RSS |\n| --- | --- | --- | --- | --- |", flush=True)
    for n in (int(x) for x in args.routes.split(",")):
        print(measure(n, args.trials), flush=True)


if __name__ == "__main__":
    main()
