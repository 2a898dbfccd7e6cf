"""flowproxy's own log lines: one event per line, text or JSON, the node's name on each, secrets redacted.

The one adapter for python-json-logger. Every process of a node (the terminal of `node up`, `node run`
under journald, a watch handler, the warm applier's `handler.log`) formats through `formatter`, so a
line reads the same wherever it lands. A traceback stays on its event's line: folded with `\\n` in text,
a field (`exc_info`) in JSON.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import threading
from pathlib import Path
from typing import Any

from flowproxy.redact import RedactFilter, redact

# What a log file may grow to before it is rotated (two older files are kept).
MAX_BYTES = 5_000_000
BACKUPS = 2


def level_of(name: str) -> int:
    return int(logging.getLevelName(name.upper()))


class TextFormatter(logging.Formatter):
    """Redaction is the handler's filter's (`RedactFilter`: the message and the traceback's text)."""

    def __init__(self, node: str) -> None:
        super().__init__(f"%(asctime)s {node} %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\\n")


def json_lines(node: str) -> logging.Formatter:
    """{"level", "logger", "message", "node", "time" (ISO 8601, UTC)[, "exc_info"]} a line.

    Imported here: a cold watch handler in text format does without the import."""
    from pythonjsonlogger.json import JsonFormatter

    class JsonLines(JsonFormatter):
        # It formats the traceback itself (not the filter's redacted text): every field is redacted here.
        def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
            return {key: redact(value) if isinstance(value, str) else value for key, value in log_data.items()}

    return JsonLines("%(levelname)s %(name)s %(message)s", static_fields={"node": node}, timestamp="time",
                     rename_fields={"levelname": "level", "name": "logger"})


def formatter(fmt: str, node: str) -> logging.Formatter:
    return json_lines(node) if fmt == "json" else TextFormatter(node)


def handler(target: logging.Handler, fmt: str, node: str, level: str = "debug") -> logging.Handler:
    """`target` in the node's format, redacted, passing `level` and above (whatever a logger lets through:
    the warm applier lowers the package's level to what a handler process logs)."""
    target.setFormatter(formatter(fmt, node))
    target.setLevel(level_of(level))
    target.addFilter(RedactFilter())
    return target


def capped_file(path: Path) -> logging.handlers.RotatingFileHandler:
    """A log file of at most MAX_BYTES, rotated to `.1` and `.2`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return logging.handlers.RotatingFileHandler(path, maxBytes=MAX_BYTES, backupCount=BACKUPS)


def install(fmt: str, level: str, node: str, *, stream: bool = True, file: Path | None = None) -> None:
    """The process's logging: stderr (the terminal, or journald under systemd) and/or a capped file."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.setLevel(level_of(level))
    if stream:
        root.addHandler(handler(logging.StreamHandler(), fmt, node, level))
    if file is not None:
        try:
            root.addHandler(handler(capped_file(file), fmt, node, level))
        except OSError as exc:
            logging.getLogger(__name__).warning("cannot open %s (%s); logging to stderr only", file, exc)


class CappedFile:
    """What a child process prints (HAProxy's access log and alerts, the agent's log), appended to a file of
    at most `max_bytes`, then rotated to `.1`, `.2`, ...: `node up`'s logs never fill the disk."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def write(self, data: bytes) -> None:
        if os.fstat(self.fd).st_size + len(data) > self.max_bytes:
            self.rotate()
        os.write(self.fd, data)

    def rotate(self) -> None:
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.close(self.fd)
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def close(self) -> None:
        os.close(self.fd)


def pump(read_fd: int, target: CappedFile) -> threading.Thread:
    """Copy a pipe into `target` until the writer closes it; big reads, so a busy access log costs little."""
    def run() -> None:
        try:
            while chunk := os.read(read_fd, 1 << 16):
                target.write(chunk)
        except OSError:
            pass  # the file went away with the node's folder: nothing left to keep
        finally:
            os.close(read_fd)
            target.close()

    thread = threading.Thread(target=run, daemon=True, name=f"log-{target.path.name}")
    thread.start()
    return thread
