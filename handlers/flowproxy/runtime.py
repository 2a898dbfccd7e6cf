"""Map-only changes through HAProxy's Runtime API instead of a reload. The diff is pure; sending is an edge.

Every valid variant already has a backend, so activating, flipping or switching off a route changes only
map files. Field notes: `add/set/del map` take ~80 µs and need no reload, where a reload confirmed with
`show proc` takes ~40 ms and leaves an old worker behind. The files are still written and switched first,
so a later reload, a restart or a fresh node load the same state.
"""

from __future__ import annotations

from flowproxy.errors import HAProxyError
from flowproxy.haproxy import HAProxySocket
from flowproxy.render import Bundle

MAX_COMMANDS = 200  # past this a reload is as quick and leaves nothing half-applied for long


def parse_map(data: bytes) -> dict[str, str]:
    rows = (line.split(" ", 1) for line in data.decode().splitlines() if line)
    return {key: value for key, value in rows}


def runtime_commands(old: Bundle, new: Bundle) -> list[str] | None:
    """The commands that turn `old`'s maps into `new`'s, or None when only a reload will do."""
    if old.config != new.config or set(old.files) != set(new.files):
        return None
    commands: list[str] = []
    for name in sorted(new.files):
        if name == "haproxy.cfg" or old.files[name] == new.files[name]:
            continue
        if name.endswith("_reg.map"):
            return None  # map_reg takes the first match in file order; `add map` appends at the end
        before, after = parse_map(old.files[name]), parse_map(new.files[name])
        commands += [f"del map {name} {key}" for key in sorted(before.keys() - after.keys())]
        for key, value in sorted(after.items()):
            if key not in before:
                commands.append(f"add map {name} {key} {value}")
            elif before[key] != value:
                commands.append(f"set map {name} {key} {value}")
    if len(commands) > MAX_COMMANDS or any(";" in c or "\\" in c for c in commands):
        return None  # the CLI splits commands on ';' and unescapes '\'
    return commands


def send(stats: HAProxySocket, commands: list[str]) -> None:
    """Run each command; HAProxy answers success with nothing, and anything else is an error."""
    for command in commands:
        answer = stats.command(command).strip()
        if answer:
            raise HAProxyError(f"runtime API refused `{command}`: {answer}")
