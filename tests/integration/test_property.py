"""Property: whatever lands in KV, an accepted intent renders a config that `haproxy -c` accepts and that
holds no directive the intent did not ask for (no injected lines, no extra map columns)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flowproxy.core.intent import parse_intent
from flowproxy.core.kv import desired_from_kv
from flowproxy.core.model import Instance, KVEntry
from flowproxy.core.plan import make_plan
from flowproxy.core.render import Bundle, Templates, render
from flowproxy.haproxy import release
from flowproxy.haproxy.master import check_config
from flowproxy.settings import REPO_TEMPLATES, Settings
from tests.harness import need

P = "flowproxy/"
NASTY = " \t\r\n\x00#\"'\\;{}%$é→\u2028"
safe = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,12}", fullmatch=True)
nasty = st.text(alphabet=st.sampled_from(list(NASTY) + list("abc/.-*")), max_size=12)
path = st.one_of(st.from_regex(r"/[A-Za-z0-9._~!$&()*+,;=:@%/-]{0,16}", fullmatch=True), nasty.map(lambda s: "/" + s))
domain = st.one_of(st.from_regex(r"(\*\.)?[a-z0-9]{1,8}\.[a-z]{2,5}", fullmatch=True), nasty)
anything = st.one_of(st.none(), st.booleans(), st.integers(), nasty, st.lists(nasty, max_size=2))

good_path = st.from_regex(r"/[A-Za-z0-9._~!$&()*+,;=:@%/-]{0,16}", fullmatch=True)
good_domain = st.from_regex(r"(\*\.)?[a-z0-9]{1,8}\.[a-z]{2,5}", fullmatch=True)


def injected(good: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid value with one hostile character spliced in: how injections really look."""
    return st.builds(lambda v, i, c: v[:i] + c + v[i:], good, st.integers(0, 20), st.sampled_from(list(NASTY)))
GOOD: dict[str, st.SearchStrategy[Any]] = {
    "paths": st.lists(good_path, min_size=1, max_size=3, unique=True),
    "domains": st.lists(good_domain, min_size=1, max_size=2, unique=True),
    "tags": st.lists(safe, min_size=1, max_size=2, unique=True),
    "path_type": st.sampled_from(["prefix", "exact", "regex"]),
    "balance": st.sampled_from(["roundrobin", "leastconn", "source"]),
    "check": st.booleans(),
    "template": st.just("example"),
}
HOSTILE: dict[str, st.SearchStrategy[Any]] = {
    "service": st.one_of(injected(safe), nasty, anything),
    "paths": st.one_of(st.lists(injected(good_path), min_size=1, max_size=2), st.lists(path, min_size=1), anything),
    "domains": st.one_of(st.lists(injected(good_domain), min_size=1, max_size=2), anything),
    "tags": st.one_of(st.lists(injected(safe), min_size=1, max_size=2), anything),
    "template": st.one_of(injected(safe), nasty),
    "path_type": anything,
    "balance": anything,
    "check": anything,
    "extra": anything,
}


@st.composite
def intents(draw: st.DrawFn) -> dict[str, Any]:
    """A plausible intent with at most one field poisoned by a hostile value, so that many are accepted
    (the property is about accepted ones) and every field gets probed in turn."""
    doc: dict[str, Any] = {"service": draw(safe)}
    for name, good in GOOD.items():
        if draw(st.booleans()):
            doc[name] = draw(good)
    poison = draw(st.sampled_from([None, *HOSTILE]))
    if poison is not None:
        doc[poison] = draw(HOSTILE[poison])
    return doc


ALLOWED_BACKEND_LINES = [
    re.compile(r"backend [a-z0-9][a-z0-9_.-]*:[a-z0-9][a-z0-9_.-]*"),
    re.compile(r"    # flowproxy/routes/[a-z0-9_.-]+/[a-z0-9_.-]+ -> service [A-Za-z0-9_.-]+"),
    re.compile(r"    balance (roundrobin|leastconn|source)"),
    re.compile(r"    # Consistent hashing: the one hash HAProxy allows servers to be added to at run time."),
    re.compile(r"    hash-type consistent"),
    re.compile(r"    server [0-9.:]+ [0-9.:]+( check( inter 2s fall 2 rise 1)?)?"),
    re.compile(r"    http-response set-header X-Flowproxy-Route [a-z0-9_.-]+"),  # templates/routes/example.j2
]


def frame(entries: list[KVEntry]) -> set[str]:
    return set(render(make_plan(desired_from_kv(P, entries), {}), Templates(REPO_TEMPLATES))[0].config.decode()
               .splitlines())


def routes(*intents: dict[str, Any]) -> list[KVEntry]:
    return [KVEntry(f"{P}routes/k{n}/{key}", value.encode(), 1, 1) for n, intent in enumerate(intents)
            for key, value in (("live", json.dumps(intent)), ("active", "live"))]


# The empty render's lines, and the public frontend's steps that come with a route of each kind: the
# frontend looks up only the maps with rows (exact and regex paths, hosts, redirect_from, https_only).
EVERY_KIND = routes(
    {"service": "h", "paths": ["/e"], "path_type": "exact"}, {"service": "h", "paths": ["^/r$"], "path_type": "regex"},
    {"service": "h", "domains": ["e.example"], "paths": ["/e"], "path_type": "exact"},
    {"service": "h", "domains": ["r.example"], "paths": ["^/r$"], "path_type": "regex"},
    {"service": "h", "domains": ["h.example"], "https_only": True, "redirect_from": ["www.h.example"]})
BASELINE = frame([]) | {line for line in frame(EVERY_KIND) if line.startswith("    http-request ")}


def render_one(doc: dict[str, Any]) -> Bundle | None:
    raw = json.dumps(doc).encode()
    intent, problems = parse_intent(f"{P}routes/r/live", raw)
    if intent is None:
        assert problems
        return None
    entries = [KVEntry(f"{P}routes/r/live", raw, 1, 1), KVEntry(f"{P}routes/r/active", b"live", 2, 2)]
    bundle, plan = render(make_plan(desired_from_kv(P, entries), {intent.service: [Instance("127.0.0.1", 9000)]}),
                          Templates(REPO_TEMPLATES))
    (state,) = plan.states
    # A valid template name may name no template at all: that rejects the route at render time, alone.
    assert state.state == "serving" or state.reasons[0].startswith(f"{P}routes/r/live: template: "), state
    return bundle


def assert_no_injection(bundle: Bundle) -> None:
    for line in bundle.config.decode().splitlines():
        assert line in BASELINE or line == "" or any(p.fullmatch(line) for p in ALLOWED_BACKEND_LINES), line
    for name, data in bundle.files.items():
        if name.startswith("maps/"):
            for line in data.decode().splitlines():
                key, backend = line.split(" ")  # exactly two columns: nothing smuggled in
                assert backend == "r:live" and key.isprintable() and key.isascii()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=intents())
def test_accepted_intents_render_configs_haproxy_accepts_with_nothing_injected(doc: dict[str, Any]) -> None:
    need("haproxy")
    bundle = render_one(doc)
    event("accepted" if bundle is not None else "rejected")
    if bundle is None:
        return
    assert_no_injection(bundle)
    folder = Path("/tmp/flowproxy-property")
    check_settings = Settings(data_dir=folder).checked()
    staged = release.stage(check_settings.haproxy_dir, bundle)
    check_config(check_settings.haproxy_bin, staged / "haproxy.cfg", check_settings.haproxy_env())
    release.prune(check_settings.haproxy_dir, keep=2)


SPLICE_FIELDS = ("service", "paths", "domains", "tags", "template")


@st.composite
def spliced(draw: st.DrawFn) -> dict[str, Any]:
    """A valid intent, then one hostile character spliced into one string of one field."""
    doc: dict[str, Any] = {"service": draw(safe), "paths": draw(GOOD["paths"]), "domains": draw(GOOD["domains"]),
                           "tags": draw(GOOD["tags"]), "template": "example"}
    field = draw(st.sampled_from(SPLICE_FIELDS))
    char = draw(st.sampled_from(list(NASTY)))
    value = doc[field]
    target = value[0] if isinstance(value, list) else value
    at = draw(st.integers(0, len(target)))
    poisoned = target[:at] + char + target[at:]
    doc[field] = [poisoned, *value[1:]] if isinstance(value, list) else poisoned
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=spliced())
def test_one_hostile_character_anywhere_never_reaches_the_config(doc: dict[str, Any]) -> None:
    bundle = render_one(doc)
    event("accepted" if bundle is not None else "rejected")
    if bundle is not None:  # only tags may take some characters, and tags never reach the config
        assert_no_injection(bundle)
