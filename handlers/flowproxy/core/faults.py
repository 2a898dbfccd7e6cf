"""A bug met by one key rejects that key, with a reason, and never the node. Logging is the only effect.

Each stage (parse, plan, render, vet) catches what it did not expect around the one key it is working on
and turns it into `internal error while <stage> <key>: <type>: <message>`, logged once per distinct
failure with its traceback (the warm applier meets the same key on every event).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)
_SEEN: set[str] = set()
_SEEN_MAX = 1000


def internal_error(key: str, stage: str, exc: BaseException) -> str:
    """The reason for `key`, logged with its traceback the first time this process meets it."""
    message = f"internal error while {stage} {key}: {type(exc).__name__}: {str(exc)[:300]}"
    if message not in _SEEN:
        if len(_SEEN) > _SEEN_MAX:
            _SEEN.clear()
        _SEEN.add(message)
        log.error("%s", message, exc_info=exc)
    return message
