"""The dashboard at a large route table: its API and a real browser drawing it.

    .venv/bin/python -m bench.dashboard [--routes 1000] [--trials 5]

A `flowproxy node up --dev` with its metrics listener open, N routes on one real instance, then per trial:
`GET /api/routes` (built afresh: each trial waits out the one-second cache), and Debian's chromium
(headless, driven over the DevTools protocol in real time) loading /dashboard: from navigation to its
first poll drawn, and what the page's script recorded of its API calls and of drawing them.
A report, never a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from typing import Any

from bench.live import bulk_routes
from bench.parts import free_port, pct
from bench.scale import node_up
from flowproxy.backend import IdentityServer
from flowproxy.cli.demo import register_instance

AUTH = "ops:bench-secret"


def api_ms(metrics: str) -> tuple[float, int]:
    request = urllib.request.Request(f"http://{metrics}/api/routes", headers={
        "Authorization": "Basic " + base64.b64encode(AUTH.encode()).decode()})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as answer:
        size = len(answer.read())
    return (time.perf_counter() - started) * 1000, size


class Browser:
    """Debian's chromium, headless, driven over the DevTools protocol on a pipe (JSON messages ending in a
    NUL on fds 3 and 4): real time, unlike --dump-dom's virtual time, in which the page's clocks stand still."""

    def __init__(self, chromium: str) -> None:
        ours_in, theirs_out = os.pipe()
        theirs_in, ours_out = os.pipe()
        os.set_inheritable(theirs_in, True)
        os.set_inheritable(theirs_out, True)
        # Its fds 3 and 4 must be these two; a small shell moves them there before exec.
        self.proc = subprocess.Popen(
            ["sh", "-c", f'exec 3<&{theirs_in} 4>&{theirs_out} "$@"', "sh", chromium, "--headless",
             "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
             "--remote-debugging-pipe", "about:blank"],
            pass_fds=(theirs_in, theirs_out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(theirs_in)
        os.close(theirs_out)
        self.send_fd, self.reader = ours_out, os.fdopen(ours_in, "rb")
        self.next_id, self.buffer = 0, b""

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params} | ({"sessionId": session} if session else {})
        os.write(self.send_fd, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                chunk = self.reader.read1(65536)
                if not chunk:
                    raise RuntimeError("chromium closed its pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return dict(answer.get("result") or {})

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.call("Browser.close")
        self.proc.wait(timeout=30)
        os.close(self.send_fd)
        self.reader.close()


def page_ms(browser: Browser, metrics: str) -> tuple[float, float, float, float, int]:
    """(navigation -> first poll drawn, navigation -> the script's first poll, the page's API calls,
    its drawing, rows) in ms, real time."""
    target = browser.call("Target.createTarget", url="about:blank")["targetId"]
    session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    browser.call("Network.enable", session)
    token = base64.b64encode(AUTH.encode()).decode()
    browser.call("Network.setExtraHTTPHeaders", session, headers={"Authorization": f"Basic {token}"})
    started = time.perf_counter()
    browser.call("Page.navigate", session, url=f"http://{metrics}/dashboard")
    probe = ("[document.body.dataset.polls, document.body.dataset.loadMs, document.body.dataset.renderMs, "
             "document.querySelectorAll('#route-rows > .route').length, document.body.dataset.firstPollAt].join(' ')")
    while True:
        value = browser.call("Runtime.evaluate", session, expression=probe, returnByValue=True)["result"]
        polls, load, draw, rows, script = (str(value.get("value") or "").split() + ["0"] * 5)[:5]
        if polls not in ("", "0", "undefined"):
            shown = (time.perf_counter() - started) * 1000
            browser.call("Target.closeTarget", targetId=target)
            return shown, float(script), float(load), float(draw), int(rows)
        if time.perf_counter() - started > 60:
            raise RuntimeError("the page did not draw within 60 s")
        time.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routes", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("chromium is not installed (bash .ci/install installs it)")
    metrics = f"127.0.0.1:{free_port()}"
    server = IdentityServer("app-1").start()
    try:
        with node_up("dash", extra=("--metrics", metrics, "--stats-auth", AUTH)) as live:
            register_instance(live.store, "app", "app-1", server.port)
            bulk_routes(live.store, [f"r{i}" for i in range(args.routes)], "app")
            live.settle()
            apis, shown, scripts, loads, draws, rows, size = [], [], [], [], [], 0, 0
            browser = Browser(chromium)
            try:
                for _ in range(args.trials):
                    time.sleep(1.2)  # past the API's one-second cache
                    ms, size = api_ms(metrics)
                    apis.append(ms)
                    time.sleep(1.2)
                    total, script, load, draw, rows = page_ms(browser, metrics)
                    shown.append(total)
                    scripts.append(script)
                    loads.append(load)
                    draws.append(draw)
            finally:
                browser.close()
    finally:
        server.stop()
    print(f"\n| dashboard, {args.routes:,} routes ({args.trials} trials, `node up`) | p50 | max |")
    print("| --- | --- | --- |")
    print(f"| `GET /api/routes` built afresh ({size / 1024:.0f} KiB) | {pct(apis, 0.5):.0f} ms | {max(apis):.0f} ms |")
    print(f"| page: navigation -> its script's first poll | {pct(scripts, 0.5):.0f} ms | {max(scripts):.0f} ms |")
    print(f"| page: its API calls | {pct(loads, 0.5):.0f} ms | {max(loads):.0f} ms |")
    print(f"| page: drawing {rows:,} route rows | {pct(draws, 0.5):.0f} ms | {max(draws):.0f} ms |")
    print(f"| page: navigation -> first poll drawn | {pct(shown, 0.5):.0f} ms | {max(shown):.0f} ms |")


if __name__ == "__main__":
    main()
