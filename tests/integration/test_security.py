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
from flowproxy.cli.demo import register_instance
from tests.harness import NODE_RULES, OPERATOR_RULES, ProxyNode, node_spec, start_node

FLOWPROXY = str(Path(sys.executable).parent / "flowproxy")


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
        from flowproxy.consul.store import ConsulStore

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
    # ...owned by the node's data folder: the same for every command, never in a world-readable file.
    assert s.haproxy_env()["FP_STATS_AUTH"] == env["FP_STATS_AUTH"]
    assert stat.S_IMODE((s.data_dir / "stats-lock").stat().st_mode) == 0o600


def proc_text(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_no_token_anywhere_with_the_agent_away(acl_cluster: tuple[ProxyNode, ProxyNode, dict[str, str]],
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Tokens travel in the X-Consul-Token header only: never in a URL, so never in an error, log or status."""
    _, edge, tokens = acl_cluster
    texts = [proc_text(p.pid, "cmdline") for p in edge.node.procs.values()]  # every process argument
    edge.paused.set()
    agent = edge.node.procs["consul"]
    agent.kill()
    agent.wait()
    try:
        edge.node.beat()  # the health check update fails: its error is logged
        env = {**os.environ, **edge.settings.env(), "CONSUL_HTTP_TOKEN": tokens["node"]}
        for args in (["handle"], ["status", "--json"], ["render"], ["route", "list"]):
            done = subprocess.run([FLOWPROXY, *args], env=env, capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 3, (args, done.stdout, done.stderr)
            assert "Traceback" not in done.stderr
            texts += [done.stdout, done.stderr]
    finally:
        edge.paused.clear()
        edge.wait(lambda: edge.node.procs["consul"].poll() is None, "the agent revived", timeout=30)
        edge.wait(lambda: _rejoined(edge), "the revived agent to rejoin its server", timeout=60)
    texts += [r.getMessage() for r in caplog.records] + [(edge.settings.data_dir / "handler.log").read_text()]
    texts += [p.read_text(errors="replace") for p in (edge.settings.data_dir / "logs").glob("*.log")]
    texts += [p.read_text(errors="replace") for p in (edge.settings.data_dir / "run").glob("*.json")]
    assert any("could not update this node's health check" in t for t in texts)  # the error was there
    for secret in tokens.values():
        assert not [t[:200] for t in texts if secret in t]
        assert "token=" not in "".join(texts)


def _rejoined(edge: ProxyNode) -> bool:
    from flowproxy.errors import FlowproxyError

    try:
        return bool(edge.node.store().leader())
    except FlowproxyError:
        return False


def test_haproxy_workers_are_unprivileged_and_see_no_token(
        acl_cluster: tuple[ProxyNode, ProxyNode, dict[str, str]]) -> None:
    _, edge, tokens = acl_cluster
    from flowproxy.haproxy.master import HAProxySocket

    info = HAProxySocket(edge.settings.master_socket).show_proc_settled()
    assert info.workers
    for pid in info.workers:
        uid = next(line.split()[1] for line in proc_text(pid, "status").splitlines() if line.startswith("Uid:"))
        assert os.geteuid() != 0 or uid != "0", f"HAProxy worker {pid} runs as root"
    for pid in (info.master_pid, *info.workers):
        environ = proc_text(pid, "environ")
        assert environ and "CONSUL_HTTP_TOKEN" not in environ
        assert all(secret not in environ for secret in tokens.values())


def test_a_template_cannot_run_a_command(acl_cluster: tuple[ProxyNode, ProxyNode, dict[str, str]],
                                         tmp_path: Path) -> None:
    """The template that ran `touch` as root on an older main: refused, and nothing ever runs."""
    _, edge, tokens = acl_cluster
    from flowproxy.consul.store import ConsulStore

    marker = tmp_path / "pwned"
    admin = ConsulStore(edge.node.http_addr(), tokens["master"])
    admin.put("flowproxy/templates/rce", f"""backend {{{{ backend.name }}}}
    option external-check
    external-check command /usr/bin/touch
    server x {marker} check inter 200ms
"global"
    external-check
    insecure-fork-wanted
""")
    admin.put("flowproxy/routes/rce/live", json.dumps({"service": "evil", "paths": ["/rce"], "template": "rce"}))
    admin.put("flowproxy/routes/rce/active", "live")

    def refused() -> bool:
        entry = admin.get("flowproxy/status/edge-acl")
        doc = json.loads(entry.value) if entry else {}
        route = (doc.get("routes") or {}).get("rce") or {}
        return route.get("state") == "rejected" and "external-check" in " ".join(route.get("reasons", []))

    edge.wait(refused, "the template refused with its line")
    assert b"external-check" not in (edge.settings.current / "haproxy.cfg").read_bytes()
    assert b"insecure-fork-wanted" not in (edge.settings.current / "haproxy.cfg").read_bytes()
    import time

    time.sleep(2)  # ten check intervals: an external check would have run by now
    assert not marker.exists()
    admin.delete("flowproxy/routes/rce/", recurse=True)
    admin.delete("flowproxy/templates/rce")
    admin.close()
