"""Types of ``quicmesh._native``, the native QUIC engine (native/src/lib.rs).

Events from :meth:`Endpoint.drain` are tuples whose first item names them:

* ``("connected", token, conn, early)`` / ``("connect_failed", token, kind, message)``
* ``("accepted", conn, early)`` / ``("accept_failed", kind, message)``
* ``("early_data", conn, accepted)``: the server's answer to a 0-RTT flight
* ``("early_data_rejected", conn, stream)``: a stream sent as 0-RTT was rejected
* ``("stream_opened", token, conn, stream)`` / ``("open_failed", token, conn, message)``
* ``("stream_accepted", conn, stream, bidirectional)``
* ``("data", conn, stream, data, fin)``: the answer to one :meth:`Endpoint.read`
* ``("written", conn, stream, count)``: quinn took ``count`` more bytes
* ``("send_acked", conn, stream)``: a finished stream's data and FIN were all
  acknowledged (where ``SEND_ACKED_EVENTS``)
* ``("reset_received", conn, stream, code)`` / ``("stop_sending_received", conn, stream, code)``
* ``("read_paused", conn, stream)``: after :meth:`Endpoint.pause_read`, behind every
  ``data`` event of the stream
* ``("spliced", conn, splice_id, stream, sent, received, error, code, connected)``: a
  spliced flow ended (``error`` empty and ``code`` 0 when both directions ended cleanly;
  ``connected`` False for a ``connect_splice`` aborted before its destination connected)
* ``("splice_unconnected", conn, splice_id, stream, errno, message)``: a
  ``connect_splice`` could not connect its destination (nothing was sent on the stream)
* ``("peer_address_changed", conn, host, port)`` / ``("path_validated", conn, host, port)``
  / ``("path_abandoned", conn, host, port)``: (server) the client's path moved, or its
  validation ended (sampled every 50 ms)
* ``("closed", conn, kind, message)``

Events from :meth:`FlowAcceptor.drain` (engine flows, ``Endpoint.start_flow``):

* ``("flow_accepted", flow, host, port)``: a connection accepted and parked
* ``("flow_unanswered", flow, stream, kind, reason, answer)``: an engine flow got no plain
  200 (``kind``: ``answered``, ``reset``, ``timeout``, ``lost``); its connection is parked;
  ``answer``: another answer's first frame, whole (else ``b""``)
* ``("spliced", conn, flow, stream, sent, received, error, code, connected)``: an engine
  flow ended, as a splice

``kind`` is one of ``verification`` (this side refused the peer's certificate),
``peer_refused`` (the peer's TLS alert refused ours), ``peer_closed``,
``locally_closed``, ``timed_out``, ``failed``.
"""

from typing import Any

QUINN_VERSION: str
SEND_ACKED_EVENTS: bool
OPEN_WITH_FIRST_READ: bool

def spiffe_id_problem(value: str) -> str | None: ...
def fd_carrier() -> int: ...
def h3_deframe(
    chunks: list[bytes], *, frame_type: int | None = None, remaining: int = 0
) -> tuple[bytes, int | None, str]: ...

class Endpoint:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        cert_chain_pem: bytes,
        key_pem: bytes,
        trust_pem: bytes,
        alpn: list[bytes],
        server: bool = False,
        allowed_clients: list[str] | None = None,
        stream_receive_window: int | None = None,
        receive_window: int | None = None,
        send_window: int | None = None,
        idle_timeout: float | None = None,
        keep_alive: float | None = None,
        max_bidi_streams: int | None = None,
        max_uni_streams: int | None = None,
        congestion: str | None = None,
        early_data: bool = False,
        reset_key: bytes | None = None,
    ) -> None: ...
    def fileno(self) -> int: ...
    def drain(self) -> list[tuple[Any, ...]]: ...
    def local_address(self) -> tuple[str, int]: ...
    def connect(
        self,
        host: str,
        port: int,
        *,
        server_name: str | None = None,
        allowed: list[str] | None = None,
        resume: bool = True,
    ) -> int: ...
    def open_stream(self, conn: int, *, bidirectional: bool = True) -> int: ...
    def try_open_stream(
        self, conn: int, *, bidirectional: bool = True, first_read: int | None = None
    ) -> int | None: ...
    def write(self, conn: int, stream: int, data: bytes) -> None: ...
    def finish(self, conn: int, stream: int) -> None: ...
    def reset(self, conn: int, stream: int, code: int) -> bool: ...
    def read(self, conn: int, stream: int, max_bytes: int) -> None: ...
    def grant_read_permits(self, conn: int, count: int) -> None: ...
    def revoke_read_permits(self, conn: int) -> int: ...
    def stop_sending(self, conn: int, stream: int, code: int) -> bool: ...
    def close_connection(self, conn: int, code: int = 0, reason: str = "") -> None: ...
    def peer_certificates(self, conn: int) -> list[bytes]: ...
    def remote_address(self, conn: int) -> tuple[str, int]: ...
    def stats(self, conn: int) -> dict[str, float | int]: ...
    def rebind(self, host: str, port: int) -> tuple[str, int]: ...
    def set_identity(self, cert_chain_pem: bytes, key_pem: bytes, trust_pem: bytes) -> None: ...
    def pause_read(self, conn: int, stream: int) -> None: ...
    def splice(
        self,
        conn: int,
        stream: int,
        token: int,
        *,
        to_tcp: bytes,
        to_quic: bytes,
        unparsed: bytes,
        frame_type: int | None = None,
        frame_remaining: int = 0,
        recv_fin: bool = False,
        engine_socket: bool = False,
        received: int | None = None,
        idle_timeout: float | None = None,
    ) -> int: ...
    def connect_splice(
        self,
        conn: int,
        stream: int,
        host: str,
        port: int,
        *,
        timeout: float,
        answer: bytes,
        to_tcp: bytes,
        unparsed: bytes,
        frame_type: int | None = None,
        frame_remaining: int = 0,
        recv_fin: bool = False,
        received: int | None = None,
        idle_timeout: float | None = None,
    ) -> int: ...
    def hand_over_read(self, conn: int, stream: int) -> bool: ...
    def tcp_connect(self, host: str, port: int, *, timeout: float) -> int: ...
    def tcp_abort(self, token: int) -> bool: ...
    def splice_abort(self, splice_id: int, code: int) -> bool: ...
    def splice_buffered(self, splice_id: int) -> int: ...
    def splice_moved(self, splice_id: int) -> tuple[int, int] | None: ...
    def start_flow(
        self,
        acceptor: FlowAcceptor,
        flow: int,
        conn: int,
        *,
        request: bytes,
        answer: bytes,
        timeout: float,
        idle_timeout: float | None = None,
    ) -> bool: ...
    def close(self, code: int = 0, reason: str = "") -> None: ...
    def wait_released(self, timeout: float) -> bool: ...

class FlowAcceptor:
    """The engine's accept loop on a listening TCP socket (native/src/outbound.rs)."""

    def __init__(self, token: int) -> None: ...
    def fileno(self) -> int: ...
    def drain(self) -> list[tuple[Any, ...]]: ...
    def local_address(self) -> tuple[str, int]: ...
    def release(self, flow: int) -> int | None: ...
    def abort(self, flow: int, code: int) -> bool: ...
    def moved(self, flow: int) -> tuple[int, int] | None: ...
    def stop(self) -> None: ...
