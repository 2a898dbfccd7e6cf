"""`flowproxy route ...`: write intents the way users would by hand, but linted and with CAS."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from flowproxy.cli.common import echo_json, settings_of
from flowproxy.core import contract
from flowproxy.core.intent import BALANCES, NAME_RE, PATH_TYPES, intent_to_json, parse_intent
from flowproxy.core.kv import desired_from_kv, parse_weights
from flowproxy.core.model import Intent
from flowproxy.errors import ConsulUnavailable, IntentRejected, NotFound, RejectedByNode, UsageError

if TYPE_CHECKING:
    from flowproxy.consul.store import ConsulStore

F = TypeVar("F", bound=Callable[..., Any])


def wait_options(fn: F) -> F:
    options = [
        click.option("--wait", is_flag=True,
                     help="Return only when every proxy node has applied the write (passing, warning and "
                          "critical nodes; not those in maintenance); exit 7 if one did not in time or there "
                          "is no node, exit 9 if a node rejected the route."),
        click.option("--timeout", default=30.0, show_default=True, help="Seconds --wait may take."),
        click.option("--min-nodes", default=1, show_default=True, type=click.IntRange(min=0),
                     help="With --wait: fail unless at least this many nodes applied it (0: none is fine)."),
        click.option("--ignore-critical", is_flag=True,
                     help="With --wait: do not wait for nodes whose health check is critical (named in the output)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def settle(ctx: click.Context, index: int, options: dict[str, Any], route: str) -> None:
    """With --wait: block until every node the policy names applied `index`, with a progress line meanwhile."""
    if not options["wait"]:
        return
    from flowproxy.cli.fleet import WaitPolicy, wait_converged
    from flowproxy.consul.store import store_for

    shown: set[str] = set()

    def progress(line: str) -> None:
        if line not in shown:
            shown.add(line)
            click.echo(line, err=True)

    settings = settings_of(ctx)
    policy = WaitPolicy(min_nodes=options["min_nodes"], ignore_critical=options["ignore_critical"])
    click.echo(wait_converged(store_for(settings), settings.prefix, index, options["timeout"], progress,
                              policy=policy, route=route))


def _with_extra(body: str, extra: str | None) -> str:
    if extra is None:
        return body
    try:
        fields = json.loads(extra)
    except ValueError as exc:
        raise UsageError(f"--extra is not valid JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise UsageError("--extra must be a JSON object of intent fields")
    return json.dumps(json.loads(body) | fields, sort_keys=True)


def _name(value: str, what: str) -> str:
    if not NAME_RE.fullmatch(value) or value == "active":
        raise UsageError(f"{what} {value!r} must match [a-z0-9][a-z0-9_.-]{{0,62}} and not be 'active'")
    return value


@click.group()
def route() -> None:
    """Stage, activate and remove routes (each command is one KV write)."""


@route.command("put")
@click.argument("name")
@click.option("--variant", "-v", required=True, help="Variant name, e.g. live, blue, green.")
@click.option("--service", "-s", required=True, help="Consul service whose passing instances serve.")
@click.option("--path", "-p", "paths", multiple=True, help="Path to route (repeatable).")
@click.option("--domain", "-d", "domains", multiple=True, help="Host to route, exact or *.wildcard (repeatable).")
@click.option("--tag", "-t", "tags", multiple=True, help="Instances must carry every tag given (repeatable).")
@click.option("--path-type", type=click.Choice(PATH_TYPES), default="prefix", show_default=True,
              help="How --path matches: a string prefix, the exact path, or a PCRE regex.")
@click.option("--balance", type=click.Choice(BALANCES), default="roundrobin", show_default=True,
              help="HAProxy's balance algorithm for the route's instances.")
@click.option("--no-check", is_flag=True, help="No HAProxy health checks on top of Consul's.")
@click.option("--template", default=None, help="Custom template name for this route's backend.")
@click.option("--activate", is_flag=True, help="Also make this variant the serving one, in the same write.")
@click.option("--acme", is_flag=True, help="Certificates for its domains from the nodes' ACME CA (tls.acme).")
@click.option("--extra", default=None, metavar="JSON",
              help='More intent fields as a JSON object, e.g. \'{"https_only": true, "timeout_server": "30s"}\'.')
@wait_options
@click.pass_context
def put(ctx: click.Context, /, *, name: str, variant: str, service: str, paths: tuple[str, ...],
        domains: tuple[str, ...], tags: tuple[str, ...], path_type: str, balance: str, no_check: bool,
        template: str | None, activate: bool, acme: bool, extra: str | None, **waiting: Any) -> None:
    """Stage (and optionally activate) the intent routes/NAME/VARIANT."""
    from flowproxy.consul.store import store_for

    settings = settings_of(ctx)
    key = contract.intent_key(settings.prefix, _name(name, 'route'), _name(variant, 'variant'))
    intent = Intent(service=service, paths=paths, domains=domains, tags=tags, path_type=path_type,
                    balance=balance, check=not no_check, template=template, acme=acme)
    body = _with_extra(intent_to_json(intent), extra)
    _, problems = parse_intent(key, body.encode())
    if problems:
        raise IntentRejected([str(p) for p in problems])
    store = store_for(settings)
    existing = store.get(key)
    ops: list[tuple[str, str, bytes | None, int | None]] = [
        ("cas", key, body.encode(), existing.modify_index if existing else 0)]
    if activate:
        active_key = contract.active_key(settings.prefix, name)
        current = store.get(active_key)
        ops.append(("cas", active_key, variant.encode(), current.modify_index if current else 0))
    store.txn(ops)
    written = store.get(key)
    if written is None or written.value != body.encode():
        raise ConsulUnavailable(f"{settings.consul_addr} accepted the write but {key} does not read back as "
                                "written; is CONSUL_HTTP_ADDR a Consul agent?")
    click.echo(f"{key} = {body}" + ("  (active)" if activate else ""))
    if not store.service_health(service):
        click.echo(f"warning: service {service!r} has no instance registered in Consul's catalog; the route "
                   "answers 503 until one registers and passes its checks (a typo?)", err=True)
    settle(ctx, written.modify_index, waiting, name)


@route.command("activate")
@click.argument("name")
@click.argument("variant")
@wait_options
@click.pass_context
def activate(ctx: click.Context, /, *, name: str, variant: str, **waiting: Any) -> None:
    """Make VARIANT the serving variant of route NAME (one CAS write).

    A weighted canary names several: `flowproxy route activate web blue=90,green=10`.
    """
    from flowproxy.consul.store import store_for

    settings = settings_of(ctx)
    store = store_for(settings)
    base = contract.route_folder(settings.prefix, _name(name, 'route'))
    names = [part.split("=", 1)[0].strip() for part in variant.split(",")]
    for one in names:
        target = store.get(base + _name(one, "variant"))
        if target is None:
            raise NotFound(f"{base}{one} does not exist; stage it first with `flowproxy route put`")
        _, problems = parse_intent(target.key, target.value)
        if problems:
            raise IntentRejected([str(p) for p in problems])
    if "=" in variant:
        _, weight_problems = parse_weights(base + "active", variant, set(names))
        if weight_problems:
            raise IntentRejected([str(p) for p in weight_problems])
    current = store.get(base + "active")
    store.put(base + "active", variant, cas=current.modify_index if current else 0)
    written = store.get(base + "active")
    if written is None or written.value.decode(errors="replace") != variant:
        raise ConsulUnavailable(f"{settings.consul_addr} accepted the write but {base}active does not read back "
                                "as written; is CONSUL_HTTP_ADDR a Consul agent?")
    click.echo(f"{base}active = {variant}")
    settle(ctx, written.modify_index, waiting, name)


def existing_route(store: ConsulStore, prefix: str, name: str) -> str:
    """The folder of route NAME; NotFound when it holds no key."""
    folder = contract.route_folder(prefix, _name(name, "route"))
    if not store.keys(folder):
        raise NotFound(f"there is no route {name} (no keys under {folder})")
    return folder


@route.command("deactivate")
@click.argument("name")
@wait_options
@click.pass_context
def deactivate(ctx: click.Context, /, *, name: str, **waiting: Any) -> None:
    """Switch route NAME off; its variants stay in KV."""
    from flowproxy.consul.store import store_for

    settings = settings_of(ctx)
    store = store_for(settings)
    key = contract.active_key(settings.prefix, _name(name, "route"))
    current = store.get(key)
    if current is None:
        existing_route(store, settings.prefix, name)
        click.echo(f"{key} is absent: route {name} is already off")
        return
    store.delete(key, cas=current.modify_index)
    click.echo(f"deleted {key}")
    settle(ctx, store.read_prefix(key)[0], waiting, name)  # the delete's tombstone index


@route.command("remove")
@click.argument("name")
@wait_options
@click.pass_context
def remove(ctx: click.Context, /, *, name: str, **waiting: Any) -> None:
    """Delete route NAME with all its variants."""
    from flowproxy.consul.store import store_for

    settings = settings_of(ctx)
    store = store_for(settings)
    key = existing_route(store, settings.prefix, name)
    store.delete(key, recurse=True)
    click.echo(f"deleted {key}")
    settle(ctx, store.read_prefix(key)[0], waiting, name)


@route.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the routes as JSON.")
@click.pass_context
def list_routes(ctx: click.Context, as_json: bool) -> None:
    """Every route with its variants, the active one, and what the nodes report."""
    from flowproxy.consul.reads import read_config, read_statuses
    from flowproxy.consul.store import store_for

    settings = settings_of(ctx)
    store = store_for(settings)
    index, entries = read_config(store, settings.prefix)
    desired = desired_from_kv(settings.prefix, entries, index)
    statuses = read_statuses(store, settings.prefix)
    rows = [_route_row(r.name, r, statuses) for r in desired.routes]
    ignored = [str(p) for p in desired.stray]
    if as_json:
        echo_json({"routes": rows, "ignored": ignored})
        sys.exit(RejectedByNode.exit_code if any(row["reasons"] for row in rows) else 0)
    for row in rows:
        click.echo(f"{row['route']:<24} active={row['active'] or '-':<12} variants={','.join(row['variants'])}"
                   f"  nodes: {row['summary']}")
        for reason in row["reasons"]:
            click.echo(f"    rejected: {reason}")
    for problem in ignored:
        click.echo(f"ignored: {problem}")
    if any(row["reasons"] for row in rows):
        sys.exit(RejectedByNode.exit_code)


def _route_row(name: str, r: Any, statuses: dict[str, dict[str, Any]]) -> dict[str, Any]:
    lint = [str(p) for p in r.problems] + [str(p) for v in r.variants for p in v.problems]
    states: dict[str, list[str]] = {}
    reasons = list(lint)
    for node, doc in sorted(statuses.items()):
        st = (doc.get("routes") or {}).get(name) or ({"state": "serving"} if doc.get("serving_omitted") else {})
        states.setdefault(st.get("state", "unknown"), []).append(node)
        reasons += [x for x in st.get("reasons", []) if x not in reasons]
    summary = "; ".join(f"{state}: {', '.join(nodes)}" for state, nodes in sorted(states.items())) or "none"
    return {"route": name, "active": r.active, "variants": [v.name for v in r.variants],
            "reasons": reasons, "nodes": states, "summary": summary}


def register(group: click.Group) -> None:
    group.add_command(route)
