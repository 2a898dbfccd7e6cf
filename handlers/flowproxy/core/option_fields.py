"""Optional intent fields (TCP/SNI, redirects, auth, rewrites, timeouts, health checks). Pure.

All optional and additive: an intent without them means what it meant in contract v1.
"""

from __future__ import annotations

import re
from typing import Any

from flowproxy.core.fields import (
    DURATION_RE,
    EXACT_DOMAIN_RE,
    REWRITE_FORBIDDEN,
    Checker,
    boolean,
    enum,
    integer,
    obj,
    path,
    regex,
    string,
)

MODES = ("http", "tcp", "sni")
REDIRECT_CODES = (301, 302, 303, 307, 308)
USER_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
REALM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.,:()-]{0,63}")
# crypt(3) hashes that Debian's libxcrypt verifies for HAProxy: SHA-512, SHA-256, yescrypt, bcrypt.
# MD5-crypt and DES are refused as too weak, and anything else would be a plain-text password.
HASH_RE = re.compile(r"\$(?:6|5|y|2[aby])\$[A-Za-z0-9./$=,]{8,300}")
# A replacement is an HAProxy log-format string: no `%` (sample expressions), quotes or `#`.
REPLACE_RE = re.compile(r"[A-Za-z0-9\-._~!$&()*+,;=:@/\\]{1,1024}")
HTTP_ONLY = ("https_only", "redirect_from", "auth", "strip_prefix", "rewrite")
MAX_USERS = 256


def _users(value: Any, _field: str) -> list[str]:
    if not isinstance(value, dict) or not value:
        return ["must be a non-empty JSON object of user name -> password hash"]
    if len(value) > MAX_USERS:
        return [f"has {len(value)} users, at most {MAX_USERS} are allowed"]
    found = []
    for name, digest in sorted(value.items()):
        if not USER_RE.fullmatch(name):
            found.append(f"{name[:64]!r}: user names are 1-64 of letters, digits and _.@-")
        elif not isinstance(digest, str) or not HASH_RE.fullmatch(digest):
            found.append(f"{name}: must be a crypt(3) hash ($6$, $5$, $y$ or $2b$), never a plain password; "
                         "make one with `openssl passwd -6`")
    return found


def _nested(known: dict[str, Checker], required: tuple[str, ...] = ()) -> Checker:
    def check(value: Any, _field: str) -> list[str]:
        return [f"{sub}: {msg}" if sub else msg for sub, msg in obj(value, known, required)]

    return check


def _rewrite_search(value: Any, _field: str) -> list[str]:
    return regex(value, REWRITE_FORBIDDEN)


def _path(value: Any, _field: str) -> list[str]:
    return path(value)


DURATION = string(DURATION_RE, "a duration such as 500ms, 30s, 5m or 1h")
OPTION_FIELDS: dict[str, Checker] = {
    "mode": enum(MODES),
    "port": integer(1, 65535),
    "https_only": boolean,
    "redirect_code": enum(REDIRECT_CODES),
    "auth": _nested({"realm": string(REALM_RE, "a realm (letters, digits, spaces and _.,:()-)"),
                     "users": _users}, required=("users",)),
    "strip_prefix": _path,
    "rewrite": _nested({"search": _rewrite_search,
                        "replace": string(REPLACE_RE, "a path with optional \\1-style references")},
                       required=("search", "replace")),
    "timeout_server": DURATION,
    "timeout_tunnel": DURATION,
    "health": _nested({"path": _path, "interval": DURATION}),
    "tls": _nested({"acme": boolean}),
}
OPTION_LIST_FIELDS: dict[str, Checker] = {
    "redirect_from": string(EXACT_DOMAIN_RE, "a domain name (lowercase, no wildcard)"),
}


def option_rules(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """Rules across fields: what each mode needs and allows. (field, message) pairs."""
    mode = doc.get("mode", "http")
    if mode not in MODES:
        return []  # the mode itself is already reported
    needs = {"http": (), "tcp": ("port",), "sni": ("domains",)}[mode]
    refused = {"http": ("port",), "tcp": ("paths", "domains", *HTTP_ONLY), "sni": ("paths", "port", *HTTP_ONLY)}
    found = [(name, f"is required with mode {mode}") for name in needs if name not in doc]
    found += [(name, f"is not allowed with mode {mode}") for name in refused[mode] if name in doc]
    if mode != "http" and isinstance(doc.get("health"), dict) and "path" in doc["health"]:
        found.append(("health.path", f"HTTP checks need mode http, not {mode}"))
    found += _acme_rules(doc, mode)
    if "redirect_from" in doc and mode == "http":
        if "domains" not in doc:
            found.append(("redirect_from", "needs domains: requests are redirected to the first one"))
        elif isinstance(doc["redirect_from"], list) and isinstance(doc["domains"], list):
            both = sorted(set(map(str, doc["redirect_from"])) & set(map(str, doc["domains"])))
            found += [("redirect_from", f"{d!r} is also in domains") for d in both]
    return found


def _acme_rules(doc: dict[str, Any], mode: str) -> list[tuple[str, str]]:
    """ACME proves each name with HTTP-01 on the HTTP listener: names of an HTTP route, none a wildcard."""
    tls = doc.get("tls")
    if not isinstance(tls, dict) or tls.get("acme") is not True:
        return []
    if mode != "http":
        return [("tls.acme", f"certificates for mode {mode} routes are the service's own (TLS is not terminated)")]
    domains = doc.get("domains")
    if not isinstance(domains, list) or not domains:
        return [("tls.acme", "needs domains: the certificate is issued for them")]
    return [("tls.acme", f"{d!r}: HTTP-01 cannot prove a wildcard name") for d in domains
            if isinstance(d, str) and d.startswith("*.")]
