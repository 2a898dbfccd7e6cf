"""The click edge: options, then one call into the library; errors become messages and exit codes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from flowproxy import __version__
from flowproxy.cli.common import echo_json, settings_of
from flowproxy.core import contract
from flowproxy.defaults import DEFAULT_CONSUL_ADDR
from flowproxy.errors import EXIT_CODES, FlowproxyError
from flowproxy.node.forward import HANDLE_KINDS
from flowproxy.redact import redact
from flowproxy.settings import Settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowproxy")
@click.option("--consul", "consul_addr", envvar="CONSUL_HTTP_ADDR", default=DEFAULT_CONSUL_ADDR, show_default=True,
              help="Consul agent HTTP address (env CONSUL_HTTP_ADDR).")
@click.option("--token", envvar="CONSUL_HTTP_TOKEN", default=None, help="Consul ACL token (env CONSUL_HTTP_TOKEN).")
@click.option("--prefix", envvar="FLOWPROXY_PREFIX", default=contract.DEFAULT_PREFIX, show_default=True,
              help="KV prefix holding the routes (env FLOWPROXY_PREFIX).")
@click.option("--node", envvar="FLOWPROXY_NODE", default=None, help="This proxy node's name (default: hostname).")
@click.option("--data-dir", envvar="FLOWPROXY_DATA_DIR", type=click.Path(path_type=Path), default=None,
              help="This node's data folder (env FLOWPROXY_DATA_DIR).")
@click.option("--log-format", envvar="FLOWPROXY_LOG_FORMAT", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="flowproxy's own log lines, one event a line (env FLOWPROXY_LOG_FORMAT).")
@click.option("--log-level", envvar="FLOWPROXY_LOG_LEVEL", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              help="The least a line must be to be logged (env FLOWPROXY_LOG_LEVEL).")
@click.pass_context
def cli(ctx: click.Context, /, *, consul_addr: str, token: str | None, prefix: str, node: str | None,
        data_dir: Path | None, log_format: str, log_level: str) -> None:
    """On-demand HAProxy reconfiguration where Consul KV is the whole API."""
    ctx.obj = Settings.from_env(consul_addr=consul_addr, consul_token=token, prefix=prefix, node=node,
                                data_dir=data_dir, log_format=log_format, log_level=log_level.lower())


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--kind", type=click.Choice(HANDLE_KINDS), default="manual", show_default=True,
              help="Which watch calls (the payload comes on stdin); manual waits for a running apply.")
@click.option("--accept-empty", is_flag=True, help="Apply an empty route table even if not newer than the running one.")
def handle(kind: str, accept_empty: bool) -> None:
    """Apply Consul's state to this node (the entry Consul watches call)."""
    from flowproxy.node.handler import main as handle_main

    sys.exit(handle_main(["--kind", kind] + (["--accept-empty"] if accept_empty else [])))


@cli.command()
@click.option("--maps", is_flag=True, help="Print the map files after haproxy.cfg.")
@click.pass_context
def render(ctx: click.Context, maps: bool) -> None:
    """Print the config rendered from KV now (what a reload loads); changes nothing."""
    import dataclasses
    import tempfile

    from flowproxy.consul.store import store_for
    from flowproxy.pipeline import build, gather

    # Vetting's verdicts go to a scratch folder that ends with the command: nothing of the node's changes.
    with tempfile.TemporaryDirectory(prefix="flowproxy-render-") as scratch:
        settings = dataclasses.replace(settings_of(ctx), scratch=Path(scratch))
        seen = gather(settings, store_for(settings))
        built = build(settings, seen.desired, seen.health)
    bundle, plan = built.bundle, built.plan
    click.echo(bundle.config.decode(), nl=False)
    if maps:
        for name in sorted(bundle.files):
            if name != "haproxy.cfg":
                click.echo(f"# ---- {name}")
                click.echo(bundle.files[name].decode(), nl=False)
    for state in plan.states:
        for reason in state.reasons:
            click.echo(f"rejected: {reason}", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status documents as JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show every proxy node: applied index, config hash, rejected routes; and this node's traffic per route."""
    import dataclasses

    from flowproxy.cli.fleet import certificates_report, fleet_report
    from flowproxy.consul.reads import read_certificates, read_fleet
    from flowproxy.consul.store import store_for
    from flowproxy.core.fleet import fleet_exit_code
    from flowproxy.haproxy.master import local_old_workers
    from flowproxy.haproxy.spares import current_slots
    from flowproxy.haproxy.traffic import counts_report, local_counts
    from flowproxy.node.selfcheck import SERVICE

    settings = settings_of(ctx)
    store = store_for(settings)
    docs, latest, rows = read_fleet(store, settings.prefix, SERVICE)
    counts = local_counts(settings.stats_socket, current_slots(settings.current))
    old = local_old_workers(settings.master_socket)
    certificates = read_certificates(store, settings.prefix)
    code = fleet_exit_code(rows, docs)
    if as_json:
        echo_json({"latest_index": latest, "nodes": [dataclasses.asdict(r) for r in rows], "status": docs,
                   "certificates": certificates, "exit_code": code}
                  | ({"traffic": counts} if counts is not None else {})
                  | ({"haproxy": dataclasses.asdict(old)} if old is not None else {}))
    else:
        click.echo(fleet_report(rows, docs, latest), nl=False)
        if certificates:
            click.echo("\n" + certificates_report(certificates), nl=False)
        if old is not None:
            click.echo(f"\nthis node: {old.reloads} reload(s) since HAProxy started; {old.summary()}")
        if counts:
            click.echo("\n" + counts_report(counts), nl=False)
    sys.exit(code)


def with_exit_codes(command: click.Command) -> None:
    """Every command's --help ends with the exit codes."""
    command.epilog = EXIT_CODES
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            with_exit_codes(sub)


def main() -> None:
    from flowproxy.cli import node as cli_node
    from flowproxy.cli import route as cli_route

    cli_route.register(cli)
    cli_node.register(cli)
    with_exit_codes(cli)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except FlowproxyError as exc:
        click.echo(f"flowproxy: {redact(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: one line for the user, the traceback only when asked for
        if os.environ.get("FLOWPROXY_DEBUG"):
            raise
        click.echo(f"flowproxy: internal error: {type(exc).__name__}: {redact(str(exc))[:500]} "
                   "(FLOWPROXY_DEBUG=1 shows the traceback)", err=True)
        sys.exit(1)
