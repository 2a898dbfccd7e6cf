"""Fault injection: a key that makes one stage of the pipeline raise is rejected alone, with a reason.

For each stage (parse, validate, plan, render, vet) one key is made to raise an unexpected exception;
the node's own pipeline (`apply.build`, real `haproxy -c`) must still render every other route, name the
key in an `internal error while ...` reason, and produce a config HAProxy accepts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowproxy.core import kv, plan, render
from flowproxy.core.kv import desired_from_kv
from flowproxy.core.model import Instance, KVEntry
from flowproxy.haproxy import certs
from flowproxy.haproxy.master import check_config
from flowproxy.haproxy.release import stage
from flowproxy.pipeline import build
from flowproxy.settings import REPO_TEMPLATES, Settings
from tests.harness import need

P = "flowproxy/"
BAD = "flowproxy/routes/bad/live"


def entries() -> list[KVEntry]:
    out = []
    for name in ("good", "bad", "other"):
        out.append(KVEntry(f"{P}routes/{name}/live", json.dumps({"service": "s", "paths": [f"/{name}"]}).encode()))
        out.append(KVEntry(f"{P}routes/{name}/active", b"live", 5, 5))
    out.append(KVEntry(f"{P}certs/site", b"not a pem"))
    return out


def boom(original: Callable[..., Any], when: Callable[..., bool]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if when(*args, **kwargs):
            raise RuntimeError("injected fault")
        return original(*args, **kwargs)

    return wrapped


Stage = tuple[str, Any, str, Callable[..., bool], str, str]
STAGES: list[Stage] = [
    # (id, module, function, when it raises, the stage's words, the key reported)
    ("parse", kv, "_template", lambda *a: True, "reading", f"{P}templates/t"),
    ("validate", kv, "parse_intent", lambda key, raw: key == BAD, "reading", BAD),
    ("plan", plan, "_inactive_state", lambda route: route.name == "bad", "planning", f"{P}routes/bad/active"),
    ("render", render, "render_backend", lambda env, b, c, memo: b.route == "bad", "rendering", BAD),
    ("vet", certs, "pem_problem", lambda pem: True, "vetting", f"{P}certs/site"),
]


@pytest.mark.parametrize("case", STAGES, ids=[s[0] for s in STAGES])
def test_a_key_that_makes_a_stage_raise_is_rejected_alone(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, case: Stage) -> None:
    _, module, function, when, words, key = case
    haproxy = need("haproxy")
    monkeypatch.setattr(module, function, boom(getattr(module, function), when))
    settings = Settings(node="t", data_dir=tmp_path, templates=REPO_TEMPLATES, haproxy_bin=haproxy).checked()
    items = [*entries(), KVEntry(f"{P}templates/t", b"backend {{ backend.name }}\n")]
    desired = desired_from_kv(P, items, 10)
    built = build(settings, desired, {"s": [Instance("127.0.0.1", 9000)]})
    bundle, planned = built.bundle, built.plan

    states = {s.route: s for s in planned.states}
    reasons = [r for s in planned.states for r in s.reasons] + [str(p) for p in planned.stray]
    expected = f"internal error while {words} {key}: RuntimeError: injected fault"
    assert any(expected in r for r in reasons), reasons
    assert states["good"].state == "serving" and states["other"].state == "serving"
    config = bundle.config.decode()
    assert "backend good:live" in config and "backend other:live" in config
    check_config(haproxy, stage(settings.haproxy_dir, bundle) / "haproxy.cfg", settings.haproxy_env())
