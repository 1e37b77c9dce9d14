"""Certificates for interop runs: a throwaway CA, a server leaf and a client leaf.

Foreign stacks expect an ordinary server certificate (a DNS name and IP
address in subjectAltName, serverAuth), and some (qh3) refuse a self-signed
leaf. quicmesh's native engine checks SPIFFE identities inside the handshake
(native/src/verify.rs), in both roles: it accepts a server whose leaf carries
one ``spiffe://`` URI, and as a server it requires a client certificate. So
the server leaf carries both (DNS and IP names, and :data:`SERVER_ID`), and a
client leaf (:data:`CLIENT_ID`, clientAuth) is there for the clients of a
server that asks for one. :func:`make_certificates` writes the Interop
Runner's layout, ``cert.pem`` (leaf then CA), ``priv.key`` (leaf key, PKCS#8),
``ca.pem``, plus ``client.pem`` and ``client.key``.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAME = "localhost"
"""The DNS name in the server certificate (also sent as SNI by the clients)."""

SERVER_ID = "spiffe://interop.quicmesh.test/ns/interop/sa/server"
"""The SPIFFE ID in the server certificate (the native engine's client checks it)."""

CLIENT_ID = "spiffe://interop.quicmesh.test/ns/interop/sa/client"
"""The SPIFFE ID of the client certificate (``client.pem``)."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificates(directory: Path) -> Path:
    """Write ``ca.pem``, ``cert.pem``, ``priv.key``, ``client.pem`` and ``client.key``
    into ``directory``; return it."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=7))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("quicmesh interop CA"))
        .issuer_name(_name("quicmesh interop CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    server_names: list[x509.GeneralName] = [
        x509.DNSName(SERVER_NAME),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("127.0.0.2")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.UniformResourceIdentifier(SERVER_ID),
    ]
    key, leaf = _leaf(
        ca_cert, ca_key, SERVER_NAME, server_names, ExtendedKeyUsageOID.SERVER_AUTH, validity
    )
    client_key, client = _leaf(
        ca_cert,
        ca_key,
        "quicmesh interop client",
        [x509.UniformResourceIdentifier(CLIENT_ID)],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        validity,
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (directory / "cert.pem").write_bytes(leaf.public_bytes(pem) + ca_cert.public_bytes(pem))
    (directory / "priv.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / "client.pem").write_bytes(client.public_bytes(pem) + ca_cert.public_bytes(pem))
    (directory / "client.key").write_bytes(
        client_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return directory


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    names: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    validity: tuple[datetime.datetime, datetime.datetime],
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A key and a leaf certificate for it, signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, leaf
