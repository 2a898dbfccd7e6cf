"""The ACME worker of a node process (`node up`, `node run`): certificates for the routes that opt in,
issued and renewed once for the whole fleet, with Consul as the only coordinator.

Every node runs one; for each certificate that is due (`core/acme.py`), a node takes the Consul lock
`acme/locks/<name>` with a session of its own (TTL, released when it ends), re-reads the state under the
lock, and works: the account from `acme/accounts/<id>` (registered once, with check-and-set), the order
from `acme/orders/<name>` (placed once; its URL and the certificate's key are stored before any
challenge, so a node that takes over after the holder died resumes the same order instead of placing
another), the HTTP-01 answers written to `acme/challenges/<token>`, which every node serves through its
own apply. It answers the CA once this node serves them and every live node has applied them, then
finalizes and writes the chain and key to `certs/<name>` (flags ACME_FLAG, check-and-set), which every
node then serves through the existing path (a renewal is `set ssl cert`, no reload). The outcome, the
last error and the next attempt go to `acme/state/<name>`; a failure waits fleet-wide (backoff).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from flowproxy import runstate
from flowproxy.ca.client import CA, Account, CAError, Challenge, new_key_pem
from flowproxy.consul import reads
from flowproxy.consul.store import ConsulStore, store_for
from flowproxy.core import acme, contract, pem
from flowproxy.core.fleet import fleet_view
from flowproxy.core.model import Desired, KVEntry
from flowproxy.errors import CasConflict, FlowproxyError
from flowproxy.haproxy import ports
from flowproxy.node import selfcheck
from flowproxy.probe import fetch
from flowproxy.settings import Settings

log = logging.getLogger(__name__)
SESSION_TTL = 10  # Consul's least: a holder that dies frees its locks within 10-20 s
EVERY = 15.0  # seconds between looks at the certificates when nothing changed
LOCKED_EVERY = 2.0  # ... while another node works on a due one (it may die)
ORDER_TIME = 180.0  # an attempt's bound, from order to certificate
SERVE_TIME = 30.0  # how long the answers may take to be served by every live node


class LockLost(FlowproxyError):
    """This node's lock session ended while it worked: another node may hold the certificate's lock now."""


@dataclass(frozen=True)
class Order:
    """KV `acme/orders/<name>`: the order in progress and its certificate's key (see the ACL policy)."""

    url: str
    domains: tuple[str, ...]
    key: str  # PEM
    directory: str
    node: str
    placed: float

    def to_json(self) -> str:
        return json.dumps({"url": self.url, "domains": list(self.domains), "key": self.key,
                           "directory": self.directory, "node": self.node, "placed": self.placed}, sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes) -> Order | None:
        try:
            doc = json.loads(raw)
            if not isinstance(doc["domains"], list):
                return None
            return cls(str(doc["url"]), tuple(map(str, doc["domains"])), str(doc["key"]), str(doc["directory"]),
                       str(doc["node"]), float(doc["placed"]))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class Seen:
    """One read of the ACME folder and the ACME certificates."""

    states: dict[str, acme.State]
    orders: dict[str, KVEntry]
    certs: dict[str, KVEntry]

    def held(self, name: str) -> acme.Held | None:
        entry = self.certs.get(name)
        if entry is None:
            return None
        return acme.Held(pem.facts(entry.value), entry.flags == acme.ACME_FLAG)


class Certifier:
    def __init__(self, settings: Settings, desired: Callable[[], Desired | None]) -> None:
        self.settings = settings
        self.desired = desired
        self.ca = CA(str(settings.acme_directory), verify=settings.acme_ca_bundle or True)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.session: str | None = None
        self._store: ConsulStore | None = None
        self._seen_desired: Desired | None = None
        self._next = 0.0
        self.lost = threading.Event()  # the session ended under this node: whatever it holds is no longer its
        self._account_index = 0  # the ModifyIndex of the account entry the last attempt used (0: unknown)
        self._keeper_store: ConsulStore | None = None

    # -- the thread -------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="flowproxy-acme", daemon=True)
        self.thread.start()
        # Its own thread and client: an order may take minutes, and the session must outlive them.
        threading.Thread(target=self._keep, name="flowproxy-acme-session", daemon=True).start()
        log.info("ACME: certificates for routes with tls.acme from %s", self.settings.acme_directory)

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
        if self.session is not None:
            with contextlib.suppress(FlowproxyError):
                self.store().destroy_session(self.session)  # its locks go at once, not after the TTL
        for store in (self._store, self._keeper_store):
            if store is not None:
                store.close()

    def store(self) -> ConsulStore:
        if self._store is None:
            self._store = store_for(self.settings)
        return self._store

    def _loop(self) -> None:
        while not self.stopping.wait(1.0):
            desired = self.desired()
            if desired is None or (desired is self._seen_desired and time.time() < self._next):
                continue
            self._seen_desired = desired
            try:
                self._next = time.time() + self.tick(desired)
            except FlowproxyError as exc:
                log.warning("ACME: %s", exc)
                self._next = time.time() + LOCKED_EVERY
            except Exception:  # the worker must outlive a bug; the log says where
                log.exception("ACME: unexpected error; trying again later")
                self._next = time.time() + EVERY

    # -- one look -------------------------------------------------------------------------------------
    def tick(self, desired: Desired) -> float:
        """Work on what is due; seconds until the next look."""
        wanted = acme.wanted(desired)
        seen = self.read()
        worked = False
        wait = EVERY
        for name, want in sorted(wanted.items()):
            if self.stopping.is_set():
                break
            verdict = acme.verdict(want, seen.held(name), seen.states.get(name, acme.State()), time.time())
            if verdict.action == "blocked":
                self.note(name, want, seen.states.get(name), verdict.reason)
            if verdict.action != "due":
                wait = min(wait, self._until(seen, name, verdict.action))
                continue
            worked = True
            if not self.work(want, verdict.reason):
                wait = LOCKED_EVERY  # another node holds it: look again soon, it may die
        self.publish_rows(self.read() if worked else seen, wanted)
        return wait

    def _until(self, seen: Seen, name: str, action: str) -> float:
        """Seconds until this certificate may be due: its next attempt after a failure, or its renewal."""
        state, held = seen.states.get(name, acme.State()), seen.held(name)
        if action == "waiting" and state.next_attempt:
            return max(0.5, state.next_attempt - time.time())
        if action == "fresh" and held is not None and held.facts is not None:
            return max(0.5, acme.renew_at(held.facts) - time.time())
        return EVERY

    def read(self) -> Seen:
        prefix = self.settings.prefix
        _, entries = self.store().read_prefix(contract.acme_folder(prefix))
        _, certs = self.store().read_prefix(contract.cert_key(prefix, acme.CERT_PREFIX))
        states: dict[str, acme.State] = {}
        orders: dict[str, KVEntry] = {}
        for entry in entries:
            shape = contract.classify(prefix, entry.key)
            if shape.kind is contract.Kind.ACME and shape.names[0] == "state":
                states[shape.names[1]] = acme.state_from(entry.value)
            elif shape.kind is contract.Kind.ACME and shape.names[0] == "orders":
                orders[shape.names[1]] = entry
        return Seen(states, orders, {e.key.rsplit("/", 1)[-1]: e for e in certs})

    def publish_rows(self, seen: Seen, wanted: Mapping[str, acme.Wanted]) -> None:
        rows = acme.status_rows(seen.states, {name: e.value for name, e in seen.certs.items()}, frozenset(wanted))
        runstate.save(self.settings.run_dir, runstate.ACME, {"time": time.time(), "certificates": rows})

    # -- one certificate ------------------------------------------------------------------------------
    def work(self, want: acme.Wanted, reason: str) -> bool:
        """Take the certificate's lock and issue it; False when another node holds the lock."""
        lock = contract.acme_key(self.settings.prefix, "locks", want.name)
        session = self.ensure_session()
        if self.store().holder(lock) is not None or not self.store().acquire(lock, self.settings.node, session):
            return False
        try:
            seen = self.read()  # under the lock: another node may have finished it a moment ago
            state = seen.states.get(want.name, acme.State())
            verdict = acme.verdict(want, seen.held(want.name), state, time.time())
            if verdict.action == "due":
                log.info("ACME: %s (%s): %s; this node works on it", want.name, ", ".join(want.domains), reason)
                self.issue(want, state, seen)
        finally:
            with contextlib.suppress(FlowproxyError):
                self.store().release(lock, session)
        return True

    def issue(self, want: acme.Wanted, state: acme.State, seen: Seen) -> None:
        written: list[str] = []
        try:
            account = self.account()
            order, state = self.order(account, want, state, seen.orders.get(want.name))
            chain = self.ca.complete(account, order.url, want.domains, order.key.encode(),
                                     publish=lambda found: self.serve(found, want, written),
                                     deadline=time.time() + ORDER_TIME)
            state = self.store_certificate(want, state, chain.encode() + order.key.encode(), seen)
            self.drop_order(want.name)
        except CAError as exc:
            state = self.failure(want, state, str(exc), exc.kind, exc.retry_after)
            if exc.kind not in ("unreachable", "timeout"):  # the order is dead: the next attempt places another
                self.drop_order(want.name)
            if exc.kind == "accountDoesNotExist":  # the CA forgot it (a reset): the next attempt registers anew
                self.forget_account()
        except FlowproxyError:
            raise  # Consul is away: nothing was decided; the lock goes, the next look tries again
        except Exception as exc:  # a bug, or a stored order that cannot be used: backoff, not a crash loop
            log.exception("ACME: %s: unexpected error", want.name)
            state = self.failure(want, state, f"internal error: {type(exc).__name__}: {exc}", "internal")
            self.drop_order(want.name)
        finally:
            for key in written if not self.lost.is_set() else ():  # a node that took over may serve them still
                with contextlib.suppress(FlowproxyError):
                    self.store().delete(key)
        self.put_state(want.name, state)

    def drop_order(self, name: str) -> None:
        self.store().delete(contract.acme_key(self.settings.prefix, "orders", name))

    def failure(self, want: acme.Wanted, state: acme.State, error: str, kind: str,
                retry_after: float | None = None) -> acme.State:
        s = self.settings
        out = acme.failed(state, want, error, kind, time.time(), retry=s.acme_retry, retry_max=s.acme_retry_max,
                          retry_after=retry_after)
        log.warning("ACME: %s: %s (attempt %d failed; next at %s)", want.name, error, out.failures,
                    acme.iso(out.next_attempt or 0))
        return out

    def account(self) -> Account:
        """The fleet's account at this directory: registered once, by whichever node needs it first."""
        key = self.account_key()
        entry = self.store().get(key)
        found = Account.from_json(entry.value) if entry else None
        if found is not None and found.directory == self.settings.acme_directory:
            self._account_index = entry.modify_index if entry else 0
            return found
        made = self.ca.register(self.settings.acme_email, self.settings.acme_agree_tos)
        try:
            self.store().put(key, made.to_json(), cas=entry.modify_index if entry else 0)
        except CasConflict:  # another node registered meanwhile: use its account (ours stays unused)
            return self.account()
        log.info("ACME: registered account %s", made.uri)
        written = self.store().get(key)
        self._account_index = written.modify_index if written else 0
        return made

    def forget_account(self) -> None:
        """The CA no longer knows the stored account (reset, or deactivated): drop it, unless another node
        has already replaced it, so that the next attempt registers anew."""
        key = self.account_key()
        log.warning("ACME: the CA no longer knows the account in %s; registering anew at the next attempt", key)
        with contextlib.suppress(CasConflict):
            self.store().delete(key, cas=self._account_index or None)

    def account_key(self) -> str:
        return contract.acme_key(self.settings.prefix, "accounts", acme.account_id(str(self.settings.acme_directory)))

    def order(self, account: Account, want: acme.Wanted, state: acme.State,
              entry: KVEntry | None) -> tuple[Order, acme.State]:
        """The order to work on: the stored one when it is for these names at this CA, else a new one (its
        URL and key stored before anything else happens, so that another node can resume it)."""
        s = self.settings
        stored = Order.from_json(entry.value) if entry else None
        if stored is not None and stored.domains == want.domains and stored.directory == s.acme_directory \
                and self.ca.owns(stored.url):
            log.info("ACME: %s: resuming order %s that %s placed", want.name, stored.url, stored.node)
            return stored, state
        key = new_key_pem().decode()
        url = self.ca.place(account, want.domains, key.encode())
        order = Order(url, want.domains, key, str(s.acme_directory), s.node, time.time())
        self.store().put(contract.acme_key(s.prefix, "orders", want.name), order.to_json())
        state = replace(state, domains=want.domains, routes=want.routes, orders=state.orders + 1,
                        working=f"order placed by {s.node}", last_attempt=time.time())
        self.put_state(want.name, state)
        log.info("ACME: %s: placed order %s", want.name, url)
        return order, state

    def serve(self, found: list[Challenge], want: acme.Wanted, written: list[str]) -> None:
        """Write the answers and wait until this node serves them and every live node has applied them."""
        s = self.settings
        for challenge in found:
            key = contract.challenge_key(s.prefix, challenge.token)
            self.store().put(key, challenge.answer)
            written.append(key)
        if not found:
            return
        index, _ = self.store().keys_with_index(contract.challenge_key(s.prefix))
        deadline = time.time() + SERVE_TIME
        while time.time() < deadline and not self.stopping.is_set():
            if all(self.answers(c) for c in found) and not self.lagging(index):
                self.holding()
                return
            time.sleep(0.2)
        log.warning("ACME: %s: not every node serves its challenge answers after %.0f s (%s); answering anyway",
                    want.name, SERVE_TIME, ", ".join(self.lagging(index)) or "this node")
        self.holding()

    def answers(self, challenge: Challenge) -> bool:
        """Whether this node's HTTP listener serves the answer (what the CA will fetch)."""
        url = f"http://{loopback(self.settings.http_bind)}{acme.CHALLENGE_PATH}{challenge.token}"
        try:
            reply = fetch(url, challenge.domain, timeout=2)
        except OSError:
            return False
        return reply.status == 200 and reply.body.strip() == challenge.answer

    def lagging(self, index: int) -> list[str]:
        """Live nodes (passing health) that have not applied the config at `index` yet. (Not `read_fleet`:
        its newest-write index reads the whole config, ~0.3 s at 10,000 routes, and this runs every 0.2 s.)"""
        store = self.store()
        rows = fleet_view(reads.read_statuses(store, self.settings.prefix), store.service_health(selfcheck.SERVICE),
                          index)
        return [r.node for r in rows if r.health == "passing" and not r.current]

    def store_certificate(self, want: acme.Wanted, state: acme.State, pem_bytes: bytes, seen: Seen) -> acme.State:
        facts = pem.facts(pem_bytes)
        if facts is None or tuple(sorted(set(facts.names))) != want.domains:
            raise CAError(f"the CA issued a certificate for {facts.names if facts else 'nothing readable'}, "
                          f"not {list(want.domains)}", "client")
        key = contract.cert_key(self.settings.prefix, want.name)
        entry = seen.certs.get(want.name)
        self.holding()
        try:
            self.store().put(key, pem_bytes, cas=entry.modify_index if entry else 0, flags=acme.ACME_FLAG)
        except CasConflict:
            raise CAError(f"certs/{want.name} changed while the certificate was issued; not overwritten",
                          "client") from None
        log.info("ACME: %s: issued by %s, valid until %s", want.name, facts.issuer, acme.iso(facts.not_after))
        return acme.issued(state, want, facts, self.settings.node, time.time())

    def note(self, name: str, want: acme.Wanted, state: acme.State | None, reason: str) -> None:
        """Record a reason nothing is done (a user's certificate holds the name) once."""
        if state is None or state.last_error != reason:
            self.put_state(name, replace(state or acme.State(), domains=want.domains, routes=want.routes,
                                         last_error=reason, last_error_type="blocked"))

    def put_state(self, name: str, state: acme.State) -> None:
        self.store().put(contract.acme_key(self.settings.prefix, "state", name), state.to_json())

    # -- the session ----------------------------------------------------------------------------------
    def ensure_session(self) -> str:
        if self.session is None:
            self.session = self.store().create_session(f"flowproxy-acme {self.settings.node}", SESSION_TTL)
            self.lost.clear()
        return self.session

    def _keep(self) -> None:
        """Renew the session every third of its TTL; when Consul says it ended, the locks it held are gone."""
        while not self.stopping.wait(SESSION_TTL / 3):
            session = self.session
            if session is None:
                continue
            try:
                if self._keeper_store is None:
                    self._keeper_store = store_for(self.settings)
                if not self._keeper_store.renew_session(session):
                    log.warning("ACME: the lock session ended (this node was away too long); its work stops")
                    self.lost.set()
                    self.session = None
            except FlowproxyError as exc:
                log.warning("ACME: could not renew the lock session: %s", exc)

    def holding(self) -> None:
        """Raise unless this node still holds what it locked: another node may have taken over."""
        if self.lost.is_set():
            raise LockLost("ACME: the lock session ended while this node worked; another node takes over")


def loopback(bind: str) -> str:
    """Where this node's own listener is reached: a wildcard bind is reached on loopback."""
    host, _, port = bind.rpartition(":")
    return f"127.0.0.1:{port}" if ports.wildcard(host) else bind
