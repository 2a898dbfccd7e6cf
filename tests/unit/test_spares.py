"""spares.place: a route added between reloads lands in a spare backend, so the runtime API can serve it;
anything else the runtime API cannot do is a reload, with its reason. Real renders of real plans."""

from __future__ import annotations

import json
from typing import Any

import pytest

from flowproxy.core.kv import desired_from_kv
from flowproxy.core.model import Instance, KVEntry
from flowproxy.core.plan import make_plan
from flowproxy.core.render import SLOTS_MAP, Bundle, Templates, render
from flowproxy.haproxy.runtime import Reload, plan_change, sections
from flowproxy.haproxy.spares import place
from flowproxy.settings import REPO_TEMPLATES
from tests.scenarios import P

HEALTH = {"web": [Instance("10.0.1.1", 80, tags=("blue",)), Instance("10.0.1.2", 80, tags=("green",))],
          "api": [Instance("10.0.2.1", 8080)], "db": [Instance("10.0.3.1", 5432)]}


def fresh(intents: dict[str, dict[str, Any]], active: dict[str, str] | None = None,
          health: dict[str, list[Instance]] | None = None) -> Bundle:
    """route -> intent of its variant `live` (or {variant: intent} under the key `variants`)."""
    entries = []
    for name, intent in sorted(intents.items()):
        variants = intent.get("variants", {"live": intent})
        for variant, body in variants.items():
            entries.append(KVEntry(f"{P}routes/{name}/{variant}", json.dumps(body).encode(), 1, 1))
        entries.append(KVEntry(f"{P}routes/{name}/active", (active or {}).get(name, "live").encode(), 2, 2))
    plan = make_plan(desired_from_kv(P, entries), HEALTH if health is None else health)
    return render(plan, Templates(REPO_TEMPLATES))[0]


WEB = {"service": "web", "paths": ["/web"]}
API = {"service": "api", "paths": ["/api"]}
CANARY = {"variants": {"blue": {"service": "web", "tags": ["blue"], "paths": ["/can"]},
                       "green": {"service": "web", "tags": ["green"], "paths": ["/can"]}}}


def backend(bundle: Bundle, name: str) -> list[str]:
    return next(body for head, body in sections(bundle.config.decode()) if head == f"backend {name}")


def test_a_new_plain_route_lands_in_a_spare_and_needs_no_reload() -> None:
    before = fresh({"web": WEB})
    after = place(fresh({"web": WEB, "api": API}), before)
    assert isinstance(after, Bundle)
    assert after.files[SLOTS_MAP] == b"fp_spare_http_00 api:live\n"
    assert "    server 10.0.2.1:8080 10.0.2.1:8080 check inter 2s fall 2 rise 1" in backend(after, "fp_spare_http_00")
    assert after.files["maps/path_beg.map"] == b"/api fp_spare_http_00\n/web web:live\n"
    commands = plan_change(before, after)
    assert not isinstance(commands, Reload)
    assert commands[0] == "add server fp_spare_http_00/10.0.2.1:8080 10.0.2.1:8080 check inter 2s fall 2 rise 1"
    assert commands[-3:] == ["add map maps/path_beg.map /api fp_spare_http_00",
                             "add map maps/preview_path_beg.map live~/api fp_spare_http_00",
                             "add map maps/slots.map fp_spare_http_00 api:live"]


def test_a_held_route_follows_its_instances_then_frees_its_spare_when_removed() -> None:
    start = fresh({"web": WEB})
    held = place(fresh({"web": WEB, "api": API}), start)
    assert isinstance(held, Bundle)
    moved = place(fresh({"web": WEB, "api": API}, health=HEALTH | {"api": [Instance("10.0.2.9", 8080)]}), held)
    assert isinstance(moved, Bundle)
    assert plan_change(held, moved) == [
        "add server fp_spare_http_00/10.0.2.9:8080 10.0.2.9:8080 check inter 2s fall 2 rise 1",
        "set server fp_spare_http_00/10.0.2.9:8080 addr 10.0.2.9 port 8080",
        "enable health fp_spare_http_00/10.0.2.9:8080", "set server fp_spare_http_00/10.0.2.9:8080 state ready",
        "set server fp_spare_http_00/10.0.2.1:8080 state maint", "del server fp_spare_http_00/10.0.2.1:8080"]
    gone = place(fresh({"web": WEB}), moved)
    assert isinstance(gone, Bundle)
    assert gone == start  # the spare is free again: the files are the fresh render's, byte for byte


def test_a_removed_route_keeps_its_empty_section_until_the_next_reload() -> None:
    before = fresh({"web": WEB, "api": API})
    after = place(fresh({"web": WEB}), before)
    assert isinstance(after, Bundle)
    assert [line for line in backend(after, "api:live") if "server" in line] == []
    # Out of the maps first, then its servers: requests meanwhile get 404, never a 503.
    assert plan_change(before, after) == ["del map maps/path_beg.map /api",
                                          "del map maps/preview_path_beg.map live~/api",
                                          "set server api:live/10.0.2.1:8080 state maint",
                                          "del server api:live/10.0.2.1:8080"]
    back = place(fresh({"web": WEB, "api": API}), after)
    assert back == before  # the route comes back into its own section


def test_a_canary_starts_and_ends_in_a_spare() -> None:
    before = fresh({"can": CANARY}, {"can": "blue"})
    started = place(fresh({"can": CANARY}, {"can": "blue=90,green=10"}), before)
    assert isinstance(started, Bundle)
    assert started.files[SLOTS_MAP] == b"fp_spare_http_00 can::canary\n"
    assert not isinstance(plan_change(before, started), Reload)
    ended = place(fresh({"can": CANARY}, {"can": "green"}), started)
    assert isinstance(ended, Bundle) and not isinstance(plan_change(started, ended), Reload)
    assert ended.files[SLOTS_MAP] == b""


def test_an_sni_route_lands_in_a_tcp_spare() -> None:
    sni = {"service": "db", "mode": "sni", "domains": ["db.example.test"]}
    after = place(fresh({"web": WEB, "db": sni}), fresh({"web": WEB}))
    assert isinstance(after, Bundle)
    assert after.files[SLOTS_MAP] == b"fp_spare_tcp_00 db:live\n"
    assert after.files["maps/sni.map"] == b"db.example.test fp_spare_tcp_00\n"


RELOADS = [
    ("own-settings", {"web": WEB, "api": API | {"timeout_server": "5s"}},
     "new backend api:live (settings other than servers)"),
    ("tcp-listener", {"web": WEB, "db": {"service": "db", "mode": "tcp", "port": 5432}}, "new frontend fp_tcp_5432"),
    ("no-spare-left", {"web": WEB} | {f"r{i:02d}": {"service": "api", "paths": [f"/r{i}"]} for i in range(65)},
     "new backend r64:live (no spare backend left)"),
]


@pytest.mark.parametrize(("intents", "why"), [c[1:] for c in RELOADS], ids=[c[0] for c in RELOADS])
def test_what_a_spare_cannot_take_is_a_reload_with_its_reason(intents: dict[str, dict[str, Any]], why: str) -> None:
    assert place(fresh(intents), fresh({"web": WEB})) == Reload(why)


def test_a_spares_own_settings_changing_is_a_reload() -> None:
    held = place(fresh({"web": WEB, "api": API}), fresh({"web": WEB}))
    assert isinstance(held, Bundle)
    later = place(fresh({"web": WEB, "api": API | {"balance": "leastconn"}}), held)
    assert isinstance(later, Bundle)
    assert plan_change(held, later) == Reload("backend fp_spare_http_00: settings other than its servers changed")


PEM = {name: f"-----BEGIN CERTIFICATE-----\n{name}\n-----END CERTIFICATE-----\n".encode() for name in "abc"}


def with_certs(*names: str) -> Bundle:
    return render(make_plan(desired_from_kv(P, []), {}), Templates(REPO_TEMPLATES), {n: PEM[n] for n in names})[0]


CERTS = [
    ("added-last", ("a", "b"), ("a", "b", "c"), "certs/a.pem\ncerts/b.pem\ncerts/c.pem\n",
     ["new ssl cert certs/c.pem", "set ssl cert certs/c.pem <<\n-----BEGIN CERTIFICATE-----\nc\n"
      "-----END CERTIFICATE-----\n", "commit ssl cert certs/c.pem", "add ssl crt-list certs.list certs/c.pem"]),
    ("removed", ("a", "b", "c"), ("a", "c"), "certs/a.pem\ncerts/c.pem\n",
     ["del ssl crt-list certs.list certs/b.pem", "del ssl cert certs/b.pem"]),
    # A new first name would change what clients without SNI get: HAProxy's order is the file's.
    ("new-default", ("b", "c"), ("a", "b", "c"), "certs/a.pem\ncerts/b.pem\ncerts/c.pem\n",
     Reload("the certificate for clients without SNI changes (['certs/b.pem'] -> ['certs/a.pem'])")),
    ("default-removed", ("a", "b"), ("b",), "certs/b.pem\n",
     Reload("the certificate for clients without SNI changes (['certs/a.pem'] -> ['certs/b.pem'])")),
]


@pytest.mark.parametrize(("before", "after", "listed", "expected"), [c[1:] for c in CERTS], ids=[c[0] for c in CERTS])
def test_certificates_come_and_go_through_the_crt_list(before: tuple[str, ...], after: tuple[str, ...], listed: str,
                                                       expected: list[str] | Reload) -> None:
    running = with_certs(*before)
    target = place(with_certs(*after), running)
    assert isinstance(target, Bundle)
    assert target.files["certs.list"] == listed.encode()
    assert plan_change(running, target) == expected


def test_a_certificate_added_then_another_keeps_the_running_order() -> None:
    running = place(with_certs("a", "c"), with_certs("a"))
    assert isinstance(running, Bundle)
    target = place(with_certs("a", "b", "c"), running)
    assert isinstance(target, Bundle)
    assert target.files["certs.list"] == b"certs/a.pem\ncerts/c.pem\ncerts/b.pem\n"
    commands = plan_change(running, target)
    assert not isinstance(commands, Reload) and commands[-1] == "add ssl crt-list certs.list certs/b.pem"
