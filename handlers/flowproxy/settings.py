"""Node settings. Stdlib only: the watch handler reads them on its lean start-up path.

They come from FLOWPROXY_* environment variables because a Consul watch handler inherits exactly the
agent's environment (plus CONSUL_INDEX); `node up` sets them for the agent it starts.
"""

from __future__ import annotations

import grp
import hashlib
import logging
import os
import pwd
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from flowproxy.core import contract
from flowproxy.defaults import DEFAULT_CONSUL_ADDR, DEFAULT_DATA_DIR

PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*/")
NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
HAPROXY_TIME_RE = re.compile(r"[1-9][0-9]{0,8}(ms|s|m|h|d)")
# An old worker (the previous config, kept alive by its connections after a reload) holds long-lived
# connections (WebSockets, TCP, SNI passthrough) until they end, at most this long: a day, so a reload
# for someone else's change does not cut a database session, at the price of that worker's memory.
DEFAULT_OLD_WORKER_LIFETIME = "24h"
# ...and one that has outlived this many later reloads is stopped: the cap on how many can pile up.
DEFAULT_MAX_OLD_WORKERS = 10
# A keyprefix watch hands the agent its whole subtree each time (~110 ms for 10,000 routes): 500 routes a
# watch keep that near 5 ms (core/shards.py).
DEFAULT_WATCH_SHARD_SIZE = 500
# Health checks hold a descriptor each; routes whose checks would leave HAProxy fewer connections than this
# under its open-file limit are refused by name (haproxy/capacity.py).
DEFAULT_MIN_CONNECTIONS = 1000
# Where HAProxy sends its access log: its stdout or stderr, a syslog host:port, a unix socket path, or off.
# A failed ACME attempt waits a minute, then twice as long each time, at most six hours (fleet-wide).
DEFAULT_ACME_RETRY = 60.0
DEFAULT_ACME_RETRY_MAX = 6 * 3600.0
ACME_URL_RE = re.compile(r"https?://[A-Za-z0-9._\[\]:-]+(/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?")
EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,253}")
ACCESS_LOG_RE = re.compile(r"off|stdout|stderr|[A-Za-z0-9_.\[\]:-]+:[0-9]{1,5}|/[A-Za-z0-9_./-]+")


def shipped(folder: str, repo_folder: str) -> Path:
    """A folder of package data: inside the installed package (a wheel), else at the checkout's top."""
    here = Path(__file__).resolve().parent
    return here / folder if (here / folder).is_dir() else here.parents[1] / repo_folder


REPO_TEMPLATES = shipped("templates", "templates")
STATS_LOCK = "stats-lock"  # in the data folder: the password no one was told, see stats_lock()


def stats_lock(data_dir: Path) -> str:
    """Without FLOWPROXY_STATS_AUTH the stats page answers nobody: its password is one no one was told. The
    node's data folder owns it (`ensure_stats_lock`, run by `node up`, `node run` and `node env`), so
    every command prints and starts HAProxy with the same one; a folder without it gets a fresh one each
    time, which locks the page just as well."""
    try:
        text = (data_dir / STATS_LOCK).read_text().strip()
    except OSError:
        text = ""
    return text if text.startswith("locked:") else f"locked:{os.urandom(16).hex()}"


def ensure_stats_lock(data_dir: Path) -> None:
    path = data_dir / STATS_LOCK
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".{STATS_LOCK}.{os.getpid()}"
        tmp.write_text(f"locked:{os.urandom(16).hex()}\n")
        tmp.chmod(0o600)
        tmp.replace(path)


def unprivileged() -> dict[str, str]:
    """FP_USER/FP_GROUP for HAProxy's workers when flowproxy runs as root: `flowproxy` if that user exists,
    else `nobody`. Without root there is nothing to drop (and HAProxy could not change user anyway)."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam("flowproxy")
    except KeyError:
        user = pwd.getpwnam("nobody")  # every Debian system has it; a KeyError here is a broken system
    return {"FP_USER": user.pw_name, "FP_GROUP": grp.getgrgid(user.pw_gid).gr_name}


@dataclass(frozen=True)
class ConsulTLS:
    """HTTPS to the Consul agent, from the standard Consul variables (as the `consul` CLI reads them)."""

    enabled: bool = False  # CONSUL_HTTP_SSL, or an https:// address
    ca_file: str | None = None  # CONSUL_CACERT
    cert_file: str | None = None  # CONSUL_CLIENT_CERT
    key_file: str | None = None  # CONSUL_CLIENT_KEY
    server_name: str | None = None  # CONSUL_TLS_SERVER_NAME
    verify: bool = True  # CONSUL_HTTP_SSL_VERIFY

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ConsulTLS:
        https = _true(env.get("CONSUL_HTTP_SSL", "")) or env.get("CONSUL_HTTP_ADDR", "").startswith("https://")
        return cls(enabled=https,
                   ca_file=env.get("CONSUL_CACERT") or None, cert_file=env.get("CONSUL_CLIENT_CERT") or None,
                   key_file=env.get("CONSUL_CLIENT_KEY") or None,
                   server_name=env.get("CONSUL_TLS_SERVER_NAME") or None,
                   verify=not env.get("CONSUL_HTTP_SSL_VERIFY") or _true(env["CONSUL_HTTP_SSL_VERIFY"]))

    def env(self) -> dict[str, str]:
        values = {"CONSUL_HTTP_SSL": "true" if self.enabled else None, "CONSUL_CACERT": self.ca_file,
                  "CONSUL_CLIENT_CERT": self.cert_file, "CONSUL_CLIENT_KEY": self.key_file,
                  "CONSUL_TLS_SERVER_NAME": self.server_name,
                  "CONSUL_HTTP_SSL_VERIFY": None if self.verify else "false"}
        return {k: v for k, v in values.items() if v}


def _true(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _count(text: str, default: int) -> int:
    """A whole number from the environment; a typo is kept as -1, for `checked` to refuse by name."""
    if not text.strip():
        return default
    return int(text) if text.strip().isascii() and text.strip().isdigit() else -1


def _seconds(text: str, default: float) -> float:
    try:
        return max(0.0, float(text)) if text.strip() else default
    except ValueError:
        return default


def token_from(env: Mapping[str, str]) -> str | None:
    """CONSUL_HTTP_TOKEN, else the first line of CONSUL_HTTP_TOKEN_FILE (a file keeps it out of every
    process's environment)."""
    if env.get("CONSUL_HTTP_TOKEN"):
        return env["CONSUL_HTTP_TOKEN"]
    path = env.get("CONSUL_HTTP_TOKEN_FILE")
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError as exc:
        # Not fatal here: `node env` and `node init` need no token; a Consul call will be denied and say so.
        logging.getLogger(__name__).warning("CONSUL_HTTP_TOKEN_FILE %s: cannot read it (%s)", path, exc.strerror)
        return None


@dataclass(frozen=True)
class Settings:
    prefix: str = contract.DEFAULT_PREFIX
    node: str = "flowproxy"
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    consul_addr: str = DEFAULT_CONSUL_ADDR
    consul_token: str | None = None
    consul_token_file: str | None = None  # where the token came from, passed on instead of the token
    consul_tls: ConsulTLS = ConsulTLS()
    http_bind: str = "127.0.0.1:8080"
    preview_bind: str | None = None
    https_bind: str | None = None
    sni_bind: str | None = None
    metrics_bind: str | None = None
    tcp_host: str = "127.0.0.1"
    stats_auth: str | None = None  # user:password for the stats page
    haproxy_bin: str = "haproxy"
    templates: Path = REPO_TEMPLATES
    scratch: Path | None = None  # see cache_dir
    drain_wait: float = 10.0  # seconds a reload waits for old workers before it counts as applied
    old_worker_lifetime: str = DEFAULT_OLD_WORKER_LIFETIME  # HAProxy's hard-stop-after
    max_old_workers: int = DEFAULT_MAX_OLD_WORKERS  # HAProxy's mworker-max-reloads
    watch_shard_size: int = DEFAULT_WATCH_SHARD_SIZE  # routes per keyprefix watch before it is split
    min_connections: int = DEFAULT_MIN_CONNECTIONS  # connections HAProxy's health checks must leave room for
    log_format: str = "text"  # flowproxy's own log lines: text | json (logs.py)
    log_level: str = "info"  # debug | info | warning | error
    access_log: str = "stdout"  # HAProxy's access log target: stdout, stderr, a syslog address, or off
    access_log_format: str = "text"  # text | json
    # ACME (core/acme.py, node/certifier.py): off without a directory URL.
    acme_directory: str | None = None  # e.g. https://acme-v02.api.letsencrypt.org/directory
    acme_email: str | None = None  # the account's contact
    acme_agree_tos: bool = False  # the CA's terms of service, agreed by the operator
    acme_ca_bundle: str | None = None  # CA certificates that verify the directory's HTTPS (default: the system's)
    acme_retry: float = DEFAULT_ACME_RETRY  # seconds after a first failure; doubled each time after that
    acme_retry_max: float = DEFAULT_ACME_RETRY_MAX

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if env is None else env
        values = {
            "prefix": env.get("FLOWPROXY_PREFIX", contract.DEFAULT_PREFIX),
            "node": env.get("FLOWPROXY_NODE") or socket.gethostname().split(".")[0],
            "data_dir": Path(env.get("FLOWPROXY_DATA_DIR", DEFAULT_DATA_DIR)),
            "consul_addr": env.get("CONSUL_HTTP_ADDR", DEFAULT_CONSUL_ADDR),
            "consul_token": token_from(env),
            "consul_token_file": None if env.get("CONSUL_HTTP_TOKEN") else env.get("CONSUL_HTTP_TOKEN_FILE") or None,
            "consul_tls": ConsulTLS.from_env(env),
            "http_bind": env.get("FLOWPROXY_HTTP_BIND", "127.0.0.1:8080"),
            "preview_bind": env.get("FLOWPROXY_PREVIEW_BIND") or None,
            "https_bind": env.get("FLOWPROXY_HTTPS_BIND") or None,
            "sni_bind": env.get("FLOWPROXY_SNI_BIND") or None,
            "metrics_bind": env.get("FLOWPROXY_METRICS_BIND") or None,
            "tcp_host": env.get("FLOWPROXY_TCP_HOST") or "127.0.0.1",
            "stats_auth": env.get("FLOWPROXY_STATS_AUTH") or None,
            "haproxy_bin": env.get("FLOWPROXY_HAPROXY", "haproxy"),
            "templates": Path(env.get("FLOWPROXY_TEMPLATES", str(REPO_TEMPLATES))),
            "drain_wait": _seconds(env.get("FLOWPROXY_DRAIN_WAIT", ""), 10.0),
            "old_worker_lifetime": env.get("FLOWPROXY_OLD_WORKER_LIFETIME") or DEFAULT_OLD_WORKER_LIFETIME,
            "max_old_workers": _count(env.get("FLOWPROXY_MAX_OLD_WORKERS", ""), DEFAULT_MAX_OLD_WORKERS),
            "watch_shard_size": _count(env.get("FLOWPROXY_WATCH_SHARD_SIZE", ""), DEFAULT_WATCH_SHARD_SIZE),
            "min_connections": _count(env.get("FLOWPROXY_MIN_CONNECTIONS", ""), DEFAULT_MIN_CONNECTIONS),
            "log_format": env.get("FLOWPROXY_LOG_FORMAT") or "text",
            "log_level": (env.get("FLOWPROXY_LOG_LEVEL") or "info").lower(),
            "access_log": env.get("FLOWPROXY_ACCESS_LOG") or "stdout",
            "access_log_format": env.get("FLOWPROXY_ACCESS_LOG_FORMAT") or "text",
            "acme_directory": env.get("FLOWPROXY_ACME_DIRECTORY") or None,
            "acme_email": env.get("FLOWPROXY_ACME_EMAIL") or None,
            "acme_agree_tos": _true(env.get("FLOWPROXY_ACME_AGREE_TOS", "")),
            "acme_ca_bundle": env.get("FLOWPROXY_ACME_CA_BUNDLE") or None,
            "acme_retry": _seconds(env.get("FLOWPROXY_ACME_RETRY", ""), DEFAULT_ACME_RETRY),
            "acme_retry_max": _seconds(env.get("FLOWPROXY_ACME_RETRY_MAX", ""), DEFAULT_ACME_RETRY_MAX),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]
        return settings.checked()

    def checked(self) -> Settings:
        from flowproxy.errors import UsageError

        prefix = self.prefix if self.prefix.endswith("/") else self.prefix + "/"
        if not PREFIX_RE.fullmatch(prefix):
            raise UsageError(f"prefix {self.prefix!r}: use letters, digits and _.- in /-separated parts")
        if not NODE_RE.fullmatch(self.node):
            raise UsageError(f"node name {self.node!r}: use 1-63 letters, digits and _.-")
        if not HAPROXY_TIME_RE.fullmatch(self.old_worker_lifetime):
            raise UsageError(f"FLOWPROXY_OLD_WORKER_LIFETIME {self.old_worker_lifetime!r}: a HAProxy time, "
                             "digits with a unit (ms, s, m, h, d), e.g. 24h")
        if not 1 <= self.max_old_workers <= 1000:
            raise UsageError(f"FLOWPROXY_MAX_OLD_WORKERS {self.max_old_workers}: a number from 1 to 1000")
        if not 1 <= self.watch_shard_size <= 1_000_000:
            raise UsageError(f"FLOWPROXY_WATCH_SHARD_SIZE {self.watch_shard_size}: a number from 1 to 1000000")
        if not 1 <= self.min_connections <= 1 << 30:
            raise UsageError(f"FLOWPROXY_MIN_CONNECTIONS {self.min_connections}: a number from 1 to 1073741824")
        if self.log_format not in ("text", "json"):
            raise UsageError(f"FLOWPROXY_LOG_FORMAT {self.log_format!r}: text or json")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise UsageError(f"FLOWPROXY_LOG_LEVEL {self.log_level!r}: debug, info, warning or error")
        if not ACCESS_LOG_RE.fullmatch(self.access_log):
            raise UsageError(f"FLOWPROXY_ACCESS_LOG {self.access_log!r}: stdout, stderr, off, a syslog address "
                             "(host:port) or a unix socket path (/dev/log)")
        if self.access_log_format not in ("text", "json"):
            raise UsageError(f"FLOWPROXY_ACCESS_LOG_FORMAT {self.access_log_format!r}: text or json")
        self._check_acme()
        return replace(self, prefix=prefix, data_dir=self.data_dir.absolute())

    def _check_acme(self) -> None:
        from flowproxy.errors import UsageError

        if self.acme_directory is not None and not ACME_URL_RE.fullmatch(self.acme_directory):
            raise UsageError(f"FLOWPROXY_ACME_DIRECTORY {self.acme_directory!r}: the CA's directory URL, "
                             "https://... (e.g. https://acme-staging-v02.api.letsencrypt.org/directory)")
        if self.acme_email is not None and not EMAIL_RE.fullmatch(self.acme_email):
            raise UsageError(f"FLOWPROXY_ACME_EMAIL {self.acme_email!r}: one e-mail address")
        if not 1 <= self.acme_retry <= self.acme_retry_max:
            raise UsageError(f"FLOWPROXY_ACME_RETRY {self.acme_retry:g}: seconds, at least 1 and at most "
                             f"FLOWPROXY_ACME_RETRY_MAX ({self.acme_retry_max:g})")

    def env(self) -> dict[str, str]:
        """The environment that carries these settings to the agent, its handlers and HAProxy."""
        out = {
            "FLOWPROXY_PREFIX": self.prefix,
            "FLOWPROXY_NODE": self.node,
            "FLOWPROXY_DATA_DIR": str(self.data_dir),
            "CONSUL_HTTP_ADDR": self.consul_addr,
            "FLOWPROXY_HTTP_BIND": self.http_bind,
            "FLOWPROXY_HAPROXY": self.haproxy_bin,
            "FLOWPROXY_TEMPLATES": str(self.templates),
            "FLOWPROXY_DRAIN_WAIT": f"{self.drain_wait:g}",
            "FLOWPROXY_OLD_WORKER_LIFETIME": self.old_worker_lifetime,
            "FLOWPROXY_MAX_OLD_WORKERS": str(self.max_old_workers),
            "FLOWPROXY_WATCH_SHARD_SIZE": str(self.watch_shard_size),
            "FLOWPROXY_MIN_CONNECTIONS": str(self.min_connections),
            "FLOWPROXY_LOG_FORMAT": self.log_format,
            "FLOWPROXY_LOG_LEVEL": self.log_level,
            "FLOWPROXY_ACCESS_LOG": self.access_log,
            "FLOWPROXY_ACCESS_LOG_FORMAT": self.access_log_format,
        }
        if self.consul_token_file:
            out["CONSUL_HTTP_TOKEN_FILE"] = self.consul_token_file
        elif self.consul_token:
            out["CONSUL_HTTP_TOKEN"] = self.consul_token
        out |= self.consul_tls.env()
        out |= self.acme_env()
        optional = {"FLOWPROXY_PREVIEW_BIND": self.preview_bind, "FLOWPROXY_HTTPS_BIND": self.https_bind,
                    "FLOWPROXY_SNI_BIND": self.sni_bind, "FLOWPROXY_METRICS_BIND": self.metrics_bind,
                    "FLOWPROXY_TCP_HOST": self.tcp_host, "FLOWPROXY_STATS_AUTH": self.stats_auth}
        return out | {k: v for k, v in optional.items() if v} | self.haproxy_env()

    def acme_env(self) -> dict[str, str]:
        if not self.acme_directory:
            return {}
        out = {"FLOWPROXY_ACME_DIRECTORY": self.acme_directory,
               "FLOWPROXY_ACME_AGREE_TOS": "true" if self.acme_agree_tos else "false",
               "FLOWPROXY_ACME_RETRY": f"{self.acme_retry:g}", "FLOWPROXY_ACME_RETRY_MAX": f"{self.acme_retry_max:g}"}
        return out | {k: v for k, v in (("FLOWPROXY_ACME_EMAIL", self.acme_email),
                                        ("FLOWPROXY_ACME_CA_BUNDLE", self.acme_ca_bundle)) if v}

    def haproxy_env(self) -> dict[str, str]:
        # A listener the node does not open (preview, HTTPS, SNI, metrics) still exists, since the config is
        # the same on every node, but only as a unix socket inside the node's own 0700 folder.
        def own(name: str, bind: str | None) -> str:
            return bind or f"unix@{self.haproxy_dir / name}"

        # One port for both (--https and --sni the same): the SNI listener binds it and hands every name
        # without a passthrough route to the HTTPS listener, which then listens only on its own socket.
        shared = self.https_bind is not None and self.https_bind == self.sni_bind
        return {"FP_HTTP_BIND": self.http_bind, "FP_PREVIEW_BIND": own("preview.sock", self.preview_bind),
                "FP_HTTPS_BIND": own("https.sock", None if shared else self.https_bind),
                # Abstract: workers that dropped root cannot reach into the node's 0700 folder.
                "FP_HTTPS_HANDOVER": f"abns@flowproxy-{self.handover_id}",
                "FP_SNI_FALLBACK": "fp_tls_handover" if shared else "fp_no_route_tcp",
                "FP_SNI_BIND": own("sni.sock", self.sni_bind),
                "FP_METRICS_BIND": own("metrics.sock", self.metrics_bind), "FP_TCP_HOST": self.tcp_host,
                "FP_STATS_SOCKET": str(self.stats_socket),
                "FP_STATS_AUTH": self.stats_credentials(),
                "FP_OLD_WORKER_LIFETIME": self.old_worker_lifetime, "FP_MAX_OLD_WORKERS": str(self.max_old_workers),
                "FP_NODE_METRICS": f"abns@{self.node_metrics_name}", **self.access_log_env()} | unprivileged()

    def stats_credentials(self) -> str:
        """`user:password` of the stats page and the dashboard (locked without FLOWPROXY_STATS_AUTH)."""
        return self.stats_auth or stats_lock(self.data_dir)

    def access_log_env(self) -> dict[str, str]:
        """HAProxy's access log: a target (none when off: the config then logs nothing) and a format."""
        if self.access_log == "off":
            return {}
        return {"FP_ACCESS_LOG": self.access_log, "FP_ACCESS_LOG_FORMAT": self.access_log_format}

    @property
    def node_metrics_name(self) -> str:
        """The abstract socket where the node process serves flowproxy's metrics to HAProxy."""
        return f"flowproxy-metrics-{self.handover_id}"

    @property
    def handover_id(self) -> str:
        return hashlib.sha256(str(self.haproxy_dir).encode()).hexdigest()[:16]

    @property
    def haproxy_dir(self) -> Path:
        return self.data_dir / "haproxy"

    @property
    def current(self) -> Path:
        return self.haproxy_dir / "current"

    @property
    def master_socket(self) -> Path:
        return self.haproxy_dir / "master.sock"

    @property
    def stats_socket(self) -> Path:
        return self.haproxy_dir / "stats.sock"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def cache_dir(self) -> Path:
        """Where vetting and the template sandbox keep their verdicts: the node's run folder, or the
        scratch folder of a command that must write nothing of the node's (`flowproxy render`)."""
        return self.scratch if self.scratch is not None else self.run_dir

    @property
    def watch_dir(self) -> Path:
        """Agent config generated by the handler (one service watch per routed service)."""
        return self.data_dir / "consul.d"

    @property
    def status_key(self) -> str:
        return contract.status_key(self.prefix, self.node)
