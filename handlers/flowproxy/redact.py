"""Keep secrets out of every log line and error message. Stdlib only (the lean handler path logs too).

Tokens travel only in the X-Consul-Token header, never in a URL, so they should never be in a message in
the first place; this is the second line: anything shaped like a Consul token (a UUID), a `token=` query
value or a `X-Consul-Token` header value is replaced, whatever logged it.
"""

from __future__ import annotations

import logging
import re

SECRET_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|(?<=token=)[^&\s'\"]+|(?<=X-Consul-Token: )\S+", re.IGNORECASE)
MARK = "[redacted]"


def redact(text: str) -> str:
    return SECRET_RE.sub(MARK, text)


class RedactFilter(logging.Filter):
    """Attached to every handler flowproxy installs: the record is formatted, then redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True
