"""runtime_commands: map and server-slot differences become Runtime API commands; the rest needs a reload."""

from __future__ import annotations

import pytest

from flowproxy.core.render import Bundle
from flowproxy.errors import HAProxyError
from flowproxy.haproxy.runtime import MAX_COMMANDS, Reload, accepted, plan_change, runtime_commands, send

CFG = b"frontend f\n"


def bundle(cfg: bytes = CFG, certs: dict[str, bytes] | None = None, **maps: str) -> Bundle:
    files = {"haproxy.cfg": cfg} | {f"maps/{k}.map": v.encode() for k, v in maps.items()}
    return Bundle(files | {f"certs/{k}.pem": v for k, v in (certs or {}).items()})


# A blank line between blocks is legal PEM but would end the `<<` payload early: it must not reach HAProxy.
PEM_OLD = b"-----BEGIN CERTIFICATE-----\nOLD\n-----END CERTIFICATE-----\n"
PEM_NEW = (b"-----BEGIN CERTIFICATE-----\nNEW\n-----END CERTIFICATE-----\n\n"
           b"-----BEGIN PRIVATE KEY-----\nKEY\n-----END PRIVATE KEY-----\n")

CASES = [
    ("activate", bundle(path_beg=""), bundle(path_beg="/demo r:live\n"), ["add map maps/path_beg.map /demo r:live"]),
    ("deactivate", bundle(path_beg="/demo r:live\n"), bundle(path_beg=""), ["del map maps/path_beg.map /demo"]),
    ("flip", bundle(path_beg="/demo r:blue\n"), bundle(path_beg="/demo r:green\n"),
     ["set map maps/path_beg.map /demo r:green"]),
    ("several-maps", bundle(path_beg="/a x:1\n", host_exact=""), bundle(path_beg="", host_exact="a.io/ x:1\n"),
     ["add map maps/host_exact.map a.io/ x:1", "del map maps/path_beg.map /a"]),
    ("config-changed", bundle(path_beg=""), bundle(b"frontend g\n", path_beg="/a x:1\n"), None),
    ("regex-map-changed", bundle(path_reg=""), bundle(path_reg="^/a x:1\n"), None),
    ("map-file-added", bundle(path_beg=""), bundle(path_beg="", host_beg=""), None),
    ("semicolon-in-key", bundle(path_beg=""), bundle(path_beg="/a;b x:1\n"), None),
    ("too-many", bundle(path_beg=""), bundle(path_beg="".join(f"/r{i} x:1\n" for i in range(MAX_COMMANDS + 1))), None),
    ("cert-renewed", bundle(certs={"a": PEM_OLD}, path_beg=""), bundle(certs={"a": PEM_NEW}, path_beg=""),
     ["set ssl cert certs/a.pem <<\n-----BEGIN CERTIFICATE-----\nNEW\n-----END CERTIFICATE-----\n"
      "-----BEGIN PRIVATE KEY-----\nKEY\n-----END PRIVATE KEY-----\n", "commit ssl cert certs/a.pem"]),
    ("cert-added", bundle(path_beg=""), bundle(certs={"a": PEM_NEW}, path_beg=""), None),
    ("cert-removed", bundle(certs={"a": PEM_OLD}, path_beg=""), bundle(path_beg=""), None),
]


@pytest.mark.parametrize(("old", "new", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_runtime_commands(old: Bundle, new: Bundle, expected: list[str] | None) -> None:
    assert runtime_commands(old, new) == expected


def cfg(*servers: str, extra: str = "", balance: str = "roundrobin") -> bytes:
    body = "".join(f"    server {s}\n" for s in servers)
    return f"global\n    daemon\nbackend r:live\n    balance {balance}\n{extra}{body}backend z:live\n".encode()


OPTS = "check inter 2s fall 2 rise 1"
ADD_2 = ["add server r:live/b 10.0.0.2:81 " + OPTS, "set server r:live/b addr 10.0.0.2 port 81",
         "enable health r:live/b", "set server r:live/b state ready"]
SERVER_CASES = [
    ("add", cfg(f"a 10.0.0.1:80 {OPTS}"), cfg(f"a 10.0.0.1:80 {OPTS}", f"b 10.0.0.2:81 {OPTS}"), ADD_2),
    ("remove", cfg(f"a 10.0.0.1:80 {OPTS}", f"b 10.0.0.2:81 {OPTS}"), cfg(f"a 10.0.0.1:80 {OPTS}"),
     ["set server r:live/b state maint", "del server r:live/b"]),
    ("replace-adds-first", cfg(f"a 10.0.0.1:80 {OPTS}"), cfg(f"b 10.0.0.2:81 {OPTS}"),
     [*ADD_2, "set server r:live/a state maint", "del server r:live/a"]),
    ("to-empty-and-back", cfg(), cfg("x [::1]:8080"),
     ["add server r:live/x [::1]:8080", "set server r:live/x addr ::1 port 8080", "set server r:live/x state ready"]),
    ("hostname-needs-reload", cfg(), cfg(f"d db.internal:80 {OPTS}"), None),
    ("options-changed", cfg(f"a 10.0.0.1:80 {OPTS}"), cfg("a 10.0.0.1:80"), None),
    ("other-line-changed", cfg("a 10.0.0.1:80"), cfg("a 10.0.0.1:80", extra="    timeout server 5s\n"), None),
    ("balance-changed", cfg("a 10.0.0.1:80"), cfg("a 10.0.0.1:80", balance="leastconn"), None),
    ("backend-added", cfg(), cfg() + b"backend y:live\n", None),
    ("global-changed", cfg(), cfg().replace(b"daemon", b"quiet"), None),
    ("server-in-frontend", b"frontend f\n", b"frontend f\n    server a 10.0.0.1:80\n", None),
    ("duplicate-name", cfg(), cfg("a 10.0.0.1:80", "a 10.0.0.2:80"), None),
    ("canary-shares", cfg(f"b_a 10.0.0.1:80 weight 230 {OPTS}", f"g_b 10.0.0.2:80 weight 26 {OPTS}"),
     cfg(f"b_a 10.0.0.1:80 weight 128 {OPTS}", f"g_b 10.0.0.2:80 weight 128 {OPTS}"),
     ["set server r:live/b_a weight 128", "set server r:live/g_b weight 128"]),
    ("weight-and-address", cfg(f"b_a 10.0.0.1:80 weight 230 {OPTS}"), cfg(f"b_a 10.0.0.9:80 weight 128 {OPTS}"),
     None),
    ("weight-appears", cfg(f"b_a 10.0.0.1:80 {OPTS}"), cfg(f"b_a 10.0.0.1:80 weight 128 {OPTS}"), None),
]


@pytest.mark.parametrize(("old", "new", "expected"), [c[1:] for c in SERVER_CASES], ids=[c[0] for c in SERVER_CASES])
def test_server_commands(old: bytes, new: bytes, expected: list[str] | None) -> None:
    assert runtime_commands(bundle(old), bundle(new)) == expected


def test_servers_change_before_maps() -> None:
    """A route switched to a backend that just got its instance must find it ready."""
    old, new = bundle(cfg(), path_beg=""), bundle(cfg(f"b 10.0.0.2:81 {OPTS}"), path_beg="/a r:live\n")
    assert runtime_commands(old, new) == [*ADD_2, "add map maps/path_beg.map /a r:live"]


ANSWERS = [
    ("empty", "set server b/s state ready", "", True),
    ("addr-changed", "set server b/s addr 10.0.0.1 port 80", "IP changed from '10.0.0.2' to '10.0.0.1', no need "
     "to change the port by 'stats socket command'", True),
    ("addr-same", "set server b/s addr 10.0.0.1 port 80", "No need to change the addr, no need to change the port "
     "by 'stats socket command'", True),
    ("addr-invalid", "set server b/s addr 10.0.0.1 port 80", "Invalid addr '10.0.0.1' by 'stats socket command'",
     False),
    ("added", "add server b/s 10.0.0.1:80", "New server registered.", True),
    ("left-in-maint", "add server b/s 10.0.0.1:80", "Already exists a server with the same name in backend.", True),
    ("add-refused", "add server b/s 10.0.0.1:80", "Backend must use a dynamic load balancing to support dynamic "
     "servers.", False),
    ("deleted", "del server b/s", "Server deleted.", True),
    ("busy", "del server b/s", "Server still has connections attached to it, cannot remove it.", True),
    ("not-in-maint", "del server b/s", "Only servers in maintenance mode can be deleted.", False),
    ("map-error", "add map maps/x.map k v", "Unknown map identifier.", False),
    ("cert-set", "set ssl cert certs/a.pem <<\nPEM\n", "Transaction created for certificate certs/a.pem!", True),
    ("cert-set-again", "set ssl cert certs/a.pem <<\nPEM\n", "Transaction updated for certificate certs/a.pem!",
     True),
    ("cert-unknown", "set ssl cert certs/z.pem <<\nPEM\n", "Can't replace a certificate which is not referenced by "
     "the configuration!\nCan't update certs/z.pem!", False),
    ("cert-committed", "commit ssl cert certs/a.pem", "Committing certs/a.pem.\nSuccess!", True),
    ("cert-commit-failed", "commit ssl cert certs/a.pem", "Committing certs/a.pem\nFailed!\nunable to load", False),
]


def test_a_refused_certificate_is_named_without_its_private_key() -> None:
    class Refusing:
        def batch(self, lines: list[str]) -> list[str]:
            return ["Can't update certs/a.pem!"] * len(lines)

    with pytest.raises(HAProxyError) as caught:
        send(Refusing(), [f"set ssl cert certs/a.pem <<\n{PEM_NEW.decode()}"])  # type: ignore[arg-type]
    assert "KEY" not in str(caught.value) and "set ssl cert certs/a.pem <<" in str(caught.value)


@pytest.mark.parametrize(("command", "answer", "ok"), [c[1:] for c in ANSWERS], ids=[c[0] for c in ANSWERS])
def test_answers(command: str, answer: str, ok: bool) -> None:
    assert accepted(command, answer) is ok


REASONS = [
    ("cert-added", bundle(path_beg=""), bundle(certs={"a": PEM_NEW}, path_beg=""), "new file certs/a.pem"),
    ("cert-removed", bundle(certs={"a": PEM_OLD}), bundle(), "file gone certs/a.pem"),
    ("regex-map", bundle(path_reg=""), bundle(path_reg="^/a x:1\n"),
     "maps/path_reg.map changed (a regex map is matched in file order)"),
    ("new-backend", bundle(b"backend a\n"), bundle(b"backend a\nbackend b\n"), "new backend b"),
    ("gone-listener", bundle(b"frontend t\nbackend a\n"), bundle(b"backend a\n"), "gone: frontend t"),
    ("frontend-changed", bundle(b"frontend t\n    bind :1\n"), bundle(b"frontend t\n    bind :2\n"),
     "section `frontend t` changed"),
    ("backend-option", bundle(b"backend a\n    balance roundrobin\n"), bundle(b"backend a\n    balance first\n"),
     "backend a: settings other than its servers changed"),
    ("server-option", bundle(b"backend a\n    server s 10.0.0.1:80 check\n"),
     bundle(b"backend a\n    server s 10.0.0.1:80\n"), "backend a: server s changed more than its weight"),
    ("host-name", bundle(b"backend a\n"), bundle(b"backend a\n    server s db.local:80\n"),
     "backend a: new server s has a host name, not an address"),
    ("too-many", bundle(path_beg=""), bundle(path_beg="".join(f"/r{i} x:1\n" for i in range(MAX_COMMANDS + 1))),
     f"{MAX_COMMANDS + 1} runtime commands, more than {MAX_COMMANDS}"),
]


@pytest.mark.parametrize(("old", "new", "why"), [c[1:] for c in REASONS], ids=[c[0] for c in REASONS])
def test_reload_reasons(old: Bundle, new: Bundle, why: str) -> None:
    """Each reload says why, in words an operator can act on (log and status)."""
    assert plan_change(old, new) == Reload(why)
