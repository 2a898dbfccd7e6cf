"""Consul edge: the only module that talks to Consul's HTTP API (through python-consul2)."""

from __future__ import annotations

import base64
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import consul
import requests

from flowproxy.errors import CasConflict, ConsulUnavailable
from flowproxy.model import Instance, KVEntry

log = logging.getLogger(__name__)
T = TypeVar("T")


class ConsulStore:
    def __init__(self, addr: str, token: str | None = None, timeout: float = 10.0) -> None:
        scheme, _, hostport = addr.rpartition("://")
        host, _, port = hostport.rpartition(":")
        if not host or not (port.isascii() and port.isdigit()):
            raise ConsulUnavailable(f"Consul address {addr!r} is not host:port (set CONSUL_HTTP_ADDR or --consul)")
        self.addr = addr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.client = consul.Consul(host=host, port=int(port), token=token, scheme=scheme or "http")
        # python-consul2 silently lets CONSUL_HTTP_ADDR override explicit arguments; pin what we were given.
        self.client.http = self.client.http_connect(host, int(port), scheme or "http", timeout=timeout)
        self.client.token = token

    def close(self) -> None:
        """Close the pooled connection now. python-consul2's client holds reference cycles, so a dropped
        store keeps its socket until the cyclic GC runs, and Consul caps connections per client IP (200)."""
        self.client.http.session.close()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            try:
                return fn()
            except requests.ConnectionError:
                # The agent closes idle keep-alive connections (a `consul reload` does, too); a request on
                # such a stale connection dies with a reset. One more try on a fresh connection.
                time.sleep(0.1)
                return fn()
        except consul.ACLPermissionDenied as exc:
            raise ConsulUnavailable(f"Consul at {self.addr} denied {what}: {exc}. "
                                    "Check the ACL token (CONSUL_HTTP_TOKEN or --token).") from exc
        except (consul.ConsulException, requests.RequestException, ValueError) as exc:
            raise ConsulUnavailable(f"Consul at {self.addr} failed {what}: {exc}. "
                                    "Is the local agent running and joined to a cluster?") from exc

    def read_prefix(self, prefix: str) -> tuple[int, list[KVEntry]]:
        index, data = self._call(f"to list {prefix}", lambda: self.client.kv.get(prefix, recurse=True))
        return int(index), [_entry(d) for d in data or []]

    def keys(self, prefix: str) -> list[str]:
        return self.keys_with_index(prefix)[1]

    def keys_with_index(self, prefix: str) -> tuple[int, list[str]]:
        """The keys under `prefix` and the prefix's index (its newest write or tombstone)."""
        index, data = self._call(f"to list keys of {prefix}", lambda: self.client.kv.get(prefix, keys=True))
        return int(index), [str(k) for k in data or []]

    def get(self, key: str) -> KVEntry | None:
        _, data = self._call(f"to read {key}", lambda: self.client.kv.get(key))
        return _entry(data) if data else None

    def put(self, key: str, value: str | bytes, cas: int | None = None) -> None:
        ok = self._call(f"to write {key}", lambda: self.client.kv.put(key, value, cas=cas))
        if not ok:
            raise CasConflict(f"{key} changed while this command ran (check-and-set failed); run it again")

    def delete(self, key: str, recurse: bool = False, cas: int | None = None) -> None:
        ok = self._call(f"to delete {key}", lambda: self.client.kv.delete(key, recurse=recurse or None, cas=cas))
        if ok is False:
            raise CasConflict(f"{key} changed while this command ran (check-and-set failed); run it again")

    def txn(self, ops: Iterable[tuple[str, str, bytes | None, int | None]]) -> None:
        """Apply (verb, key, value, index) KV operations atomically: all or none."""
        payload: list[dict[str, Any]] = []
        for verb, key, value, index in ops:
            op: dict[str, Any] = {"Verb": verb, "Key": key}
            if value is not None:
                op["Value"] = base64.b64encode(value).decode()
            if index is not None:
                op["Index"] = index
            payload.append({"KV": op})
        try:
            self._call("a KV transaction", lambda: self.client.txn.put(payload))
        except ConsulUnavailable as exc:
            if "permission denied" in str(exc).lower():  # Consul answers a denied txn with 409 as well
                raise ConsulUnavailable(f"Consul at {self.addr} denied a KV transaction: {exc}. "
                                        "Check the ACL token (CONSUL_HTTP_TOKEN or --token).") from exc
            if "409" in str(exc) or "cas" in str(exc).lower() or "index" in str(exc).lower():
                raise CasConflict(f"a key changed while this command ran (check-and-set failed): {exc}") from exc
            raise

    def healthy(self, service: str) -> list[Instance]:
        _, entries = self._call(f"to list passing instances of {service}",
                                lambda: self.client.health.service(service, passing=True))
        return [_instance(e) for e in entries]

    def service_health(self, service: str) -> dict[str, tuple[str, dict[str, str]]]:
        """Every instance of a service, passing or not: node name -> (worst check status, service meta)."""
        _, entries = self._call(f"to list instances of {service}", lambda: self.client.health.service(service))
        rank = {"passing": 0, "warning": 1, "critical": 2}
        out: dict[str, tuple[str, dict[str, str]]] = {}
        for e in entries:
            statuses = [c.get("Status", "critical") for c in e.get("Checks") or []]
            worst = max(statuses or ["critical"], key=lambda s: rank.get(s, 2))
            out[str((e.get("Node") or {}).get("Node", ""))] = (worst, dict((e.get("Service") or {}).get("Meta") or {}))
        return out

    def update_check(self, check_id: str, status: str, output: str) -> None:
        self._call(f"to update check {check_id}", lambda: self.client.http.put(
            consul.base.CB.bool(), f"/v1/agent/check/update/{check_id}", params=self._token_params(),
            data=json.dumps({"Status": status, "Output": output[:4000]})))

    def deregister_service(self, service_id: str) -> None:
        self._call(f"to deregister {service_id}", lambda: self.client.agent.service.deregister(service_id))

    def reload_agent(self) -> None:
        self._call("to reload the agent", lambda: self.client.http.put(
            consul.base.CB.bool(), "/v1/agent/reload", params=self._token_params()))

    def register_service(self, payload: dict[str, Any]) -> None:
        self._call("to register a service", lambda: self.client.http.put(
            consul.base.CB.bool(), "/v1/agent/service/register", params=self._token_params(),
            data=json.dumps(payload)))

    def _token_params(self) -> list[tuple[str, str]]:
        return [("token", self.client.token)] if self.client.token else []


def _entry(d: dict[str, Any]) -> KVEntry:
    return KVEntry(key=d["Key"], value=d.get("Value") or b"", create_index=int(d.get("CreateIndex", 0)),
                   modify_index=int(d.get("ModifyIndex", 0)))


def _instance(e: dict[str, Any]) -> Instance:
    svc, node = e.get("Service") or {}, e.get("Node") or {}
    return Instance(address=str(svc.get("Address") or node.get("Address") or ""), port=int(svc.get("Port") or 0),
                    service_id=str(svc.get("ID", "")), node=str(node.get("Node", "")),
                    tags=tuple(str(t) for t in svc.get("Tags") or ()))
