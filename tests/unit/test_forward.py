"""The watch entry hands events to a warm applier when one listens, and applies itself when none does."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowproxy.node.forward import forward, socket_path


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, list[bytes], list[bytes]]]:
    """A unix socket that records what it was sent and answers what the test queues."""
    path = str(tmp_path / "apply.sock")
    received: list[bytes] = []
    answers: list[bytes] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            received.append(b"".join(iter(lambda: conn.recv(65536), b"")))
            conn.sendall(answers.pop(0))

    threading.Thread(target=serve, daemon=True).start()
    yield path, received, answers
    server.close()


CASES = [("success", b"0", 0), ("apply-failed", b"5", 5), ("garbage", b"what", 1), ("nothing", b"", 1)]


@pytest.mark.parametrize(("answer", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_forwards_the_event_and_returns_the_answer(listener: tuple[str, list[bytes], list[bytes]],
                                                   answer: bytes, code: int, monkeypatch: pytest.MonkeyPatch) -> None:
    path, received, answers = listener
    monkeypatch.setenv("CONSUL_INDEX", "42")  # what the agent gives a watch handler: the payload's index
    answers.append(answer)
    payload = b'[{"Key": "flowproxy/routes/a/active"}]' * 1000  # larger than one socket buffer
    assert forward(path, "keyprefix", payload) == code
    assert received == [b"keyprefix 42\n" + payload]


def test_no_applier_means_apply_here(tmp_path: Path) -> None:
    assert forward(str(tmp_path / "missing.sock"), "service", b"[]") is None
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.sock"))  # bound, never listening: what a killed supervisor leaves
    assert forward(str(tmp_path / "stale.sock"), "service", b"[]") is None
    stale.close()


def test_socket_lives_in_the_node_data_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWPROXY_DATA_DIR", "/srv/fp")
    assert socket_path() == os.path.join("/srv/fp", "run", "apply.sock")
