"""The walkthrough of issue #2, step by step, through a real Consul agent, real HAProxy and real backends."""

from __future__ import annotations

import collections
import json
from collections.abc import Callable

from flowproxy.backend import IdentityServer
from tests.harness import ProxyNode, status_of, wait_applied

INTENT = json.dumps({"service": "go-demo", "paths": ["/demo"]})


def put(proxy: ProxyNode, rel: str, value: str) -> None:
    proxy.store().put(proxy.settings.prefix + rel, value)


def spread(proxy: ProxyNode, path: str, n: int) -> collections.Counter[str]:
    return collections.Counter(proxy.get(path).instance for _ in range(n))


def test_step2_a_staged_intent_changes_nothing(proxy: ProxyNode, instances: Callable[..., IdentityServer]) -> None:
    instances("go-demo", "go-demo-1")
    put(proxy, "routes/go-demo/live", INTENT)
    status = wait_applied(proxy)
    assert proxy.get("/demo/hello").status == 404
    assert "go-demo" not in proxy.public_routes()  # a warm backend for previews, but no public route
    assert status["routes"] == {"go-demo": {"state": "off", "variant": None, "reasons": [], "instances": 0,
                                            "notes": []}}


def test_step3_activate_routes_to_the_service(proxy: ProxyNode, instances: Callable[..., IdentityServer]) -> None:
    instances("go-demo", "go-demo-1")
    put(proxy, "routes/go-demo/live", INTENT)
    put(proxy, "routes/go-demo/active", "live")
    reply = proxy.wait_reply("/demo/hello", 200)
    assert json.loads(reply.body) == {"instance": "go-demo-1", "path": "/demo/hello", "host": proxy.url[7:],
                                       "forwarded_for": "127.0.0.1"}
    status = wait_applied(proxy)
    assert status["ok"] is True
    assert status["routes"]["go-demo"]["state"] == "serving"


def test_step4_scaling_is_picked_up_and_critical_instances_get_nothing(
        proxy: ProxyNode, instances: Callable[..., IdentityServer]) -> None:
    first = instances("go-demo", "go-demo-1")
    put(proxy, "routes/go-demo/live", INTENT)
    put(proxy, "routes/go-demo/active", "live")
    proxy.wait_reply("/demo/hello", 200)
    instances("go-demo", "go-demo-2")
    instances("go-demo", "go-demo-3")
    proxy.wait(lambda: len(spread(proxy, "/demo/hello", 6)) == 3, "all three instances to get traffic")
    counts = spread(proxy, "/demo/hello", 30)
    assert counts == {"go-demo-1": 10, "go-demo-2": 10, "go-demo-3": 10}

    first.unhealthy.set()  # its Consul HTTP check goes critical within a second or two
    proxy.wait(lambda: "go-demo-1" not in spread(proxy, "/demo/hello", 6), "the critical instance to leave")
    counts = spread(proxy, "/demo/hello", 30)
    assert counts == {"go-demo-2": 15, "go-demo-3": 15}
    assert b"127.0.0.1:%d" % first.port not in proxy.config()


def test_step5_several_paths(proxy: ProxyNode, instances: Callable[..., IdentityServer]) -> None:
    instances("go-demo", "go-demo-1")
    put(proxy, "routes/go-demo/live", json.dumps({"service": "go-demo", "paths": ["/demo/hello", "/demo/person"]}))
    put(proxy, "routes/go-demo/active", "live")
    proxy.wait_reply("/demo/hello", 200)
    assert proxy.get("/demo/person").status == 200
    assert proxy.get("/demo/other").status == 404


def test_step6_domains_exact_and_wildcard(proxy: ProxyNode, instances: Callable[..., IdentityServer]) -> None:
    instances("go-demo", "go-demo-1")
    put(proxy, "routes/go-demo/live",
        json.dumps({"service": "go-demo", "paths": ["/demo"], "domains": ["my-domain.com", "*.example.com"]}))
    put(proxy, "routes/go-demo/active", "live")
    proxy.wait_reply("/demo/hello", 200, host="my-domain.com")
    assert proxy.get("/demo/hello", "shop.example.com").status == 200
    assert proxy.get("/demo/hello", "other.com").status == 404
    assert proxy.get("/demo/hello").status == 404  # Host is the proxy's own address


def test_step7_deactivate_keeps_variants_then_remove(
        proxy: ProxyNode, instances: Callable[..., IdentityServer]) -> None:
    instances("go-demo", "go-demo-1")
    put(proxy, "routes/go-demo/live", INTENT)
    put(proxy, "routes/go-demo/active", "live")
    proxy.wait_reply("/demo/hello", 200)

    proxy.store().delete(proxy.settings.prefix + "routes/go-demo/active")
    reply = proxy.wait_reply("/demo/hello", 404)
    assert reply.body == "flowproxy: no route for this request"
    assert proxy.store().get(proxy.settings.prefix + "routes/go-demo/live") is not None
    # Traffic moves first (runtime API), the release files a moment later: wait for the files too.
    proxy.wait(lambda: "go-demo" not in proxy.public_routes(), "the release files to drop the route")

    put(proxy, "routes/go-demo/active", "live")
    proxy.wait_reply("/demo/hello", 200)
    proxy.store().delete(proxy.settings.prefix + "routes/go-demo", recurse=True)
    proxy.wait_reply("/demo/hello", 404)
    status = wait_applied(proxy)
    assert "go-demo" not in status["routes"]
    # Its backend, emptied, may stay in the running file until the next reload: no map points at it.
    maps = "".join(p.read_text() for p in (proxy.settings.current / "maps").glob("*.map"))
    assert "go-demo" not in maps


def test_step8_custom_templates_from_kv_and_from_the_folder(
        proxy: ProxyNode, instances: Callable[..., IdentityServer]) -> None:
    instances("go-demo", "go-demo-1")
    kv_template = ("backend {{ backend.name }}\n    http-response set-header X-From-KV {{ backend.service }}\n"
                   "{% for s in backend.servers %}    server {{ s.name }} {{ s.endpoint }}\n{% endfor %}")
    put(proxy, "templates/tagged", kv_template)
    put(proxy, "routes/kv/live", json.dumps({"service": "go-demo", "paths": ["/kv"], "template": "tagged"}))
    put(proxy, "routes/kv/active", "live")
    put(proxy, "routes/file/live", json.dumps({"service": "go-demo", "paths": ["/file"], "template": "example"}))
    put(proxy, "routes/file/active", "live")
    proxy.wait_reply("/kv", 200)
    proxy.wait_reply("/file", 200)
    import urllib.request

    with urllib.request.urlopen(proxy.url + "/kv") as resp:
        assert resp.headers["X-From-KV"] == "go-demo"
    with urllib.request.urlopen(proxy.url + "/file") as resp:
        assert resp.headers["X-Flowproxy-Route"] == "file"


def test_bad_intent_is_rejected_alone_and_reported(proxy: ProxyNode, instances: Callable[..., IdentityServer]) -> None:
    instances("go-demo", "go-demo-1")
    put(proxy, "routes/go-demo/live", INTENT)
    put(proxy, "routes/go-demo/active", "live")
    put(proxy, "routes/broken/live", '{"service": "go-demo", "paths": ["nope"]}')
    put(proxy, "routes/broken/active", "live")
    proxy.wait_reply("/demo/hello", 200)
    status = wait_applied(proxy)
    broken = status["routes"]["broken"]
    assert broken["state"] == "rejected"
    assert broken["reasons"] == ['flowproxy/routes/broken/live: paths[0]: \'nope\' must start with "/"']
    assert status_of(proxy)["ok"] is True


def test_activations_flips_and_switching_off_warm_variants_reload_nothing(
        proxy: ProxyNode, instances: Callable[..., IdentityServer]) -> None:
    from flowproxy.haproxy.master import HAProxySocket

    instances("go-demo", "blue-1", ("blue",))
    instances("go-demo", "green-1", ("green",))
    put(proxy, "routes/go-demo/blue", json.dumps({"service": "go-demo", "tags": ["blue"], "paths": ["/demo"]}))
    put(proxy, "routes/go-demo/green", json.dumps({"service": "go-demo", "tags": ["green"], "paths": ["/demo"]}))
    wait_applied(proxy)
    before = HAProxySocket(proxy.settings.master_socket).show_proc()
    def serves(instance: str) -> Callable[[], bool]:
        return lambda: proxy.get("/demo/x").instance == instance

    for color in ("blue", "green", "blue"):
        put(proxy, "routes/go-demo/active", color)
        proxy.wait(serves(f"{color}-1"), f"{color} to serve")
    proxy.store().delete("flowproxy/routes/go-demo/active")
    proxy.wait_reply("/demo/x", 404)
    wait_applied(proxy)
    after = HAProxySocket(proxy.settings.master_socket).show_proc()
    assert (after.reloads, after.workers) == (before.reloads, before.workers)  # same worker all along
    assert "go-demo" not in proxy.public_routes()  # and the files say what runs


def test_instances_coming_and_going_reload_nothing(proxy: ProxyNode,
                                                  instances: Callable[..., IdentityServer]) -> None:
    """Membership goes through `add server`/`del server`; the files say what runs, so a reload changes nothing."""
    from flowproxy.haproxy.master import HAProxySocket

    first = instances("go-demo", "go-demo-1")
    put(proxy, "routes/go-demo/live", INTENT)
    put(proxy, "routes/go-demo/active", "live")
    proxy.wait_reply("/demo/x", 200)
    wait_applied(proxy)
    master = HAProxySocket(proxy.settings.master_socket)
    before = master.show_proc()
    second = instances("go-demo", "go-demo-2")
    proxy.wait(lambda: set(spread(proxy, "/demo/x", 4)) == {"go-demo-1", "go-demo-2"}, "both instances to serve")
    proxy.store().deregister_service("go-demo-1")
    proxy.wait(lambda: set(spread(proxy, "/demo/x", 4)) == {"go-demo-2"}, "only the second instance to serve")
    wait_applied(proxy)
    after = master.show_proc()
    assert (after.reloads, after.workers) == (before.reloads, before.workers)
    running = HAProxySocket(proxy.settings.stats_socket).command(
        f"show servers state {proxy.running_backend('go-demo:live')}")
    assert f"127.0.0.1:{second.port}" in running and f"127.0.0.1:{first.port}" not in running
    assert f":{first.port}" not in proxy.config().decode() and f":{second.port}" in proxy.config().decode()
    master.reload()  # what the files say is what ran
    assert set(spread(proxy, "/demo/x", 4)) == {"go-demo-2"}
