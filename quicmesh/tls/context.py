"""``ssl.SSLContext`` factories for mutual TLS between sidecars over TCP.

Both sides present an :class:`~quicmesh.tls.Identity`, require the peer's
certificate and verify it against a :class:`~quicmesh.tls.TrustBundle`;
only TLS 1.3 is offered. Host names are not checked (SPIFFE certificates
carry no DNS names): after the handshake the caller reads the peer's SPIFFE
ID with :func:`~quicmesh.tls.peer_identity_from_ssl` and decides.
"""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path

from quicmesh.errors import ConfigError
from quicmesh.tls._pem import write_file
from quicmesh.tls.identity import Identity, TrustBundle


def server_ssl_context(
    identity: Identity, trust: TrustBundle, alpn_protocols: list[str]
) -> ssl.SSLContext:
    """Return a TLS 1.3 server context that requires and verifies client certificates.

    :param identity: the certificate chain and key this server presents.
    :param trust: the roots client certificates must chain to.
    :param alpn_protocols: ALPN protocol names offered, most preferred first.
    :raises ConfigError: if ``ssl`` rejects the identity, trust bundle or ALPN list.
    """
    return _mutual_tls_context(ssl.PROTOCOL_TLS_SERVER, identity, trust, alpn_protocols)


def client_ssl_context(
    identity: Identity, trust: TrustBundle, alpn_protocols: list[str]
) -> ssl.SSLContext:
    """Return a TLS 1.3 client context that presents ``identity`` and verifies the server.

    Host names are not checked; check the server's SPIFFE ID after the handshake.

    :param identity: the certificate chain and key this client presents.
    :param trust: the roots the server's certificate must chain to.
    :param alpn_protocols: ALPN protocol names offered, most preferred first.
    :raises ConfigError: if ``ssl`` rejects the identity, trust bundle or ALPN list.
    """
    return _mutual_tls_context(ssl.PROTOCOL_TLS_CLIENT, identity, trust, alpn_protocols)


def update_ssl_context(context: ssl.SSLContext, identity: Identity, trust: TrustBundle) -> None:
    """Make a context from this module present ``identity`` from the next handshake on.

    The roots of ``trust`` are added to those the context verifies with (``ssl``
    cannot remove roots from a context; a CA that must be distrusted needs a new
    context, i.e. a restart).

    :raises ConfigError: if ``ssl`` rejects the identity or trust bundle.
    """
    try:
        context.load_verify_locations(cadata=trust.pem.decode("ascii"))
        _load_identity(context, identity)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"cannot update TLS context: {exc}") from exc


def _mutual_tls_context(
    protocol: ssl._SSLMethod, identity: Identity, trust: TrustBundle, alpn_protocols: list[str]
) -> ssl.SSLContext:
    """Build a TLS 1.3-only, certificate-required context for either side."""
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cadata=trust.pem.decode("ascii"))
        _load_identity(context, identity)
        if alpn_protocols:
            context.set_alpn_protocols(alpn_protocols)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"cannot build TLS context: {exc}") from exc
    return context


def _load_identity(context: ssl.SSLContext, identity: Identity) -> None:
    """Load ``identity`` into ``context`` via private temporary files, deleted at once.

    ``SSLContext.load_cert_chain`` only reads files; the directory is created
    0700 and the files 0600, and both are removed before this returns.
    """
    with tempfile.TemporaryDirectory(prefix="quicmesh-tls-") as directory:
        cert_path = Path(directory) / "cert.pem"
        key_path = Path(directory) / "key.pem"
        write_file(cert_path, identity.cert_chain_pem(), private=True)
        write_file(key_path, identity.private_key_pem(), private=True)
        context.load_cert_chain(cert_path, key_path)
