"""logs: one event a line, text or JSON, the node's name on each, secrets redacted, the level honoured."""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flowproxy import logs
from flowproxy.settings import Settings

TOKEN = "0c3b1a52-8e4f-4d21-9a77-5b2f0e6d9c11"


@pytest.fixture
def root() -> Iterator[logging.Logger]:
    """The root logger, given back as it was."""
    logger = logging.getLogger()
    handlers, level = list(logger.handlers), logger.level
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(level)


def lines(fmt: str, emit: Callable[[logging.Logger], None]) -> list[str]:
    stream = io.StringIO()
    logger = logging.getLogger("flowproxy.test")
    logger.propagate, logger.level = False, logging.DEBUG
    logger.handlers = [logs.handler(logging.StreamHandler(stream), fmt, "edge-7")]
    try:
        emit(logger)
    finally:
        logger.handlers, logger.propagate = [], True
    return stream.getvalue().splitlines()


def failing(logger: logging.Logger) -> None:
    try:
        raise RuntimeError(f"cannot reach Consul with token {TOKEN}\nsecond line")
    except RuntimeError:
        logger.exception("apply failed for %s", "routes/api/live")


CASES = [
    ("text-plain", "text", lambda lg: lg.info("applied config %s", "abc123")),
    ("text-exception", "text", failing),
    ("json-plain", "json", lambda lg: lg.info("applied config %s", "abc123")),
    ("json-exception", "json", failing),
    ("json-token-in-args", "json", lambda lg: lg.warning("token=%s refused", TOKEN)),
    ("text-token-in-args", "text", lambda lg: lg.warning("token=%s refused", TOKEN)),
]


@pytest.mark.parametrize(("fmt", "emit"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_line_an_event_with_the_node_and_no_secret(fmt: str, emit: Callable[[logging.Logger], None]) -> None:
    (line,) = lines(fmt, emit)
    assert TOKEN not in line
    if fmt == "json":
        doc = json.loads(line)
        assert doc["node"] == "edge-7" and doc["logger"] == "flowproxy.test"
        assert doc["level"] in ("INFO", "WARNING", "ERROR") and doc["time"].endswith("+00:00")
        assert TOKEN not in json.dumps(doc)
        if "exc_info" in doc:
            assert "RuntimeError" in doc["exc_info"] and "[redacted]" in doc["exc_info"]
    else:
        assert " edge-7 " in line and " flowproxy.test: " in line
        if "Traceback" in line:
            assert "\\n" in line and "[redacted]" in line


def test_level_and_file(root: logging.Logger, tmp_path: Path) -> None:
    logs.install("json", "warning", "edge-7", stream=False, file=tmp_path / "handler.log")
    logging.getLogger("flowproxy.x").info("not logged")
    logging.getLogger("flowproxy.x").warning("logged")
    for handler in root.handlers:
        handler.flush()
    (line,) = (tmp_path / "handler.log").read_text().splitlines()
    assert json.loads(line)["message"] == "logged"
    (handler,) = root.handlers
    assert isinstance(handler, logging.handlers.RotatingFileHandler) and handler.maxBytes == logs.MAX_BYTES


@pytest.mark.parametrize(("env", "fmt", "level"), [
    ({}, "text", "info"),
    ({"FLOWPROXY_LOG_FORMAT": "json", "FLOWPROXY_LOG_LEVEL": "DEBUG"}, "json", "debug"),
], ids=["default", "json-debug"])
def test_settings_carry_the_format_to_handlers(env: dict[str, str], fmt: str, level: str) -> None:
    settings = Settings.from_env(env)
    assert (settings.log_format, settings.log_level) == (fmt, level)
    again = Settings.from_env(settings.env())
    assert (again.log_format, again.log_level) == (fmt, level)


@pytest.mark.parametrize("env", [{"FLOWPROXY_LOG_FORMAT": "xml"}, {"FLOWPROXY_LOG_LEVEL": "loud"}],
                         ids=["format", "level"])
def test_bad_log_settings_are_refused_by_name(env: dict[str, str]) -> None:
    from flowproxy.errors import UsageError

    with pytest.raises(UsageError, match=next(iter(env))):
        Settings.from_env(env)
