"""The ACME wing: the only module that speaks to an ACME CA, through certbot's `acme` (with `josepy` and
`cryptography`). It keeps no state: the account, the order and the keys are values the caller stores in
Consul, so that any node can pick up an order another node began.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from acme import client as acme_client
from acme import crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy import errors as jose_errors
from josepy.jwa import ES256
from josepy.jwk import JWK, JWKEC

from flowproxy.errors import FlowproxyError

T = TypeVar("T")
CHALLENGE = "http-01"


class CAError(FlowproxyError):
    """The CA refused, failed or could not be reached; `kind` is the ACME problem type's last part
    (`rateLimited`, `unauthorized`, `connection`, ...), or `timeout` / `unreachable` / `client`;
    `retry_after` the seconds the CA asked to wait (its Retry-After header), if it did."""

    def __init__(self, message: str, kind: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


# The Retry-After of the CA's last answer in this thread (acme's errors do not carry their headers).
_answers = threading.local()


class _Network(acme_client.ClientNetwork):
    """acme's network, noting each answer's Retry-After (RFC 8555 6.6: a rate-limited client waits that long)."""

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        response = super()._send_request(method, url, *args, **kwargs)
        _answers.retry_after = retry_after(response.headers.get("Retry-After"))
        return response


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when.tzinfo else None


@dataclass(frozen=True)
class Account:
    """An ACME account as KV `acme/accounts/<id>` keeps it (the private key included: see the ACL policy)."""

    directory: str
    uri: str
    key: str  # the JWK, JSON

    def to_json(self) -> str:
        return json.dumps({"directory": self.directory, "uri": self.uri, "key": json.loads(self.key)}, sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes) -> Account | None:
        """The stored account, or None when it is not one (its key must load)."""
        try:
            doc = json.loads(raw)
            found = cls(str(doc["directory"]), str(doc["uri"]), json.dumps(doc["key"], sort_keys=True))
            JWK.json_loads(found.key)
        except (ValueError, KeyError, TypeError, jose_errors.Error):
            return None
        return found


@dataclass(frozen=True)
class Challenge:
    token: str
    answer: str  # the key authorization HTTP-01 must serve
    domain: str


def new_key_pem() -> bytes:
    """A fresh P-256 private key, PEM (PKCS#8): the certificate's."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CA:
    """One ACME directory. Every method raises CAError on any failure."""

    def __init__(self, directory: str, *, verify: bool | str = True, timeout: int = 30) -> None:
        self.directory_url = directory
        self.verify = verify
        self.timeout = timeout

    def owns(self, url: str) -> bool:
        """Whether `url` is on this CA's host: an order URL read from KV is fetched with the account's key
        only then (a KV writer must not point a node at another server)."""
        return urlsplit(url).scheme == urlsplit(self.directory_url).scheme and \
            urlsplit(url).netloc == urlsplit(self.directory_url).netloc

    def register(self, email: str | None, agree: bool) -> Account:
        """A new account with a fresh P-256 key."""
        key = JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        client = self._client(key, None)
        body = messages.NewRegistration.from_data(email=email or None, terms_of_service_agreed=agree)
        regr = _guard("registering an account", lambda: client.new_account(body))
        return Account(self.directory_url, str(regr.uri), key.json_dumps())

    def place(self, account: Account, domains: tuple[str, ...], key_pem: bytes) -> str:
        """A new order for `domains`; its URL."""
        client = self._client(JWK.json_loads(account.key), account)
        csr = crypto_util.make_csr(key_pem, list(domains))
        order = _guard("placing an order", lambda: client.new_order(csr))
        return str(order.uri)

    def complete(self, account: Account, url: str, domains: tuple[str, ...], key_pem: bytes, *,
                 publish: Callable[[list[Challenge]], None], deadline: float) -> str:
        """Take the order at `url` from wherever it stands to its certificate (full chain, PEM): answers the
        pending HTTP-01 challenges once `publish` returned (it makes every node serve them), waits for the
        CA to validate, finalizes, downloads. Safe to call again on the same order after a crash."""
        key = JWK.json_loads(account.key)
        client = self._client(key, account)
        order = self._order(client, url, crypto_util.make_csr(key_pem, list(domains)))
        if order.body.status == messages.STATUS_INVALID:
            raise _order_error(order.body)
        pending = [a for a in (self._authz(client, u) for u in order.body.authorizations)
                   if a.body.status == messages.STATUS_PENDING]
        found = [(a, _http01(a)) for a in pending]
        publish([Challenge(str(c.chall.encode("token")), str(c.chall.key_authorization(key)),
                           str(a.body.identifier.value)) for a, c in found])
        for _, challb in found:
            if challb.status == messages.STATUS_PENDING:
                _answer(client, challb, key)
        self._validated(client, order.body.authorizations, deadline)
        when = datetime.datetime.now() + datetime.timedelta(seconds=max(1.0, deadline - time.time()))
        done = _guard("finalizing the order", lambda: client.finalize_order(order, when))
        return str(done.fullchain_pem)

    def _client(self, key: JWK, account: Account | None) -> acme_client.ClientV2:
        net = _Network(key, alg=ES256, verify_ssl=self.verify,  # type: ignore[arg-type]
                       user_agent="flowproxy", timeout=self.timeout)
        if account is not None:
            net.account = messages.RegistrationResource(uri=account.uri, body=messages.Registration())
        directory = _guard("reading the directory",
                           lambda: acme_client.ClientV2.get_directory(self.directory_url, net))
        return acme_client.ClientV2(directory, net)

    def _order(self, client: acme_client.ClientV2, url: str, csr: bytes) -> messages.OrderResource:
        response = _guard("reading the order", lambda: _post_as_get(client, url))
        return messages.OrderResource(body=messages.Order.from_json(response.json()), uri=url, csr_pem=csr)

    def _authz(self, client: acme_client.ClientV2, url: str) -> messages.AuthorizationResource:
        response = _guard("reading an authorization", lambda: _post_as_get(client, url))
        return messages.AuthorizationResource(body=messages.Authorization.from_json(response.json()), uri=url)

    def _validated(self, client: acme_client.ClientV2, urls: Iterable[str], deadline: float) -> None:
        """Wait until no authorization is pending; raise with the CA's reason for the first invalid one."""
        for url in urls:
            while True:
                authz = self._authz(client, url)
                if authz.body.status == messages.STATUS_VALID:
                    break
                if authz.body.status != messages.STATUS_PENDING:
                    raise _authz_error(authz)
                if time.time() > deadline:
                    raise CAError("the CA did not validate the challenge in time", "timeout")
                time.sleep(0.5)


def _answer(client: acme_client.ClientV2, challb: messages.ChallengeBody, key: JWK) -> None:
    response = challb.chall.response(key)
    _guard("answering a challenge", lambda: client.answer_challenge(challb, response))


def _post_as_get(client: acme_client.ClientV2, url: str) -> requests.Response:
    """RFC 8555 6.3 POST-as-GET, through the client's public network object (nonces, a retry on badNonce)."""
    return client.net.post(url, None, new_nonce_url=client.directory["newNonce"])


def _http01(authz: messages.AuthorizationResource) -> messages.ChallengeBody:
    for challb in authz.body.challenges:
        if challb.chall.typ == CHALLENGE:
            return challb
    raise CAError(f"{authz.body.identifier.value}: the CA offers no HTTP-01 challenge", "client")


def _authz_error(authz: messages.AuthorizationResource) -> CAError:
    body = authz.body
    for challb in body.challenges:
        if challb.error is not None:
            return _problem(f"{body.identifier.value}: the CA could not validate it", challb.error)
    return CAError(f"{body.identifier.value}: authorization is {body.status}", "unauthorized")


def _order_error(body: messages.Order) -> CAError:
    if body.error is not None:
        return _problem("the order is invalid", body.error)
    return CAError("the order is invalid", "client")


def _problem(what: str, error: messages.Error, retry: float | None = None) -> CAError:
    code = error.code or str(error.typ).rsplit(":", 1)[-1] or "client"
    return CAError(f"{what}: {code}: {error.detail or error.title or error.typ}", code, retry)


def _guard(what: str, call: Callable[[], T]) -> T:
    """One CA call, its failures as CAError with the problem type."""
    _answers.retry_after = None
    try:
        return call()
    except CAError:
        raise
    except messages.Error as exc:
        raise _problem(what, exc, getattr(_answers, "retry_after", None)) from None
    except errors.TimeoutError:
        raise CAError(f"{what}: the CA did not finish in time", "timeout") from None
    except requests.RequestException as exc:
        raise CAError(f"{what}: cannot reach the CA ({type(exc).__name__}: {str(exc)[:200]})", "unreachable") from None
    except (errors.Error, ValueError, KeyError, TypeError) as exc:
        raise CAError(f"{what}: {type(exc).__name__}: {str(exc)[:300]}", "client") from None
