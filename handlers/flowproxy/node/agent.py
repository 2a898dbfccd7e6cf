"""The Consul agent of a proxy node: its command line, its config file, and the watches it runs."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from flowproxy.consul.watches import config_watches, ensure_files
from flowproxy.core import contract
from flowproxy.settings import Settings, shipped

REPO_CONSUL_D = shipped("consul_d", "consul.d")


@dataclass(frozen=True)
class AgentTLS:
    """The agent's own certificates: the HTTP API only as HTTPS, RPC verified both ways (`consul tls`)."""

    ca_file: str
    cert_file: str
    key_file: str

    def config(self) -> dict[str, object]:
        return {"ca_file": self.ca_file, "cert_file": self.cert_file, "key_file": self.key_file,
                "verify_outgoing": True, "verify_incoming_rpc": True, "verify_server_hostname": True}


@dataclass(frozen=True)
class NodeSpec:
    settings: Settings
    bind: str = "127.0.0.1"  # the agent's serf/RPC address
    http_port: int = 8500
    serf_port: int = 8301
    server_port: int = 8300
    join: tuple[str, ...] = ()
    dev: bool = False
    consul_bin: str = "consul"
    consul_d: Path = REPO_CONSUL_D
    proxy: bool = True  # False: a bare Consul agent (a cluster's server), no HAProxy, no watches
    acl: bool = False  # ACLs on, default deny; the node's token serves its watches and the agent itself
    acl_master: str | None = None  # a server's initial management token (bootstrap)
    client: str = "127.0.0.1"  # the agent's HTTP API: loopback unless asked, whatever the serf address
    advertise: str | None = None  # the serf address other agents reach (default: bind)
    encrypt: str | None = None  # gossip encryption key (`consul keygen`)
    tls: AgentTLS | None = None  # the agent's certificates: HTTPS API, verified RPC


def consul_argv(spec: NodeSpec) -> list[str]:
    s = spec.settings
    api = {"https": spec.http_port, "http": -1} if spec.tls is not None else {"http": spec.http_port}
    ports = api | {"serf_lan": spec.serf_port, "serf_wan": -1, "server": spec.server_port, "dns": -1, "grpc": -1}
    agent_file = s.data_dir / "consul-agent.json"
    # Every local client shares 127.0.0.1: watches, handlers, the CLI, the supervisor. Consul's default
    # of 200 connections per client IP is too tight for a proxy node.
    config: dict[str, object] = {"ports": ports, "performance": {"raft_multiplier": 1},
                                 "limits": {"http_max_conns_per_client": 4096}, "disable_update_check": True}
    if spec.encrypt:
        config["encrypt"] = spec.encrypt
    if spec.tls is not None:
        config |= spec.tls.config()
    if spec.acl:
        tokens = {k: v for k, v in (("default", s.consul_token), ("agent", s.consul_token),
                                    ("master", spec.acl_master)) if v}
        config["acl"] = {"enabled": True, "default_policy": "deny", "down_policy": "extend-cache",
                         "tokens": tokens}
    agent_file.write_text(json.dumps(config, indent=2))
    agent_file.chmod(0o600)  # it may hold tokens and the gossip key
    s.watch_dir.mkdir(parents=True, exist_ok=True)
    for old in s.watch_dir.glob("*.json"):
        old.unlink()  # armed again after the join, see Node.arm_watches
    argv = [spec.consul_bin, "agent", "-node", s.node, "-data-dir", str(s.data_dir / "consul"),
            # Serf and RPC where the cluster reaches the node; the HTTP API (tokens, KV) on loopback
            # unless asked: a LAN --bind must not open the API to the LAN.
            "-bind", spec.bind, "-advertise", spec.advertise or spec.bind, "-client", spec.client,
            "-config-file", str(agent_file), "-config-dir", str(s.watch_dir)]
    if spec.dev:
        argv += ["-server", "-bootstrap-expect", "1"]
    for addr in spec.join:
        argv += ["-retry-join", addr]
    return argv


def install_watches(spec: NodeSpec) -> None:
    """Copy the shipped consul.d watches into the node's config folder (another prefix: its own watch)."""
    s = spec.settings
    if s.prefix == contract.DEFAULT_PREFIX:
        for path in sorted(spec.consul_d.glob("*.json")):
            shutil.copyfile(path, s.watch_dir / path.name)
    else:
        (s.watch_dir / "flowproxy-prefix.json").write_text(config_watches(s.prefix))
    ensure_files(s.watch_dir, s.prefix)
