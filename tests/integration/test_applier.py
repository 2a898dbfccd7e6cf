"""Watch events reach the node's warm applier: the handler process never loads the heavy modules."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from flowproxy.backend import IdentityServer
from tests.harness import ProxyNode, need
from tests.unit.test_handler import HEAVY, imported


def handle(proxy: ProxyNode, payload: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; sys.argv = ['flowproxy', 'handle', '--kind', 'keyprefix']; " \
           "from flowproxy.entry import main; main()"
    env = {**os.environ, **proxy.settings.env()}
    return subprocess.run([sys.executable, "-X", "importtime", "-c", code], input=payload, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_events_are_applied_by_the_warm_applier(proxy: ProxyNode, instances: Callable[..., IdentityServer]) -> None:
    sock = proxy.settings.run_dir / "apply.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    instances("go-demo", "go-demo-1")
    proxy.store().put("flowproxy/routes/go-demo/live", json.dumps({"service": "go-demo", "paths": ["/demo"]}))
    proxy.store().put("flowproxy/routes/go-demo/active", "live")
    # A payload unlike anything applied: handled in this process, it would have to load python-consul2.
    done = handle(proxy, json.dumps([{"Key": "flowproxy/routes/go-demo/active", "Value": "bGl2ZQ=="}]))
    assert done.returncode == 0, done.stderr[-2000:]
    assert not imported(done.stderr) & set(HEAVY)  # the applier did the work, in its own process
    proxy.wait_reply("/demo/x", 200)


WATCH = str(Path(sys.executable).parent / "flowproxy-watch")


def test_the_shell_entry_hands_events_to_the_applier(proxy: ProxyNode,
                                                     instances: Callable[..., IdentityServer]) -> None:
    need("socat")
    instances("go-demo", "go-demo-1")
    proxy.store().put("flowproxy/routes/go-demo/live", json.dumps({"service": "go-demo", "paths": ["/demo"]}))
    proxy.store().put("flowproxy/routes/go-demo/active", "live")
    env = {**os.environ, **proxy.node.env()}
    done = subprocess.run([WATCH, "keyprefix"], input="[]", env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    proxy.wait_reply("/demo/x", 200)
    unknown = subprocess.run([WATCH, "bogus"], input="[]", env=env, capture_output=True, text=True, timeout=60,
                             check=False)
    assert unknown.returncode == 2  # the applier refuses a kind it does not know


def test_the_shell_entry_applies_itself_without_an_applier(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "FLOWPROXY_DATA_DIR": str(tmp_path), "FLOWPROXY_NODE": "alone", "CONSUL_HTTP_ADDR": "127.0.0.1:1"}
    payload = json.dumps([{"Key": "flowproxy/routes/a/active", "Value": "bGl2ZQ=="}])
    done = subprocess.run([WATCH, "keyprefix"], input=payload, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 3, done.stderr  # it went to Consul itself (unreachable here) and said so
    assert "apply failed: Consul at 127.0.0.1:1" in (tmp_path / "handler.log").read_text()
