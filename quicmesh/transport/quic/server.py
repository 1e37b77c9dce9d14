"""A QUIC server socket whose connections are :class:`~quicmesh._aioquic.MeshQuicConnection`.

aioquic's :class:`~aioquic.asyncio.server.QuicServer` routes datagrams by
connection ID and answers version negotiation, but builds plain
``QuicConnection`` objects for new clients. :class:`MeshQuicServer` keeps its
routing and builds new connections itself, through an ``accept`` factory (the
engine's :meth:`~quicmesh.transport.quic.engine.QuicEngine.accept`), so every
quicmesh server connection (the transport's and the interop endpoint's) is the
same class.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, cast

from aioquic.asyncio.server import QuicServer
from aioquic.quic.packet import encode_quic_retry
from aioquic.quic.retry import QuicRetryTokenHandler

from ... import _aioquic
from ..._aioquic import MeshQuicConnection

Accept = Callable[[bytes | None, bytes | None], tuple[MeshQuicConnection, Any]]
"""``accept(original_destination_cid, retry_source_cid)``: a new server connection
and the protocol object (an asyncio datagram protocol) that drives it."""


class MeshQuicServer(QuicServer):
    """aioquic's server with quicmesh's connections (see the module docstring).

    :param accept: builds the connection and its driver for a new client Initial.
    :param retry: answer every token-less Initial with a Retry (address validation).
    Other keyword arguments go to :class:`~aioquic.asyncio.server.QuicServer`
    (``configuration``).
    """

    def __init__(self, *, accept: Accept, retry: bool = False, **kwargs: Any) -> None:
        super().__init__(retry=False, **kwargs)
        self._accept = accept
        self._retry_all = retry
        self._retry_tokens = QuicRetryTokenHandler()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        data = cast(bytes, data)
        header = _aioquic.new_connection_initial(
            data, self._configuration, known=self._protocols.__contains__
        )
        if header is None:
            super().datagram_received(data, addr)
        else:
            self._new_connection(data, addr, header, retry=self._retry_all)

    def _new_connection(self, data: bytes, addr: Any, header: Any, *, retry: bool) -> None:
        """What aioquic's ``QuicServer.datagram_received`` does for a new Initial
        (Retry, token check, connection), with our engine building the connection.
        A token is always checked; without one a Retry goes out when ``retry``."""
        assert self._transport is not None
        original_cid: bytes | None = header.destination_cid
        retry_source_cid: bytes | None = None
        if header.token:
            try:
                original_cid = self._retry_tokens.validate_token(
                    address=addr,
                    destination_cid=header.destination_cid,
                    token=header.token,
                    now=self._loop.time(),
                )
            except ValueError:
                # RFC 9000 section 8.1.3: close with INVALID_TOKEN.
                self._transport.sendto(
                    _aioquic.invalid_token_close(
                        header.version, header.destination_cid, header.source_cid
                    ),
                    addr,
                )
                return
            retry_source_cid = header.destination_cid
        elif retry:
            source_cid = os.urandom(8)
            self._transport.sendto(
                encode_quic_retry(
                    version=header.version,
                    source_cid=source_cid,
                    destination_cid=header.source_cid,
                    original_destination_cid=header.destination_cid,
                    retry_token=self._retry_tokens.create_token(
                        address=addr,
                        original_destination_connection_id=header.destination_cid,
                        retry_source_connection_id=source_cid,
                        now=self._loop.time(),
                    ),
                ),
                addr,
            )
            return
        connection, protocol = self._accept(original_cid, retry_source_cid)
        protocol.connection_made(self._transport)
        protocol._connection_id_issued_handler = functools.partial(
            self._connection_id_issued, protocol=protocol
        )
        protocol._connection_id_retired_handler = functools.partial(
            self._connection_id_retired, protocol=protocol
        )
        protocol._connection_terminated_handler = functools.partial(
            self._connection_terminated, protocol=protocol
        )
        self._protocols[header.destination_cid] = protocol
        self._protocols[connection.host_cid] = protocol
        protocol.datagram_received(data, addr)
