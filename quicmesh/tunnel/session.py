"""The interface every sans-IO tunnel session implements.

A tunnel session maps flows onto CONNECT streams of one connection to a peer
sidecar: :class:`~quicmesh.tunnel.h3.H3TunnelSession` over HTTP/3,
:class:`~quicmesh.tunnel.h2.H2TunnelSession` over HTTP/2 and
:class:`~quicmesh.tunnel.http1.Http1TunnelSession` (one flow) over HTTP/1.1. The
asyncio layer (:mod:`quicmesh.transport._session`) drives any of them the same way:
it calls the methods below, feeds the protocol's input to the session's own
``receive`` method, and acts on the :mod:`~quicmesh.tunnel.events` returned.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod

from .connect import Target


class ResetReason(enum.Enum):
    """Why a stream is aborted; each protocol maps it to its own error code."""

    CANCELLED = "cancelled"
    """The application gave up on the flow (H3_REQUEST_CANCELLED, h2 CANCEL)."""

    CONNECT_ERROR = "connect_error"
    """The flow's TCP connection to its destination failed (H3_CONNECT_ERROR, h2 CONNECT_ERROR)."""


class TunnelSession(ABC):
    """Sans-IO CONNECT tunnel over one connection to a peer sidecar."""

    is_client: bool

    @abstractmethod
    def can_open_stream(self) -> bool:
        """Whether the peer's stream limit allows :meth:`open_stream` now."""

    @abstractmethod
    def open_stream(self, target: Target, headers: dict[str, str]) -> int:
        """(client) Send a CONNECT request for ``target`` and return its stream ID."""

    @abstractmethod
    def respond(self, stream_id: int, status: int, reason: str = "") -> None:
        """(server) Answer a CONNECT: 200 opens the tunnel, any other status refuses it."""

    @abstractmethod
    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Queue tunnelled bytes (and the half-close when ``end_stream``)."""

    @abstractmethod
    def reset_stream(self, stream_id: int, reason: ResetReason) -> None:
        """Abort the stream in both directions."""

    @abstractmethod
    def stop_reading(self, stream_id: int) -> None:
        """Discard what the peer still sends on the stream and ask it to stop."""

    @abstractmethod
    def data_consumed(self, stream_id: int, amount: int) -> bool:
        """The application read ``amount`` tunnelled bytes: credit them to the peer.

        Returns True when that made something (a window update) worth sending now.
        """

    @abstractmethod
    def unsent_bytes(self, stream_id: int) -> int:
        """Bytes queued on the stream that have not yet been handed to the network."""

    @abstractmethod
    def close(self, reason: str = "") -> None:
        """Close the whole connection gracefully."""

    def is_idle(self) -> bool:
        """True when no stream holds state: every byte written was delivered (acked)."""
        return True
