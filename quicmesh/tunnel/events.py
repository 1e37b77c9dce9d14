"""Events a tunnel session reports, whatever protocol carries it.

Like aioquic's and h2's events these are past-tense dataclasses: the session
returns them from its input methods and the asyncio layer acts on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .connect import Target


@dataclass
class TunnelEvent:
    """Base class of the events a :class:`~quicmesh.tunnel.session.TunnelSession` returns."""


@dataclass
class StreamRequested(TunnelEvent):
    """(server) The peer opened a stream with a valid CONNECT request."""

    stream_id: int
    target: Target
    """Parsed by the session; carried as is to :attr:`MeshStream.target
    <quicmesh.transport.stream.MeshStream.target>`."""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class RequestRejected(TunnelEvent):
    """(server) A malformed request was answered with an error status by the session itself."""

    stream_id: int
    status: int
    reason: str


@dataclass
class ResponseReceived(TunnelEvent):
    """(client) The peer answered our CONNECT; ``status`` 200 means the tunnel is open."""

    stream_id: int
    status: int
    reason: str = ""


@dataclass
class DataReceived(TunnelEvent):
    """Tunnelled bytes arrived; ``stream_ended`` is the peer's half-close (FIN)."""

    stream_id: int
    data: bytes
    stream_ended: bool = False


@dataclass
class StreamReset(TunnelEvent):
    """The peer aborted the stream (reset, or asked us to stop sending)."""

    stream_id: int
    error_code: int
    connect_error: bool = False
    """True when the peer reset because its destination connection failed."""
    reason: str = ""
    """Set when this side reset the stream for what the peer sent (its answer was
    malformed, too large, or never came): why, naming the peer's fault."""
    not_processed: bool = False
    """This side reset it because the peer's GOAWAY left it out: the peer did not
    process it (no fault, safe to open again elsewhere); ``reason`` says so."""


@dataclass
class PeerStoppedReading(TunnelEvent):
    """The peer needs no more of our bytes (STOP_SENDING with no error); its data still flows."""

    stream_id: int


@dataclass
class PeerGoingAway(TunnelEvent):
    """(client) The peer takes no new stream on this connection (an HTTP/3 GOAWAY, or
    an HTTP/2 one with NO_ERROR): new flows go on another one; streams below
    ``stream_id`` carry on. A ``notice`` names the largest stream ID there can be (a
    server's first GOAWAY of two, RFC 9113 6.8, RFC 9114 5.2): none of ours is refused
    by it."""

    stream_id: int
    notice: bool = False


@dataclass
class ConnectionTerminated(TunnelEvent):
    """The connection is closed; every stream on it is gone. ``by_peer`` False: this side
    closed it (a GOAWAY with ``error_code``) because the peer broke the protocol."""

    error_code: int
    reason: str = ""
    by_peer: bool = True
