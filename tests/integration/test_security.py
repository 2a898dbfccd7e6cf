"""Security: Consul ACLs with default deny, private sockets, and no secret in logs, status or render."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from flowproxy.backend import IdentityServer
from flowproxy.demo import register_instance
from tests.harness import ProxyNode, node_spec, start_node

FLOWPROXY = str(Path(sys.executable).parent / "flowproxy")
NODE_RULES = """
key_prefix "flowproxy/" { policy = "read" }
key_prefix "flowproxy/status/" { policy = "write" }
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
service "flowproxy" { policy = "write" }
agent_prefix "" { policy = "write" }
node_prefix "edge-" { policy = "write" }
"""
OPERATOR_RULES = """
key_prefix "flowproxy/" { policy = "read" }
key_prefix "flowproxy/routes/" { policy = "write" }
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
"""


def make_token(addr: str, master: str, name: str, rules: str) -> str:
    headers = {"X-Consul-Token": master}
    policy = requests.put(f"http://{addr}/v1/acl/policy", headers=headers, timeout=10,
                          json={"Name": name, "Rules": rules})
    policy.raise_for_status()
    token = requests.put(f"http://{addr}/v1/acl/token", headers=headers, timeout=10,
                         json={"Description": name, "Policies": [{"Name": name}]})
    token.raise_for_status()
    return str(token.json()["SecretID"])


@pytest.fixture(scope="module")
def acl_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyNode, ProxyNode, dict[str, str]]]:
    """A Consul server with ACLs (default deny) and a proxy node that holds only the node token."""
    base = tmp_path_factory.mktemp("acl")
    master = str(uuid.uuid4())
    server = start_node(node_spec(base / "server", "acl-server", dev=True, proxy=False, acl_master=master))
    addr = server.node.http_addr()
    requests.put(f"http://{addr}/v1/agent/token/agent", headers={"X-Consul-Token": master},
                 json={"Token": master}, timeout=10).raise_for_status()
    tokens = {"master": master, "node": make_token(addr, master, "flowproxy-node", NODE_RULES),
              "operator": make_token(addr, master, "flowproxy-operator", OPERATOR_RULES)}
    edge = start_node(node_spec(base / "edge", "edge-acl", dev=False, join=(server.serf,), token=tokens["node"]))
    try:
        yield server, edge, tokens
    finally:
        edge.stop()
        server.stop()


def cli(edge: ProxyNode, token: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CONSUL_HTTP_TOKEN"}
    env |= {"CONSUL_HTTP_ADDR": edge.node.http_addr()} | ({"CONSUL_HTTP_TOKEN": token} if token else {})
    return subprocess.run([FLOWPROXY, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def test_nodes_and_operators_work_with_least_privilege_tokens(
        acl_cluster: tuple[ProxyNode, ProxyNode, dict[str, str]]) -> None:
    _, edge, tokens = acl_cluster
    backend = IdentityServer("go-demo-1").start()
    try:
        from flowproxy.consul_io import ConsulStore

        admin = ConsulStore(edge.node.http_addr(), tokens["master"])
        register_instance(admin, "go-demo", "go-demo-1", backend.port)
        done = cli(edge, tokens["operator"], "route", "put", "go-demo", "-v", "live", "-s", "go-demo",
                   "-p", "/demo", "--activate", "--wait", "--timeout", "30")
        assert done.returncode == 0, done.stderr
        assert edge.get("/demo/x").instance == "go-demo-1"  # the node read, applied and reported
        assert edge.node.store().get("flowproxy/status/edge-acl") is not None
        status = cli(edge, tokens["operator"], "status")
        assert status.returncode == 0 and "edge-acl" in status.stdout

        denied = cli(edge, tokens["node"], "route", "put", "go-demo", "-v", "live", "-s", "go-demo", "-p", "/other")
        assert denied.returncode == 3
        assert "denied" in denied.stderr and "Check the ACL token" in denied.stderr
        anonymous = cli(edge, None, "route", "activate", "go-demo", "live")
        assert anonymous.returncode == 3
        entry = admin.get("flowproxy/routes/go-demo/live")
        assert entry is not None and json.loads(entry.value)["paths"] == ["/demo"]  # unchanged
        admin.close()
    finally:
        backend.stop()


def test_no_secret_in_logs_status_or_render(acl_cluster: tuple[ProxyNode, ProxyNode, dict[str, str]]) -> None:
    _, edge, tokens = acl_cluster
    rendered = cli(edge, tokens["operator"], "render", "--maps")
    assert rendered.returncode == 0, rendered.stderr
    status = cli(edge, tokens["operator"], "status", "--json").stdout
    texts = [rendered.stdout, rendered.stderr, status, (edge.settings.data_dir / "handler.log").read_text()]
    texts += [p.read_text(errors="replace") for p in (edge.settings.data_dir / "logs").glob("*.log")]
    for secret in tokens.values():
        assert all(secret not in text for text in texts)
    agent_config = edge.settings.data_dir / "consul-agent.json"
    assert stat.S_IMODE(agent_config.stat().st_mode) == 0o600  # it holds the node token


def test_sockets_are_private(acl_cluster: tuple[ProxyNode, ProxyNode, dict[str, str]]) -> None:
    _, edge, _ = acl_cluster
    s = edge.settings
    assert stat.S_IMODE(s.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(s.haproxy_dir.stat().st_mode) == 0o700
    for sock in (s.master_socket, s.stats_socket):
        mode = stat.S_IMODE(sock.stat().st_mode)
        assert stat.S_ISSOCK(sock.stat().st_mode) and mode & 0o077 == 0, oct(mode)
    config = (s.current / "haproxy.cfg").read_text()
    # The stats page is on the metrics listener: unless the node opens it, a unix socket in the 0700 folder,
    # and without --stats-auth its password is random.
    assert 'bind "${FP_METRICS_BIND}"' in config and 'stats auth "${FP_STATS_AUTH}"' in config
    env = s.haproxy_env()
    assert env["FP_METRICS_BIND"] == f"unix@{s.haproxy_dir / 'metrics.sock'}"
    assert env["FP_STATS_AUTH"].startswith("locked:") and len(env["FP_STATS_AUTH"]) > 30
