"""Check custom-template fragments one by one with `haproxy -c`, so a bad one rejects only its route.

A fragment passes the sandbox and the section rules yet can still hold a directive HAProxy refuses; in
the full config that would stop every update. Verdicts are cached by the fragment's hash (the check costs
~30 ms a fragment), so only new text pays.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from flowproxy import runstate
from flowproxy.errors import HAProxyError
from flowproxy.haproxy.master import check_config
from flowproxy.settings import Settings

CACHE = "fragment-verdicts.json"
SHELL = """defaults
    mode http
    timeout connect 5s
    timeout client 5s
    timeout server 5s
    default-server init-addr last,libc,none

# `haproxy -c` exits 2 for a config without a listener; this one is never started, so never binds.
frontend fp_fragment_check
    bind 127.0.0.1:1

"""


def refused(settings: Settings, fragments: Mapping[str, str]) -> dict[str, str]:
    """backend name -> HAProxy's reason, for each fragment that `haproxy -c` refuses on its own."""
    verdicts: dict[str, str] = dict(runstate.load(settings.cache_dir, CACHE))
    out = {}
    for name, text in sorted(fragments.items()):
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest not in verdicts:
            verdicts[digest] = _check(settings, text)
        if verdicts[digest]:
            out[name] = verdicts[digest]
    live = _live(fragments)
    runstate.save(settings.cache_dir, CACHE, {k: v for k, v in verdicts.items() if k in live})
    return out


def _live(fragments: Mapping[str, str]) -> set[str]:
    return {hashlib.sha256(t.encode()).hexdigest() for t in fragments.values()}


def _check(settings: Settings, text: str) -> str:
    path = settings.cache_dir / "fragment-check.cfg"
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(SHELL + text)
    try:
        check_config(settings.haproxy_bin, path, settings.haproxy_env())
    except HAProxyError as exc:
        return str(exc).replace(str(path), "fragment")
    return ""
