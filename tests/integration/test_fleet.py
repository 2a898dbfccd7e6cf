"""A fleet: one Consul server and three proxy nodes (client agents + HAProxy), all on loopback."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.wrk import WrkResult, run_wrk
from flowproxy.backend import IdentityServer
from flowproxy.cli.demo import register_instance
from flowproxy.consul.reads import latest_index
from flowproxy.node.up import wait_for
from flowproxy.probe import fetch
from tests.harness import ProxyNode, need, node_spec, start_node, status_of

FLOWPROXY = str(Path(sys.executable).parent / "flowproxy")
BLUE = json.dumps({"service": "go-demo", "tags": ["blue"], "paths": ["/demo"]})
GREEN = json.dumps({"service": "go-demo", "tags": ["green"], "paths": ["/demo"]})


@dataclass
class Fleet:
    server: ProxyNode
    nodes: list[ProxyNode]
    backends: Callable[[str], IdentityServer]

    def put(self, rel: str, value: str) -> None:
        self.server.store().put("flowproxy/" + rel, value)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "CONSUL_HTTP_ADDR": self.server.node.http_addr()}
        return subprocess.run([FLOWPROXY, *args], env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    def instance(self, name: str, tags: tuple[str, ...]) -> IdentityServer:
        server = self.backends(name)
        register_instance(self.nodes[0].store(), "go-demo", name, server.port, tags=tags)
        return server

    def converge(self, previous: set[str]) -> str:
        """Wait until every node reports one bundle hash (not in `previous`) at the latest KV index."""
        seen: list[dict[str, object]] = []
        latest = latest_index(self.server.store(), "flowproxy/")

        def same() -> bool:
            seen[:] = [status_of(n) for n in self.nodes]
            hashes = {str(s.get("bundle_sha256")) for s in seen}
            indexes = {s.get("kv_index") for s in seen}
            return (len(hashes) == 1 and indexes == {latest} and not hashes & previous
                    and all(s["ok"] for s in seen))

        try:
            wait_for(same, 45, "every node to apply the same config")  # watches, else the 20 s full resync
        except Exception:
            import difflib

            texts = [n.config().decode().splitlines() for n in self.nodes]
            diff = "\n".join(difflib.unified_diff(texts[0], texts[-1], lineterm="", n=0))
            states = [(s.get("kv_index"), str(s.get("bundle_sha256"))[:12]) for s in seen]
            logs = "\n".join(f"--- {n.settings.node} handler.log\n" + "\n".join(
                (n.settings.data_dir / "handler.log").read_text().splitlines()[-8:]) for n in self.nodes)
            raise AssertionError(f"fleet did not converge: {states}\nedge-1 vs edge-3:\n{diff}\n{logs}") from None
        digest = str(seen[0]["bundle_sha256"])
        configs = {n.config() for n in self.nodes}
        assert len(configs) == 1, "haproxy.cfg bytes differ between nodes"
        return digest

    def blue_green(self) -> None:
        """go-demo with a blue and a green instance and variant, blue active, applied everywhere."""
        self.instance("blue-1", ("blue",))
        self.instance("green-1", ("green",))
        self.put("routes/go-demo/blue", BLUE)
        self.put("routes/go-demo/green", GREEN)
        self.put("routes/go-demo/active", "blue")
        self.converge(set())

    def answers(self, path: str, n: int = 12) -> list[tuple[int, frozenset[str]]]:
        """What each node answers: status and the set of instances seen over n requests."""
        out = []
        for node in self.nodes:
            replies = [node.get(path) for _ in range(n)]
            out.append((replies[0].status, frozenset(r.instance for r in replies)))
        return out


@pytest.fixture(scope="module")
def fleet_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyNode, list[ProxyNode]]]:
    base = tmp_path_factory.mktemp("fleet")
    server = start_node(node_spec(base / "server", "consul-server", dev=True, proxy=False))
    nodes: list[ProxyNode] = []
    try:
        for i in (1, 2, 3):
            nodes.append(start_node(node_spec(base / f"edge-{i}", f"edge-{i}", dev=False, join=(server.serf,),
                                              preview=i == 1)))
        yield server, nodes
    finally:
        for node in nodes:
            node.stop()
        server.stop()


@pytest.fixture
def fleet(fleet_nodes: tuple[ProxyNode, list[ProxyNode]],
          backends: Callable[[str], IdentityServer]) -> Iterator[Fleet]:
    server, nodes = fleet_nodes
    f = Fleet(server, nodes, backends)
    yield f
    server.store().delete("flowproxy/routes/", recurse=True)
    agent = nodes[0].store().client.agent  # Fleet.instance registers on edge-1's agent
    for service_id in agent.services():
        if not service_id.startswith("flowproxy-"):
            agent.service.deregister(service_id)


def test_scripted_sequence_converges_everywhere(fleet: Fleet) -> None:
    last: set[str] = set()
    blue = fleet.instance("blue-1", ("blue",))
    green = fleet.instance("green-1", ("green",))
    steps: list[tuple[str, Callable[[], object], tuple[int, set[str]]]] = [
        ("put", lambda: fleet.put("routes/go-demo/blue", BLUE), (404, {""})),
        ("activate", lambda: fleet.put("routes/go-demo/active", "blue"), (200, {"blue-1"})),
        ("scale out", lambda: fleet.instance("blue-2", ("blue",)), (200, {"blue-1", "blue-2"})),
        ("scale in", lambda: fleet.nodes[0].store().client.agent.service.deregister("blue-2"), (200, {"blue-1"})),
        ("stage green", lambda: fleet.put("routes/go-demo/green", GREEN), (200, {"blue-1"})),
        ("check critical", green.unhealthy.set, (200, {"blue-1"})),
        ("check passing", green.unhealthy.clear, (200, {"blue-1"})),
        ("flip", lambda: fleet.put("routes/go-demo/active", "green"), (200, {"green-1"})),
        ("rollback", lambda: fleet.put("routes/go-demo/active", "blue"), (200, {"blue-1"})),
        ("remove", lambda: fleet.server.store().delete("flowproxy/routes/go-demo", recurse=True), (404, {""})),
    ]
    assert blue.port
    for name, action, (status, instances) in steps:
        action()
        last = {fleet.converge(last)}  # every step changes the config, so each waits for a new hash
        answers = fleet.answers("/demo/x")
        assert answers == [(status, frozenset(instances))] * 3, f"after {name}: {answers}"


def test_preview_reaches_any_variant_and_the_public_listener_never_does(fleet: Fleet) -> None:
    fleet.blue_green()
    edge = fleet.nodes[0]
    preview = f"http://{edge.settings.preview_bind}"
    wait_for(lambda: fetch(preview + "/demo/x", variant="green").instance == "green-1", 20, "green in preview")
    assert {fetch(preview + "/demo/x", variant="green").instance for _ in range(10)} == {"green-1"}
    assert {fetch(edge.url + "/demo/x", variant="green").instance for _ in range(20)} == {"blue-1"}
    other = fleet.nodes[1]  # preview off: only a unix socket in its own 0700 folder
    assert (other.settings.haproxy_dir / "preview.sock").exists()
    assert oct(other.settings.haproxy_dir.stat().st_mode & 0o777) == "0o700"


class MasterStats:
    """HTTP response codes per proxy/server from the stats socket, to explain a failed load test."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def codes(self) -> list[str]:
        import socket

        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.path))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        rows = [line.split(",") for line in data.decode().splitlines() if line and not line.startswith("#")]
        return [f"{r[0]}/{r[1]} {r[17]} 2xx={r[40]} 4xx={r[42]} 5xx={r[43]}" for r in rows if len(r) > 43]


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
def test_flip_and_rollback_under_load_fail_no_request(fleet: Fleet, close: bool) -> None:
    fleet.blue_green()
    edge = fleet.nodes[0]
    need("wrk")
    result: list[WrkResult] = []
    load = threading.Thread(target=lambda: result.append(run_wrk(edge.url + "/demo/x", 8, close=close,
                                                                 count_status=True)))
    load.start()
    time.sleep(1)
    for color in ("green", "blue", "green", "blue"):
        done = fleet.cli("route", "activate", "go-demo", color, "--wait", "--timeout", "20")
        assert done.returncode == 0, done.stderr
        # Once the write is reported applied everywhere, no request reaches the old color.
        assert {n.get("/demo/x").instance for n in fleet.nodes for _ in range(5)} == {f"{color}-1"}
        time.sleep(0.5)
    load.join()
    stats = MasterStats(edge.settings.stats_socket).codes()
    assert result[0].requests > 100
    assert (result[0].non2xx, result[0].socket_errors) == (0, 0), (result[0], stats)


def test_wait_returns_zero_after_convergence_and_names_a_held_back_node(fleet: Fleet) -> None:
    fleet.instance("blue-1", ("blue",))
    done = fleet.cli("route", "put", "go-demo", "-v", "blue", "-s", "go-demo", "-t", "blue", "-p", "/demo",
                     "--activate", "--wait")
    assert done.returncode == 0, done.stderr
    assert "3 proxy node(s) applied KV index" in done.stdout
    assert all(n.get("/demo/x").status == 200 for n in fleet.nodes)

    def all_passing() -> bool:
        rows = json.loads(fleet.cli("status", "--json").stdout)["nodes"]
        return sorted(r["node"] for r in rows if r["health"] == "passing") == ["edge-1", "edge-2", "edge-3"]

    wait_for(all_passing, 30, "all three nodes passing")
    held = fleet.nodes[2]
    lock = os.open(held.settings.run_dir / "apply.lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # its handlers find the lock taken: the node holds back
    try:
        done = fleet.cli("route", "put", "go-demo", "-v", "blue", "-s", "go-demo", "-t", "blue",
                         "-p", "/demo", "-p", "/more", "--wait", "--timeout", "4")
        assert done.returncode == 7
        assert "edge-3 (applied" in done.stderr and "edge-1" not in done.stderr.splitlines()[-1]
        assert "waiting for 1 node(s)" in done.stderr
    finally:
        os.close(lock)
    # Released, the node's supervisor finds the stranded change and applies it by itself.
    held.wait_reply("/more", 200, timeout=20)


def test_a_node_without_its_agent_keeps_serving_shows_stale_then_catches_up(fleet: Fleet) -> None:
    fleet.instance("blue-1", ("blue",))
    fleet.put("routes/go-demo/blue", BLUE)
    fleet.put("routes/go-demo/active", "blue")
    fleet.converge(set())
    lonely = fleet.nodes[1]
    lonely.paused.set()  # its supervisor would revive the agent within a second; keep it down for now
    try:
        agent = lonely.node.procs["consul"]
        agent.kill()
        agent.wait()
        fleet.put("routes/go-demo/blue", json.dumps({"service": "go-demo", "tags": ["blue"], "paths": ["/next"]}))
        fleet.nodes[0].wait_reply("/next", 200)
        assert lonely.get("/demo/x").status == 200  # the last good config keeps serving
        assert lonely.get("/next").status == 404

        def reported_stale() -> bool:
            done = fleet.cli("status", "--json")
            rows = {r["node"]: r for r in json.loads(done.stdout)["nodes"]}
            return not rows["edge-2"]["current"] and rows["edge-2"]["health"] != "passing"

        wait_for(reported_stale, 30, "edge-2 to show as stale and not passing")
        status = fleet.cli("status")
        assert re.search(r"edge-2\s+\S+\s+\d+\s+STALE", status.stdout), status.stdout
        # "converged" means every node is current: one that is down and stale says NOT, with exit 7.
        assert "NOT converged" in status.stdout and status.returncode == 7
    finally:
        lonely.paused.clear()  # the supervisor's next tick restarts the agent, which re-arms its watches
    lonely.wait_reply("/next", 200, timeout=30)
    wait_for(lambda: "fleet converged" in fleet.cli("status").stdout, 30, "the fleet to converge again")


def test_wait_with_no_node_to_wait_for_fails(tmp_path: Path) -> None:
    bare = start_node(node_spec(tmp_path / "bare", "bare", dev=True, proxy=False))
    try:
        env = {**os.environ, "CONSUL_HTTP_ADDR": bare.node.http_addr()}
        put = [FLOWPROXY, "route", "put", "x", "-v", "live", "-s", "x", "-p", "/x", "--activate", "--wait",
               "--timeout", "3"]
        done = subprocess.run(put, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 7, done.stdout + done.stderr
        assert "fewer than --min-nodes 1" in done.stderr and "no node registered" in done.stderr
        allowed = subprocess.run([*put, "--min-nodes", "0"], env=env, capture_output=True, text=True, timeout=60,
                                 check=False)
        assert allowed.returncode == 0, allowed.stderr
    finally:
        bare.stop()


def test_wait_fails_when_the_nodes_reject_the_route(fleet: Fleet) -> None:
    fleet.instance("blue-1", ("blue",))
    done = fleet.cli("route", "put", "bad", "-v", "live", "-s", "go-demo", "-p", "/bad", "--template", "nosuch",
                     "--activate", "--wait")
    assert done.returncode == 9, done.stdout + done.stderr
    for node in ("edge-1", "edge-2", "edge-3"):
        assert f"{node}: flowproxy/routes/bad/live: template: template 'nosuch' is in neither" in done.stderr
    assert fleet.cli("status").returncode == 9
    assert fleet.cli("route", "list").returncode == 9
    assert fleet.cli("route", "list", "--json").returncode == 9


def test_every_node_reports_the_index_of_the_newest_write(fleet: Fleet) -> None:
    fleet.blue_green()
    for i in range(10):  # each write's status writes race the next write's watch events
        fleet.put(f"routes/r{i}/live", json.dumps({"service": "go-demo", "paths": [f"/r{i}/"]}))
        fleet.put(f"routes/r{i}/active", "live")
        fleet.converge(set())
    time.sleep(3)  # every node's status write (and the resyncs) come and go: nothing moves the number
    latest = latest_index(fleet.server.store(), "flowproxy/")
    assert {status_of(n).get("kv_index") for n in fleet.nodes} == {latest}
    status = fleet.cli("status")
    assert status.returncode == 0 and "fleet converged" in status.stdout, status.stdout


def test_wait_is_never_early_across_reloads(fleet: Fleet) -> None:
    """30 rounds of a change that reloads, then `route put --activate --wait`, then a request to every node."""
    fleet.blue_green()
    for r in range(30):
        balance = ("leastconn", "roundrobin")[r % 2]
        fleet.put("routes/go-demo/blue", json.dumps({"service": "go-demo", "tags": ["blue"], "paths": ["/demo"],
                                                     "balance": balance}))
        done = fleet.cli("route", "put", f"r{r}", "-v", "live", "-s", "go-demo", "-t", "blue", "-p", f"/r{r}/",
                         "--activate", "--wait", "--timeout", "60")
        assert done.returncode == 0, done.stdout + done.stderr
        for node in fleet.nodes:
            reply = node.get(f"/r{r}/x")
            assert (reply.status, reply.instance) == (200, "blue-1"), (r, node.settings.node, reply)


def test_once_wait_returns_no_request_reaches_the_old_color(fleet: Fleet) -> None:
    """A keep-alive client sending back to back across the end of a canary (a change that reloads)."""
    fleet.blue_green()
    for _ in range(5):
        late, seen = canary_exit(fleet)
        assert {i for _, i in seen} >= {"blue-1", "green-1"}  # the canary served both before
        assert not late, f"{len(late)} requests after --wait returned reached {set(late)}"


def canary_exit(fleet: Fleet) -> tuple[list[str], list[tuple[float, str]]]:
    """Enter a 50/50 canary, then leave it with --wait while a keep-alive client sends back to back."""
    import http.client

    canary = fleet.cli("route", "activate", "go-demo", "blue=50,green=50", "--wait")
    assert canary.returncode == 0, canary.stderr
    host, port = fleet.nodes[0].settings.http_bind.rsplit(":", 1)
    seen: list[tuple[float, str]] = []
    stop = threading.Event()

    def client() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        while not stop.is_set():
            sent = time.monotonic()
            try:
                conn.request("GET", "/demo/x")
                reply = conn.getresponse()
                reply.read()
                seen.append((sent, reply.getheader("X-Instance", "")))
            except (OSError, http.client.HTTPException):
                conn.close()  # the old worker closed it after its last response: reconnect
                conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.close()

    thread = threading.Thread(target=client)
    thread.start()
    try:
        time.sleep(0.5)
        done = fleet.cli("route", "activate", "go-demo", "blue", "--wait")
        returned = time.monotonic()
        assert done.returncode == 0, done.stderr
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(timeout=10)
    return [instance for sent, instance in seen if sent > returned and instance != "blue-1"], seen


def test_names_that_do_not_exist_and_a_mistyped_service(fleet: Fleet) -> None:
    for args in (("route", "remove", "nosuch"), ("route", "deactivate", "nosuch"),
                 ("route", "activate", "nosuch", "live")):
        done = fleet.cli(*args)
        assert done.returncode == 4, (args, done.stdout, done.stderr)
        assert "nosuch" in done.stderr and "deleted" not in done.stdout
    typo = fleet.cli("route", "put", "typo", "-v", "live", "-s", "go-dmeo", "-p", "/typo")
    assert typo.returncode == 0 and "service 'go-dmeo' has no instance registered" in typo.stderr
