"""The KV contract (v1), the public API: the folders under the prefix, how keys are built, what any key
under the prefix is, and the fingerprint of what an apply depends on. Stdlib only, pure.

    <prefix>routes/<route>/<variant>   JSON intent
    <prefix>routes/<route>/active      the variant that serves, or canary weights (`blue=90,green=10`)
    <prefix>templates/<name>           a Jinja2 template for routes with `"template": "<name>"`
    <prefix>certs/<name>               PEM: certificate chain and private key, served by SNI
    <prefix>status/<node>              written by proxy nodes only
    <prefix>acme/challenges/<token>    an HTTP-01 key authorization every node answers (written by nodes)
    <prefix>acme/{accounts,orders,locks,state}/<name>   ACME bookkeeping, written by nodes only
    <prefix>accept-empty               any value: an operator accepts an empty route table (after a restore)

Every other module asks this one: adding a key kind means a folder (or name) and a `Kind` here, its
parser in `core/kv.py`, and its consumer. Later versions only add.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_PREFIX = "flowproxy/"
ROUTES = "routes/"
TEMPLATES = "templates/"
CERTS = "certs/"
STATUS = "status/"
ACME = "acme/"
CHALLENGES = ACME + "challenges/"
# What the ACME worker keeps besides the challenges: drives no config (an apply never reads it).
ACME_WORK = ("accounts", "orders", "locks", "state")
ACTIVE = "active"
ACCEPT_EMPTY = "accept-empty"
# What an apply reads and depends on, the required folder first. Consul answers an empty subtree without
# tombstones with the whole table's index, so the optional ones count only when they hold keys.
CONFIG_FOLDERS = (ROUTES, TEMPLATES, CERTS, CHALLENGES)
OPTIONAL_FOLDERS = CONFIG_FOLDERS[1:]
SHAPES = ("routes/<route>/<variant|active>, templates/<name>, certs/<name>, acme/challenges/<token>, "
          "acme/{accounts,orders,locks,state}/<name>")


class Kind(enum.Enum):
    ROOT = "root"  # the prefix itself
    INTENT = "intent"
    ACTIVE = "active"
    TEMPLATE = "template"
    CERT = "cert"
    STATUS = "status"  # written by nodes; drives nothing
    CHALLENGE = "challenge"  # acme/challenges/<token>: written by the node holding an order; every node serves it
    ACME = "acme"  # acme/<accounts|orders|locks|state>/<name>: the ACME worker's bookkeeping; drives nothing
    ACCEPT_EMPTY = "accept-empty"
    STRAY = "stray"  # under the prefix, outside the contract: reported, never used
    OUTSIDE = "outside"  # not under the prefix at all


@dataclass(frozen=True)
class Key:
    """A key read against the contract: its kind and the names in it (route and variant, or one name)."""

    kind: Kind
    names: tuple[str, ...] = ()


def classify(prefix: str, key: str) -> Key:
    """What `key` is under `prefix`, by its shape alone (names are the parser's to judge)."""
    if not key.startswith(prefix):
        return Key(Kind.OUTSIDE)
    rel = key[len(prefix):]
    if rel == "":
        return Key(Kind.ROOT)
    parts = tuple(rel.split("/"))
    if is_status_key(prefix, key):
        return Key(Kind.STATUS, parts[1:])
    if parts == (ACCEPT_EMPTY,):
        return Key(Kind.ACCEPT_EMPTY)
    if parts[0] + "/" == ROUTES and len(parts) == 3:
        return Key(Kind.ACTIVE if parts[2] == ACTIVE else Kind.INTENT, parts[1:])
    if parts[0] + "/" == TEMPLATES and len(parts) == 2:
        return Key(Kind.TEMPLATE, parts[1:])
    if parts[0] + "/" == CERTS and len(parts) == 2:
        return Key(Kind.CERT, parts[1:])
    if parts[0] + "/" == ACME and len(parts) == 3:
        if parts[1] + "/" == CHALLENGES[len(ACME):]:
            return Key(Kind.CHALLENGE, parts[2:])
        if parts[1] in ACME_WORK:
            return Key(Kind.ACME, parts[1:])
    return Key(Kind.STRAY, parts)


def is_acme_work_key(prefix: str, key: str) -> bool:
    """`<prefix>acme/<accounts|orders|locks|state>/<name>` (or one of those folders): what ACME workers write."""
    rest = key[len(prefix) + len(ACME):] if key.startswith(prefix + ACME) else None
    if rest is None:
        return False
    folder, _, name = rest.partition("/")
    return folder in ACME_WORK and "/" not in name


def is_status_key(prefix: str, key: str) -> bool:
    """`<prefix>status/<node>` (or the folder itself): what nodes write. Anything deeper is a stray key."""
    rest = key[len(prefix) + len(STATUS):] if key.startswith(prefix + STATUS) else None
    return rest is not None and "/" not in rest


def is_folder_marker(key: str, value: bytes) -> bool:
    """An empty key ending in `/`, made by the UI or `consul kv put dir/`: not a key of the contract."""
    return key.endswith("/") and not value


def in_config(prefix: str, key: str) -> bool:
    """Under one of the folders an apply reads (folder markers included: they come with the reads)."""
    return key.startswith(tuple(prefix + folder for folder in CONFIG_FOLDERS))


def ignored(prefix: str, key: str) -> bool:
    """Keys an apply never looks at, not even by name: the prefix itself, the nodes' status keys and the ACME
    workers' bookkeeping (a lock taken or a state written must not look like a config change)."""
    return key == prefix or is_status_key(prefix, key) or is_acme_work_key(prefix, key)


def kv_fingerprint(prefix: str, pairs: Iterable[tuple[str, bytes]]) -> str:
    """A digest of what an apply depends on: the config folders' keys with values, and the names of keys
    outside the contract (reported, never used, so their values do not matter). status/ is left out: every
    node writes there, and those writes drive nothing. Any new folder is covered: it is either a config
    folder (values) or not (names).

    The sum of each key's digest (mod 2**256), so that an incremental apply moves it by the keys it changed
    alone (`moved`); a sum of SHA-256 digests is as hard to make collide on purpose as the digests."""
    return _hex(sum(_weight(prefix, key, value) for key, value in pairs))


def moved(fingerprint: str, prefix: str, before: Iterable[tuple[str, bytes]],
          after: Iterable[tuple[str, bytes]]) -> str:
    """`fingerprint` with the keys `before` replaced by `after` (a key that is new has no `before`)."""
    total = int(fingerprint, 16) if fingerprint else 0
    return _hex(total - sum(_weight(prefix, k, v) for k, v in before) + sum(_weight(prefix, k, v) for k, v in after))


def _weight(prefix: str, key: str, value: bytes) -> int:
    if in_config(prefix, key):
        part = key.encode() + b"\0" + hashlib.sha256(value).digest()
    elif not ignored(prefix, key):
        part = key.encode() + b"\0"
    else:
        return 0
    return int.from_bytes(hashlib.sha256(part).digest(), "big")


def _hex(total: int) -> str:
    return f"{total % (1 << 256):064x}"


def route_of(prefix: str, key: str) -> str | None:
    """The route an intent or active key belongs to; None for any other key."""
    shape = classify(prefix, key)
    return shape.names[0] if shape.kind in (Kind.INTENT, Kind.ACTIVE) else None


def route_names(prefix: str, keys: Iterable[str]) -> frozenset[str]:
    """The names of the routes that `keys` hold keys of."""
    return frozenset(name for name in (route_of(prefix, key) for key in keys) if name is not None)


def route_folder(prefix: str, route: str | None = None) -> str:
    return prefix + ROUTES + (f"{route}/" if route is not None else "")


def intent_key(prefix: str, route: str, variant: str) -> str:
    return f"{prefix}{ROUTES}{route}/{variant}"


def active_key(prefix: str, route: str) -> str:
    return intent_key(prefix, route, ACTIVE)


def template_key(prefix: str, name: str) -> str:
    return f"{prefix}{TEMPLATES}{name}"


def cert_key(prefix: str, name: str) -> str:
    return f"{prefix}{CERTS}{name}"


def status_folder(prefix: str) -> str:
    return prefix + STATUS


def status_key(prefix: str, node: str) -> str:
    return f"{prefix}{STATUS}{node}"


def accept_empty_key(prefix: str) -> str:
    return prefix + ACCEPT_EMPTY


def challenge_key(prefix: str, token: str = "") -> str:
    """An HTTP-01 answer's key; without a token, their folder."""
    return f"{prefix}{CHALLENGES}{token}"


def acme_folder(prefix: str) -> str:
    return prefix + ACME


def acme_key(prefix: str, folder: str, name: str) -> str:
    """`<prefix>acme/<folder>/<name>` for one of ACME_WORK's folders."""
    if folder not in ACME_WORK:
        raise ValueError(f"not an ACME folder: {folder}")
    return f"{prefix}{ACME}{folder}/{name}"
