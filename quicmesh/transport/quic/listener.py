"""QUIC listeners: a UDP socket accepting connections from peer sidecars.

:class:`BatchingQuicServer` is :class:`~quicmesh.transport.quic.server.MeshQuicServer`
fed in batches (:mod:`quicmesh.transport._udp`), with admission control
(:mod:`quicmesh.transport._admission`) and stateless resets for unknown
connection IDs; :class:`QuicListener` is the :class:`~quicmesh.transport.base.Listener`
handed to the caller.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import Counter
from typing import Any, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol

from ... import _aioquic
from ...logs import RateLimitedLog
from .. import _udp
from .._admission import Admission, AdmissionConfig, Decision
from ..base import InboundDecider, Listener
from .connection import QuicPeerConnection
from .engine import EngineListener
from .server import MeshQuicServer

logger = logging.getLogger("quicmesh.transport.quic")

STATELESS_RESETS_PER_SECOND = 100
"""Stateless resets a listener sends per second at most (each answers a 1-RTT
packet for an unknown connection, which anyone can send)."""


class BatchingQuicServer(MeshQuicServer):
    """aioquic's server (connection-ID routing, version negotiation, new
    connections, Retry), fed in batches: each connection transmits once per batch.

    New connections pass :class:`~quicmesh.transport._admission.Admission` first
    (half-open caps, Retry when configured or under load, handshake timeout); a
    connection whose first datagram does not decrypt is dropped at once.
    """

    def __init__(
        self,
        *,
        max_datagrams: int,
        admission: AdmissionConfig,
        counters: Counter[str],
        reset_key: bytes,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._reset_key = reset_key
        self._resets_window = (0.0, 0)
        self._max_datagrams = max_datagrams
        self.admission = Admission(admission)
        self._counters = counters
        self._refusals = RateLimitedLog(logger)
        self.reader: _udp.BatchReader | None = None
        self.socket_closed = asyncio.Event()
        """Set once the UDP socket is closed (its port free again)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self._transport is not None
        self.reader = _udp.BatchReader(
            self._transport, self._admit_datagram, max_datagrams=self._max_datagrams
        )

    def _admit_datagram(self, data: bytes, addr: Any) -> None:
        header = _aioquic.new_connection_initial(
            data, self._configuration, known=self._protocols.__contains__
        )
        if header is None:
            cid = _aioquic.unknown_short_header_cid(data, self._configuration.connection_id_length)
            if cid is not None and cid not in self._protocols:
                self._send_stateless_reset(cid, len(data), addr)
                return
            super().datagram_received(data, addr)
            return
        source = str(addr[0])
        if not _aioquic.initial_decrypts(data, self._configuration.connection_id_length):
            # Forged (or corrupted): no connection is created, nothing is kept.
            self._counters["initials_undecryptable"] += 1
            return
        decision = self.admission.decide(source, bool(header.token))
        if decision is Decision.REFUSE:
            self._counters["initials_refused_half_open"] += 1
            self._refusals.log(
                logging.WARNING,
                "half-open",
                "dropped an Initial from %s: %d connections half-open (%d from that address)",
                source,
                self.admission.half_open,
                self.admission.config.max_half_open_per_source,
            )
            return
        self._new_connection(data, addr, header, retry=decision is Decision.RETRY)
        protocol = self._protocols.get(header.destination_cid)
        if protocol is None:
            if decision is Decision.RETRY and not header.token:
                self._counters["retries_sent"] += 1
            elif header.token:
                self._counters["retry_tokens_invalid"] += 1
                self._refusals.log(
                    logging.INFO, "token", "refused an invalid Retry token from %s", source
                )
            return
        if not cast(QuicPeerConnection, protocol).quic.received_valid_packet():
            # Nothing decrypted: keep no state for it (a forged Initial costs us nothing).
            self._counters["initials_undecryptable"] += 1
            self._drop(protocol)
            return
        self.admission.opened(protocol, source)
        cast(QuicPeerConnection, protocol).on_handshake_done = self._handshake_done
        self._loop.call_later(
            self.admission.config.handshake_timeout, self._handshake_deadline, protocol
        )

    def _send_stateless_reset(self, cid: bytes, received: int, addr: Any) -> None:
        """A 1-RTT packet for a connection we do not know (we restarted, or dropped
        it): tell the peer at once (RFC 9000 10.3), at most
        :data:`STATELESS_RESETS_PER_SECOND` a second."""
        now = self._loop.time()
        start, sent = self._resets_window
        if now - start >= 1.0:
            start, sent = now, 0
        if sent >= STATELESS_RESETS_PER_SECOND:
            return
        self._resets_window = (start, sent + 1)
        assert self._transport is not None
        self._transport.sendto(_aioquic.stateless_reset(self._reset_key, cid, received), addr)
        self._counters["stateless_resets_sent"] += 1

    def _handshake_done(self, protocol: QuicPeerConnection) -> None:
        self.admission.closed(protocol)

    def _handshake_deadline(self, protocol: QuicConnectionProtocol) -> None:
        if not self.admission.is_half_open(protocol):
            return
        self._counters["handshakes_timed_out"] += 1
        self._refusals.log(
            logging.INFO,
            "handshake-timeout",
            "dropped a connection whose handshake took more than %gs",
            self.admission.config.handshake_timeout,
        )
        self._drop(protocol, close=True)

    def _drop(self, protocol: QuicConnectionProtocol, close: bool = False) -> None:
        self._connection_terminated(protocol)
        cast(QuicPeerConnection, protocol).discard(close=close)

    def _connection_terminated(self, protocol: QuicConnectionProtocol) -> None:
        self.admission.closed(protocol)
        super()._connection_terminated(protocol)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        assert self.reader is not None
        self.reader.datagram_received(cast(bytes, data), addr)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reader is not None:
            self.reader.close()
        self.socket_closed.set()

    def close(self) -> None:
        """Close every connection at once (CONNECTION_CLOSE with NO_ERROR, as aioquic's
        server does) and the socket."""
        for protocol in set(self._protocols.values()):
            cast(QuicPeerConnection, protocol).abandon()
        self._protocols.clear()
        assert self._transport is not None
        self._transport.close()


class SocketEngineListener(Listener):
    """A socket engine's listening UDP socket (:class:`~.engine.EngineListener`),
    as the :class:`~quicmesh.transport.base.Listener` handed to the caller.

    :param listener: the engine's listener.
    :param drivers: the drivers of the connections it accepted (the transport adds them).
    """

    def __init__(
        self,
        listener: EngineListener,
        drivers: weakref.WeakSet[QuicPeerConnection],
        engine_flows: list[InboundDecider | None] | None = None,
    ) -> None:
        self._listener = listener
        self._drivers = drivers
        self._engine_flows = engine_flows
        """(shared with the transport, which gives it to each connection accepted)"""
        self.address = listener.address
        self._closed = asyncio.get_running_loop().create_future()
        self._released: asyncio.Future[None] | None = None

    def set_engine_flows(self, decide: InboundDecider | None) -> bool:
        """Offer new CONNECTs to ``decide`` first, on every connection (engines that can
        connect, answer and splice in one command: the native one)."""
        if self._engine_flows is None:
            return False
        self._engine_flows[0] = decide
        for driver in list(self._drivers):
            driver.inbound_decider = decide
        return True

    def close(self) -> None:
        """Close every connection at once (CONNECTION_CLOSE) and the socket."""
        if self._closed.done():
            return
        for driver in list(self._drivers):
            driver.abandon()
        self._listener.close()
        self._closed.set_result(None)

    async def wait_closed(self) -> None:
        """Once closed: return when the port is free again (the engine may keep the
        socket while the closed connections drain), as a TCP listener's."""
        await asyncio.shield(self._closed)
        if self._released is None:
            self._released = asyncio.ensure_future(self._listener.wait_released())
        await asyncio.shield(self._released)

    @property
    def connections(self) -> list[QuicPeerConnection]:
        """The accepted peer connections still open (see :attr:`QuicListener.connections`)."""
        return [c for c in list(self._drivers) if c.established and not c.is_closed]


class QuicListener(Listener):
    """A UDP socket accepting QUIC connections from peer sidecars."""

    def __init__(
        self,
        server: BatchingQuicServer,
        protocols: weakref.WeakSet[QuicPeerConnection] | None = None,
    ) -> None:
        self._server = server
        self._protocols: weakref.WeakSet[QuicPeerConnection] = (
            protocols if protocols is not None else weakref.WeakSet()
        )
        assert server._transport is not None
        sockname = server._transport.get_extra_info("sockname")
        self.address = (sockname[0], sockname[1])
        self._closed = asyncio.get_running_loop().create_future()

    def close(self) -> None:
        if not self._closed.done():
            self._server.close()
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        """Once closed: return when the socket is closed, its port free again, as a TCP
        listener's (asyncio closes a datagram socket on its next turn)."""
        await asyncio.shield(self._closed)
        await self._server.socket_closed.wait()

    @property
    def connections(self) -> list[QuicPeerConnection]:
        """The accepted peer connections still open (a read-only snapshot).

        For a graceful shutdown: :meth:`~QuicPeerConnection.aclose` each of them,
        so the bytes of streams that just finished are acknowledged, before
        :meth:`close` (which closes whatever is left at once).
        """
        return [c for c in list(self._protocols) if c.established and not c.is_closed]
