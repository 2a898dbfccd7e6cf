"""Vet the certificates in KV `certs/<name>` before they reach HAProxy. An edge: OpenSSL reads them.

A bad PEM must be refused alone with its reason: HAProxy refuses a whole config over one unreadable or
mismatched certificate, which would stop every other change on the node.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Mapping

from flowproxy.core import contract
from flowproxy.core.faults import internal_error
from flowproxy.core.model import Problem
from flowproxy.core.pem import facts

MARKERS = (b"-----BEGIN CERTIFICATE-----", b"PRIVATE KEY-----")


def refused(prefix: str, certs: Mapping[str, bytes]) -> dict[str, Problem]:
    """A problem per certificate OpenSSL would not serve, by name."""
    problems: dict[str, Problem] = {}
    for name, pem in sorted(certs.items()):
        key = contract.cert_key(prefix, name)
        try:
            reason = pem_problem(pem)
        except Exception as exc:  # one certificate that breaks the vetting must not take the others down
            reason = internal_error(key, "vetting", exc)
        if reason is not None:
            problems[name] = Problem(key, f"{reason}; certificate not served")
    return problems


def pem_problem(pem: bytes) -> str | None:
    """Why OpenSSL would not serve this PEM (chain + key), or None when it would."""
    missing = [m.decode().strip("-") for m in MARKERS if m not in pem]
    if missing:
        return f"PEM must hold the certificate chain and its private key; no {' or '.join(missing)} block found"
    fd, path = tempfile.mkstemp(suffix=".pem")
    try:
        os.write(fd, pem)
        os.close(fd)
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(path)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            return "the private key does not match the certificate"
        return f"OpenSSL cannot load it: {exc.reason or exc}"
    finally:
        os.unlink(path)
    return None


def not_after(pem: bytes) -> float | None:
    """When the first certificate of a PEM expires (Unix time), or None when there is none to read."""
    found = facts(pem)
    return found.not_after if found is not None else None
