"""The watch entry's lean path: a payload that changes nothing never loads python-consul2, jinja2 or click."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

from flowproxy import runstate
from flowproxy.core.contract import kv_fingerprint

HEAVY = ("consul", "jinja2", "click", "requests")


def run_handle(data_dir: Path, payload: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; sys.argv = ['flowproxy', 'handle', '--kind', 'keyprefix']; " \
           "from flowproxy.entry import main; main()"
    env = {**os.environ, "FLOWPROXY_DATA_DIR": str(data_dir), "FLOWPROXY_NODE": "t1",
           "CONSUL_HTTP_ADDR": "127.0.0.1:1"}
    return subprocess.run([sys.executable, "-X", "importtime", "-c", code], input=payload, env=env,
                          capture_output=True, text=True, timeout=30, check=False)


def imported(stderr: str) -> set[str]:
    lines = [line for line in stderr.splitlines() if line.startswith("import time:")]
    return {line.split("|")[-1].strip().split(".")[0] for line in lines}


def payload(pairs: dict[str, bytes]) -> str:
    return json.dumps([{"Key": k, "Value": base64.b64encode(v).decode()} for k, v in pairs.items()])


def test_unchanged_routes_take_the_lean_path(tmp_path: Path) -> None:
    routes = {"flowproxy/routes/a/live": b'{"service": "a", "paths": ["/a"]}', "flowproxy/routes/a/active": b"live"}
    runstate.save(tmp_path / "run", runstate.LAST_APPLY,
                  {"fingerprint": kv_fingerprint("flowproxy/", list(routes.items()))})
    # Another node's status write changes the payload but not what the config depends on.
    done = run_handle(tmp_path, payload(routes | {"flowproxy/status/other": b'{"ok": true}'}))
    assert done.returncode == 0, done.stderr[-2000:]
    assert not imported(done.stderr) & set(HEAVY)


def test_changed_routes_do_the_work(tmp_path: Path) -> None:
    runstate.save(tmp_path / "run", runstate.LAST_APPLY, {"fingerprint": "something-else"})
    done = run_handle(tmp_path, payload({"flowproxy/routes/a/active": b"live"}))
    assert done.returncode == 3  # it went to Consul (unreachable here) and said so
    assert {"consul", "jinja2"} <= imported(done.stderr)
    assert "apply failed: Consul at 127.0.0.1:1" in (tmp_path / "handler.log").read_text()
