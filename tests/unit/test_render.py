"""The renderer against golden files, and the guards on custom templates.

Regenerate the golden files after an intended change: FLOWPROXY_UPDATE_GOLDEN=1 pytest tests/unit/test_render.py
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowproxy.core.kv import desired_from_kv
from flowproxy.core.model import KVEntry
from flowproxy.core.plan import Plan, make_plan
from flowproxy.core.render import Bundle, Templates, drop_backends, map_splice, map_text, render
from flowproxy.sandbox.runner import render_plan
from flowproxy.settings import REPO_TEMPLATES
from tests.scenarios import CUSTOM_TEMPLATE, SCENARIOS, P, routes

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def render_with_sandbox(plan: Plan, templates: Templates, certs: dict[str, bytes] | None = None) -> tuple[
        Bundle, Plan]:
    """render() with the custom templates rendered the way a node renders them (the sandbox child)."""
    run_dir = Path(tempfile.mkdtemp(prefix="fp-render-"))
    return render(plan, templates, certs, render_plan(plan, templates, run_dir))


def render_scenario(name: str) -> dict[str, bytes]:
    entries, health = SCENARIOS[name]
    desired = desired_from_kv(P, entries)
    bundle, _ = render_with_sandbox(make_plan(desired, health), Templates(REPO_TEMPLATES, desired.templates),
                                    desired.certs)
    return dict(bundle.files)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_golden(name: str) -> None:
    files = render_scenario(name)
    folder = GOLDEN / name
    if os.environ.get("FLOWPROXY_UPDATE_GOLDEN") == "1":
        for rel, data in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
    expected = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    assert files == expected


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_render_is_deterministic_whatever_the_input_order(name: str) -> None:
    entries, health = SCENARIOS[name]
    shuffled_health = {k: v[::-1] for k, v in reversed(list(health.items()))}
    desired = desired_from_kv(P, entries[::-1])
    plan = make_plan(desired, shuffled_health)
    bundle, _ = render_with_sandbox(plan, Templates(REPO_TEMPLATES, desired.templates), desired.certs)
    assert dict(bundle.files) == render_scenario(name)


BAD_TEMPLATES = [
    ("undefined-variable", "backend {{ backend.name }}\n  server a {{ nothing }}\n", "is undefined"),
    ("syntax-error", "backend {{ backend.name \n", "template:"),
    ("other-section", "backend {{ backend.name }}\nfrontend evil\n  bind :81\n", "opens another section"),
    ("wrong-backend", "backend other\n", "must start with 'backend api:live'"),
    ("crlf-injection", 'backend {{ backend.name }}{{ "\\r" }}\n    {{ "\\x00" }}\n', "control character"),
    ("sandbox-escape", "backend {{ backend.name }}\n# {{ ''.__class__.__mro__ }}\n", "unsafe"),
    ("missing", None, "is in neither KV templates/missing"),
]


@pytest.mark.parametrize(("body", "message"), [c[1:] for c in BAD_TEMPLATES], ids=[c[0] for c in BAD_TEMPLATES])
def test_bad_template_rejects_only_its_route(body: str | None, message: str) -> None:
    name = "missing" if body is None else "t"
    entries = routes({"api": {"service": "s1", "paths": ["/api"], "template": name},
                      "web": {"service": "s1", "paths": ["/web"]}}, {} if body is None else {"t": body})
    desired = desired_from_kv(P, entries)
    bundle, plan = render_with_sandbox(make_plan(desired, {}), Templates(REPO_TEMPLATES, desired.templates))
    states = {s.route: s for s in plan.states}
    assert states["web"].state == "serving"
    assert states["api"].state == "rejected"
    assert states["api"].reasons[0].startswith(f"{P}routes/api/live: template:")
    assert message in states["api"].reasons[0]
    assert b"backend api:live" not in bundle.config and b"api:live" not in b"".join(bundle.files.values())


def test_kv_template_receives_the_default_data() -> None:
    files = render_scenario("templates")
    assert b"http-response set-header X-Custom kv-tpl" in files["haproxy.cfg"]
    assert CUSTOM_TEMPLATE  # the scenario's template, rendered above


def web_plan(active: str) -> Plan:
    entries = [KVEntry(f"{P}routes/web/{color}", json.dumps({"service": "web", "tags": [color], "paths": ["/w"]})
                       .encode()) for color in ("blue", "green")]
    return make_plan(desired_from_kv(P, [*entries, KVEntry(f"{P}routes/web/active", active.encode(), 5, 5)]), {})


@pytest.mark.parametrize(("active", "failed", "state"), [
    ("blue", "web:blue", "rejected"),
    ("blue", "web:green", "serving"),  # a failed preview-only variant leaves the public route alone
    ("blue=90,green=10", "web::canary", "rejected"),
], ids=["serving-variant", "warm-variant", "canary"])
def test_a_failed_backend_rejects_the_route_it_serves(active: str, failed: str, state: str) -> None:
    plan = drop_backends(web_plan(active), {failed: "flowproxy/routes/web/x: refused"})
    assert [(s.route, s.state) for s in plan.states] == [("web", state)]
    assert failed not in {b.name for b in plan.backends} | {c.backend for c in plan.claims}


MAP_KEYS = st.text(st.sampled_from("/ab.~-*:9Z\u00e9"), min_size=1, max_size=6)
MAP_ROWS = st.dictionaries(MAP_KEYS, st.sampled_from(["r:live", "s:blue", "fp_spare_http_00"]), max_size=30)


@settings(max_examples=300, deadline=None)
@given(MAP_ROWS, MAP_ROWS, st.sampled_from(["maps/path_beg.map", "maps/host_exact.map", "maps/path_reg.map"]))
def test_a_spliced_map_file_is_the_rendered_one(before: dict[str, str], after: dict[str, str], name: str) -> None:
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert map_splice(name, map_text(name, before), after, changed) == map_text(name, after)
