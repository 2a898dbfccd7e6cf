"""`flowproxy node up` and `flowproxy demo`: run a proxy node in the foreground."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import click

from flowproxy.cli import settings_of
from flowproxy.node import Node, NodeSpec
from flowproxy.settings import Settings


def node_options(fn: click.decorators.FC) -> click.decorators.FC:
    options = [
        click.option("--bind", default="127.0.0.1", show_default=True, help="Address the Consul agent binds."),
        click.option("--http", "http_bind", envvar="FLOWPROXY_HTTP_BIND", default="127.0.0.1:8080",
                     show_default=True, help="Where HAProxy listens for users (address:port)."),
        click.option("--preview", "preview_bind", envvar="FLOWPROXY_PREVIEW_BIND", default=None,
                     help="Open the preview listener here (address:port); off: a unix socket in the data folder."),
        click.option("--https", "https_bind", envvar="FLOWPROXY_HTTPS_BIND", default=None,
                     help="Serve HTTPS here with the certificates in KV certs/ (address:port); off by default."),
        click.option("--sni", "sni_bind", envvar="FLOWPROXY_SNI_BIND", default=None,
                     help="Pass TLS through by SNI here, for routes with mode sni (address:port); off by default. "
                          "The same address as --https shares the port: other names are terminated."),
        click.option("--tcp-host", "tcp_host", envvar="FLOWPROXY_TCP_HOST", default="127.0.0.1", show_default=True,
                     help="Address that routes with mode tcp listen on, each on its own port."),
        click.option("--metrics", "metrics_bind", envvar="FLOWPROXY_METRICS_BIND", default=None,
                     help="Prometheus /metrics and the /stats page here (address:port); off by default."),
        click.option("--stats-auth", envvar="FLOWPROXY_STATS_AUTH", default=None,
                     help="user:password for the /stats page (env FLOWPROXY_STATS_AUTH); without it, locked."),
        click.option("--consul-http-port", default=8500, show_default=True, type=int),
        click.option("--serf-port", default=8301, show_default=True, type=int),
        click.option("--server-port", default=8300, show_default=True, type=int),
        click.option("--consul-bin", default="consul", show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def make_spec(settings: Settings, *, bind: str, consul_http_port: int, serf_port: int, server_port: int,
              consul_bin: str, join: tuple[str, ...], dev: bool, **listeners: str | None) -> NodeSpec:
    """`listeners`: http_bind, preview_bind, https_bind, sni_bind, tcp_host, metrics_bind, stats_auth."""
    settings = dataclasses.replace(settings, consul_addr=f"{bind}:{consul_http_port}",
                                   **listeners)  # type: ignore[arg-type]  # click gives each as str or None
    return NodeSpec(settings=settings, bind=bind, http_port=consul_http_port, serf_port=serf_port,
                    server_port=server_port, join=join, dev=dev, consul_bin=consul_bin)


@click.group()
def node() -> None:
    """Run this machine as a proxy node."""


@node.command("up")
@node_options
@click.option("--join", multiple=True, help="Serf address of an existing Consul agent to join (repeatable).")
@click.option("--dev", is_flag=True, help="Run the agent as a one-node Consul server (no cluster needed).")
@click.option("--acl", is_flag=True, help="Consul ACLs on (default deny); the node's --token runs its watches.")
@click.pass_context
def up(ctx: click.Context, /, *, join: tuple[str, ...], dev: bool, acl: bool, **opts: str | int) -> None:
    """Start Consul agent + HAProxy for this node; Ctrl-C stops both."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not dev and not join:
        raise click.UsageError("give --join ADDR to join an existing Consul, or --dev to run one here")
    spec = dataclasses.replace(make_spec(settings_of(ctx), join=join, dev=dev, **opts), acl=acl)  # type: ignore[arg-type]
    running = Node(spec)
    try:
        running.start()
        running.arm_watches()
        click.echo(f"node {spec.settings.node} up: proxy http://{spec.settings.http_bind}  "
                   f"consul http://{running.http_addr()}  data {spec.settings.data_dir}  (Ctrl-C stops)")
        running.supervise()
    finally:
        running.stop()


@node.command("init")
@click.pass_context
def init(ctx: click.Context) -> None:
    """Give HAProxy a valid config before the first apply: the last good one, else an empty route table.

    For an HAProxy started by systemd (ops/systemd/flowproxy-haproxy.service runs this first).
    """
    from flowproxy.node import ensure_bootstrap_config

    settings = settings_of(ctx)
    for folder in (settings.data_dir, settings.haproxy_dir):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    ensure_bootstrap_config(settings)
    click.echo(f"{settings.current / 'haproxy.cfg'} is ready")


@node.command("env")
@click.pass_context
def env(ctx: click.Context) -> None:
    """Print the FP_* environment HAProxy needs for this node's settings (for a systemd EnvironmentFile)."""
    for name, value in sorted(settings_of(ctx).haproxy_env().items()):
        click.echo(f"{name}={value}")


@click.command()
@node_options
@click.option("--keep-running/--no-keep-running", default=True, show_default=True,
              help="Stay up after the walkthrough until Ctrl-C.")
@click.pass_context
def demo(ctx: click.Context, /, *, keep_running: bool, **opts: str | int) -> None:
    """A local node with demo services, then the walkthrough, step by step."""
    from flowproxy.demo import run_demo

    settings = settings_of(ctx)
    if ctx.find_root().params.get("data_dir") is None:
        settings = dataclasses.replace(settings, data_dir=Path("/tmp/flowproxy-demo"), node="demo")
    spec = make_spec(settings, join=(), dev=True, **opts)  # type: ignore[arg-type]
    run_demo(spec, keep_running)


def register(group: click.Group) -> None:
    group.add_command(node)
    group.add_command(demo)
