"""Run wrk against loopback and read its summary: one runner for the benchmark and the load tests."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

COUNT_STATUS = Path(__file__).with_name("count-status.lua")


@dataclass(frozen=True)
class WrkResult:
    requests: int
    rps: float
    non2xx: int
    socket_errors: int
    codes: dict[int, int] = field(default_factory=dict)  # with count_status only

    @property
    def failed(self) -> int:
        return self.non2xx + self.socket_errors


def run_wrk(url: str, seconds: int, *, connections: int = 8, close: bool = False,
            count_status: bool = False) -> WrkResult:
    """A bounded load (wrk stops by itself after `seconds`); `count_status` tallies responses by status code."""
    args = ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", url]
    if close:
        args[1:1] = ["-H", "Connection: close"]
    if count_status:
        args[1:1] = ["-s", str(COUNT_STATUS)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    requests = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if requests is None or rps is None:
        raise RuntimeError(f"unexpected wrk output: {out[-500:]}")
    return WrkResult(
        requests=int(requests.group(1)), rps=float(rps.group(1)),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(x) for x in sock.groups()) if sock else 0,
        codes={int(code): int(n) for code, n in re.findall(r"^status (\d+) (\d+)$", out, re.M)},
    )
