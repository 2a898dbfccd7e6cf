"""What the benchmark's modules share: the row type, free ports, percentiles, a served HAProxy, a fast backend."""


from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flowproxy.core.render import Bundle
from flowproxy.haproxy import release
from flowproxy.node.up import Node, NodeSpec, wait_for
from flowproxy.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
FLOWPROXY = str(Path(sys.executable).parent / "flowproxy")
P = "flowproxy/"


@dataclass
class Row:
    metric: str
    flowproxy: str
    baseline: str = "-"
    target: str = "-"
    verdict: str = "-"


_GIVEN: set[int] = set()


def free_port() -> int:
    """A loopback port free now, never one handed out before in this process: the kernel can hand the
    same ephemeral port to two binds in a row, and an agent given one port for serf and RPC never starts."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextmanager
def haproxy_serving(files: dict[str, bytes], access_log: str = "off") -> Iterator[tuple[str, Settings]]:
    """A bare HAProxy master-worker serving these files; yields its URL and settings. No access log unless
    asked: the throughput rows compare routing with a minimal config that logs nothing either."""
    folder = Path(tempfile.mkdtemp(prefix="fp-bench-"))
    settings = Settings(node="bench", data_dir=folder, http_bind=f"127.0.0.1:{free_port()}",
                        access_log=access_log).checked()
    release.activate(settings.current, release.stage(settings.haproxy_dir, Bundle(files)))
    node = Node(NodeSpec(settings=settings))
    (folder / "logs").mkdir()
    node.start_haproxy()
    try:
        yield f"http://{settings.http_bind}", settings
    finally:
        node.stop()
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def fast_backend() -> Iterator[int]:
    """A real HTTP backend that is never the bottleneck: a second HAProxy answering 200 by itself."""
    port = free_port()
    cfg = (f"defaults\n    mode http\n    timeout client 10s\n    timeout server 10s\n    timeout connect 1s\n"
           f"frontend be\n    bind 127.0.0.1:{port}\n    http-request return status 200 content-type text/plain "
           f"string ok hdr X-Instance fast\n")
    folder = Path(tempfile.mkdtemp(prefix="fp-backend-"))
    (folder / "haproxy.cfg").write_text(cfg)
    proc = subprocess.Popen(["haproxy", "-f", str(folder / "haproxy.cfg")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _listening(port), 10, "the fast backend")
        yield port
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


