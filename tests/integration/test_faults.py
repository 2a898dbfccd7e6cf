"""Faults, each on a fresh node: the last good config keeps serving, the reason is reported, and the node
recovers by itself. Real Consul, real HAProxy, real backends."""

from __future__ import annotations

import fcntl
import functools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowproxy.backend import IdentityServer
from flowproxy.cli.demo import register_instance
from flowproxy.core.render import Bundle
from flowproxy.errors import HAProxyError
from flowproxy.haproxy import release
from flowproxy.haproxy.deploy import deploy
from flowproxy.haproxy.master import HAProxySocket, ProcInfo, check_config
from flowproxy.node import coalesce
from flowproxy.node.up import wait_for
from flowproxy.settings import REPO_TEMPLATES
from tests.harness import ProxyNode, node_spec, start_node, status_of, wait_applied

FLOWPROXY = str(Path(sys.executable).parent / "flowproxy")


def route(paths: list[str]) -> str:
    return json.dumps({"service": "go-demo", "paths": paths})


@pytest.fixture
def node(tmp_path: Path) -> Iterator[ProxyNode]:
    """A fresh dev node (its own Consul server) serving /demo from go-demo-1, with a private templates copy."""
    shutil.copytree(REPO_TEMPLATES, tmp_path / "templates")
    proxy = start_node(node_spec(tmp_path / "node", "faulty", dev=True, templates=tmp_path / "templates"))
    backend = IdentityServer("go-demo-1").start()
    register_instance(proxy.store(), "go-demo", "go-demo-1", backend.port)
    proxy.store().put("flowproxy/routes/go-demo/live", route(["/demo"]))
    proxy.store().put("flowproxy/routes/go-demo/active", "live")
    proxy.wait_reply("/demo", 200)
    wait_applied(proxy)  # traffic moves first (runtime API), the release files a moment later
    yield proxy
    proxy.stop()
    backend.stop()


def handle(proxy: ProxyNode, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **proxy.settings.env()}
    done: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
        [FLOWPROXY, "handle", *args], env=env, capture_output=True, text=True, timeout=60, check=False, **kwargs)
    return done


def kill_child(proxy: ProxyNode, name: str) -> None:
    """SIGKILL the node's agent or HAProxy, with its supervisor paused so the death stays visible."""
    proxy.paused.set()
    child = proxy.node.procs[name]
    child.kill()
    child.wait()


def serving_hash(proxy: ProxyNode) -> str:
    bundle = release.read_bundle(proxy.settings.current)
    assert bundle is not None
    return bundle.digest


def test_consul_unreachable_during_a_run_keeps_the_config_then_recovers(node: ProxyNode) -> None:
    before = serving_hash(node)
    kill_child(node, "consul")
    done = handle(node)
    assert done.returncode == 3
    assert "apply failed: Consul at" in (node.settings.data_dir / "handler.log").read_text()
    assert node.get("/demo").status == 200 and serving_hash(node) == before
    node.paused.clear()  # the supervisor revives the agent; its watches fire and the node converges
    node.wait(lambda: status_of(node).get("ok") is True, "the node to report ok again", timeout=30)
    node.store().put("flowproxy/routes/go-demo/live", route(["/demo", "/more"]))
    node.wait_reply("/more", 200, timeout=30)


def snapshot(proxy: ProxyNode, verb: str, path: Path) -> None:
    env = {**os.environ, "CONSUL_HTTP_ADDR": proxy.node.http_addr()}
    subprocess.run(["consul", "snapshot", verb, str(path)], env=env, check=True, capture_output=True, timeout=60)


def test_an_empty_answer_never_drops_the_routes(node: ProxyNode, tmp_path: Path) -> None:
    store = node.store()
    store.delete("flowproxy/routes/go-demo/active")
    node.wait_reply("/demo", 404)
    store.delete("flowproxy/routes/", recurse=True)
    snapshot(node, "save", tmp_path / "empty.snap")  # a KV store without routes
    store.put("flowproxy/routes/go-demo/live", route(["/demo"]))
    store.put("flowproxy/routes/go-demo/active", "live")
    node.wait_reply("/demo", 200)
    wait_applied(node)
    before = serving_hash(node)

    snapshot(node, "restore", tmp_path / "empty.snap")  # Consul now answers: no routes, at an older index
    node.wait(lambda: "Consul answered no routes" in str(status_of(node).get("last_error")), "the refusal")
    assert node.get("/demo").status == 200 and serving_hash(node) == before
    assert handle(node).returncode == 8  # refused again, with its own exit code

    # The refusal holds whatever happens to indexes: writes elsewhere move the index Consul answers an
    # empty prefix with, and the supervisor retries the failed apply every few seconds meanwhile.
    for i in range(3):
        store.put(f"elsewhere/bump-{i}", str(i))
        store.put("flowproxy/junk", str(i))
        time.sleep(2.5)
        assert node.get("/demo").status == 200 and serving_hash(node) == before
    assert "Consul answered no routes" in str(status_of(node).get("last_error"))

    done = handle(node, "--accept-empty")  # the operator says the restore was meant
    assert done.returncode == 0, done.stderr
    node.wait_reply("/demo", 404)
    store.delete("flowproxy/junk")


def test_an_empty_table_after_a_restore_is_applied_once_the_fleet_marker_says_so(
        node: ProxyNode, tmp_path: Path) -> None:
    store = node.store()
    store.delete("flowproxy/routes/", recurse=True)  # a real delete: tombstones, applied at once
    node.wait_reply("/demo", 404)
    snapshot(node, "save", tmp_path / "empty.snap")
    store.put("flowproxy/routes/go-demo/live", route(["/demo"]))
    store.put("flowproxy/routes/go-demo/active", "live")
    node.wait_reply("/demo", 200)
    wait_applied(node)
    snapshot(node, "restore", tmp_path / "empty.snap")  # its tombstones are older than what runs
    node.wait(lambda: "Consul answered no routes" in str(status_of(node).get("last_error")), "the refusal")
    assert node.get("/demo").status == 200
    store.put("flowproxy/accept-empty", "restored on purpose")  # the documented fleet-wide override
    node.wait_reply("/demo", 404, timeout=30)
    node.wait(lambda: status_of(node).get("ok") is True, "the node ok again")
    store.delete("flowproxy/accept-empty")


def test_deleting_every_route_is_applied(node: ProxyNode) -> None:
    """A real delete is no empty answer: it applies, and quickly."""
    store = node.store()
    node.wait_reply("/demo", 200)
    store.delete("flowproxy/routes/", recurse=True)
    node.wait_reply("/demo", 404, timeout=15)
    node.wait(lambda: status_of(node).get("ok") is True and not status_of(node).get("routes"), "status: ok, empty")
    store.put("flowproxy/routes/go-demo/live", route(["/demo"]))
    store.put("flowproxy/routes/go-demo/active", "live")
    node.wait_reply("/demo", 200)


def test_the_index_going_backwards_is_applied_not_deduplicated(node: ProxyNode, tmp_path: Path) -> None:
    snapshot(node, "save", tmp_path / "demo.snap")
    node.store().put("flowproxy/routes/go-demo/live", route(["/other"]))
    node.wait_reply("/other", 200)
    newer = int(str(wait_applied(node)["kv_index"]))
    snapshot(node, "restore", tmp_path / "demo.snap")
    node.wait_reply("/demo", 200, timeout=30)  # by the watch, or by the supervisor's anti-entropy check
    assert node.get("/other").status == 404
    node.wait(lambda: int(str(status_of(node).get("kv_index", newer))) < newer, "the older index reported")


def test_haproxy_refusing_the_candidate_keeps_the_old_config(node: ProxyNode) -> None:
    template = node.settings.templates / "haproxy.cfg.j2"
    good = template.read_text()
    template.write_text(good.replace("    default-path config\n", "    default-path config\n    no-such-directive\n"))
    before = serving_hash(node)
    node.store().put("flowproxy/routes/go-demo/live", route(["/demo", "/next"]))
    node.wait(lambda: "haproxy -c refused" in str(status_of(node).get("last_error")), "the refusal")
    assert node.get("/demo").status == 200 and node.get("/next").status == 404
    assert serving_hash(node) == before
    template.write_text(good)  # fixed: the supervisor retries the failed apply by itself
    node.wait_reply("/next", 200, timeout=30)
    node.wait(lambda: status_of(node).get("ok") is True, "the node to report ok")


def test_a_failed_reload_rolls_the_files_back(node: ProxyNode) -> None:
    # The apply lock, as every handler takes it: a reload of theirs in between would confirm ours.
    with socket.create_server(("127.0.0.1", 0)) as blocker, coalesce.try_lock(node.settings.run_dir, wait=True):
        port = int(blocker.getsockname()[1])
        current = release.read_bundle(node.settings.current)
        assert current is not None
        extra = f"\nfrontend fp_extra\n    bind 127.0.0.1:{port}\n    default_backend fp_no_route\n"
        bad = Bundle(dict(current.files) | {"haproxy.cfg": current.config + extra.encode()})
        check_config("haproxy", write_tmp(node, bad), node.settings.haproxy_env())  # -c cannot see it
        failed = HAProxySocket(node.settings.master_socket).show_proc().failed
        with pytest.raises(HAProxyError, match="could not load the new configuration") as caught:
            deploy(node.settings, bad)
        # the reason, in HAProxy's words, reaches the status: not just "see the log"
        assert f"cannot bind socket (Address already in use) for [127.0.0.1:{port}]" in str(caught.value)
        assert HAProxySocket(node.settings.master_socket).show_proc().failed == failed + 1
        assert serving_hash(node) == current.digest  # the files on disk match what runs
        assert node.get("/demo").status == 200
    node.store().put("flowproxy/routes/go-demo/live", route(["/demo", "/after"]))
    node.wait_reply("/after", 200)


def write_tmp(proxy: ProxyNode, bundle: Bundle) -> Path:
    return release.stage(proxy.settings.data_dir / "scratch", bundle) / "haproxy.cfg"


def test_a_handler_killed_mid_apply_never_leaves_a_half_written_config(node: ProxyNode) -> None:
    rng = random.Random(7)
    env = {**os.environ, **node.settings.env()}
    for i in range(20):
        node.store().put("flowproxy/routes/go-demo/live", route(["/demo", f"/k{i}"]))
        proc = subprocess.Popen([FLOWPROXY, "handle"], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        bundle = release.read_bundle(node.settings.current)  # old or new, never a mix
        assert bundle is not None
        check_config("haproxy", node.settings.current / "haproxy.cfg", node.settings.haproxy_env())
        assert node.get("/demo").status == 200
    assert handle(node).returncode == 0
    node.wait_reply("/k19", 200)


def test_a_storm_of_writes_and_an_agent_reload_lose_no_change(node: ProxyNode) -> None:
    before = proc_info(node)
    store = node.store()
    started = time.monotonic()
    for i in range(50):
        # `balance` changes haproxy.cfg itself, so every write needs a real reload (not a map update).
        balance = "leastconn" if i % 2 else "roundrobin"
        store.put("flowproxy/routes/go-demo/live",
                  json.dumps({"service": "go-demo", "paths": ["/demo", f"/s{i}"], "balance": balance}))
    store.reload_agent()  # re-fires every watch at once
    took = time.monotonic() - started
    node.wait_reply("/s49", 200)
    node.wait(lambda: status_of(node).get("kv_index") == store.read_prefix("flowproxy/routes/")[0], "final index")
    after = proc_info(node)
    assert node.get("/s48").status == 404
    assert b"balance leastconn" in (node.settings.current / "haproxy.cfg").read_bytes()  # write 49 won
    assert after.failed == before.failed
    reloads = after.reloads - before.reloads
    assert 1 <= reloads <= 51, reloads  # coalesced, and never more than one a change
    print(f"storm: 50 writes in {took:.2f}s -> {reloads} reloads")


def proc_info(proxy: ProxyNode) -> ProcInfo:
    return HAProxySocket(proxy.settings.master_socket).show_proc_settled()


def test_the_haproxy_master_dying_shows_critical_then_comes_back(node: ProxyNode) -> None:
    before = serving_hash(node)
    kill_child(node, "haproxy")
    node.node.beat()
    env = {**os.environ, "CONSUL_HTTP_ADDR": node.node.http_addr()}
    report = subprocess.run([FLOWPROXY, "status"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert "faulty" in report.stdout and "critical" in report.stdout, report.stdout
    node.paused.clear()  # the supervisor restarts HAProxy with the last good config
    node.wait_reply("/demo", 200)
    assert serving_hash(node) == before
    node.wait(lambda: "critical" not in subprocess.run([FLOWPROXY, "status"], env=env, capture_output=True,
                                                       text=True, check=False).stdout, "passing again")


def with_file_size_limit(argv: list[str]) -> list[str]:
    """`argv` run with writes capped at 2 KiB (a write past it fails with EFBIG, like ENOSPC), set in a
    wrapper that then execs it: no preexec_fn in a process with threads. Ignored signals stay ignored
    across exec."""
    wrapper = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048)); os.execv(sys.argv[1], sys.argv[1:])")
    return [sys.executable, "-c", wrapper, *argv]


def waits_for_a_lock(pid: int) -> bool:
    """The process is blocked on a flock (`->` marks a waiting request in /proc/locks)."""
    return any(line.split()[1:2] == ["->"] and str(pid) in line.split()
               for line in Path("/proc/locks").read_text().splitlines())


def test_a_failed_disk_write_keeps_the_old_config(node: ProxyNode) -> None:
    # The failed run's status write fires the keyprefix watch, and the warm applier (no file size limit)
    # would apply within ~15 ms, before the old config could be looked at. Handler processes take longer.
    assert node.node.applier is not None
    node.node.applier.stop()
    node.paused.set()
    for attempt in range(3):
        before, path = serving_hash(node), f"/disk{attempt}"
        lock = os.open(node.settings.run_dir / "apply.lock", os.O_RDWR)
        fcntl.flock(lock, fcntl.LOCK_EX)  # the watch handlers find the lock taken and leave it to us
        try:
            node.store().put("flowproxy/routes/go-demo/live", route(["/demo", path]))
            time.sleep(1)
            # Ours waits for the lock (a manual run does) before we let go of it.
            ours = subprocess.Popen(with_file_size_limit([FLOWPROXY, "handle"]), text=True,
                                    env={**os.environ, **node.settings.env()}, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
            wait_for(functools.partial(waits_for_a_lock, ours.pid), 20, "our handler to wait for the apply lock")
        finally:
            os.close(lock)
        _, stderr = ours.communicate(timeout=60)
        # Looked at under the lock: the failure's status write fires a watch whose handler (no limit) would
        # apply the change a moment later.
        with coalesce.try_lock(node.settings.run_dir, wait=True):
            if ours.returncode == 0 and node.get(path).status == 200:
                continue  # a watch's handler (without the limit) applied it before ours could: again
            assert ours.returncode == 6, stderr
            assert "cannot write release" in stderr
            assert node.get("/demo").status == 200 and node.get(path).status == 404
            assert serving_hash(node) == before
        break
    else:
        pytest.fail("three times a watch's handler applied the change before ours could")
    node.node.applier.start()
    node.paused.clear()  # the supervisor retries without the limit
    node.wait_reply(path, 200, timeout=30)
