"""The socket interface a proxy plugs in: Transport, Listener, PeerConnection.

These abstract classes are defined once; :class:`~quicmesh.QuicTransport`,
:class:`~quicmesh.H2Transport` and :class:`~quicmesh.TcpTransport` implement them,
and a proxy picks one by configuration without changing its own code. A flow is
a :class:`~quicmesh.transport.stream.MeshStream` whichever transport carries it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..tls import Identity, TrustBundle
from .stream import MeshStream

Address = tuple[str, int]
StreamHandler = Callable[[MeshStream], Awaitable[None]]
"""Called once per accepted stream, in its own task."""

Authorizer = Callable[[str, str], bool]
"""``authorize(peer_spiffe_id, target) -> bool``: may this peer reach this target?"""


def host_port(address: Any) -> str:
    """A socket address (``(host, port, ...)``) as ``host:port`` or ``[v6]:port``; ``""``
    for anything else."""
    if not isinstance(address, tuple) or len(address) < 2:
        return ""
    host, port = str(address[0]), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class PeerConnection(ABC):
    """A connection to one peer sidecar that carries many streams."""

    transport_name: str
    peer_identity: str
    """The peer sidecar's SPIFFE ID, verified during the handshake."""

    @abstractmethod
    async def open_stream(self, target: str, headers: dict[str, str] | None = None) -> MeshStream:
        """Open a flow to ``target`` (``host:port``) through the peer sidecar.

        Waits while the peer's stream limit is reached. Raises
        :class:`~quicmesh.errors.InvalidTarget` for a malformed target or header,
        :class:`~quicmesh.errors.StreamRefused` when the peer answers with an error
        status, :class:`~quicmesh.errors.ConnectionLost` when the connection fails.
        """

    @property
    @abstractmethod
    def is_closed(self) -> bool:
        """True once the connection is closed or lost."""

    @property
    def early_data(self) -> str:
        """0-RTT outcome: ``"none"``, ``"attempted"``, ``"accepted"`` or ``"rejected"``."""
        return "none"

    @property
    def peer_address(self) -> str:
        """The peer sidecar's address now, ``host:port`` (``[v6]:port``); ``""`` if unknown."""
        return ""

    @property
    @abstractmethod
    def active_streams(self) -> int:
        """Streams currently open on this connection."""

    @property
    @abstractmethod
    def can_open_stream(self) -> bool:
        """Whether a stream can be opened now without waiting for the peer's credit."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters: ``rtt`` (s), ``bytes_sent``, ``bytes_received``, ``streams_opened``,
        ``streams_active``, ``packets_sent``, ``packets_lost``, ``cwnd`` (where known)."""

    @abstractmethod
    def close(self) -> None:
        """Close gracefully (GOAWAY / CONNECTION_CLOSE); open streams are reset."""

    @abstractmethod
    async def wait_closed(self) -> None:
        """Wait until the connection is fully closed."""

    async def aclose(self, timeout: float = 10.0) -> None:
        """Close gracefully: open no new stream, let open ones finish, then close.

        Streams still open after ``timeout`` seconds are reset by the close. Unlike
        :meth:`close`, no byte a stream has written is lost if it finishes in time.
        """
        self.close()
        await self.wait_closed()

    async def migrate(self, local_address: Address | None = None) -> None:
        """Move the connection to a new local address (QUIC only)."""
        raise NotImplementedError(f"{self.transport_name} connections cannot migrate")


class Listener(ABC):
    """Accepts peer connections and hands each stream to the handler."""

    address: Address
    """The (host, port) actually bound."""

    @property
    @abstractmethod
    def connections(self) -> Sequence[PeerConnection]:
        """The accepted peer connections still open (a snapshot)."""

    @abstractmethod
    def close(self) -> None:
        """Stop accepting; established connections are closed."""

    @abstractmethod
    async def wait_closed(self) -> None:
        """Wait until the listener and its connections are closed."""


class Transport(ABC):
    """A way of carrying flows between sidecars, with mutual TLS on every hop."""

    name: str

    def __init__(self, *, identity: Identity, trust: TrustBundle) -> None:
        self.identity = identity
        self.trust = trust
        self.handshake_failures: Counter[str] = Counter()
        """(server side) Handshakes refused, by reason (see
        :func:`quicmesh.tls.check.handshake_failure_reason`)."""

    def set_identity(self, identity: Identity, trust: TrustBundle) -> None:
        """Present ``identity`` and verify with ``trust`` in every handshake from now on.

        Connections already established keep the certificates they were made with.
        """
        self.identity = identity
        self.trust = trust

    @abstractmethod
    async def listen(
        self,
        address: Address,
        handler: StreamHandler,
        authorize: Authorizer | None = None,
    ) -> Listener:
        """Accept peer connections on ``address``.

        Each stream whose CONNECT is well formed and allowed by ``authorize`` is
        passed to ``handler``; others are answered 400 or 403 and logged.
        """

    @abstractmethod
    async def connect(self, address: Address, *, timeout: float = 10.0) -> PeerConnection:
        """Connect to the peer sidecar at ``address``, verifying its identity."""

    def stats(self) -> dict[str, Any]:
        """Transport-wide counters for the admin's ``/stats`` (an
        :class:`~quicmesh.AutoTransport`'s fallbacks); none by default."""
        return {}

    async def aclose(self) -> None:
        """Stop the transport's own background work, if any (listeners and
        connections are closed through their own objects)."""
        return None
