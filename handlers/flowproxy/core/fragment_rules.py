"""What a custom template's output may say: read as HAProxy reads it, judged against an allowlist. Pure.

Templates come from KV, so their output is untrusted. HAProxy's own tokenizer (cfgparse.c `parse_line`)
joins quoted and escaped pieces into one word, so `"global"`, `glo"bal"` and `\\x67lobal` all open the
global section, and `"${VAR}"` pastes the node's environment (its secrets) into the config. Matching raw
text misses those (field notes), so every line is tokenized the same way first, then its first word must
be a backend keyword on the allowlist, and no word may name something that forks, loads code or files,
reads the environment, changes shared maps, or opens a listener.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SECTION_KEYWORDS = frozenset({"global", "defaults", "frontend", "listen", "backend", "peers", "resolvers",
                              "userlist", "program", "cache", "ring", "http-errors", "mailers", "crt-store",
                              "fcgi-app", "log-forward", "namespace_list", "dynamic-update", "traces"})
# Backend keywords a route's own backend may use (HAProxy 2.6). Everything else is refused: an allowlist
# fails safe when HAProxy grows a keyword or reads a line differently from us.
ALLOWED = frozenset({
    "balance", "hash-type", "hash-balance-factor", "timeout", "retries", "retry-on", "option", "no",
    "http-check", "tcp-check", "http-request", "http-response", "http-after-response", "tcp-request",
    "tcp-response", "acl", "server", "default-server", "server-template", "cookie", "dynamic-cookie-key",
    "stick-table", "stick", "persist", "force-persist", "ignore-persist", "use-server", "fullconn",
    "http-reuse", "http-send-name-header", "compression", "description", "id", "errorloc", "errorloc302",
    "errorloc303", "redirect", "max-keep-alive-queue", "max-session-srv-conns", "unique-id-format",
    "unique-id-header", "source", "filter", "http-error", "capture",
})
# Options that fork (external-check) or write where the node does not look are refused with them.
FORBIDDEN_OPTIONS = frozenset({"external-check", "log-health-checks", "dontlog-normal", "dontlognull"})
# Words refused by where they stand, as HAProxy's grammar gives them meaning (a header value may say
# "file"; the argument `file /etc/shadow` of `http-request return` may not):
ANYWHERE = frozenset({"external-check", "insecure-fork-wanted", "insecure-setuid-wanted", "lua-load",
                      "lua-load-per-thread", "lua-prepend-path", "load-server-state-from-file",
                      "server-state-file-name", "-f", "-M"})  # -f/-M: ACL patterns from a file
RULES = frozenset({"http-request", "http-response", "http-after-response", "tcp-request", "tcp-response"})
RULE_ACTIONS = frozenset({"use-service", "set-map", "del-map", "add-acl", "del-acl", "send-spoe-group"})
FILE_ACTIONS = frozenset({"return", "deny", "tarpit"})  # their replies may come from files
FILE_ARGS = frozenset({"file", "lf-file", "errorfile", "errorfiles"})
SERVERS = frozenset({"server", "default-server", "server-template"})
SERVER_OPTIONS = frozenset({"crt", "crt-list", "ca-file", "crl-file", "agent-check", "agent-addr", "agent-port",
                            "agent-send", "agent-inter", "namespace"})
FORBIDDEN_WORDS = ANYWHERE | RULE_ACTIONS | FILE_ARGS | SERVER_OPTIONS  # every word refused somewhere
ALLOWED_FILTERS = frozenset({"compression", "cache"})
# Inside a word: sample fetches and converters that read the process environment or files, and Lua.
FORBIDDEN_INSIDE = re.compile(r"env\(|\bmap(_\w+)?\(|lua\.|\blua\b|51d\.|wurfl|da-csv|spoe", re.IGNORECASE)
HEX = frozenset("0123456789abcdefABCDEF")
ESCAPES = {"\\": "\\", " ": " ", "#": "#", "'": "'", '"': '"', "r": "\r", "n": "\n", "t": "\t", "$": "$"}
MAX_LINES = 400


class TokenError(ValueError):
    """A line HAProxy would read in a way we do not accept (an unclosed quote, a `$`, a bad escape)."""


@dataclass(frozen=True)
class Line:
    number: int
    text: str
    words: tuple[str, ...]


def words(line: str) -> tuple[str, ...]:
    """The words of one config line as HAProxy's tokenizer yields them; `$` (environment) is refused."""
    out: list[str] = []
    word: list[str] | None = None
    quote = ""
    i = 0
    while i < len(line):
        ch = line[i]
        if not quote and ch in " \t":
            if word is not None:
                out.append("".join(word))
            word = None
        elif not quote and ch == "#":
            break
        else:
            piece, i, quote = _step(line, i, quote)
            word = (word or []) + [piece]
        i += 1
    if quote:
        raise TokenError(f"unclosed {quote} quote")
    if word is not None:
        out.append("".join(word))
    return tuple(out)


def _step(line: str, i: int, quote: str) -> tuple[str, int, str]:
    """One character (or escape) inside a word: (text it adds, index of its last character, quote after)."""
    ch = line[i]
    if quote == "'":
        return ("", i, "") if ch == "'" else (ch, i, quote)
    if ch == "\\":
        decoded, i = _escape(line, i)
        return decoded, i, quote
    if ch == "$":
        raise TokenError("'$' (environment expansion) is not allowed")
    if ch == '"':
        return "", i, "" if quote else '"'
    if ch == "'" and not quote:
        return "", i, "'"
    return ch, i, quote


def _escape(line: str, i: int) -> tuple[str, int]:
    nxt = line[i + 1:i + 2]
    if nxt == "x" and len(line) >= i + 4 and set(line[i + 2:i + 4]) <= HEX:
        return chr(int(line[i + 2:i + 4], 16)), i + 3
    if nxt in ESCAPES:
        return ESCAPES[nxt], i + 1
    raise TokenError(f"unsupported escape '\\{nxt}'")


def lines(text: str) -> list[Line]:
    """Every non-empty, non-comment line of `text`, tokenized. Raises TokenError naming the line."""
    found = []
    for number, raw in enumerate(text.split("\n"), start=1):
        bad = next((c for c in raw if (ord(c) < 32 and c != "\t") or ord(c) == 127), None)
        if bad is not None:
            raise TokenError(f"line {number}: control character {bad!r}")
        try:
            tokens = words(raw)
        except TokenError as exc:
            raise TokenError(f"line {number}: {exc}: {raw.strip()[:80]!r}") from None
        if tokens:
            found.append(Line(number, raw.strip(), tokens))
    return found


def fragment_errors(text: str, backend: str) -> list[str]:
    """Every reason to refuse a rendered fragment for backend `backend`; [] when it may be used."""
    try:
        parsed = lines(text)
    except TokenError as exc:
        return [str(exc)]
    if not parsed or parsed[0].words != ("backend", backend):
        return [f"rendered text must start with 'backend {backend}'"]
    if len(parsed) > MAX_LINES:
        return [f"rendered text has {len(parsed)} lines, at most {MAX_LINES}"]
    return [f"line {ln.number}: {reason}: {ln.text[:80]!r}" for ln in parsed[1:] if (reason := _judge(ln.words))]


def _judge(tokens: tuple[str, ...]) -> str:
    keyword = tokens[0]
    if keyword in SECTION_KEYWORDS:
        return f"opens another section ({keyword!r})"
    if keyword not in ALLOWED:
        return f"{keyword[:40]!r} is not a backend keyword flowproxy allows in a template"
    if keyword == "no" and tokens[1:2] != ("option",):
        return "only 'no option ...' may start with 'no'"
    options = tokens[1:] if keyword == "option" else tokens[2:] if keyword == "no" else ()
    if options and options[0] in FORBIDDEN_OPTIONS:
        return f"option {options[0]!r} is not allowed"
    if keyword == "filter" and tokens[1:2] and tokens[1] not in ALLOWED_FILTERS:
        return f"filter {tokens[1][:40]!r} is not allowed (only {', '.join(sorted(ALLOWED_FILTERS))})"
    refused = _refused_here(keyword, tokens)
    for word in tokens[1:]:
        head = word.split("(")[0]  # `set-map(file)` is the action set-map
        if head in refused or head.lower() in refused:
            return f"{word!r} loads files or code, runs programs or reaches outside the route"
        if FORBIDDEN_INSIDE.search(word) or any(ord(c) < 32 or ord(c) == 127 for c in word):
            return f"{word[:60]!r} reads the environment, files or code"
    return ""


def _refused_here(keyword: str, tokens: tuple[str, ...]) -> frozenset[str]:
    """The words a line starting with `keyword` may not hold."""
    heads = {t.split("(")[0] for t in tokens[1:4]}
    refused = ANYWHERE
    if keyword in RULES:
        refused |= RULE_ACTIONS | (FILE_ARGS if heads & FILE_ACTIONS else frozenset())
    if keyword == "http-error":
        refused |= FILE_ARGS
    if keyword in SERVERS:
        refused |= SERVER_OPTIONS
    return refused


def sections(config: str) -> list[tuple[str, str]]:
    """(keyword, name) of every section a whole config opens, read with the same tokenizer.

    For checks: the rendered haproxy.cfg must hold exactly the sections flowproxy put there. Lines that do
    not tokenize (never in an accepted config) are skipped here; `fragment_errors` refuses them.
    """
    out = []
    for raw in config.split("\n"):
        try:
            tokens = words(raw)
        except TokenError:
            continue
        if tokens and tokens[0] in SECTION_KEYWORDS:
            out.append((tokens[0], tokens[1] if len(tokens) > 1 else ""))
    return out
