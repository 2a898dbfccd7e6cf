"""flowproxy's own metrics: names, types and values from the node's last status (HAProxy not running)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from flowproxy import runstate, telemetry
from flowproxy.node.metrics import NodeCollector
from flowproxy.settings import Settings


def test_metrics_come_from_the_last_status_and_say_when_haproxy_is_down(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path).checked()
    runstate.save(settings.run_dir, runstate.LAST_STATUS, {
        "ok": True, "kv_index": 42, "last_reload": {"why": "new backend pg:live (settings other than servers)",
                                                    "kv_index": 40, "time": "2026-11-30T09:00:00Z"}})
    registry = CollectorRegistry()
    registry.register(NodeCollector(settings))
    text = generate_latest(registry).decode()
    assert "# TYPE flowproxy_haproxy_up gauge\nflowproxy_haproxy_up 0.0\n" in text
    assert "flowproxy_applied_kv_index 42.0\n" in text and "flowproxy_last_apply_ok 1.0\n" in text
    assert ('flowproxy_last_reload_info{kv_index="40",why="new backend pg:live (settings other than servers)"} 1.0'
            in text)
    assert "flowproxy_old_workers" not in text  # unknown while HAProxy is down: absent, never a made-up 0


@pytest.mark.parametrize(("why", "kind"), [
    ("first config", "first"),
    ("new backend own:live (settings other than servers)", "new_backend"),
    ("backend api:live goes", "backend_gone"),
    ("backend api:live: settings other than its servers changed", "backend_settings"),
    ("section `frontend fp_http` changed", "section"),
    ("maps/path_reg.map changed (a regex map is matched in file order)", "regex_map"),
    ("new file maps/host_exact.map", "map_file"),
    ("the certificate for clients without SNI changes (a -> b)", "certificates"),
    ("700 runtime commands, more than 500", "runtime_limits"),
    ("something nobody foresaw", "other"),
], ids=lambda v: v if v.isidentifier() else None)
def test_reload_reasons_fall_into_few_kinds(why: str, kind: str) -> None:
    assert telemetry.reason_kind(why) == kind


def test_counts_go_to_the_enabled_registry_only_while_enabled() -> None:
    registry = CollectorRegistry()
    telemetry.applied("reload", True, 0.2)  # not enabled: counted nowhere
    telemetry.enable(registry)
    try:
        telemetry.applied("incremental", True, 0.012)
        telemetry.applied("full", False, 1.5)
        telemetry.reloaded("new backend x:live (no spare backend left)")
        telemetry.event("keyprefix", 120)
        telemetry.event("keyprefix", 90)  # an older shard's index: the gauge does not go back
        telemetry.event("service", None)
    finally:
        telemetry.disable(registry)
    telemetry.applied("incremental", True, 0.01)  # disabled again
    text = generate_latest(registry).decode()
    assert "# TYPE flowproxy_applies_total counter" in text
    assert 'flowproxy_applies_total{path="incremental",result="ok"} 1.0' in text
    assert 'flowproxy_applies_total{path="full",result="failed"} 1.0' in text
    assert 'flowproxy_applies_total{path="reload",result="ok"} 0.0' in text
    assert "# TYPE flowproxy_apply_duration_seconds histogram" in text
    assert 'flowproxy_apply_duration_seconds_bucket{le="0.02",path="incremental"} 1.0' in text
    assert 'flowproxy_reloads_total{reason="new_backend"} 1.0' in text
    assert 'flowproxy_watch_events_total{kind="keyprefix"} 2.0' in text
    assert 'flowproxy_watch_events_total{kind="service"} 1.0' in text
    assert "flowproxy_kv_index_seen 120.0" in text
    assert "# TYPE flowproxy_last_apply_success_timestamp_seconds gauge" in text


def self_signed(days: int) -> bytes:
    """A certificate and key PEM, as `certs/<name>` holds them."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a.example.test")])
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def test_each_served_certificate_has_its_expiry(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path).checked()
    folder = settings.current / "certs"
    folder.mkdir(parents=True)
    (folder / "a.example.pem").write_bytes(self_signed(90))
    (folder / "b.pem").write_bytes(self_signed(1))
    (folder / "keyonly.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    registry = CollectorRegistry()
    registry.register(NodeCollector(settings))
    text = generate_latest(registry).decode()
    assert "# TYPE flowproxy_certificate_expiry_timestamp_seconds gauge" in text
    assert 'flowproxy_certificate_expiry_timestamp_seconds{certificate="a.example"} 1.7750016e+09' in text
    assert 'flowproxy_certificate_expiry_timestamp_seconds{certificate="b"} 1.767312e+09' in text
    assert 'certificate="keyonly"' not in text  # nothing to read: absent, never a made-up time
