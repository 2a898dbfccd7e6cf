"""flowproxy's own metrics for a node, served beside HAProxy's exporter at `/metrics/flowproxy`, and the
dashboard (`/dashboard`, `/api/...`: node/dashboard.py).

prometheus-client writes the exposition format; this module is its one adapter. Values are read when
scraped (HAProxy's master socket, the node's last status), so nothing here keeps state of its own. The
node process serves them on an abstract unix socket that HAProxy's metrics listener forwards to: no port
of its own, and reachable by HAProxy's unprivileged workers (abstract sockets have no file permissions).
"""

from __future__ import annotations

import logging
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from flowproxy import runstate, telemetry
from flowproxy.haproxy.certs import not_after
from flowproxy.haproxy.master import local_old_workers
from flowproxy.node import dashboard
from flowproxy.settings import Settings

log = logging.getLogger(__name__)
PATH = "/metrics/flowproxy"


class NodeCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        old = local_old_workers(self.settings.master_socket)
        yield GaugeMetricFamily("flowproxy_haproxy_up", "1 while HAProxy's master socket answers", old is not None)
        if old is not None:
            yield CounterMetricFamily("flowproxy_haproxy_reloads", "HAProxy reloads since its master started",
                                      old.reloads)
            yield GaugeMetricFamily("flowproxy_old_workers", "HAProxy workers of earlier configs still holding "
                                    "connections", len(old.pids))
            yield GaugeMetricFamily("flowproxy_old_workers_resident_bytes", "Resident memory of those workers",
                                    old.rss_kib * 1024)
        last = runstate.load(self.settings.run_dir, runstate.LAST_STATUS)
        yield GaugeMetricFamily("flowproxy_applied_kv_index", "KV index of the config this node applied",
                                int(last.get("kv_index") or 0))
        yield GaugeMetricFamily("flowproxy_last_apply_ok", "1 when the node's last apply succeeded",
                                bool(last.get("ok", False)))
        routes = last.get("routes")
        states = list(routes.values()) if isinstance(routes, dict) else []
        rejected = len([st for st in states if isinstance(st, dict) and st.get("state") == "rejected"])
        yield GaugeMetricFamily("flowproxy_rejected_routes", "Routes this node rejected in its last apply", rejected)
        yield self.certificates()
        yield from self.acme()
        reload = last.get("last_reload")
        if isinstance(reload, dict):
            yield InfoMetricFamily("flowproxy_last_reload", "The node's latest HAProxy reload and why",
                                   {"why": str(reload.get("why")), "kv_index": str(reload.get("kv_index"))})


    def certificates(self) -> Metric:
        """The expiry of every certificate HAProxy serves from this node's current release."""
        family = GaugeMetricFamily("flowproxy_certificate_expiry_timestamp_seconds",
                                   "When a served certificate (KV certs/<name>) expires (Unix time)",
                                   labels=["certificate"])
        for path in sorted((self.settings.current / "certs").glob("*.pem")):
            try:
                expires = not_after(path.read_bytes())
            except OSError:  # a release being swapped: the next scrape reads the new one
                continue
            if expires is not None:
                family.add_metric([path.stem], expires)
        return family


    def acme(self) -> Iterator[Metric]:
        """The ACME worker's last look (every node's worker reads the fleet-wide state): per certificate, its
        issuer, consecutive failed attempts, next attempt and last error."""
        rows = runstate.load(self.settings.run_dir, runstate.ACME).get("certificates")
        if not isinstance(rows, dict):
            return
        info = InfoMetricFamily("flowproxy_certificate", "A certificate in KV and who issued it",
                                labels=["certificate"])
        failures = GaugeMetricFamily("flowproxy_acme_failures", "Consecutive failed ACME attempts",
                                     labels=["certificate"])
        retry = GaugeMetricFamily("flowproxy_acme_next_attempt_timestamp_seconds",
                                  "When the fleet tries again after a failure (Unix time)", labels=["certificate"])
        error = InfoMetricFamily("flowproxy_acme_last_error", "The last ACME error of a certificate",
                                 labels=["certificate"])
        for name, row in sorted(rows.items()):
            if not isinstance(row, dict):
                continue
            info.add_metric([name], {"issuer": str(row.get("issuer") or ""), "not_after": str(row.get("not_after"))})
            if row.get("acme"):
                failures.add_metric([name], float(row.get("failures") or 0))
            if row.get("next_attempt"):
                retry.add_metric([name], _timestamp(str(row["next_attempt"])))
            if row.get("last_error"):
                error.add_metric([name], {"error": str(row["last_error"])[:300]})
        yield from (info, failures, retry, error)


def _timestamp(iso: str) -> float:
    import datetime

    try:
        return datetime.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC).timestamp()
    except ValueError:
        return 0.0


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == PATH:
            self.reply(200, {"Content-Type": CONTENT_TYPE_LATEST}, generate_latest(self.server.registry))
        elif dashboard.handles(path):
            self.reply(*self.server.dashboard.answer(path, self.headers.get("Authorization")))
        else:
            self.reply(404, {"Content-Type": "text/plain"}, b"not found\n")

    def reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def version_string(self) -> str:
        return "flowproxy"  # not the Python version

    def address_string(self) -> str:
        return "haproxy"  # a unix socket has no client address

    def log_message(self, format: str, *args: object) -> None:
        pass


class MetricsServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(NodeCollector(settings))
        self.dashboard = dashboard.Dashboard(settings)
        telemetry.enable(self.registry)
        super().__init__(abstract_address(settings.node_metrics_name), _Handler)

    def start(self) -> MetricsServer:
        threading.Thread(target=self.serve_forever, daemon=True, name="flowproxy-metrics").start()
        return self

    def stop(self) -> None:
        telemetry.disable(self.registry)
        self.shutdown()
        self.server_close()


def abstract_address(name: str) -> bytes:
    """HAProxy 2.6 reaches `abns@name` with the whole 108-byte path, the name padded with NULs."""
    return b"\0" + name.encode().ljust(107, b"\0")


def serve(settings: Settings) -> MetricsServer | None:
    try:
        return MetricsServer(settings).start()
    except OSError as exc:  # another process of this node holds it (a second `node run`?): metrics only
        log.warning("flowproxy metrics not served (%s: %s)", settings.node_metrics_name, exc)
        return None

