"""Loopback mutual-TLS tests of server_ssl_context and client_ssl_context (quicmesh.tls.context).

Each test runs a real asyncio TCP server on 127.0.0.1. The server upgrades the
accepted connection with ``StreamWriter.start_tls`` so a failed handshake is
seen as an exception in the server's own code rather than only in a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import pytest

from quicmesh.errors import ConfigError
from quicmesh.tls import (
    DevCA,
    Identity,
    client_ssl_context,
    peer_identity_from_ssl,
    server_ssl_context,
)

SERVER_ID = "spiffe://mesh.local/ns/default/sa/productpage"
CLIENT_ID = "spiffe://mesh.local/ns/default/sa/reviews"
ALPN = ["h2"]


async def _serve_once(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> tuple[str | BaseException, str | BaseException]:
    """Run one connection; return (server's view, client's view): peer SPIFFE ID or error."""
    server_result: asyncio.Future[str | BaseException] = asyncio.Future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(server_context)
            ssl_object = writer.get_extra_info("ssl_object")
            assert ssl_object.selected_alpn_protocol() == "h2"
            peer = peer_identity_from_ssl(ssl_object)
            writer.write(b"ok\n")
            await writer.drain()
            server_result.set_result(peer)
        except (ssl.SSLError, ConnectionError) as exc:
            server_result.set_result(exc)
        finally:
            writer.close()
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client_result: str | BaseException
    try:
        async with server:
            writer: asyncio.StreamWriter | None = None
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=client_context, server_hostname=None
                )
                client_result = peer_identity_from_ssl(writer.get_extra_info("ssl_object"))
                line = await reader.readline()
                if line != b"ok\n":
                    client_result = ConnectionError(f"server closed the connection: {line!r}")
            except (ssl.SSLError, ConnectionError) as exc:
                client_result = exc
            finally:
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(ssl.SSLError, ConnectionError):
                        await writer.wait_closed()
            return await server_result, client_result
    finally:
        server.close()
        await server.wait_closed()


def test_mutual_tls_handshake_exchanges_spiffe_ids() -> None:
    ca = DevCA()
    server_ctx = server_ssl_context(ca.issue(SERVER_ID), ca.trust_bundle, ALPN)
    client_ctx = client_ssl_context(ca.issue(CLIENT_ID), ca.trust_bundle, ALPN)
    server_view, client_view = asyncio.run(_serve_once(server_ctx, client_ctx))
    assert server_view == CLIENT_ID
    assert client_view == SERVER_ID


def test_server_rejects_a_client_from_another_ca() -> None:
    ca, stranger_ca = DevCA(), DevCA()
    server_ctx = server_ssl_context(ca.issue(SERVER_ID), ca.trust_bundle, ALPN)
    # The stranger trusts our CA, so only the server's check of the client can fail.
    client_ctx = client_ssl_context(stranger_ca.issue(CLIENT_ID), ca.trust_bundle, ALPN)
    server_view, client_view = asyncio.run(_serve_once(server_ctx, client_ctx))
    assert isinstance(server_view, ssl.SSLError)
    assert "certificate verify failed" in str(server_view)
    assert isinstance(client_view, BaseException)


def test_client_rejects_a_server_from_another_ca() -> None:
    ca, stranger_ca = DevCA(), DevCA()
    server_ctx = server_ssl_context(stranger_ca.issue(SERVER_ID), ca.trust_bundle, ALPN)
    client_ctx = client_ssl_context(ca.issue(CLIENT_ID), ca.trust_bundle, ALPN)
    server_view, client_view = asyncio.run(_serve_once(server_ctx, client_ctx))
    assert isinstance(client_view, ssl.SSLError)
    assert "certificate verify failed" in str(client_view)
    assert isinstance(server_view, BaseException)


def test_contexts_are_tls13_only_and_require_certificates() -> None:
    ca = DevCA()
    identity = ca.issue(SERVER_ID)
    for context in (
        server_ssl_context(identity, ca.trust_bundle, ALPN),
        client_ssl_context(identity, ca.trust_bundle, []),
    ):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_3
        assert context.maximum_version == ssl.TLSVersion.TLSv1_3
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert not context.check_hostname


def test_bad_alpn_is_a_config_error() -> None:
    ca = DevCA()
    identity: Identity = ca.issue(SERVER_ID)
    with pytest.raises(ConfigError, match="cannot build TLS context"):
        server_ssl_context(identity, ca.trust_bundle, ["x" * 300])
