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


class MutualTlsContexts:
    """A transport's two mutual-TLS contexts, made again when its identity or trust changes.

    ``ssl`` cannot take a root out of a context, and a listener is handed its server
    context once (asyncio keeps it for the server's life), so a rotation makes new
    contexts, and every server context made here moves each new handshake to the newest
    one (its ``sni_callback``, which OpenSSL calls for every ClientHello, SNI or not):
    the new certificate is presented, and a root taken out of the trust bundle refused,
    from the next handshake on, on listeners started before the change too. Connections
    already established keep the certificates they were made with.

    :param alpn_protocols: ALPN protocol names offered, most preferred first.
    :param session_tickets: TLS 1.3 session tickets a server context sends after each
        handshake: none by default (``ssl``'s default is 2). A resumed session presents no
        certificate, so the listeners refuse every resumption
        (:meth:`~quicmesh.transport._tcp.TlsTunnelProtocol._verify_peer`): a ticket only
        tells a client that the server accepted its certificate (TcpTransport's use).
        Not ``ssl.OP_NO_TICKET``: under TLS 1.3, OpenSSL 3 then keeps stateful tickets in
        the server's session cache, which resume all the same.
    """

    def __init__(self, alpn_protocols: list[str], *, session_tickets: int = 0) -> None:
        self._alpn = alpn_protocols
        self._session_tickets = session_tickets
        self._contexts: dict[bool, ssl.SSLContext] = {}

    def get(self, identity: Identity, trust: TrustBundle, *, server_side: bool) -> ssl.SSLContext:
        """The current context for one side (made on first use from ``identity`` and
        ``trust``, which must be those of the last :meth:`update`).

        :raises ConfigError: if ``ssl`` rejects the identity or trust bundle.
        """
        if server_side not in self._contexts:
            self._contexts[server_side] = self._make(identity, trust, server_side)
        return self._contexts[server_side]

    def problem(self, identity: Identity, trust: TrustBundle) -> str | None:
        """Why ``ssl`` cannot make contexts from ``identity`` and ``trust``, or None."""
        try:
            for side in (False, True):
                self._make(identity, trust, side)
        except ConfigError as exc:
            return str(exc)
        return None

    def update(self, identity: Identity, trust: TrustBundle) -> None:
        """Make the contexts used so far again from ``identity`` and ``trust``; on an
        error, the current ones stay.

        :raises ConfigError: if ``ssl`` rejects the identity or trust bundle.
        """
        made = {side: self._make(identity, trust, side) for side in self._contexts}
        self._contexts.update(made)

    def _make(self, identity: Identity, trust: TrustBundle, server_side: bool) -> ssl.SSLContext:
        if not server_side:
            return client_ssl_context(identity, trust, self._alpn)
        context = server_ssl_context(identity, trust, self._alpn)
        context.num_tickets = self._session_tickets
        context.sni_callback = self._to_newest
        return context

    def _to_newest(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: object
    ) -> None:
        newest = self._contexts[True]
        if connection.context is not newest:
            connection.context = newest


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
