"""Parsing the master socket's `show proc` (as HAProxy 2.6.12 prints it)."""

from __future__ import annotations

import pytest

from flowproxy.errors import HAProxyError
from flowproxy.haproxy import ProcInfo, parse_show_proc

RELOADED = """#<PID>          <type>          <reloads>       <uptime>        <version>
2305            master          1 [failed: 0]   0d00h00m01s     2.6.12-1+deb12u4
# workers
2318            worker          0               0d00h00m01s     2.6.12-1+deb12u4
# old workers
2306            worker          1               0d00h00m05s     2.6.12-1+deb12u4
# programs

"""
FAILED = """#<PID>          <type>          <reloads>       <uptime>        <version>
2305            master          2 [failed: 1]   0d00h00m03s     2.6.12-1+deb12u4
# workers
2318            worker          1               0d00h00m03s     2.6.12-1+deb12u4
# programs

"""


@pytest.mark.parametrize(("text", "expected"), [
    (RELOADED, ProcInfo(2305, 1, 0, (2318,))),
    (FAILED, ProcInfo(2305, 2, 1, ())),  # the surviving worker predates the failed reload
], ids=["reloaded", "failed-reload"])
def test_parse_show_proc(text: str, expected: ProcInfo) -> None:
    assert parse_show_proc(text) == expected


def test_unexpected_answer_is_an_error() -> None:
    with pytest.raises(HAProxyError, match="unexpected `show proc` answer"):
        parse_show_proc("Unknown command\n")
