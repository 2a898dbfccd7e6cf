"""The CLI as a user runs it: the real `flowproxy` executable against a real node."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from flowproxy.backend import IdentityServer
from tests.harness import ProxyNode, status_of, wait_applied

FLOWPROXY = str(Path(sys.executable).parent / "flowproxy")


def run(proxy: ProxyNode, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **proxy.settings.env()}
    return subprocess.run([FLOWPROXY, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def test_route_put_lints_before_writing(proxy: ProxyNode) -> None:
    done = run(proxy, "route", "put", "api", "--variant", "blue", "--service", "api", "--path", "nope")
    assert done.returncode == 4
    assert done.stderr.strip() == "flowproxy: flowproxy/routes/api/blue: paths[0]: 'nope' must start with \"/\""
    assert proxy.store().get("flowproxy/routes/api/blue") is None


def test_route_put_rejects_bad_names(proxy: ProxyNode) -> None:
    done = run(proxy, "route", "put", "Bad", "-v", "active", "-s", "api", "-p", "/a")
    assert done.returncode == 2 and "must match" in done.stderr


def test_put_activate_list_status_render_deactivate_remove(
        proxy: ProxyNode, instances: Callable[..., IdentityServer]) -> None:
    instances("go-demo", "go-demo-1")
    done = run(proxy, "route", "put", "go-demo", "-v", "live", "-s", "go-demo", "-p", "/demo", "--activate")
    assert done.returncode == 0, done.stderr
    entry = proxy.store().get("flowproxy/routes/go-demo/live")
    assert entry is not None and json.loads(entry.value) == {"service": "go-demo", "paths": ["/demo"]}
    proxy.wait_reply("/demo/x", 200)
    wait_applied(proxy)

    listed = run(proxy, "route", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)["routes"]
    assert (row["route"], row["active"], row["variants"], row["nodes"]) == (
        "go-demo", "live", ["live"], {"serving": ["edge-1"]})

    status = run(proxy, "status")
    assert status.returncode == 0 and "edge-1" in status.stdout and "yes" in status.stdout

    rendered = run(proxy, "render", "--maps")
    assert rendered.returncode == 0, rendered.stderr
    # The config as rendered from KV, whose hash the node reports (its running file may hold a route added
    # since the last reload in a spare backend instead).
    config = rendered.stdout.split("# ---- ", 1)[0]
    assert hashlib.sha256(config.encode()).hexdigest() == status_of(proxy)["config_sha256"]
    assert "/demo go-demo:live" in rendered.stdout
    # `render` changes nothing: a data folder it is pointed at is never created, caches included.
    unused = proxy.settings.data_dir.parent / "render-writes-nothing"
    again = run(proxy, "--data-dir", str(unused), "render")
    assert again.returncode == 0 and again.stdout == config, again.stderr
    assert not unused.exists()

    assert run(proxy, "route", "put", "go-demo", "-v", "next", "-s", "go-demo", "-p", "/next").returncode == 0
    assert run(proxy, "route", "activate", "go-demo", "next").returncode == 0
    proxy.wait_reply("/next", 200)
    assert proxy.get("/demo/x").status == 404

    assert run(proxy, "route", "deactivate", "go-demo").returncode == 0
    proxy.wait_reply("/next", 404)
    assert proxy.store().get("flowproxy/routes/go-demo/next") is not None
    assert run(proxy, "route", "remove", "go-demo").returncode == 0
    assert proxy.store().read_prefix("flowproxy/routes/")[1] == []


def test_activate_refuses_missing_or_invalid_variant(proxy: ProxyNode) -> None:
    missing = run(proxy, "route", "activate", "ghost", "live")
    assert missing.returncode == 4 and "does not exist" in missing.stderr  # no such variant: exit 4
    proxy.store().put("flowproxy/routes/bad/live", '{"service": "x"}')
    invalid = run(proxy, "route", "activate", "bad", "live")
    assert invalid.returncode == 4
    assert "flowproxy/routes/bad/live: at least one of paths or domains is required" in invalid.stderr
    assert proxy.store().get("flowproxy/routes/bad/active") is None


def test_consul_unreachable_is_a_clean_error(proxy: ProxyNode, tmp_path: Path) -> None:
    env = {**os.environ, "CONSUL_HTTP_ADDR": "127.0.0.1:1"}
    done = subprocess.run([FLOWPROXY, "route", "list"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 3
    assert done.stderr.startswith("flowproxy: Consul at 127.0.0.1:1 failed") and "Traceback" not in done.stderr


def test_extra_fields_and_canary_weights_through_the_cli(proxy: ProxyNode) -> None:
    done = run(proxy, "route", "put", "web", "-v", "blue", "-s", "web", "-t", "blue", "-p", "/web",
               "--extra", '{"timeout_server": "30s", "strip_prefix": "/web"}')
    assert done.returncode == 0, done.stderr
    entry = proxy.store().get("flowproxy/routes/web/blue")
    assert entry is not None and json.loads(entry.value) == {
        "service": "web", "tags": ["blue"], "paths": ["/web"], "timeout_server": "30s", "strip_prefix": "/web"}
    bad = run(proxy, "route", "put", "web", "-v", "green", "-s", "web", "-p", "/web", "--extra", '{"auth": "x"}')
    assert (bad.returncode, bad.stderr.strip()) == (
        4, "flowproxy: flowproxy/routes/web/green: auth: must be a JSON object, got str")
    assert run(proxy, "route", "put", "web", "-v", "green", "-s", "web", "-t", "green", "-p", "/web").returncode == 0
    weights = run(proxy, "route", "activate", "web", "blue=abc,green=10")
    assert weights.returncode == 4 and "'blue=abc' is not variant=weight" in weights.stderr
    assert run(proxy, "route", "activate", "web", "blue=90,green=10").returncode == 0
    assert wait_applied(proxy)["routes"]["web"]["variant"] == "blue=90,green=10"
