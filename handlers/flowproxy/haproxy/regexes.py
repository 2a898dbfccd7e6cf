"""Vet regexes with the engine HAProxy compiles them with (PCRE2), so a bad one rejects only its route.

Python's `re` accepts patterns PCRE2 refuses (`[:alpha:]` outside a class, `(?u)`: field notes), and one
such pattern made the whole candidate fail `haproxy -c`. Every regex that reaches a map file or a rewrite
is compiled by a real `haproxy -c`, many in one run: HAProxy stops at the first refused line and names it,
so the run is repeated on the lines after it. Verdicts are cached by pattern, so only new text pays.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from flowproxy import runstate
from flowproxy.errors import HAProxyError
from flowproxy.haproxy.master import check_config
from flowproxy.settings import Settings

CACHE = "regex-verdicts.json"
SHELL = """defaults
    mode http
    timeout connect 5s
    timeout client 5s
    timeout server 5s

# Never started: `haproxy -c` only needs a listener to accept the file.
frontend fp_regex_check
    bind 127.0.0.1:1
    default_backend fp_regex_check

backend fp_regex_check
"""
FIRST_LINE = SHELL.count("\n") + 1
LINE_RE = re.compile(r"\[[^\]]*:(\d+)\]")


def refused(settings: Settings, patterns: Iterable[str]) -> dict[str, str]:
    """pattern -> HAProxy's reason, for every pattern PCRE2 (as HAProxy uses it) refuses."""
    wanted = sorted(set(patterns))
    if not wanted:
        return {}
    verdicts = {str(k): str(v) for k, v in runstate.load(settings.cache_dir, CACHE).items()}
    todo = [p for p in wanted if p not in verdicts]
    while todo:
        bad, why = _first_refused(settings, todo)
        if bad is None:
            verdicts.update(dict.fromkeys(todo, ""))
            break
        verdicts.update(dict.fromkeys(todo[:bad], ""))
        verdicts[todo[bad]] = why
        todo = todo[bad + 1:]
    runstate.save(settings.cache_dir, CACHE, {p: verdicts[p] for p in wanted})
    return {p: verdicts[p] for p in wanted if verdicts[p]}


def _first_refused(settings: Settings, patterns: list[str]) -> tuple[int | None, str]:
    """Index of the first pattern HAProxy refuses, with its words; (None, "") when it takes them all."""
    path = settings.cache_dir / "regex-check.cfg"
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    # Single quotes: HAProxy takes every character literally, and validated patterns hold no quote.
    path.write_text(SHELL + "".join(f"    http-request replace-path '{p}' '/'\n" for p in patterns))
    try:
        check_config(settings.haproxy_bin, path, settings.haproxy_env())
    except HAProxyError as exc:
        text = str(exc)
        found = LINE_RE.search(text)
        index = int(found.group(1)) - FIRST_LINE if found else -1
        if not 0 <= index < len(patterns):
            if len(patterns) == 1:
                return 0, _reason(text)
            # Unmapped: judge one at a time, so an unrelated failure cannot blame the wrong pattern.
            return next(((i, why) for i, p in enumerate(patterns) if (why := _alone(settings, p))), (None, ""))
        return index, _reason(text)
    return None, ""


def _alone(settings: Settings, pattern: str) -> str:
    bad, why = _first_refused(settings, [pattern])
    return why if bad is not None else ""


def _reason(text: str) -> str:
    """PCRE2's own words, `... (at offset N)`; HAProxy's whole alert when it said something else."""
    found = re.search(r"error=(.*?), erroffset=(\d+)", text)
    return f"{found.group(1)} (at offset {found.group(2)})" if found else text.rsplit(" : ", maxsplit=1)[-1][:300]
