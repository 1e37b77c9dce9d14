"""Peer certificates every transport must refuse, both ways (a client's and a server's),
and one with an intermediate that all must take: through the public transports on
loopback, each engine where QUIC.

Found by a review: h2 and TLS-over-TCP checked the trust domain against every root when
the peer sent an intermediate (an intermediate under ``other.local``'s root could issue a
``mesh.local`` ID); aioquic's client took a server certificate with two URI SANs, or
with a SPIFFE and an https URI SAN, or made for clients only."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from quic_helpers import require_engine

import quicmesh
from quicmesh import DevCA, Identity, TrustBundle
from quicmesh.tls.ca import _key_usage

NOW = datetime.datetime.now(datetime.UTC)
GOOD = "spiffe://mesh.local/ns/default/sa/good"
SERVER = "spiffe://mesh.local/ns/default/sa/server"
BOTH_EKU = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
MESH = DevCA()
OTHER = DevCA("other.local")
TWO_ROOTS = TrustBundle([MESH.certificate, OTHER.certificate])
TRANSPORTS = ["quic-native", "quic-aioquic", "h2", "tcp"]


def _cert(
    issuer: x509.Certificate,
    issuer_key: Any,
    uris: list[str],
    *,
    ca: bool = False,
    eku: tuple[x509.ObjectIdentifier, ...] = BOTH_EKU,
    key_usage: x509.KeyUsage | None = None,
) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate" if ca else "leaf")])
        )
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(minutes=5))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    elif eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


def _via_intermediate(root: DevCA, spiffe_id: str) -> Identity:
    domain = root.trust_domain
    intermediate, key = _cert(root.certificate, root.private_key, [f"spiffe://{domain}"], ca=True)
    leaf, leaf_key = _cert(intermediate, key, [spiffe_id])
    return Identity(leaf, leaf_key, [intermediate])


def _transport(kind: str, identity: Identity, trust: TrustBundle) -> Any:
    if kind.startswith("quic-"):
        engine = kind.removeprefix("quic-")
        require_engine(engine)
        return quicmesh.QuicTransport(identity=identity, trust=trust, engine=engine)
    if kind == "h2":
        return quicmesh.H2Transport(identity=identity, trust=trust)
    return quicmesh.TcpTransport(identity=identity, trust=trust)


async def _flow(kind: str, server: Identity, client: Identity, trust: TrustBundle) -> str:
    """The server's echo of one flow, with the identities each side saw; or the error."""
    seen: list[str] = []

    async def handler(stream: quicmesh.MeshStream) -> None:
        seen.append(stream.peer_identity)
        stream.write(await stream.read())
        stream.write_eof()

    listener = await _transport(kind, server, trust).listen(("127.0.0.1", 0), handler)
    client_transport = _transport(kind, client, trust)
    try:
        connection = await client_transport.connect(listener.address, timeout=5)
        try:
            stream = await asyncio.wait_for(connection.open_stream("x.svc:80"), 5)
            stream.write(b"hi")
            stream.write_eof()
            echoed = await asyncio.wait_for(stream.read(), 5)
            return f"{echoed!r} {connection.peer_identity} {seen}"
        finally:
            await connection.aclose()
    except quicmesh.QuicmeshError as exc:
        return f"refused: {type(exc).__name__}"
    finally:
        await client_transport.aclose()
        listener.close()
        await listener.wait_closed()


BAD = {
    "an intermediate under another trust domain's root": _via_intermediate(
        OTHER, "spiffe://mesh.local/ns/default/sa/impersonated"
    ),
    "two SPIFFE URI SANs": Identity(
        *_cert(MESH.certificate, MESH.private_key, [GOOD, "spiffe://mesh.local/ns/x/sa/admin"])
    ),
    "a SPIFFE and an https URI SAN": Identity(
        *_cert(MESH.certificate, MESH.private_key, ["https://example.com/", GOOD])
    ),
    # (Until 2026-12-07 h2 and tcp took this one both ways, and aioquic's client as a server.)
    "a leaf with basicConstraints CA:true": Identity(
        *_cert(MESH.certificate, MESH.private_key, [GOOD], ca=True)
    ),
    # (Until 2026-12-07 every transport took the next three; X509-SVID 4.3.)
    "a leaf whose key may sign certificates (keyCertSign)": Identity(
        *_cert(
            MESH.certificate,
            MESH.private_key,
            [GOOD],
            key_usage=_key_usage(digital_signature=True, key_cert_sign=True),
        )
    ),
    "a leaf whose key may sign CRLs (cRLSign)": Identity(
        *_cert(
            MESH.certificate,
            MESH.private_key,
            [GOOD],
            key_usage=_key_usage(digital_signature=True, crl_sign=True),
        )
    ),
    "a leaf whose keyUsage lacks digitalSignature": Identity(
        *_cert(
            MESH.certificate,
            MESH.private_key,
            [GOOD],
            key_usage=_key_usage(key_encipherment=True),
        )
    ),
    # (aioquic's client took it as a server's, identity spiffe://mesh.local.)
    "the CA's own certificate": Identity(MESH.certificate, MESH.private_key),
    # (Every transport took it; X509-SVID 5.2: a leaf's SPIFFE ID has a path.)
    "a trust domain's ID, with no path": Identity(
        *_cert(MESH.certificate, MESH.private_key, ["spiffe://mesh.local"])
    ),
}


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_peer_certificate_is_refused_both_ways(kind: str, case: str) -> None:
    server = MESH.issue(SERVER)
    for server_identity, client_identity in ((server, BAD[case]), (BAD[case], server)):
        outcome = asyncio.run(_flow(kind, server_identity, client_identity, TWO_ROOTS))
        assert outcome.startswith("refused"), (case, outcome)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_a_server_certificate_made_for_clients_only_is_refused(kind: str) -> None:
    clients_only = Identity(
        *_cert(MESH.certificate, MESH.private_key, [SERVER], eku=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    )
    outcome = asyncio.run(_flow(kind, clients_only, MESH.issue(GOOD), MESH.trust_bundle))
    assert outcome.startswith("refused"), outcome


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_a_certificate_from_an_intermediate_of_its_own_domain_is_taken(kind: str) -> None:
    client = _via_intermediate(MESH, GOOD)
    server = _via_intermediate(MESH, SERVER)
    outcome = asyncio.run(_flow(kind, server, client, TWO_ROOTS))
    assert outcome == f"b'hi' {SERVER} ['{GOOD}']", outcome


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_a_leaf_naming_the_usual_key_usages_is_taken(kind: str) -> None:
    # Istio's workload certificates: digitalSignature and keyEncipherment.
    usual = _key_usage(digital_signature=True, key_encipherment=True)
    server = Identity(*_cert(MESH.certificate, MESH.private_key, [SERVER], key_usage=usual))
    client = Identity(*_cert(MESH.certificate, MESH.private_key, [GOOD], key_usage=usual))
    outcome = asyncio.run(_flow(kind, server, client, MESH.trust_bundle))
    assert outcome == f"b'hi' {SERVER} ['{GOOD}']", outcome
