"""Which nodes `--wait` waits for, and what it says of each: a table over every health and report state."""

from __future__ import annotations

from typing import Any

import pytest

from flowproxy.cli.fleet import Verdict, WaitPolicy, judge
from flowproxy.core.fleet import NodeView, fleet_exit_code


def doc(index: int, route_state: str = "serving", error: str | None = None) -> dict[str, Any]:
    return {"kv_index": index, "ok": error is None, "last_error": error,
            "routes": {"web": {"state": route_state, "reasons": ["flowproxy/routes/web/live: bad"]
                               if route_state == "rejected" else []}}}


CASES: list[tuple[str, dict[str, str], dict[str, dict[str, Any]], WaitPolicy, Verdict]] = [
    ("passing-applied", {"a": "passing"}, {"a": doc(10)}, WaitPolicy(), Verdict(["a"], [], [], [])),
    ("passing-behind", {"a": "passing"}, {"a": doc(9)}, WaitPolicy(), Verdict([], ["a (applied 9)"], [], [])),
    ("warning-must-apply", {"a": "warning"}, {"a": doc(9)}, WaitPolicy(),
     Verdict([], ["a (applied 9), warning"], [], [])),
    # A node critical during a reload (or whose last apply failed) is waited for, never skipped...
    ("critical-must-apply", {"a": "critical"}, {"a": doc(9, error="boom")}, WaitPolicy(),
     Verdict([], ["a (applied 9, last error: boom), critical"], [], [])),
    # ...unless the user says so, by name.
    ("critical-ignored", {"a": "critical", "b": "passing"}, {"b": doc(10)}, WaitPolicy(ignore_critical=True),
     Verdict(["b"], [], ["a (critical)"], [])),
    ("maintenance-skipped", {"a": "maintenance", "b": "passing"}, {"a": doc(1), "b": doc(10)}, WaitPolicy(),
     Verdict(["b"], [], ["a (maintenance)"], [])),
    ("never-reported", {"a": "passing"}, {}, WaitPolicy(), Verdict([], ["a (never reported)"], [], [])),
    ("gone-named", {"b": "passing"}, {"a": doc(10), "b": doc(10)}, WaitPolicy(),
     Verdict(["b"], [], ["a (gone: a status key, no catalog entry)"], [])),
    ("rejected-route", {"a": "passing"}, {"a": doc(10, "rejected")}, WaitPolicy(),
     Verdict(["a"], [], [], ["a: flowproxy/routes/web/live: bad"])),
    ("no-node", {}, {}, WaitPolicy(), Verdict([], [], [], [])),
]


@pytest.mark.parametrize(("members", "docs", "policy", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_judge(members: dict[str, str], docs: dict[str, dict[str, Any]], policy: WaitPolicy,
               expected: Verdict) -> None:
    assert judge(members, docs, 10, policy, "web") == expected


def view(health: str = "passing", current: bool = True, ok: bool = True, same: bool = True) -> NodeView:
    return NodeView("a", health, 10, "h", ok, None, "-", current, same)


@pytest.mark.parametrize(("rows", "docs", "code"), [
    ([view()], {"a": doc(10)}, 0),
    ([view(current=False)], {"a": doc(9)}, 7),
    ([view(health="critical")], {"a": doc(10)}, 7),
    ([view(ok=False)], {"a": doc(10, error="x")}, 7),
    ([view(same=False)], {"a": doc(10)}, 7),
    ([], {}, 7),
    ([view()], {"a": doc(10, "rejected")}, 9),
    ([view(health="maintenance", current=True)], {"a": doc(10)}, 0),
], ids=["fine", "stale", "critical", "failing", "differs", "no-node", "rejected", "maintenance"])
def test_status_exit_codes(rows: list[NodeView], docs: dict[str, dict[str, Any]], code: int) -> None:
    assert fleet_exit_code(rows, docs) == code


def test_wait_reports_every_nodes_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that rejects first does not cut the wait short: the others' verdicts are reported too."""
    from flowproxy.cli import fleet
    from flowproxy.errors import RejectedByNode

    rounds = iter([{"a": doc(10, "rejected"), "b": doc(9)}, {"a": doc(10, "rejected"), "b": doc(10, "rejected")}])
    monkeypatch.setattr(fleet, "members", lambda store: {"a": "passing", "b": "passing"})
    monkeypatch.setattr(fleet, "read_statuses", lambda store, prefix: next(rounds))
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    with pytest.raises(RejectedByNode) as caught:
        fleet.wait_converged(None, "flowproxy/", 10, 60, lambda line: None, route="web")  # type: ignore[arg-type]
    assert str(caught.value) == ("applied, but rejected: a: flowproxy/routes/web/live: bad; "
                                 "b: flowproxy/routes/web/live: bad")


def test_wait_names_the_silent_nodes_when_time_is_up_after_a_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    from flowproxy.cli import fleet
    from flowproxy.errors import RejectedByNode

    monkeypatch.setattr(fleet, "members", lambda store: {"a": "passing", "b": "passing"})
    monkeypatch.setattr(fleet, "read_statuses", lambda store, prefix: {"a": doc(10, "rejected")})
    with pytest.raises(RejectedByNode) as caught:
        fleet.wait_converged(None, "flowproxy/", 10, 0, lambda line: None, route="web")  # type: ignore[arg-type]
    assert str(caught.value).endswith("; not applied yet: b (never reported)")
