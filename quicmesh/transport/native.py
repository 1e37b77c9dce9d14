"""The native QUIC engine (``quicmesh._native``: quinn + rustls in Rust) driven from asyncio.

The extension owns the UDP socket and runs QUIC (packet protection, ACKs, loss
recovery, congestion control, pacing) on its own thread without the GIL. This
module is the thin asyncio side of it: it watches the extension's wake-up file
descriptor with ``loop.add_reader``, drains the events in batches and routes
them to :class:`NativeConnection` and :class:`NativeStream` objects.

* **mTLS with SPIFFE identities** is checked in Rust during the handshake, both
  ways: the peer's chain must reach a root of the trust bundle (rustls-webpki),
  and its leaf must carry exactly one URI SAN, a valid SPIFFE ID in the trust
  domain that root serves (the rules of :func:`quicmesh.tls.verify_peer`).
  A refusal surfaces as :class:`~quicmesh.errors.PeerVerificationError`.
* **Read-driven credit**: the engine takes a stream's data out of quinn (which is
  what lets quinn raise the peer's window) only when :meth:`NativeStream.read`
  asks for it, so a reader that stops reading stops its peer.
* **Backpressure on writes**: :meth:`NativeStream.drain` waits until what quinn
  has not yet taken (within the peer's credit) is below a high-water mark.

This is the foundation of the ``engine="native"`` QUIC engine (issue 16); it
speaks raw QUIC streams with any ALPN. The extension is optional: without it
:func:`native_available` is False and quicmesh runs on aioquic.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Iterable
from types import ModuleType
from typing import Any

from cryptography import x509

from quicmesh._timeouts import wait_within
from quicmesh.errors import (
    ConfigError,
    ConnectError,
    ConnectionLost,
    PeerVerificationError,
    StreamReset,
)
from quicmesh.logs import RateLimitedLog
from quicmesh.tls.check import handshake_failure_reason, refused_by_peer
from quicmesh.tls.identity import Identity, TrustBundle
from quicmesh.tls.spiffe import spiffe_id_of

logger = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
"""The most one read request takes out of the engine (and so re-opens of the peer's credit)."""

WRITE_HIGH_WATER = 256 * 1024
""":meth:`NativeStream.drain` returns once fewer bytes than this wait for the engine."""


def _load() -> ModuleType | None:
    try:
        from quicmesh import _native
    except ImportError:
        return None
    return _native


_NATIVE = _load()


def native_module() -> ModuleType | None:
    """The extension ``quicmesh._native``, or None where it was not built (one import
    for this adaptor and the ``native`` QUIC engine)."""
    return _NATIVE


def native_available() -> bool:
    """Whether the native extension was built and imports."""
    return _NATIVE is not None


def _extension() -> Any:
    if _NATIVE is None:
        raise ConfigError(
            "the native QUIC engine is not built (install quicmesh on a machine with Rust "
            "and cargo: pip install -e .); use engine 'aioquic'"
        )
    return _NATIVE


def _done(waiter: asyncio.Future[None] | None) -> None:
    """Wake whoever awaits ``waiter`` (results only: errors are stored, then raised by them)."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def accept_failure_line(kind: str, message: str, source: str = "") -> str:
    """The log line of a client's handshake that failed, naming which side refused:
    ``verification`` (we refused its certificate), ``peer_refused`` (it refused ours,
    with a TLS alert), or another ``kind`` (the handshake broke off); and the client's
    address, ``source``, when known."""
    client = f"a client at {source}" if source else "a client"
    if kind == "verification":
        return f"refused {client}: {message}"
    if kind == "peer_refused":
        return f"{client} refused our certificate: {message}"
    return f"handshake with {client} failed ({kind}): {message}"


HANDSHAKE_FAILURE_LOG = RateLimitedLog(logger)
"""Clients' failed handshakes, one line per reason at most every 10 s (with a count of the
others): anyone who can send a datagram can fail a handshake at will."""


def accept_failure_text(kind: str, message: str) -> str:
    """Why a client's handshake failed, as :func:`~quicmesh.tls.check.handshake_failure_reason`
    reads it: our refusal of its certificate as it is, its refusal of ours (its TLS
    alert) as "handshake refused: ...", another ``kind`` named first."""
    if kind == "verification":
        return message
    if kind == "peer_refused":
        return f"handshake refused: {message}"
    return f"{kind}: {message}"


def log_accept_failure(kind: str, message: str, source: str, *, prefix: str = "") -> None:
    """Log a client's failed handshake (:func:`accept_failure_line`), at most once every
    10 s per reason label (:func:`~quicmesh.tls.check.handshake_failure_reason`), as the
    aioquic engine keys it: a stranger's certificate refused every second does not hide
    the line of a workload whose own certificate just expired."""
    label = handshake_failure_reason(PeerVerificationError(accept_failure_text(kind, message)))
    HANDSHAKE_FAILURE_LOG.log(
        logging.WARNING,
        f"accept: {label[0]}",
        "%s%s",
        prefix,
        accept_failure_line(kind, message, source),
    )


class NativeEndpoint:
    """One UDP socket run by the native engine: connects out and, as a server, accepts.

    Create with :meth:`bind`. Close with :meth:`close` (or ``async with``).

    :ivar handshake_failures: incoming handshakes that failed, by reason
        (``verification``: the client's certificate was refused; ``peer_refused``:
        the client refused ours).
    """

    def __init__(self, endpoint: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._endpoint = endpoint
        self._loop = loop
        self._connections: dict[int, NativeConnection] = {}
        self._connecting: dict[int, asyncio.Future[NativeConnection]] = {}
        self._accepted: collections.deque[NativeConnection] = collections.deque()
        self._accept_waiter: asyncio.Future[None] | None = None
        self._closed = False
        self.handshake_failures: collections.Counter[str] = collections.Counter()
        self._fd = endpoint.fileno()
        loop.add_reader(self._fd, self._on_events)

    @classmethod
    async def bind(
        cls,
        host: str,
        port: int,
        identity: Identity,
        trust: TrustBundle,
        *,
        server: bool = False,
        alpn: Iterable[str] = ("quicmesh",),
        allowed_clients: Iterable[str] | None = None,
        early_data: bool = False,
        **options: Any,
    ) -> NativeEndpoint:
        """Bind ``host:port`` (port 0: any) with our ``identity`` and the peers' ``trust``.

        :param server: accept connections (each must present a client certificate).
        :param alpn: the ALPN protocols offered (client) or accepted (server).
        :param allowed_clients: (server) accept only these client SPIFFE IDs.
        :param early_data: resumption with 0-RTT. A server issues single-use session
            tickets (each one resumes one connection; a replayed first flight finds
            its ticket gone and its 0-RTT data is dropped) and serves a resumed
            client at once under the identity its ticket recorded; a client keeps the
            tickets (bound to this endpoint's identity and the server's address) and
            sends its first streams as 0-RTT when it has one.
        :param options: transport settings: ``stream_receive_window``,
            ``receive_window``, ``send_window`` (bytes), ``idle_timeout``,
            ``keep_alive`` (seconds), ``max_bidi_streams``, ``max_uni_streams``,
            ``congestion`` (``cubic``, ``newreno`` or ``bbr``).
        :raises ConfigError: bad identity, trust bundle or option, or the port is taken.
        """
        native = _extension()
        endpoint = native.Endpoint(
            host,
            port,
            cert_chain_pem=identity.cert_chain_pem(),
            key_pem=identity.private_key_pem(),
            trust_pem=trust.pem,
            alpn=[protocol.encode() for protocol in alpn],
            server=server,
            allowed_clients=list(allowed_clients) if allowed_clients is not None else None,
            early_data=early_data,
            **options,
        )
        return cls(endpoint, asyncio.get_running_loop())

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``."""
        host, port = self._endpoint.local_address()
        return str(host), int(port)

    async def connect(
        self,
        host: str,
        port: int,
        *,
        allowed: Iterable[str] | None = None,
        timeout: float = 10.0,
    ) -> NativeConnection:
        """Connect to a server at ``host:port`` (an IP address) and verify it.

        :param allowed: accept only servers with one of these SPIFFE IDs.
        :raises PeerVerificationError: a certificate was refused (by either side).
        :raises ConnectError: the handshake failed or timed out.
        """
        token = self._endpoint.connect(
            host, port, allowed=list(allowed) if allowed is not None else None
        )
        # The engine holds a 0-RTT first flight for requests written in this turn (the
        # QUIC transport's engine writes them so); here they come after this call returns.
        release_held = getattr(self._endpoint, "release_held", None)  # None: an older build
        if release_held is not None:
            release_held()
        future: asyncio.Future[NativeConnection] = self._loop.create_future()
        self._connecting[token] = future
        try:
            return await wait_within(future, timeout)
        except BaseException as exc:
            # A connection the engine made as the time ran out or the caller was
            # cancelled (in the same loop iteration) is nobody's: close it.
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().close()
            if isinstance(exc, TimeoutError):
                raise ConnectError(
                    f"QUIC handshake with {host}:{port} timed out after {timeout:g}s"
                ) from None
            raise
        finally:
            self._connecting.pop(token, None)

    async def accept(self) -> NativeConnection:
        """The next connection a client completed (its certificate verified)."""
        while not self._accepted:
            if self._closed:
                raise ConnectionLost("the endpoint is closed")
            self._accept_waiter = self._loop.create_future()
            await self._accept_waiter
        return self._accepted.popleft()

    def rebind(self, host: str | None = None, port: int = 0) -> tuple[str, int]:
        """Move every connection of this endpoint to a new UDP socket (connection migration).

        The peer sees packets from the new address and validates the path
        (PATH_CHALLENGE / PATH_RESPONSE, RFC 9000 section 9) before sending there
        at full rate; streams carry on.

        :param host: the new local address (default: the current one).
        :param port: the new local port (0: any free port).
        :returns: the new local ``(host, port)``.
        :raises ConfigError: the socket cannot be bound.
        """
        host = host if host is not None else self.address[0]
        new_host, new_port = self._endpoint.rebind(host, port)
        return str(new_host), int(new_port)

    def close(self) -> None:
        """Close every connection and the socket."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)  # before the endpoint closes the descriptor
        self._endpoint.close()
        self._on_events()  # what is already queued (closes) still reaches its owners
        for connection in list(self._connections.values()):
            connection._lost(ConnectionLost("the endpoint was closed"))
        _done(self._accept_waiter)

    async def __aenter__(self) -> NativeEndpoint:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # -- events --------------------------------------------------------------------------

    def _on_events(self) -> None:
        for event in self._endpoint.drain():
            kind = event[0]
            try:
                handler = getattr(self, f"_on_{kind}")
            except AttributeError:  # pragma: no cover - the extension and this module agree
                logger.warning("native engine: unknown event %r", kind)
                continue
            handler(*event[1:])

    def _on_connected(self, token: int, conn: int, early: bool) -> None:
        connection = NativeConnection(self, conn, is_client=True)
        connection.early_data = "attempted" if early else None
        self._connections[conn] = connection
        future = self._connecting.get(token)
        if future is None or future.done():  # the caller gave up (timeout, cancel)
            connection.close()
            return
        future.set_result(connection)

    def _on_connect_failed(self, token: int, kind: str, message: str) -> None:
        future = self._connecting.get(token)
        if future is None or future.done():
            return
        if kind == "verification":  # we refused the server's certificate
            future.set_exception(PeerVerificationError(message))
        elif kind == "peer_refused":  # the server refused ours
            future.set_exception(PeerVerificationError(refused_by_peer("server", message)))
        else:
            future.set_exception(ConnectError(f"QUIC handshake failed: {message}"))

    def _on_accepted(self, conn: int, early: bool) -> None:
        connection = NativeConnection(self, conn, is_client=False)
        connection.resumed = early
        self._connections[conn] = connection
        self._accepted.append(connection)
        _done(self._accept_waiter)

    def _on_early_data(self, conn: int, accepted: bool) -> None:
        connection = self._connection(conn)
        if connection is not None:
            connection.early_data = "accepted" if accepted else "rejected"

    def _on_early_data_rejected(self, conn: int, stream: int) -> None:
        target = self._stream(conn, stream)
        if target is not None:
            target._fail(
                StreamReset(f"stream {stream} was sent as 0-RTT and the server rejected it")
            )

    def _on_accept_failed(self, kind: str, message: str, source: str = "") -> None:
        self.handshake_failures[kind] += 1
        log_accept_failure(kind, message, source, prefix="native engine: ")

    def _connection(self, conn: int) -> NativeConnection | None:
        return self._connections.get(conn)

    def _on_stream_opened(self, token: int, conn: int, stream: int) -> None:
        connection = self._connection(conn)
        if connection is not None:
            connection._stream_opened(token, stream)

    def _on_open_failed(self, token: int, conn: int, message: str) -> None:
        connection = self._connection(conn)
        if connection is not None:
            connection._open_failed(token, message)

    def _on_stream_accepted(
        self,
        conn: int,
        stream: int,
        bidirectional: bool,
        read_started: bool = False,
        permit_used: bool = False,
    ) -> None:
        connection = self._connection(conn)
        if connection is not None:
            connection._stream_accepted(stream, bidirectional)

    def _stream(self, conn: int, stream: int) -> NativeStream | None:
        connection = self._connections.get(conn)
        return connection._streams.get(stream) if connection is not None else None

    def _on_data(self, conn: int, stream: int, data: bytes, fin: bool) -> None:
        target = self._stream(conn, stream)
        if target is not None:
            target._data(data, fin)

    def _on_written(self, conn: int, stream: int, count: int) -> None:
        target = self._stream(conn, stream)
        if target is not None:
            target._written(count)

    def _on_reset_received(self, conn: int, stream: int, code: int) -> None:
        target = self._stream(conn, stream)
        if target is not None:
            target._reset_received(code)

    def _on_stop_sending_received(self, conn: int, stream: int, code: int) -> None:
        target = self._stream(conn, stream)
        if target is not None:
            target._stop_sending_received(code)

    def _on_closed(self, conn: int, kind: str, message: str, code: int = 0) -> None:
        connection = self._connections.pop(conn, None)
        if connection is not None:
            connection._lost(ConnectionLost(f"QUIC connection closed: {message}"))


class NativeConnection:
    """A verified QUIC connection of a :class:`NativeEndpoint`.

    :ivar early_data: (client) ``None`` (full handshake), ``"attempted"`` (resumed with
        0-RTT, the server has not answered yet), ``"accepted"`` or ``"rejected"``.
    :ivar resumed: (server) whether the client resumed with a ticket (0-RTT possible).
    """

    def __init__(self, endpoint: NativeEndpoint, conn: int, *, is_client: bool) -> None:
        self._endpoint = endpoint
        self._native = endpoint._endpoint
        self._conn = conn
        self.is_client = is_client
        self._streams: dict[int, NativeStream] = {}
        self._opening: dict[int, asyncio.Future[NativeStream]] = {}
        self._incoming: collections.deque[NativeStream] = collections.deque()
        self._incoming_waiter: asyncio.Future[None] | None = None
        self.error: ConnectionLost | None = None
        self.early_data: str | None = None
        self.resumed = False
        self.closed: asyncio.Future[None] = endpoint._loop.create_future()
        self._peer_identity = ""

    @property
    def peer_identity(self) -> str:
        """The peer's SPIFFE ID (``""`` while a 0-RTT client waits for the server's answer)."""
        if not self._peer_identity and self.error is None:
            chain = self.peer_certificates()
            self._peer_identity = (spiffe_id_of(chain[0]) if chain else None) or ""
        return self._peer_identity

    def peer_certificates(self) -> list[x509.Certificate]:
        """The certificate chain the peer presented, leaf first."""
        if self.error is not None:
            return []
        return [
            x509.load_der_x509_certificate(der)
            for der in self._native.peer_certificates(self._conn)
        ]

    def stats(self) -> dict[str, Any]:
        """RTT (``rtt``, ``min_rtt``, seconds), ``cwnd`` (bytes), ``lost_packets``, and
        UDP counters (``datagrams_sent``, ``bytes_sent``, ``send_calls``: fewer calls than
        datagrams means segmentation offload (GSO) batched them, ...)."""
        self._check()
        return dict(self._native.stats(self._conn))

    @property
    def remote_address(self) -> tuple[str, int]:
        """The peer's ``(host, port)``."""
        self._check()
        host, port = self._native.remote_address(self._conn)
        return str(host), int(port)

    async def open_stream(self, *, bidirectional: bool = True) -> NativeStream:
        """Open a stream, waiting for the peer's stream limit if it is reached."""
        self._check()
        stream_id = self._native.try_open_stream(self._conn, bidirectional=bidirectional)
        if stream_id is not None:
            return self._add_stream(stream_id, local=True, bidirectional=bidirectional)
        token = self._native.open_stream(self._conn, bidirectional=bidirectional)
        future: asyncio.Future[NativeStream] = self._endpoint._loop.create_future()
        self._opening[token] = future
        try:
            return await future
        finally:
            self._opening.pop(token, None)

    async def accept_stream(self) -> NativeStream:
        """The next stream the peer opened."""
        while not self._incoming:
            self._check()
            self._incoming_waiter = self._endpoint._loop.create_future()
            await self._incoming_waiter
        return self._incoming.popleft()

    def close(self, code: int = 0, reason: str = "") -> None:
        """Close the connection (CONNECTION_CLOSE with application error ``code``)."""
        if self.error is None:
            self._native.close_connection(self._conn, code, reason)

    async def wait_closed(self) -> None:
        """Wait until the connection has ended."""
        await asyncio.shield(self.closed)

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _add_stream(self, stream_id: int, *, local: bool, bidirectional: bool) -> NativeStream:
        stream = NativeStream(self, stream_id, readable=bidirectional or not local,
                              writable=bidirectional or local)  # fmt: skip
        self._streams[stream_id] = stream
        return stream

    def _stream_opened(self, token: int, stream_id: int) -> None:
        stream = self._add_stream(stream_id, local=True, bidirectional=stream_id & 2 == 0)
        future = self._opening.get(token)
        if future is None or future.done():
            stream.reset(0)
            return
        future.set_result(stream)

    def _open_failed(self, token: int, message: str) -> None:
        future = self._opening.get(token)
        if future is not None and not future.done():
            future.set_exception(ConnectionLost(f"cannot open a stream: {message}"))

    def _stream_accepted(self, stream_id: int, bidirectional: bool) -> None:
        stream = self._add_stream(stream_id, local=False, bidirectional=bidirectional)
        self._incoming.append(stream)
        _done(self._incoming_waiter)

    def _lost(self, error: ConnectionLost) -> None:
        if self.error is not None:
            return
        self.error = error
        for stream in self._streams.values():
            stream._fail(StreamReset(str(error)))
        for future in self._opening.values():
            if not future.done():
                future.set_exception(error)
        _done(self._incoming_waiter)
        _done(self.closed)


class NativeStream:
    """One QUIC stream of a :class:`NativeConnection`: read-driven, with write backpressure."""

    def __init__(
        self, connection: NativeConnection, stream_id: int, *, readable: bool, writable: bool
    ) -> None:
        self._connection = connection
        self._native = connection._native
        self._conn = connection._conn
        self.stream_id = stream_id
        self._buffer = bytearray()
        self._eof = not readable
        self._read_requested = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._read_error: StreamReset | None = None
        self._writable = writable
        self._unwritten = 0
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_error: StreamReset | None = None
        self.bytes_read = 0
        self.bytes_written = 0
        self.reset_code: int | None = None
        """The code of the RESET_STREAM the peer sent, if it did."""
        self.stop_sending_code: int | None = None
        """The code of the STOP_SENDING the peer sent, if it did."""

    # -- reading -------------------------------------------------------------------------

    async def read(self, max_bytes: int = -1) -> bytes:
        """Up to ``max_bytes`` (-1: what is buffered) of the stream; ``b""`` at its end.

        Only these reads take data out of the engine, so they alone re-open the
        peer's credit.

        :raises StreamReset: the peer reset the stream or the connection was lost.
        """
        while not self._buffer:
            if self._read_error is not None:
                raise self._read_error
            if self._eof:
                return b""
            self._request_read()
            self._read_waiter = self._connection._endpoint._loop.create_future()
            await self._read_waiter
        count = len(self._buffer) if max_bytes < 0 else min(max_bytes, len(self._buffer))
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        self.bytes_read += count
        if not self._buffer and not self._eof and self._read_error is None:
            # Ask for the next chunk while the caller works on this one: at most one
            # READ_CHUNK beyond what the application has read leaves quinn early.
            self._request_read()
        return data

    def _request_read(self) -> None:
        if self._read_requested:
            return
        try:
            self._native.read(self._conn, self.stream_id, READ_CHUNK)
        except StreamReset as exc:
            # The engine already ended the stream; its events say how (FIN, reset, loss).
            self._connection._endpoint._on_events()
            if not self._eof and self._read_error is None:
                self._read_error = exc
            return
        self._read_requested = True

    async def read_all(self) -> bytes:
        """Everything until the peer finishes the stream."""
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)

    def stop_sending(self, code: int) -> None:
        """Ask the peer to stop sending (STOP_SENDING ``code``); reads end with ``b""``."""
        if not self._eof and self._read_error is None:
            self._native.stop_sending(self._conn, self.stream_id, code)
        self._eof = True
        self._buffer.clear()
        _done(self._read_waiter)

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue ``data``; await :meth:`drain` to respect the peer's credit.

        :raises StreamReset: the stream can no longer send (reset, stopped, lost).
        """
        if self._write_error is not None:
            raise self._write_error
        if not self._writable:
            raise StreamReset(f"stream {self.stream_id} is not writable (finished or receive-only)")
        if data:
            try:
                self._native.write(self._conn, self.stream_id, bytes(data))
            except StreamReset:
                # The engine ended the stream; its event (with the peer's code) may still wait.
                self._connection._endpoint._on_events()
                if self._write_error is not None:
                    raise self._write_error from None
                raise
            self._unwritten += len(data)

    async def drain(self) -> None:
        """Wait until fewer than :data:`WRITE_HIGH_WATER` bytes wait for the engine."""
        while self._unwritten >= WRITE_HIGH_WATER:
            if self._write_error is not None:
                raise self._write_error
            self._drain_waiter = self._connection._endpoint._loop.create_future()
            await self._drain_waiter
        if self._write_error is not None:
            raise self._write_error

    @property
    def unwritten(self) -> int:
        """Bytes written that the engine has not yet taken (beyond the peer's credit)."""
        return self._unwritten

    def finish(self) -> None:
        """Send FIN after what is queued."""
        if self._writable and self._write_error is None:
            self._native.finish(self._conn, self.stream_id)
        self._writable = False

    def reset(self, code: int) -> None:
        """Abort sending (RESET_STREAM ``code``)."""
        if self._write_error is None:
            with contextlib.suppress(StreamReset):
                self._native.reset(self._conn, self.stream_id, code)
        self._writable = False
        self._write_error = StreamReset(f"stream {self.stream_id} was reset locally", code)
        _done(self._drain_waiter)

    # -- engine events -------------------------------------------------------------------

    def _data(self, data: bytes, fin: bool) -> None:
        self._read_requested = False
        if self._eof:  # after stop_sending
            return
        self._buffer += data
        self._eof = fin
        _done(self._read_waiter)

    def _written(self, count: int) -> None:
        self._unwritten -= count
        self.bytes_written += count
        if self._unwritten < WRITE_HIGH_WATER:
            _done(self._drain_waiter)

    def _reset_received(self, code: int) -> None:
        self.reset_code = code
        self._read_error = StreamReset(f"peer reset stream {self.stream_id} (code {code:#x})", code)
        _done(self._read_waiter)

    def _stop_sending_received(self, code: int) -> None:
        self.stop_sending_code = code
        self._writable = False
        self._write_error = StreamReset(
            f"peer sent STOP_SENDING on stream {self.stream_id} (code {code:#x})", code
        )
        _done(self._drain_waiter)

    def _fail(self, error: StreamReset) -> None:
        if self._read_error is None and not self._eof:
            self._read_error = error
        if self._write_error is None:
            self._write_error = error
        _done(self._read_waiter)
        _done(self._drain_waiter)
