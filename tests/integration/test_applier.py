"""Watch events reach the node's warm applier: the handler process never loads the heavy modules."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable

from flowproxy.backend import IdentityServer
from tests.harness import ProxyNode
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
