"""runtime_commands: map-only differences become Runtime API commands; everything else needs a reload."""

from __future__ import annotations

import pytest

from flowproxy.render import Bundle
from flowproxy.runtime import MAX_COMMANDS, runtime_commands

CFG = b"frontend f\n"


def bundle(cfg: bytes = CFG, **maps: str) -> Bundle:
    files = {"haproxy.cfg": cfg} | {f"maps/{k}.map": v.encode() for k, v in maps.items()}
    return Bundle(files)


CASES = [
    ("activate", bundle(path_beg=""), bundle(path_beg="/demo r:live\n"), ["add map maps/path_beg.map /demo r:live"]),
    ("deactivate", bundle(path_beg="/demo r:live\n"), bundle(path_beg=""), ["del map maps/path_beg.map /demo"]),
    ("flip", bundle(path_beg="/demo r:blue\n"), bundle(path_beg="/demo r:green\n"),
     ["set map maps/path_beg.map /demo r:green"]),
    ("several-maps", bundle(path_beg="/a x:1\n", host_exact=""), bundle(path_beg="", host_exact="a.io/ x:1\n"),
     ["add map maps/host_exact.map a.io/ x:1", "del map maps/path_beg.map /a"]),
    ("config-changed", bundle(path_beg=""), bundle(b"frontend g\n", path_beg="/a x:1\n"), None),
    ("regex-map-changed", bundle(path_reg=""), bundle(path_reg="^/a x:1\n"), None),
    ("map-file-added", bundle(path_beg=""), bundle(path_beg="", host_beg=""), None),
    ("semicolon-in-key", bundle(path_beg=""), bundle(path_beg="/a;b x:1\n"), None),
    ("too-many", bundle(path_beg=""), bundle(path_beg="".join(f"/r{i} x:1\n" for i in range(MAX_COMMANDS + 1))), None),
]


@pytest.mark.parametrize(("old", "new", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_runtime_commands(old: Bundle, new: Bundle, expected: list[str] | None) -> None:
    assert runtime_commands(old, new) == expected
