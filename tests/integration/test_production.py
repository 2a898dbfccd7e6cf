"""The production layout, as a host runs it: flowproxy installed from its wheel into a fresh venv, a Consul
client agent (ACLs, gossip encryption, HTTPS with a CA made here) joined to a separate server, HAProxy, and
`flowproxy node run`, each started independently from the units' own ExecStartPre/ExecStart lines and
EnvironmentFile (paths and ports substituted; there is no systemd here).

Then what a user does and what goes wrong: the walkthrough, a blue-green flip with --wait, `kill -9` of the
flowproxy process (the watches keep applying through the cold path; it comes back and takes over), a
Consul agent restart, and a missed watch event repaired by the node's resync.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from bench.parts import free_port
from flowproxy.backend import IdentityServer
from flowproxy.node.up import wait_for
from tests.acme_ca import Pebble, start_pebble
from tests.harness import NODE_RULES, OPERATOR_RULES, need

REPO = Path(__file__).resolve().parents[2]
OPS = REPO / "ops"


def unit(name: str) -> dict[str, list[str]]:
    """The [Service] settings of an ops/systemd unit: key -> every value, in order."""
    out: dict[str, list[str]] = {}
    for line in (OPS / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@dataclass
class Host:
    """One machine's folders, mapped into a temporary root, and the processes started from the units."""

    root: Path
    venv: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    env_file: dict[str, str] = field(default_factory=dict)

    def path(self, text: str) -> str:
        """A unit's absolute paths, moved under the test root; binaries to where they are installed."""
        text = text.replace("/opt/flowproxy/venv", str(self.venv))
        for folder in ("/etc/flowproxy", "/etc/consul.d", "/var/lib/flowproxy"):
            text = text.replace(folder, str(self.root) + folder)
        return text.replace("/usr/bin/consul", need("consul")).replace("/usr/sbin/haproxy", need("haproxy"))

    def environment(self, spec: dict[str, list[str]]) -> dict[str, str]:
        env = {"HOME": str(self.root), "LANG": "C.UTF-8", "PATH": os.environ["PATH"]}
        env |= self.env_file
        for assignment in spec.get("Environment", []):
            key, value = assignment.split("=", 1)
            env[key] = self.path(value)
        if os.geteuid() == 0:  # what the unit's User=flowproxy does: HAProxy's workers never run as root
            env |= {"FP_USER": "nobody", "FP_GROUP": "nogroup"}
        return env

    def run_unit(self, name: str, key: str, extra: dict[str, str] | None = None) -> None:
        spec = unit(f"{name}.service")
        env = self.environment(spec) | (extra or {})
        for pre in spec.get("ExecStartPre", []):
            done = subprocess.run(shlex.split(self.path(pre)), env=env, capture_output=True, text=True,
                                  timeout=60, check=False)
            assert done.returncode == 0, done.stdout + done.stderr
        (argv,) = spec["ExecStart"]
        log = open(self.root / f"{key}.log", "ab")  # noqa: SIM115 - lives with the process
        self.procs[key] = subprocess.Popen(shlex.split(self.path(argv)), env=env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, key: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(key, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Production:
    host: Host
    server: subprocess.Popen[bytes]
    api: str  # the client agent's HTTPS API
    ca: str
    tokens: dict[str, str]
    http: str  # the proxy listener
    notify: socket.socket
    acme: Pebble  # the ACME CA the node's settings name
    https: str  # the HTTPS listener

    def flowproxy(self, *args: str, token: str = "operator") -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ["PATH"], "CONSUL_HTTP_ADDR": self.api, "CONSUL_CACERT": self.ca,
               "CONSUL_TLS_SERVER_NAME": "localhost", "CONSUL_HTTP_TOKEN": self.tokens[token]}
        return subprocess.run([str(self.host.venv / "bin" / "flowproxy"), *args], env=env, capture_output=True,
                              text=True, timeout=90, check=False)

    def admin(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        reply = requests.request(method, f"{self.api}{path}", verify=self.ca, timeout=10,
                                 headers={"X-Consul-Token": self.tokens["master"]}, **kwargs)
        reply.raise_for_status()
        return reply

    def get(self, path: str) -> tuple[int, str]:
        try:
            reply = requests.get(f"http://{self.http}{path}", timeout=5)
        except requests.RequestException:
            return 0, ""
        return reply.status_code, reply.headers.get("X-Instance", "")

    def wait_get(self, path: str, status: int, instance: str = "", timeout: float = 30) -> None:
        seen: list[tuple[int, str]] = []

        def ok() -> bool:
            seen[:] = [self.get(path)]
            return seen[0][0] == status and (not instance or seen[0][1] == instance)

        try:
            wait_for(ok, timeout, f"{path} -> {status} {instance}")
        except Exception:
            logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                             for p in sorted(self.host.root.glob("*.log")))
            raise AssertionError(f"{path} never answered {status} {instance}; last {seen}\n{logs}") from None

    def notified(self, what: bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if what in self.notify.recv(4096):
                    return
            except TimeoutError:
                continue
        raise AssertionError(f"systemd was never told {what!r}")


def make_tls(folder: Path) -> None:
    """CA, server and client certificates as `consul tls` makes them (names as in ops/consul.d/agent.json)."""
    folder.mkdir(parents=True)
    consul = need("consul")
    for args in (["ca", "create"], ["cert", "create", "-server", "-dc", "dc1"],
                 ["cert", "create", "-client", "-dc", "dc1"]):
        subprocess.run([consul, "tls", *args], cwd=folder, check=True, capture_output=True, timeout=60)


def install(root: Path) -> Path:
    """`ops/install.sh` into `root` from a wheel of this checkout, into a fresh venv: the package must carry
    everything (templates, watch config, `flowproxy-watch`). Returns the venv."""
    dist = root.parent / "dist"
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "wheel", "--no-deps", "-w",
                    str(dist), str(REPO)], check=True, timeout=300, capture_output=True)
    (wheel,) = dist.glob("flowproxy-*.whl")
    env = {**os.environ, "FLOWPROXY_ROOT": str(root)}
    # An upgrade: the whole-prefix watch of earlier versions gives way to the config folders' watches.
    watch = root / "etc" / "consul.d" / "flowproxy.json"
    watch.parent.mkdir(parents=True)
    watch.write_text(json.dumps({"watches": [{"type": "keyprefix", "prefix": "flowproxy/",
                                              "args": ["flowproxy-watch", "keyprefix"]}]}, indent=2))
    done = subprocess.run(["bash", str(OPS / "install.sh"), str(wheel)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert watch.read_text() == (OPS / "consul.d" / "flowproxy.json").read_text()
    assert watch.with_suffix(".json.old").exists()
    return root / "opt" / "flowproxy" / "venv"


def start_server(base: Path, tls: Path, key: str, master: str) -> tuple[subprocess.Popen[bytes], int]:
    serf, https = free_port(), free_port()
    config = {"datacenter": "dc1", "server": True, "bootstrap_expect": 1, "node_name": "consul-server",
              "data_dir": str(base / "server-data"), "bind_addr": "127.0.0.1", "client_addr": "127.0.0.1",
              "ports": {"http": -1, "https": https, "serf_lan": serf, "serf_wan": -1, "server": free_port(),
                        "dns": -1, "grpc": -1},
              "encrypt": key, "ca_file": str(tls / "consul-agent-ca.pem"),
              "cert_file": str(tls / "dc1-server-consul-0.pem"), "key_file": str(tls / "dc1-server-consul-0-key.pem"),
              "verify_incoming_rpc": True, "verify_outgoing": True, "verify_server_hostname": True,
              "performance": {"raft_multiplier": 1},
              "acl": {"enabled": True, "default_policy": "deny", "tokens": {"master": master, "agent": master}}}
    (base / "server.json").write_text(json.dumps(config))
    log = open(base / "server.log", "ab")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen([need("consul"), "agent", "-config-file", str(base / "server.json")], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    api = f"https://127.0.0.1:{https}"

    def leader() -> bool:
        try:
            return bool(requests.get(f"{api}/v1/status/leader", verify=str(tls / "consul-agent-ca.pem"),
                                     timeout=2).json())
        except (requests.RequestException, ValueError):
            return False

    wait_for(leader, 60, "the Consul server to elect itself")
    return proc, serf


def make_token(api: str, ca: str, master: str, name: str, rules: str) -> str:
    headers = {"X-Consul-Token": master}
    # A leader answers 500 for a moment after its election, while it sets up the ACL system: an operator
    # would try again, so does this (CI saw it once).
    answers: list[requests.Response] = []

    def policy_made() -> bool:
        answers[:] = [requests.put(f"{api}/v1/acl/policy", headers=headers, verify=ca, timeout=10,
                                   json={"Name": name, "Rules": rules})]
        return answers[0].status_code < 500

    wait_for(policy_made, 30, f"the ACL system to create policy {name}")
    answers[0].raise_for_status()
    reply = requests.put(f"{api}/v1/acl/token", headers=headers, verify=ca, timeout=10,
                         json={"Description": name, "Policies": [{"Name": name}]})
    reply.raise_for_status()
    return str(reply.json()["SecretID"])


def client_config(host: Host, serf: int, key: str, tokens: dict[str, str]) -> int:
    """/etc/consul.d as install.sh left it, filled in as an operator would; returns the HTTPS port."""
    etc = host.root / "etc" / "consul.d"
    https = free_port()
    config = json.loads((etc / "agent.json").read_text())
    config |= {"retry_join": [f"127.0.0.1:{serf}"], "bind_addr": "127.0.0.1", "encrypt": key, "node_name": "edge-1"}
    config["ports"] |= {"https": https, "serf_lan": free_port(), "server": free_port(), "serf_wan": -1}
    config["acl"]["tokens"] = {"agent": tokens["master"], "default": tokens["node"]}
    text = host.path(json.dumps(config, indent=2))
    (etc / "agent.json").write_text(text)
    for line in (OPS / "tmpfiles.d" / "flowproxy.conf").read_text().splitlines():
        if line.startswith("d "):  # what systemd-tmpfiles does at boot
            Path(host.path(line.split()[1])).mkdir(parents=True, exist_ok=True)
    return https


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Production]:
    need("consul")
    need("haproxy")
    base = tmp_path_factory.mktemp("production")
    host = Host(base / "host", install(base / "host"))
    tls = host.root / "etc" / "consul.d" / "tls"
    make_tls(tls)
    ca = str(tls / "consul-agent-ca.pem")
    key = subprocess.run([need("consul"), "keygen"], capture_output=True, text=True, check=True).stdout.strip()
    master = "11111111-2222-4333-8444-555555555555"
    server, serf = start_server(base, tls, key, master)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        server_api = "https://127.0.0.1:" + re.findall(r'"https": (\d+)', (base / "server.json").read_text())[0]
        tokens = {"master": master, "node": make_token(server_api, ca, master, "flowproxy-node", NODE_RULES),
                  "operator": make_token(server_api, ca, master, "flowproxy-operator", OPERATOR_RULES)}
        https = client_config(host, serf, key, tokens)
        (host.root / "etc" / "flowproxy").mkdir(parents=True, exist_ok=True)
        (host.root / "etc" / "flowproxy" / "consul-token").write_text(tokens["node"] + "\n")
        http_port = free_port()
        http, https_bind = f"127.0.0.1:{http_port}", f"127.0.0.1:{free_port()}"
        acme_ca = start_pebble(base / "ca", http_port, 3600)
        env = dict(line.split("=", 1) for line in (OPS / "flowproxy.env").read_text().splitlines()
                   if "=" in line and not line.startswith("#") and not line.startswith("FP_"))
        env = {k: host.path(v) for k, v in env.items()} | {
            "FLOWPROXY_HTTP_BIND": http, "FLOWPROXY_HTTPS_BIND": https_bind, "FLOWPROXY_METRICS_BIND": "",
            "FLOWPROXY_TCP_HOST": "127.0.0.1", "CONSUL_HTTP_ADDR": f"https://127.0.0.1:{https}",
            "FLOWPROXY_ACME_DIRECTORY": acme_ca.directory, "FLOWPROXY_ACME_CA_BUNDLE": str(acme_ca.ca_bundle),
            "FLOWPROXY_ACME_AGREE_TOS": "true", "FLOWPROXY_ACME_EMAIL": "ops@example.test"}
        fp = subprocess.run([str(host.venv / "bin" / "flowproxy"), "node", "env"],
                            env=env | {"PATH": os.environ["PATH"]}, capture_output=True, text=True, check=True,
                            timeout=60).stdout
        host.env_file = env | dict(line.split("=", 1) for line in fp.splitlines() if "=" in line)
        notify.bind(str(base / "notify.sock"))
        notify.settimeout(1.0)
        host.run_unit("flowproxy-consul", "consul")
        host.run_unit("flowproxy-haproxy", "haproxy")
        host.run_unit("flowproxy", "flowproxy", {"NOTIFY_SOCKET": str(base / "notify.sock")})
        prod = Production(host, server, f"https://127.0.0.1:{https}", ca, tokens, http, notify, acme_ca, https_bind)
        prod.notified(b"READY=1", timeout=60)
        yield prod
    finally:
        for name in ("flowproxy", "consul", "haproxy"):
            host.stop(name, signal.SIGINT if name == "consul" else signal.SIGTERM)
        server.send_signal(signal.SIGINT)
        server.wait(timeout=15)
        notify.close()
        if "acme_ca" in locals():
            acme_ca.stop()


def dashboard_shows_green(prod: Production) -> None:
    """The dashboard and its API, from the wheel, behind HAProxy's metrics listener (a unix socket here)."""
    assert dashboard_get(prod, "/api/routes", "ops:wrong")[0] == 401
    status_code, body = dashboard_get(prod, "/api/routes")
    demo = next(r for r in json.loads(body)["routes"] if r["route"] == "go-demo")
    assert status_code == 200 and demo["state"] == "serving"
    assert {v["variant"]: v["role"] for v in demo["variants"]} == {"blue": "staged", "green": "serving"}
    status_code, body = dashboard_get(prod, "/api/nodes")  # with the node's own least-privilege token
    assert status_code == 200 and [(n["node"], n["health"]) for n in json.loads(body)["nodes"]] == [
        ("edge-1", "passing")]
    assert all(dashboard_get(prod, path)[0] == 200 for path in ("/dashboard", "/dashboard/app.js"))


def dashboard_get(prod: Production, path: str, auth: str = "ops:CHANGE-ME") -> tuple[int, bytes]:
    """GET on the metrics listener (a unix socket in the data folder), with the stats credentials."""
    sock = prod.host.root / "var" / "lib" / "flowproxy" / "haproxy" / "metrics.sock"
    token = base64.b64encode(auth.encode()).decode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(sock))
        conn.sendall(f"GET {path} HTTP/1.0\r\nHost: edge\r\nAuthorization: Basic {token}\r\n\r\n".encode())
        answer = b"".join(iter(lambda: conn.recv(65536), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def register(prod: Production, name: str, port: int, tags: list[str]) -> None:
    prod.admin("PUT", "/v1/agent/service/register", json={
        "Name": "go-demo", "ID": name, "Address": "127.0.0.1", "Port": port, "Tags": tags,
        "Check": {"TCP": f"127.0.0.1:{port}", "Interval": "1s"}})


def node_passing(prod: Production) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return bool(prod.admin("GET", "/v1/health/service/flowproxy?passing=1").json())
        except requests.RequestException:
            return False  # the agent is (re)starting

    return check


def test_the_installed_units_pass_systemd_analyze_verify(production: Production, tmp_path: Path) -> None:
    """The units as install.sh laid them out, their paths moved into the test's root (systemd checks that
    every ExecStart is an executable file)."""
    host = production.host
    installed = sorted((host.root / "etc" / "systemd" / "system").glob("flowproxy*.service"))
    assert [p.name for p in installed] == ["flowproxy-consul.service", "flowproxy-haproxy.service", "flowproxy.service"]
    for path in installed:
        (tmp_path / path.name).write_text(host.path(path.read_text()))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "flowproxy" not in done.stderr, done.stdout + done.stderr


def test_production_layout_end_to_end(production: Production) -> None:
    prod = production
    blue, green = IdentityServer("blue-1").start(), IdentityServer("green-1").start()
    try:
        register(prod, "blue-1", blue.port, ["blue"])
        register(prod, "green-1", green.port, ["green"])
        wait_for(node_passing(prod), 30, "the node registered and passing")
        wait_for(lambda: len(prod.admin("GET", "/v1/health/service/go-demo?passing=1").json()) == 2, 30,
                 "Consul's checks of both instances to pass")
        status = prod.flowproxy("status")
        assert "edge-1" in status.stdout and "unregistered" not in status.stdout, status.stdout + status.stderr

        # The walkthrough and a blue-green flip, each with --wait, as a pipeline would.
        put = prod.flowproxy("route", "put", "go-demo", "-v", "blue", "-s", "go-demo", "-t", "blue", "-p", "/demo",
                             "--activate", "--wait", "--timeout", "60")
        assert put.returncode == 0, put.stdout + put.stderr
        assert prod.get("/demo/x") == (200, "blue-1")
        staged = prod.flowproxy("route", "put", "go-demo", "-v", "green", "-s", "go-demo", "-t", "green", "-p", "/demo",
                                "--wait", "--timeout", "60")
        assert staged.returncode == 0, staged.stderr
        assert prod.get("/demo/x") == (200, "blue-1")
        flip = prod.flowproxy("route", "activate", "go-demo", "green", "--wait", "--timeout", "60")
        assert flip.returncode == 0, flip.stderr
        assert prod.get("/demo/x") == (200, "green-1")

        dashboard_shows_green(prod)

        # kill -9 of the flowproxy process: the agent's watches apply through the cold path meanwhile.
        prod.host.stop("flowproxy", signal.SIGKILL)
        back = prod.flowproxy("route", "activate", "go-demo", "blue")
        assert back.returncode == 0, back.stderr
        prod.wait_get("/demo/x", 200, "blue-1")
        prod.host.run_unit("flowproxy", "flowproxy", {"NOTIFY_SOCKET": str(prod.host.root.parent / "notify.sock")})
        prod.notified(b"READY=1", timeout=60)
        flip = prod.flowproxy("route", "activate", "go-demo", "green", "--wait", "--timeout", "60")
        assert flip.returncode == 0, flip.stderr
        assert prod.get("/demo/x") == (200, "green-1")

        # The agent restarts (its watches with it); changes keep landing.
        prod.host.stop("consul", signal.SIGINT)
        prod.host.run_unit("flowproxy-consul", "consul")
        wait_for(node_passing(prod), 60, "the node passing again after the agent restart")
        # A restarted agent registers its services again with their checks critical until the first run.
        wait_for(lambda: len(prod.admin("GET", "/v1/health/service/go-demo?passing=1").json()) == 2, 30,
                 "Consul's checks of both instances to pass again")
        moved = prod.flowproxy("route", "put", "go-demo", "-v", "green", "-s", "go-demo", "-t", "green",
                               "-p", "/demo", "-p", "/after-restart", "--wait", "--timeout", "60")
        assert moved.returncode == 0, moved.stderr
        assert prod.get("/after-restart/x") == (200, "green-1")

        # A missed event: the routes' watches are taken away, a route changes, and the resync applies it
        # and gives the agent its watches back.
        watch = prod.host.root / "var" / "lib" / "flowproxy" / "consul.d" / "flowproxy-routes.json"
        watch.unlink()
        prod.admin("PUT", "/v1/agent/reload")
        missed = prod.flowproxy("route", "put", "go-demo", "-v", "green", "-s", "go-demo", "-t", "green",
                                "-p", "/demo", "-p", "/missed")
        assert missed.returncode == 0, missed.stderr
        prod.wait_get("/missed/x", 200, "green-1", timeout=60)
        wait_for(watch.exists, 30, "the node to write its routes' watches again")
        again = prod.flowproxy("route", "put", "go-demo", "-v", "green", "-s", "go-demo", "-t", "green",
                               "-p", "/demo", "-p", "/watched", "--wait", "--timeout", "10")
        assert again.returncode == 0, again.stderr
        assert prod.get("/watched/x") == (200, "green-1")
    finally:
        blue.stop()
        green.stop()


def test_acme_certificates_with_the_least_privilege_tokens(production: Production) -> None:
    """An operator opts a route in with `route put --acme`; the node process (wheel-installed, node token of
    the documented policy) gets the certificate from the CA and HAProxy serves it; the operator's token
    reads the state but not the account's key."""
    import ssl

    from flowproxy.core import acme

    prod = production
    shop = IdentityServer("shop-1").start()
    try:
        prod.admin("PUT", "/v1/agent/service/register", json={
            "Name": "shop", "ID": "shop-1", "Address": "127.0.0.1", "Port": shop.port,
            "Check": {"TCP": f"127.0.0.1:{shop.port}", "Interval": "1s"}})
        put = prod.flowproxy("route", "put", "shop", "-v", "live", "-s", "shop", "-d", "shop.example.test",
                             "--acme", "--activate", "--wait", "--timeout", "60")
        assert put.returncode == 0, put.stdout + put.stderr
        context = ssl.create_default_context(cadata=prod.acme.root())
        host, port = prod.https.rsplit(":", 1)
        seen: list[str] = []

        def served() -> bool:
            try:
                with socket.create_connection((host, int(port)), timeout=3) as raw, \
                        context.wrap_socket(raw, server_hostname="shop.example.test") as tls:
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: shop.example.test\r\nConnection: close\r\n\r\n")
                    seen[:] = [tls.recv(4096).decode(errors="replace")]
                    return True
            except (OSError, ssl.SSLError) as exc:
                seen[:] = [repr(exc)]
                return False

        try:
            wait_for(served, 60, "the node to serve a certificate from the ACME CA")
        except Exception:
            raise AssertionError(f"{seen}\n{(prod.host.root / 'flowproxy.log').read_text()[-3000:]}") from None
        assert seen[0].startswith("HTTP/1.1 200") and "shop-1" in seen[0], seen
        status = prod.flowproxy("status")
        name = acme.cert_name(("shop.example.test",))
        assert name in status.stdout and "Pebble Intermediate" in status.stdout, status.stdout + status.stderr
        account = f"/v1/kv/flowproxy/acme/accounts/{acme.account_id(prod.acme.directory)}"
        assert prod.admin("GET", account).status_code == 200  # it exists ...
        denied = requests.get(f"{prod.api}{account}", verify=prod.ca, timeout=10,
                              headers={"X-Consul-Token": prod.tokens["operator"]})
        assert denied.status_code in (403, 404), denied.status_code  # ... and the operator cannot read it
    finally:
        shop.stop()
