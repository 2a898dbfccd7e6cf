"""Custom-template output read as HAProxy reads it: tables of spellings, then properties over random text."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowproxy.core.fragment_rules import (
    ANYWHERE,
    FILE_ARGS,
    FORBIDDEN_WORDS,
    RULE_ACTIONS,
    SECTION_KEYWORDS,
    SERVER_OPTIONS,
    TokenError,
    fragment_errors,
    sections,
    words,
)
from flowproxy.core.kv import desired_from_kv
from flowproxy.core.model import KVEntry
from flowproxy.core.plan import make_plan
from flowproxy.core.render import Templates, render
from flowproxy.settings import REPO_TEMPLATES

NAME = "api:live"
HEAD = f"backend {NAME}\n"


def spellings(word: str) -> list[str]:
    """Ways to write `word` that HAProxy's tokenizer reads as `word`."""
    first, rest = word[0], word[1:]
    return [word, f'"{word}"', f"'{word}'", f'{first}"{rest}"', f"{first}'{rest}'", f'"{first}"{rest}',
            "".join(f"\\x{ord(c):02x}" for c in word), f"\\x{ord(first):02x}{rest}", f'"\\x{ord(first):02x}{rest}"',
            f"{first}\\{rest[0]}{rest[1:]}" if rest and rest[0] in " #'\"\\" else f'{first}""{rest}']


@pytest.mark.parametrize("keyword", sorted(SECTION_KEYWORDS))
def test_every_section_keyword_in_every_spelling_is_refused(keyword: str) -> None:
    for spelled in spellings(keyword):
        assert words(spelled)[0] == keyword, spelled  # the tokenizer agrees with HAProxy's reading
        for indent in ("", "    ", "\t"):
            text = HEAD + f"{indent}{spelled} evil\n"
            assert fragment_errors(text, NAME), text


FORBIDDEN_IN = [
    *((w, f"http-request {w} x") for w in sorted(ANYWHERE | RULE_ACTIONS)),
    *((w, f"tcp-request content {w} x") for w in sorted(RULE_ACTIONS)),
    *((w, f"http-request return status 200 {w} /etc/passwd") for w in sorted(FILE_ARGS)),
    *((w, f"http-request deny deny_status 403 {w} /etc/passwd") for w in sorted(FILE_ARGS)),
    *((w, f"http-error status 503 {w} /etc/passwd") for w in sorted(FILE_ARGS)),
    *((w, f"server s 127.0.0.1:80 ssl {w} /etc/ssl/private/key.pem") for w in sorted(SERVER_OPTIONS)),
    *((w, f"acl a path {w} /etc/passwd") for w in ("-f", "-M")),
    *((w, f"http-request deny if {{ path {w} /etc/passwd }}") for w in ("-f", "-M")),
]


@pytest.mark.parametrize(("word", "line"), FORBIDDEN_IN, ids=[f"{w}:{line[:20]}" for w, line in FORBIDDEN_IN])
def test_every_forbidden_word_is_refused_where_it_means_something(word: str, line: str) -> None:
    errors = fragment_errors(HEAD + f"    {line}\n", NAME)
    assert errors and (word in errors[0] or "not a backend keyword" in errors[0]), (line, errors)


@pytest.mark.parametrize("word", sorted(FILE_ARGS | SERVER_OPTIONS - {"namespace"}))
def test_the_same_word_as_a_plain_value_is_fine(word: str) -> None:
    """A header value may be the word `file` (a route named `file` sets it in templates/routes/example.j2)."""
    assert fragment_errors(HEAD + f"    http-response set-header X-Route {word}\n", NAME) == []


@pytest.mark.parametrize(("line", "reason"), [
    ('http-response set-header X "${CONSUL_HTTP_TOKEN}"', "'$' (environment expansion)"),
    ("http-response set-header X $HOME", "'$' (environment expansion)"),
    ("http-response set-header X %[env(CONSUL_HTTP_TOKEN)]", "reads the environment"),
    ("http-request set-header X %[path,map(/etc/shadow)]", "reads the environment, files"),
    ("http-request set-map(maps/host_exact.map) a b", "loads files or code"),
    ("option external-check", "option 'external-check' is not allowed"),
    ("external-check command /bin/sh", "is not a backend keyword"),
    ("insecure-fork-wanted", "is not a backend keyword"),
    ("lua-load /tmp/x.lua", "is not a backend keyword"),
    ("http-request lua.run", "reads the environment, files or code"),
    ("filter spoe engine x config /etc/x", "filter 'spoe' is not allowed"),
    ("stats admin if TRUE", "'stats' is not a backend keyword"),
    ("bind :81", "'bind' is not a backend keyword"),
    ("log 10.0.0.1:514 local0", "'log' is not a backend keyword"),
    (".if defined(HOME)", "'.if' is not a backend keyword"),
    ('server s "unclosed', "unclosed \" quote"),
    ("server s \\q", "unsupported escape"),
    ("server s 1.2.3.4:80\x0bglobal", "control character"),
], ids=lambda v: str(v)[:40])
def test_refusals_name_the_line_and_why(line: str, reason: str) -> None:
    errors = fragment_errors(HEAD + f"    {line}\n", NAME)
    assert errors and reason in errors[0], errors


@pytest.mark.parametrize("line", [
    "balance leastconn", "option httpchk GET /health", "http-check expect status 200",
    "timeout server 30s", "server s1 127.0.0.1:8080 check inter 2s weight 10", "http-request set-header X-A b",
    "http-response del-header Server", "acl admin path_beg /admin", "http-request deny if admin",
    "cookie SRV insert indirect nocache", "retries 3", "no option redispatch", "# a comment with global in it",
    "http-request set-header X 'a $b'", "compression algo gzip", "filter compression",
])
def test_ordinary_backend_lines_are_accepted(line: str) -> None:
    assert fragment_errors(HEAD + f"    {line}\n", NAME) == []


def full_config(fragment: str) -> str:
    entries = [KVEntry("flowproxy/routes/api/live", json.dumps({"service": "s", "paths": ["/api"],
                                                                 "template": "t"}).encode()),
               KVEntry("flowproxy/routes/api/active", b"live", 5, 5)]
    plan = make_plan(desired_from_kv("flowproxy/", entries), {})
    bundle, _ = render(plan, Templates(REPO_TEMPLATES), None, {NAME: {"text": fragment}})
    return bundle.config.decode()


BASELINE = sections(full_config(HEAD))
PIECES = sorted(SECTION_KEYWORDS) + sorted(FORBIDDEN_WORDS) + [
    "server", "balance", "option", "http-request", "acl", "backend", NAME, "'", '"', "\\", "\\x67", "#", "$", " ",
    "\t", "\n", "x", "{", "}", "%[env(X)]", ".if", "lua.x", "global", "frontend"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES) | st.text(max_size=6), max_size=30))
def test_no_accepted_fragment_adds_or_changes_a_section(pieces: list[str]) -> None:
    fragment = HEAD + "    " + "".join(pieces) + "\n"
    if fragment_errors(fragment, NAME):
        return  # refused: nothing reaches the config
    assert sections(full_config(fragment)) == BASELINE


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(SECTION_KEYWORDS)), st.lists(st.sampled_from(["", '"', "'", "\\x", ' "" ']),
                                                            min_size=1, max_size=4))
def test_a_section_keyword_spliced_with_quotes_is_never_accepted(keyword: str, splices: list[str]) -> None:
    text = keyword
    for i, piece in enumerate(splices):
        at = (i * 3) % (len(text) + 1)
        text = text[:at] + piece + text[at:]
    try:
        tokens = words(text)
    except TokenError:
        return
    if tokens and tokens[0] == keyword:
        assert fragment_errors(HEAD + text + "\n", NAME)
