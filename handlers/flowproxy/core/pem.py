"""What a PEM certificate says: its names, issuer and validity. Pure (bytes in, values out).

`cryptography` reads it; this is the one place that reads certificates with it (the ACME wing makes keys
and requests with it, through certbot's `acme`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CertFacts:
    names: tuple[str, ...]  # the DNS names of its subjectAltName, as written
    issuer: str  # the issuer's common name (or its whole name when it has none)
    not_before: float  # Unix time
    not_after: float
    serial: str  # hex

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before


def facts(pem: bytes) -> CertFacts | None:
    """The first certificate of a PEM (the leaf of a chain), or None when there is none to read."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError:
        return None
    if not chain:
        return None
    leaf = chain[0]
    try:
        names = tuple(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                      .get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    common = leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    issuer = str(common[0].value) if common else leaf.issuer.rfc4514_string()
    return CertFacts(names=names, issuer=issuer, not_before=leaf.not_valid_before_utc.timestamp(),
                     not_after=leaf.not_valid_after_utc.timestamp(), serial=f"{leaf.serial_number:x}")
