"""Changes that HAProxy's Runtime API can make without a reload. The diff is pure; sending is an edge.

Every valid variant already has a backend, so activating, flipping or switching off a route changes only
map files; a new route's backend sits in a spare (spares.py); instances coming and going change only
`server` lines, which `add server` and `del server` make at run time, a canary's new weights are
`set server weight`, a renewed certificate is `set ssl cert` + `commit ssl cert`, and a new or removed one
an entry of the crt-list (`new ssl cert` ... `add ssl crt-list`, `del ssl crt-list` + `del ssl cert`).
Dynamic servers rather than spare disabled slots: each slot's health check reserves a file descriptor,
and 4 slots x 10k backends asked HAProxy for 40k, over this machine's limit of 20k.
Field notes: runtime commands take ~0.1 ms (~5 us each batched on one connection) and need no reload,
where a reload confirmed with `show proc` takes ~40 ms and leaves an old worker behind. The files are
written too, so a later reload, a restart or a fresh node load the same state.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from flowproxy.core.fragment_rules import SECTION_KEYWORDS
from flowproxy.core.render import CRT_LIST, Bundle
from flowproxy.errors import HAProxyError
from flowproxy.haproxy.master import HAProxySocket

CONFIG = "haproxy.cfg"
# Past this, a reload. Over one connection a command takes ~5 us (20,000: ~0.1 s), so this bounds how long
# a change stands half-applied rather than the time: an instance of a service 5,000 routes use is
# 20,000 commands.
MAX_COMMANDS = 20_000


def parse_map(data: bytes) -> dict[str, str]:
    rows = (line.split(" ", 1) for line in data.decode().splitlines() if line)
    return {key: value for key, value in rows}


@dataclass(frozen=True)
class Reload:
    """Why HAProxy has to reload: said in the node's log and status, so an operator sees what costs one."""

    why: str


def runtime_commands(old: Bundle, new: Bundle) -> list[str] | None:
    """The commands that turn running `old` into `new`, or None when only a reload will do."""
    change = plan_change(old, new)
    return None if isinstance(change, Reload) else change


def plan_change(old: Bundle, new: Bundle) -> list[str] | Reload:
    """The commands that turn running `old` into `new`, or why only a reload will do."""
    added, removed = sorted(set(new.files) - set(old.files)), sorted(set(old.files) - set(new.files))
    listed = (set(crt_list(new)) - set(crt_list(old)), set(crt_list(old)) - set(crt_list(new)))
    if (set(added), set(removed)) != listed:  # only a certificate in the served list comes or goes
        return Reload("; ".join([f"new file {', '.join(added)}"] * bool(added)
                                + [f"file gone {', '.join(removed)}"] * bool(removed)))
    servers = server_commands(old.config, new.config)
    if isinstance(servers, Reload):
        return servers
    certs = crt_list_commands(old, new)
    if isinstance(certs, Reload):
        return certs
    files: list[str] = []
    for name in sorted(new.files):
        if name in (CONFIG, CRT_LIST) or name not in old.files or old.files[name] == new.files[name]:
            continue
        if name.startswith("certs/"):
            files += cert_commands(name, new.files[name])
            continue
        if name.endswith("_reg.map"):  # map_reg takes the first match in file order; `add map` appends
            return Reload(f"{name} changed (a regex map is matched in file order)")
        if not name.startswith("maps/"):
            return Reload(f"{name} changed")
        files += map_commands(name, parse_map(old.files[name]), parse_map(new.files[name]))
    return finish(servers + certs, files)


def finish(changes: list[str], files: list[str]) -> list[str] | Reload:
    """Server and certificate `changes` around the maps' and certificates' contents (`files`), in the order
    HAProxy must see them, or why a reload instead.

    Servers and certificates come first and go last: no map ever points at a backend whose servers are
    not there yet, and a route taken out of the maps loses its servers only afterwards (never a 503).
    """
    leaving = [c for c in changes if c.startswith(("del server ", "del ssl ")) or c.endswith(" state maint")]
    gone = set(leaving)
    commands = [c for c in changes if c not in gone] + files + leaving
    if len(commands) > MAX_COMMANDS:
        return Reload(f"{len(commands)} runtime commands, more than {MAX_COMMANDS}")
    if any(";" in c or "\\" in c for c in commands):
        return Reload("a map key or value holds ';' or '\\', which the runtime API would split or unescape")
    return commands


def map_commands(name: str, before: dict[str, str], after: dict[str, str]) -> list[str]:
    commands = [f"del map {name} {key}" for key in sorted(before.keys() - after.keys())]
    for key, value in sorted(after.items()):
        if key not in before:
            commands.append(f"add map {name} {key} {value}")
        elif before[key] != value:
            commands.append(f"set map {name} {key} {value}")
    return commands


def crt_list_commands(old: Bundle, new: Bundle) -> list[str] | Reload:
    """Certificates added to or removed from the served list, entry by entry. The first entry is what
    clients without SNI get, and HAProxy will not remove it: a new first entry is a reload."""
    before, after = crt_list(old), crt_list(new)
    if before == after:
        return []
    if not before or not after or before[0] != after[0]:
        return Reload(f"the certificate for clients without SNI changes ({before[:1] or 'none'} -> "
                      f"{after[:1] or 'none'})")
    kept = [name for name in before if name in after]
    if after != kept + [name for name in after if name not in before]:
        return Reload(f"{CRT_LIST}: certificates reordered")
    commands = []
    for name in after[len(kept):]:
        commands += [f"new ssl cert {name}", *cert_commands(name, new.files[name]),
                     f"add ssl crt-list {CRT_LIST} {name}"]
    for name in before:
        if name not in after:
            commands += [f"del ssl crt-list {CRT_LIST} {name}", f"del ssl cert {name}"]
    return commands


def crt_list(bundle: Bundle) -> list[str]:
    return bundle.files.get(CRT_LIST, b"").decode().split()


def cert_commands(name: str, pem: bytes) -> list[str]:
    """A certificate's content: a transaction on the running one (or on a `new ssl cert`), then its commit.

    The payload after `<<` ends at the first empty line, so blank lines (legal between PEM blocks) go.
    """
    payload = "\n".join(line for line in pem.decode(errors="replace").splitlines() if line.strip())
    return [f"set ssl cert {name} <<\n{payload}\n", f"commit ssl cert {name}"]


def server_commands(old: bytes, new: bytes) -> list[str] | Reload:
    """Commands for configs whose only difference is `server` lines added to or removed from backends."""
    if old == new:
        return []
    before, after = sections(old.decode()), sections(new.decode())
    heads_before, heads_after = [head for head, _ in before], [head for head, _ in after]
    if heads_before != heads_after:
        return Reload(section_change(heads_before, heads_after))
    commands: list[str] = []
    for (head, old_body), (_, new_body) in zip(before, after, strict=True):
        if old_body == new_body:
            continue
        words = head.split()
        if words[:1] != ["backend"] or len(words) != 2:
            return Reload(f"section `{head.strip() or 'global'}` changed")
        change = backend_change(words[1], old_body, new_body)
        if isinstance(change, Reload):
            return change
        commands += change
    return commands


def section_change(before: list[str], after: list[str]) -> str:
    """`new backend x`, `gone: frontend y`: the first few, enough for a log line."""
    added = [h.strip() for h in after if h not in set(before)]
    gone = [h.strip() for h in before if h not in set(after)]
    words = [f"new {h}" for h in added[:3]] + [f"gone: {h}" for h in gone[:3]]
    more = len(added) + len(gone) - len(words)
    return ", ".join(words + [f"{more} more"] * (more > 0)) or "sections reordered"


def backend_bodies(text: str) -> dict[str, list[str]]:
    """backend name -> its lines, for every backend section of a config flowproxy rendered."""
    out = {}
    for header, body in sections(text):
        words = header.split()
        if len(words) == 2 and words[0] == "backend":
            out[words[1]] = body
    return out


def sections(text: str) -> list[tuple[str, list[str]]]:
    """(header, body lines) per section; lines before the first header form a section of their own."""
    out: list[tuple[str, list[str]]] = [("", [])]
    for line in text.splitlines():
        words = line.split()
        if words and not line[0].isspace() and words[0] in SECTION_KEYWORDS:
            out.append((line, []))
        else:
            out[-1][1].append(line)
    return out


def backend_change(backend: str, old: list[str], new: list[str]) -> list[str] | Reload:
    """Add and delete servers; any other difference (options, order of other lines) needs a reload."""
    old_servers, new_servers = servers(old), servers(new)
    if old_servers is None or new_servers is None:
        return Reload(f"backend {backend}: a server name repeats")
    if others(old) != others(new):
        return Reload(f"backend {backend}: settings other than its servers changed")
    commands: list[str] = []
    for name in sorted(old_servers.keys() & new_servers.keys()):
        if old_servers[name] != new_servers[name]:
            weight = weight_change(old_servers[name], new_servers[name])
            if weight is None:
                return Reload(f"backend {backend}: server {name} changed more than its weight")
            commands.append(f"set server {backend}/{name} weight {weight}")
    # Additions first, so a backend whose instances are replaced never runs empty in between.
    for name in sorted(new_servers.keys() - old_servers.keys()):
        words, target = new_servers[name], f"{backend}/{name}"
        address = endpoint(words[0])
        if address is None:  # a host name would be resolved at run time, unlike the file's init-addr
            return Reload(f"backend {backend}: new server {name} has a host name, not an address")
        # Dynamic servers start in maintenance with checks off. `set server addr` covers a same-named
        # server left in maintenance by an earlier delete that found connections still attached.
        commands += [f"add server {target} {' '.join(words)}",
                     f"set server {target} addr {address[0]} port {address[1]}"]
        commands += [f"enable health {target}"] if "check" in words[1:] else []
        commands.append(f"set server {target} state ready")
    for name in sorted(old_servers.keys() - new_servers.keys()):
        commands += [f"set server {backend}/{name} state maint", f"del server {backend}/{name}"]
    return commands


def weight_change(old: list[str], new: list[str]) -> str | None:
    """The new weight when two server lines differ only in it (a canary's shares moving), else None."""
    if len(old) != len(new) or "weight" not in new:
        return None
    at = new.index("weight") + 1
    same_rest = at < len(new) and old[:at] == new[:at] and old[at + 1:] == new[at + 1:]
    if not same_rest or not (new[at].isascii() and new[at].isdigit()):
        return None
    return new[at]


def servers(body: list[str]) -> dict[str, list[str]] | None:
    """Server name -> the words after it; None when a name repeats (HAProxy would refuse the file)."""
    found: dict[str, list[str]] = {}
    for words in (line.split() for line in body):
        if words[:1] == ["server"] and len(words) >= 3:
            if words[1] in found:
                return None
            found[words[1]] = words[2:]
    return found


def others(body: list[str]) -> list[str]:
    return [line for line in body if line.split()[:1] != ["server"]]


def endpoint(text: str) -> tuple[str, int] | None:
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(host)), int(port)
    except ValueError:
        return None


def send(stats: HAProxySocket, commands: list[str]) -> None:
    """Run the commands (all of them, over one connection); anything but a known success answer is an error
    (named by its first line only: a certificate's payload holds its private key), and the caller then
    reloads from files, which undoes whatever did run."""
    for command, answer in zip(commands, stats.batch(commands), strict=True):
        if not accepted(command, answer.strip()):
            raise HAProxyError(f"runtime API refused `{command.splitlines()[0]}`: {answer.strip()[:300]}")


def accepted(command: str, answer: str) -> bool:
    """HAProxy 2.6 answers most commands with nothing on success, and these few in words."""
    if not answer:
        return True
    if command.startswith("set server ") and " addr " in command:
        return answer.lower().startswith(("ip changed from", "no need to change the addr"))
    if command.startswith("add server "):
        return answer in ("New server registered.", "Already exists a server with the same name in backend.")
    if command.startswith("set ssl cert "):
        return answer.startswith(("Transaction created for certificate", "Transaction updated for certificate"))
    if command.startswith("commit ssl cert "):
        return answer.endswith("Success!")
    if command.startswith("new ssl cert "):
        return answer.startswith("New empty certificate store")
    if command.startswith("add ssl crt-list "):
        return answer.endswith("Success!")
    if command.startswith("del ssl crt-list "):
        return answer.startswith("Entry ") and " deleted in crtlist " in answer
    if command.startswith("del ssl cert "):
        return answer.startswith("Certificate ") and answer.endswith("deleted!")
    if command.startswith("del server "):
        # A server with connections still attached stays in maintenance (no traffic) until the next reload.
        return answer.startswith(("Server deleted.", "Server still has connections attached"))
    return False
