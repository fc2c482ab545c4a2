"""Certificates the tests make: a self-signed CA, and the builder every certificate starts from.

The caller picks the key: the registry's token issuer needs RSA (it signs RS256 JWTs), the NATS
tests use EC (fast to generate, as a real deployment would).
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import NameOID


def common_name(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def certificate_builder(
    subject: x509.Name, key: CertificatePublicKeyTypes
) -> x509.CertificateBuilder:
    """``subject``'s certificate, valid from a day ago to a day from now: no test outlives it,
    and no clock has to be exact."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def self_signed_ca(key: CertificateIssuerPrivateKeyTypes, name: str) -> x509.Certificate:
    """A CA certificate for ``key``, named ``name``: it signs certificates, and its key may
    also sign other things (the token issuer's JWTs carry it as their ``x5c``)."""
    subject = common_name(name)
    return (
        certificate_builder(subject, key.public_key())
        .issuer_name(subject)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
