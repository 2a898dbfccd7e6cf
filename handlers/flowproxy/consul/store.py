"""Consul edge: the only module that talks to Consul's HTTP API (through python-consul2)."""

from __future__ import annotations

import base64
import json
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import consul
import requests

from flowproxy.consul.registrations import Registration
from flowproxy.core.model import Instance, KVEntry
from flowproxy.errors import CasConflict, ConsulUnavailable
from flowproxy.redact import redact
from flowproxy.settings import ConsulTLS, Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


class _ServerName(requests.adapters.HTTPAdapter):
    """Verify the agent's certificate for CONSUL_TLS_SERVER_NAME, not the address dialled (127.0.0.1)."""

    def __init__(self, server_name: str) -> None:
        self.server_name = server_name
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs |= {"server_hostname": self.server_name, "assert_hostname": self.server_name}
        super().init_poolmanager(*args, **kwargs)


class ConsulStore:
    def __init__(self, addr: str, token: str | None = None, timeout: float = 10.0,
                 tls: ConsulTLS | None = None) -> None:
        tls = tls or ConsulTLS()
        scheme, _, hostport = addr.rpartition("://")
        scheme = scheme or ("https" if tls.enabled else "http")
        host, _, port = hostport.rpartition(":")
        if not host or not (port.isascii() and port.isdigit()):
            raise ConsulUnavailable(f"Consul address {addr!r} is not host:port (set CONSUL_HTTP_ADDR or --consul)")
        self.addr = addr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.client = consul.Consul(host=host, port=int(port), scheme=scheme)
        # python-consul2 silently lets CONSUL_HTTP_ADDR override explicit arguments; pin what we were given.
        verify: bool | str = (tls.ca_file or True) if tls.verify else False
        cert = (tls.cert_file, tls.key_file) if tls.cert_file and tls.key_file else None
        self.client.http = self.client.http_connect(host, int(port), scheme, verify=verify, cert=cert, timeout=timeout)
        if tls.server_name and scheme == "https":
            self.client.http.session.mount("https://", _ServerName(tls.server_name))
        # The token only ever travels in the header: python-consul2 would put it in every URL (`?token=`),
        # and URLs end up in exception messages and logs. (It also reads CONSUL_HTTP_TOKEN on its own.)
        self.client.token = None
        if token:
            self.client.http.session.headers["X-Consul-Token"] = token

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
            raise ConsulUnavailable(redact(f"Consul at {self.addr} denied {what}: {exc}. Check the ACL token "
                                           "(CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE or --token).")) from None
        except (TypeError, KeyError, AttributeError) as exc:  # python-consul2 met an answer of another shape
            raise ConsulUnavailable(redact(f"{self.addr} answered {what} with something that is not Consul's API "
                                           f"({type(exc).__name__}); is CONSUL_HTTP_ADDR a Consul agent?")) from None
        except (consul.ConsulException, requests.RequestException, ValueError) as exc:
            raise ConsulUnavailable(redact(f"Consul at {self.addr} failed {what}: {_cause(exc)}. "
                                           "Is the local agent running and joined to a cluster?")) from None

    def read_prefix(self, prefix: str) -> tuple[int, list[KVEntry]]:
        index, data = self._call(f"to list {prefix}", lambda: self.client.kv.get(prefix, recurse=True))
        return self._index(index, prefix), self._call(f"to list {prefix}", lambda: [_entry(d) for d in data or []])

    def _index(self, index: object, what: str) -> int:
        """Every KV read carries X-Consul-Index; an answer without one is not from Consul."""
        if not (isinstance(index, (str, int)) and str(index).isascii() and str(index).isdigit()):
            raise ConsulUnavailable(f"{self.addr} answered a read of {what} without X-Consul-Index: it is not "
                                    "Consul's API; is CONSUL_HTTP_ADDR a Consul agent?")
        return int(index)

    def keys(self, prefix: str) -> list[str]:
        return self.keys_with_index(prefix)[1]

    def keys_with_index(self, prefix: str) -> tuple[int, list[str]]:
        """The keys under `prefix` and the prefix's index (its newest write or tombstone)."""
        index, data = self._call(f"to list keys of {prefix}", lambda: self.client.kv.get(prefix, keys=True))
        if data is not None and not isinstance(data, list):
            raise ConsulUnavailable(f"{self.addr} answered a key listing of {prefix} with something that is not a "
                                    "list: is CONSUL_HTTP_ADDR a Consul agent?")
        return self._index(index, prefix), [str(k) for k in data or []]

    def check_token(self) -> None:
        """Raise ConsulUnavailable unless the agent accepts this store's token (ACLs on: it resolves it)."""
        self._call("to resolve the ACL token", self.client.acl.self)

    def leader(self) -> str:
        """The cluster leader's address as this agent knows it; "" while there is none."""
        return str(self._call("to ask for the leader", self.client.status.leader) or "")

    def table_index(self, key: str) -> int:
        """The whole KV table's index: Consul answers a read of one key with it, found or not."""
        index, _ = self._call(f"to read {key}", lambda: self.client.kv.get(key))
        return self._index(index, key)

    def deleted_since(self, prefix: str, index: int) -> bool | None:
        """Whether `prefix` is empty because its keys were deleted after `index` (tombstones prove it).

        Consul indexes an empty prefix by its newest tombstone, or, with none, by the whole table (which
        every status write moves: field notes). The table is read before and after the listing; only an
        answer below the table's index, and above `index`, is a tombstone's. None when the answer equals the
        table's index above `index`: a delete that is the newest write of all, or no tombstone at all; any
        later write tells them apart (the caller makes one).
        """
        for _ in range(3):
            before = self.table_index(prefix)
            listed, keys = self.keys_with_index(prefix)
            if keys:
                return False
            if self.table_index(prefix) == before:
                if listed == before and listed > index:
                    return None
                return index < listed < before
        return False

    def get(self, key: str) -> KVEntry | None:
        index, data = self._call(f"to read {key}", lambda: self.client.kv.get(key))
        self._index(index, key)
        return self._call(f"to read {key}", lambda: _entry(data)) if data else None

    def put(self, key: str, value: str | bytes, cas: int | None = None, flags: int | None = None) -> None:
        ok = self._call(f"to write {key}", lambda: self.client.kv.put(key, value, cas=cas, flags=flags))
        if not ok:
            raise CasConflict(f"{key} changed while this command ran (check-and-set failed); run it again")

    # Sessions and locks (the ACME worker's: one node works on a certificate at a time). A session ends with
    # its TTL unless renewed, or with its node's serf health: a holder that dies releases its locks.
    def create_session(self, name: str, ttl: int, lock_delay: int = 0) -> str:
        """A session that releases its locks when it ends (`behavior=release`); Consul's default lock delay
        (15 s after an invalidation) shortened to `lock_delay`."""
        created = self._call("to create a session", lambda: self.client.session.create(
            name=name, ttl=ttl, lock_delay=lock_delay, behavior="release"))
        return str(created)

    def renew_session(self, session: str) -> bool:
        """Renew it; False when Consul no longer has it (expired or destroyed)."""
        try:
            self._call("to renew a session", lambda: self.client.session.renew(session))
        except ConsulUnavailable as exc:
            if "not found" in str(exc).lower() or "404" in str(exc):
                return False
            raise
        return True

    def destroy_session(self, session: str) -> None:
        self._call("to destroy a session", lambda: self.client.session.destroy(session))

    def acquire(self, key: str, value: str | bytes, session: str) -> bool:
        """Take the lock `key` for `session` (writing `value`); False when another session holds it."""
        return bool(self._call(f"to lock {key}", lambda: self.client.kv.put(key, value, acquire=session)))

    def release(self, key: str, session: str) -> bool:
        return bool(self._call(f"to unlock {key}", lambda: self.client.kv.put(key, b"", release=session)))

    def holder(self, key: str) -> str | None:
        """The session holding the lock `key`, or None."""
        _, data = self._call(f"to read {key}", lambda: self.client.kv.get(key))
        return str(data["Session"]) if data and data.get("Session") else None

    def session_node(self, session: str) -> str | None:
        """The node name a session belongs to (its Consul agent's), or None when it has ended."""
        _, info = self._call("to read a session", lambda: self.client.session.info(session))
        return str(info.get("Node", "")) if info else None

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
        return self.healthy_at(service)[1]

    def healthy_at(self, service: str) -> tuple[int, list[Instance]]:
        """The passing instances and Consul's index of that answer (a watch payload older than it is stale)."""
        index, entries = self._call(f"to list passing instances of {service}",
                                    lambda: self.client.health.service(service, passing=True))
        return int(index or 0), [instance_of(e) for e in entries]

    def service_health(self, service: str) -> dict[str, tuple[str, dict[str, str]]]:
        """Every instance of a service, passing or not: node name -> (worst check status, service meta)."""
        out: dict[str, tuple[str, dict[str, str]]] = {}
        for e in self._all_instances(service):
            meta = dict((e.get("Service") or {}).get("Meta") or {})
            out[str((e.get("Node") or {}).get("Node", ""))] = (worst_status(e), meta)
        return out

    def instances(self, service: str) -> list[tuple[Instance, str]]:
        """Every instance of a service, passing or not, with its worst check status."""
        return [(instance_of(e), worst_status(e)) for e in self._all_instances(service)]

    def _all_instances(self, service: str) -> list[dict[str, Any]]:
        _, entries = self._call(f"to list instances of {service}", lambda: self.client.health.service(service))
        return list(entries or [])

    def update_check(self, check_id: str, status: str, output: str) -> None:
        self._call(f"to update check {check_id}", lambda: self.client.http.put(
            consul.base.CB.bool(), f"/v1/agent/check/update/{check_id}",
            data=json.dumps({"Status": status, "Output": output[:4000]})))

    def deregister_service(self, service_id: str) -> None:
        self._call(f"to deregister {service_id}", lambda: self.client.agent.service.deregister(service_id))

    def reload_agent(self) -> None:
        self._call("to reload the agent", lambda: self.client.http.put(
            consul.base.CB.bool(), "/v1/agent/reload"))

    def register_service(self, registration: Registration) -> None:
        self._call(f"to register {registration.id}", lambda: self.client.http.put(
            consul.base.CB.bool(), "/v1/agent/service/register",
            data=json.dumps(registration.payload())))


def _cause(exc: BaseException) -> str:
    """One line for a failed call: urllib3's chain of wrappers cut down to its last cause."""
    if isinstance(exc, requests.ConnectionError):
        errno_text = re.search(r"\[Errno -?\d+\] ([^'\"()]+)", str(exc))
        detail = errno_text.group(1).strip() if errno_text else (str(exc).splitlines() or [""])[0][-200:]
        return f"cannot connect ({detail or type(exc).__name__})"
    return str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__


def _entry(d: dict[str, Any]) -> KVEntry:
    return KVEntry(key=d["Key"], value=d.get("Value") or b"", create_index=int(d.get("CreateIndex", 0)),
                   modify_index=int(d.get("ModifyIndex", 0)), flags=int(d.get("Flags") or 0))


def instances_in(payload: str) -> tuple[str, list[Instance]] | None:
    """A service watch's payload (the health API's passing entries) as the service's name (empty when no
    instance passes) and its instances; None when the payload is not that."""
    try:
        entries = json.loads(payload) if payload.strip() else []
        names = {str((e.get("Service") or {}).get("Service", "")) for e in entries or []}
        return (names.pop() if len(names) == 1 else ""), [instance_of(e) for e in entries or []]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def worst_status(entry: dict[str, Any]) -> str:
    """An instance's worst check (critical when it has none), or maintenance when an operator set it."""
    checks = entry.get("Checks") or []
    if any(str(c.get("CheckID", "")).startswith(("_node_maintenance", "_service_maintenance")) for c in checks):
        return "maintenance"  # `consul maint`: an operator took it out on purpose
    rank = {"passing": 0, "warning": 1, "critical": 2}
    return max([str(c.get("Status", "critical")) for c in checks] or ["critical"], key=lambda s: rank.get(s, 2))


def instance_of(e: dict[str, Any]) -> Instance:
    svc, node = e.get("Service") or {}, e.get("Node") or {}
    return Instance(address=str(svc.get("Address") or node.get("Address") or ""), port=int(svc.get("Port") or 0),
                    service_id=str(svc.get("ID", "")), node=str(node.get("Node", "")),
                    tags=tuple(str(t) for t in svc.get("Tags") or ()))


def store_for(settings: Settings) -> ConsulStore:
    """A client for this node's agent, as its settings say (address, token, TLS)."""
    return ConsulStore(settings.consul_addr, settings.consul_token, tls=settings.consul_tls)
