"""capacity: health checks beyond HAProxy's open-file limit are refused by route, running routes first."""

from __future__ import annotations

import json
import resource
import subprocess

import pytest

from flowproxy.core.kv import desired_from_kv
from flowproxy.core.model import Instance, KVEntry
from flowproxy.core.plan import Plan, make_plan
from flowproxy.errors import UsageError
from flowproxy.haproxy import capacity
from flowproxy.settings import Settings

P = "flowproxy/"
THREADS = 2


def plan_of(routes: dict[str, tuple[int, bool]]) -> Plan:
    """Routes by name: (instances of its own service, whether HAProxy checks them)."""
    entries: list[KVEntry] = []
    health: dict[str, list[Instance]] = {}
    for i, (name, (count, check)) in enumerate(sorted(routes.items())):
        intent = {"service": name, "paths": [f"/{name}"], "check": check}
        entries += [KVEntry(f"{P}routes/{name}/live", json.dumps(intent).encode(), 2 * i + 1, 2 * i + 1),
                    KVEntry(f"{P}routes/{name}/active", b"live", 2 * i + 2, 2 * i + 2)]
        health[name] = [Instance("127.0.0.1", 20000 + n) for n in range(count)]
    return make_plan(desired_from_kv(P, entries), health)


def limit_for(room: int, min_connections: int = 10) -> int:
    """The open-file limit that leaves `room` descriptors for health checks (no TCP routes)."""
    return room + capacity.FIXED_LISTENERS + capacity.PER_THREAD * THREADS + 2 * min_connections


@pytest.mark.parametrize(("routes", "room", "running", "refused"), [
    ({"a": (3, True), "b": (3, True)}, 6, set(), set()),
    ({"a": (3, True), "b": (3, True)}, 5, set(), {"b"}),
    ({"a": (3, True), "b": (3, True)}, 5, {"b"}, {"a"}),
    ({"a": (4, True), "b": (1, True), "c": (2, True)}, 3, set(), {"a"}),
    ({"a": (50, False), "b": (2, True)}, 2, set(), set()),
    ({"a": (2, True), "b": (2, True), "c": (2, True)}, 1, {"c"}, {"a", "b", "c"}),
], ids=["fits-exactly", "newest-by-name-out", "running-kept", "smaller-ones-fill-in", "unchecked-free",
        "none-fits"])
def test_refused(routes: dict[str, tuple[int, bool]], room: int, running: set[str], refused: set[str]) -> None:
    plan = plan_of(routes)
    names = {b.route: b.name for b in plan.backends}
    out = capacity.refused(plan, limit_for(room), 10, THREADS, {names[r] for r in running})
    assert {b.route for b in plan.backends if b.name in out} == refused
    assert capacity.fits(plan, limit_for(room), 10, THREADS) == (not refused)
    for name, reason in out.items():
        route = next(b.route for b in plan.backends if b.name == name)
        assert reason.startswith(f"{P}routes/{route}/live: node capacity: ")
        assert f"under its limit of {limit_for(room)} open files" in reason


def test_reason_names_the_remedies() -> None:
    plan = plan_of({"a": (5, True)})
    (reason,) = capacity.refused(plan, limit_for(2), 10, THREADS, set()).values()
    assert "5 health-checked servers would leave HAProxy fewer than 10 connections" in reason
    assert "LimitNOFILE" in reason and "FLOWPROXY_MIN_CONNECTIONS" in reason and '"check": false' in reason


def test_tcp_ports_count_as_listeners() -> None:
    entries = [KVEntry(f"{P}routes/db/live", json.dumps({"service": "db", "mode": "tcp", "port": 15432}).encode()),
               KVEntry(f"{P}routes/db/active", b"live", 2, 2)]
    plan = make_plan(desired_from_kv(P, entries), {"db": [Instance("127.0.0.1", 5432)]})
    assert capacity.budget(plan, 1000, 10, THREADS) == capacity.budget(plan_of({}), 1000, 10, THREADS) - 1


def test_hard_limit_of_a_real_process() -> None:
    """The limit read from /proc is the one the kernel enforces on that process."""
    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (900, 1234))

    child = subprocess.Popen(["sleep", "30"], preexec_fn=lower)  # noqa: PLW1509 (no threads to race here)
    try:
        assert capacity.hard_limit(child.pid) == 1234
    finally:
        child.kill()
        child.wait()
    assert capacity.hard_limit(None) > 0
    assert capacity.hard_limit(2**22 + 7) == capacity.hard_limit(None)  # no such process: its own


@pytest.mark.parametrize(("value", "expected"), [
    ("", 1000), ("250", 250), ("1", 1),
], ids=["default", "set", "smallest"])
def test_min_connections_setting(value: str, expected: int) -> None:
    settings = Settings.from_env({"FLOWPROXY_MIN_CONNECTIONS": value})
    assert settings.min_connections == expected
    assert Settings.from_env(settings.env()).min_connections == expected  # carried to the handlers


@pytest.mark.parametrize("value", ["0", "many", "-5"], ids=["zero", "word", "negative"])
def test_min_connections_refused_by_name(value: str) -> None:
    with pytest.raises(UsageError, match="FLOWPROXY_MIN_CONNECTIONS"):
        Settings.from_env({"FLOWPROXY_MIN_CONNECTIONS": value})


@pytest.mark.parametrize(("text", "count"), [
    ("backend a:live\n    balance roundrobin\n    server 127.0.0.1:1 127.0.0.1:1 check inter 2s fall 2 rise 1\n", 1),
    ("backend a:live\n    server s1 127.0.0.1:1 weight 3 check inter 5s fall 2 rise 1\n"
     "    server s2 127.0.0.1:2 weight 3 check\n", 2),
    ("backend a:live\n    server s1 127.0.0.1:1\n    server s2 127.0.0.1:2 weight 4\n", 0),
    ("backend a:live\n    # server s0 127.0.0.1:1 check\n    option httpchk\n", 0),
], ids=["one", "two-with-weights", "unchecked", "comment-and-httpchk"])
def test_checks_in_rendered_sections(text: str, count: int) -> None:
    assert capacity.checks_in({"a:live": text, "b:live": text}, ["a:live", "gone:live"]) == count


def test_checks_in_agrees_with_the_plan() -> None:
    """The incremental path counts rendered sections; the vet stage counts the plan: the same number."""
    from flowproxy.core.render import Templates, render_pieces
    from flowproxy.settings import REPO_TEMPLATES

    plan = plan_of({"a": (3, True), "b": (2, False), "c": (1, True)})
    pieces = render_pieces(plan, Templates(REPO_TEMPLATES, {}))
    assert capacity.checks_in(pieces.fragments, pieces.fragments) == capacity.need(plan) == 4
