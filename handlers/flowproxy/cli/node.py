"""`flowproxy node up` and `flowproxy demo`: run a proxy node in the foreground."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import click

from flowproxy import logs
from flowproxy.cli.common import settings_of
from flowproxy.errors import UsageError
from flowproxy.node.agent import AgentTLS
from flowproxy.node.up import Node, NodeSpec
from flowproxy.settings import ConsulTLS, Settings, ensure_stats_lock


def node_options(fn: click.decorators.FC) -> click.decorators.FC:
    options = [
        click.option("--bind", default="127.0.0.1", show_default=True,
                     help="Address the Consul agent binds for the cluster (serf, RPC)."),
        click.option("--client", default="127.0.0.1", show_default=True,
                     help="Address of the agent's HTTP API: loopback unless you mean to open it."),
        click.option("--advertise", default=None, help="Serf address other agents reach (default: --bind)."),
        click.option("--encrypt", envvar="FLOWPROXY_GOSSIP_KEY", default=None,
                     help="Gossip encryption key from `consul keygen` (env FLOWPROXY_GOSSIP_KEY)."),
        click.option("--tls-ca", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="CA of the cluster's TLS: with --tls-cert and --tls-key, the agent serves HTTPS only "
                          "and verifies RPC."),
        click.option("--tls-cert", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="This agent's certificate (`consul tls cert create`)."),
        click.option("--tls-key", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="This agent's private key."),
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
        click.option("--acme-directory", envvar="FLOWPROXY_ACME_DIRECTORY", default=None,
                     help="ACME directory URL: routes with \"tls\": {\"acme\": true} get certificates from it."),
        click.option("--acme-email", envvar="FLOWPROXY_ACME_EMAIL", default=None, help="The ACME account's contact."),
        click.option("--acme-agree-tos", envvar="FLOWPROXY_ACME_AGREE_TOS", is_flag=True, default=False,
                     help="Agree to the ACME CA's terms of service."),
        click.option("--acme-ca-bundle", envvar="FLOWPROXY_ACME_CA_BUNDLE", default=None,
                     type=click.Path(exists=True, dir_okay=False), help="CA certificates for the directory's HTTPS."),
        click.option("--consul-http-port", default=8500, show_default=True, type=int,
                     help="Port of the agent's HTTP (or, with TLS, HTTPS) API."),
        click.option("--serf-port", default=8301, show_default=True, type=int, help="Serf LAN port of the agent."),
        click.option("--server-port", default=8300, show_default=True, type=int,
                     help="RPC port of the agent (a server's, with --dev)."),
        click.option("--consul-bin", default="consul", show_default=True, help="The consul executable."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def make_spec(settings: Settings, *, bind: str, consul_http_port: int, serf_port: int, server_port: int,
              consul_bin: str, join: tuple[str, ...], dev: bool, client: str = "127.0.0.1",
              advertise: str | None = None, encrypt: str | None = None, tls_ca: str | None = None,
              tls_cert: str | None = None, tls_key: str | None = None, **listeners: str | None) -> NodeSpec:
    """`listeners`: http_bind, preview_bind, https_bind, sni_bind, tcp_host, metrics_bind, stats_auth, and the
    acme_* settings."""
    tls = None
    if tls_ca or tls_cert or tls_key:
        if not (tls_ca and tls_cert and tls_key):
            raise UsageError("--tls-ca, --tls-cert and --tls-key go together")
        tls = AgentTLS(str(Path(tls_ca).absolute()), str(Path(tls_cert).absolute()), str(Path(tls_key).absolute()))
    scheme = "https://" if tls else ""
    client_tls = ConsulTLS(enabled=True, ca_file=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file) \
        if tls else settings.consul_tls
    settings = dataclasses.replace(settings, consul_addr=f"{scheme}{client}:{consul_http_port}",
                                   consul_tls=client_tls, **listeners).checked()  # type: ignore[arg-type]
    return NodeSpec(settings=settings, bind=bind, http_port=consul_http_port, serf_port=serf_port,
                    server_port=server_port, join=join, dev=dev, consul_bin=consul_bin, client=client,
                    advertise=advertise, encrypt=encrypt, tls=tls)


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
    base = settings_of(ctx)
    logs.install(base.log_format, base.log_level, base.node)
    if not dev and not join:
        raise click.UsageError("give --join ADDR to join an existing Consul, or --dev to run one here")
    remote = [a for a in join if not _loopback(a.rpartition(":")[0] or a)]
    if remote and _loopback(str(opts["bind"])):
        raise click.UsageError(f"--join {remote[0]} with --bind {opts['bind']}: the cluster cannot reach an agent "
                               "bound to loopback; give --bind <this host's LAN address>")
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


@node.command("run")
@click.pass_context
def run(ctx: click.Context) -> None:
    """The production node process, beside the host's own Consul agent and a systemd-managed HAProxy.

    \b
    It starts neither: it attaches to the agent (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN or
    CONSUL_HTTP_TOKEN_FILE, CONSUL_CACERT/CONSUL_CLIENT_CERT/CONSUL_CLIENT_KEY/CONSUL_TLS_SERVER_NAME)
    and to HAProxy's master socket (<data>/haproxy/master.sock), serves the watches' events warm,
    registers the node with a TTL check, retries, resyncs, and notifies systemd (Type=notify, watchdog).
    See ops/systemd/flowproxy.service. Exit codes: 0 stopped by a signal, 2 bad settings.
    """
    from flowproxy.node import attached
    from flowproxy.node.handler import setup_logging

    settings = settings_of(ctx)
    setup_logging(settings)
    attached.run(settings)


@node.command("init")
@click.pass_context
def init(ctx: click.Context) -> None:
    """Give HAProxy a valid config before the first apply: the last good one, else an empty route table.

    For an HAProxy started by systemd (ops/systemd/flowproxy-haproxy.service runs this first).
    """
    from flowproxy.node.up import prepare

    settings = settings_of(ctx)
    prepare(settings)
    click.echo(f"{settings.current / 'haproxy.cfg'} is ready; the agent may load {settings.watch_dir}")


@node.command("env")
@click.pass_context
def env(ctx: click.Context) -> None:
    """Print the FP_* environment HAProxy needs for this node's settings (for a systemd EnvironmentFile)."""
    # Not FP_USER/FP_GROUP: they depend on who runs HAProxy (as root here, not under the unit's User=).
    settings = settings_of(ctx)
    if settings.stats_auth is None:
        ensure_stats_lock(settings.data_dir)  # the same password every time it is printed
    for name, value in sorted(settings.haproxy_env().items()):
        if name not in ("FP_USER", "FP_GROUP"):
            click.echo(f"{name}={value}")


@click.command()
@node_options
@click.option("--keep-running/--no-keep-running", default=True, show_default=True,
              help="Stay up after the walkthrough until Ctrl-C.")
@click.pass_context
def demo(ctx: click.Context, /, *, keep_running: bool, **opts: str | int) -> None:
    """A local node with demo services, then the walkthrough, step by step."""
    from flowproxy.cli.demo import run_demo

    settings = settings_of(ctx)
    if ctx.find_root().params.get("data_dir") is None:
        settings = dataclasses.replace(settings, data_dir=Path("/tmp/flowproxy-demo"), node="demo")
    spec = make_spec(settings, join=(), dev=True, **opts)  # type: ignore[arg-type]
    run_demo(spec, keep_running)


def register(group: click.Group) -> None:
    group.add_command(node)
    group.add_command(demo)
