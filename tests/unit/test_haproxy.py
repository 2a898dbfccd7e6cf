"""Parsing what HAProxy 2.6.12 prints: the master socket's `show proc`, and its log's alerts."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest

from flowproxy.errors import HAProxyError
from flowproxy.haproxy.master import ProcInfo, parse_show_proc, recent_alerts

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
    (RELOADED, ProcInfo(2305, 1, 0, (2318,), (2306,))),
    (FAILED, ProcInfo(2305, 2, 1, ())),  # the surviving worker predates the failed reload
], ids=["reloaded", "failed-reload"])
def test_parse_show_proc(text: str, expected: ProcInfo) -> None:
    assert parse_show_proc(text) == expected


def test_unexpected_answer_is_an_error() -> None:
    with pytest.raises(HAProxyError, match="unexpected `show proc` answer"):
        parse_show_proc("Unknown command\n")


@pytest.mark.parametrize(("log", "expected"), [
    ("[NOTICE]   (1) : New worker (2) forked\n", []),
    ("[ALERT]    (7) : Binding [cfg:9] for frontend fp_tcp_5432: cannot bind socket (Address already in use) "
     "for [0.0.0.0:5432]\n[NOTICE]   (7) : haproxy version is 2.6.12\n",
     ["Binding [cfg:9] for frontend fp_tcp_5432: cannot bind socket (Address already in use) for [0.0.0.0:5432]"]),
    ("".join(f"[ALERT]    (1) : a{i}\n" for i in range(5)), ["a2", "a3", "a4"]),
], ids=["no-alert", "bind", "last-three"])
def test_recent_alerts_give_haproxys_reason(tmp_path: Path, log: str, expected: list[str]) -> None:
    (tmp_path / "haproxy.log").write_text(log)
    assert recent_alerts(tmp_path / "haproxy.log") == expected


def test_recent_alerts_without_a_log_file(tmp_path: Path) -> None:
    assert recent_alerts(tmp_path / "none.log") == []


def test_recent_alerts_skip_what_was_logged_before(tmp_path: Path) -> None:
    log = tmp_path / "haproxy.log"
    log.write_text("[ALERT]    (1) : an older failure\n")
    start = log.stat().st_size
    with log.open("a") as f:
        f.write("[ALERT]    (1) : this one\n")
    assert recent_alerts(log, since=start) == ["this one"]


class ScriptedMaster:
    """A master socket whose old worker 2306 holds connections for `busy_for` of its `show info` answers."""

    def __init__(self, busy_for: int) -> None:
        self.busy_for = busy_for
        self.asked = 0

    def show_proc(self) -> ProcInfo:
        return parse_show_proc(RELOADED)

    def command(self, line: str) -> str:
        assert line == "@!2306 show info"
        self.asked += 1
        return f"Name: HAProxy\nPid: 2306\nCurrConns: {1 if self.asked <= self.busy_for else 0}\n"


@pytest.mark.parametrize(("busy_for", "timeout", "left"), [
    (0, 5.0, ()),  # no connection left on the old worker: applied at once
    (3, 5.0, ()),  # a keep-alive connection closes after its next response: waited for
    (10_000, 0.1, (2306,)),  # a long-lived connection: given up after the timeout, and named
], ids=["idle", "drains", "long-lived"])
def test_drain_waits_for_old_workers_connections(busy_for: int, timeout: float, left: tuple[int, ...]) -> None:
    from flowproxy.haproxy.master import HAProxySocket, drain

    master = ScriptedMaster(busy_for)
    assert drain(cast(HAProxySocket, master), (2306,), timeout) == left
    assert master.asked >= min(busy_for + 1, 2)


def test_prompt_mode_answers_are_split_at_each_prompt_without_payload_prompts() -> None:
    """What HAProxy 2.6 sends in prompt mode: a prompt after `prompt`, then each answer and a prompt; a
    payload command's lines are each prompted with "+ " (seen with `set ssl cert ... <<`)."""
    import socket

    from flowproxy.haproxy.master import _Prompts

    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"\n> + + + Transaction created for certificate certs/c.pem!\n\n> "
                       b"\n> New server registered.\n\n> ")
        prompts = _Prompts(ours)
        assert [prompts.next() for _ in range(4)] == [
            "", "Transaction created for certificate certs/c.pem!\n", "", "New server registered.\n"]
