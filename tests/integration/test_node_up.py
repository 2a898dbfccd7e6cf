"""`flowproxy node up` as a user runs it: the agent's addresses kept apart, gossip encryption and TLS, and
a listener another program holds refused instead of silently shared."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from bench.parts import free_port
from flowproxy.node.up import wait_for
from tests.harness import need

FLOWPROXY = str(Path(sys.executable).parent / "flowproxy")


@contextmanager
def node_up(data: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "FLOWPROXY_"))}
    proc = subprocess.Popen([FLOWPROXY, "--data-dir", str(data), "--node", "edge-up", "node", "up", "--dev", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)


def ports() -> list[str]:
    return ["--consul-http-port", str(free_port()), "--serf-port", str(free_port()), "--server-port", str(free_port())]


def test_a_listener_another_program_holds_is_refused(tmp_path: Path) -> None:
    need("haproxy")
    need("consul")
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as another HAProxy would
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        with node_up(tmp_path / "n", "--http", taken, *ports()) as proc:
            out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert f"--http {taken}: the address is already in use" in out and "Traceback" not in out
    assert not (tmp_path / "n" / "haproxy" / "master.sock").exists()  # nothing was started


def test_encrypted_tls_node_keeps_its_api_on_loopback(tmp_path: Path) -> None:
    consul = need("consul")
    need("haproxy")
    tls = tmp_path / "tls"
    tls.mkdir()
    for args in (["ca", "create"], ["cert", "create", "-server", "-dc", "dc1"]):
        subprocess.run([consul, "tls", *args], cwd=tls, check=True, capture_output=True, timeout=60)
    key = subprocess.run([consul, "keygen"], capture_output=True, text=True, check=True).stdout.strip()
    http_port, http = free_port(), f"127.0.0.1:{free_port()}"
    ca = str(tls / "consul-agent-ca.pem")
    args = ["--bind", "127.0.0.2", "--client", "127.0.0.1", "--encrypt", key, "--tls-ca", ca,
            "--tls-cert", str(tls / "dc1-server-consul-0.pem"), "--tls-key", str(tls / "dc1-server-consul-0-key.pem"),
            "--http", http, "--consul-http-port", str(http_port), "--serf-port", str(free_port()),
            "--server-port", str(free_port())]
    with node_up(tmp_path / "n", *args) as proc:
        api = f"https://127.0.0.1:{http_port}"

        def up() -> bool:
            try:
                return bool(requests.get(f"{api}/v1/catalog/service/flowproxy", verify=ca, timeout=2).json())
            except (requests.RequestException, ValueError):
                return proc.poll() is not None

        wait_for(up, 60, "the node registered over HTTPS")
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        me = requests.get(f"{api}/v1/agent/self", verify=ca, timeout=5).json()
        assert me["Stats"]["serf_lan"]["encrypted"] == "true"
        assert me["Member"]["Addr"] == "127.0.0.2"  # the cluster reaches serf where it was bound
        with socket.socket() as probe:  # while the HTTP API is not on the LAN (bind) address
            assert probe.connect_ex(("127.0.0.2", http_port)) != 0
        with socket.socket() as probe:  # and plain HTTP is not served at all
            probe.settimeout(5)
            probe.connect(("127.0.0.1", http_port))
            probe.sendall(b"GET /v1/agent/self HTTP/1.0\r\n\r\n")
            assert not probe.recv(100).startswith(b"HTTP/1.0 200")
        env = {"PATH": os.environ["PATH"], "CONSUL_HTTP_ADDR": api, "CONSUL_CACERT": ca}
        status = subprocess.run([FLOWPROXY, "status"], env=env, capture_output=True, text=True, timeout=60,
                                check=False)
        assert "edge-up" in status.stdout, status.stdout + status.stderr


def test_joining_a_remote_cluster_from_loopback_is_refused(tmp_path: Path) -> None:
    """An agent bound to 127.0.0.1 would advertise 127.0.0.1 to a remote cluster: refused before anything
    starts (no traffic leaves loopback)."""
    done = subprocess.run([FLOWPROXY, "--data-dir", str(tmp_path), "node", "up", "--join", "10.0.0.5:8301"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "give --bind <this host's LAN address>" in done.stderr
    assert not (tmp_path / "haproxy").exists()


def test_demo_walks_through_under_the_prefix_it_is_given(tmp_path: Path) -> None:
    """`flowproxy --prefix P demo` writes its routes under P, the prefix its node watches: a demo that
    wrote under the default prefix would never see its route served, and fail at step 3."""
    need("consul"), need("haproxy")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "FLOWPROXY_"))}
    done = subprocess.run([FLOWPROXY, "--prefix", "teams/edge/", "--data-dir", str(tmp_path / "demo"), "demo",
                           "--no-keep-running", "--http", f"127.0.0.1:{free_port()}", *ports()],
                          env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "consul kv put teams/edge/routes/go-demo/active live" in done.stdout
    assert "flowproxy/routes" not in done.stdout and "The walkthrough worked" in done.stdout
