"""The native QUIC engine (``engine="native"``): quinn + rustls in Rust, a socket engine.

The extension ``quicmesh._native`` (native/src) owns its UDP sockets and runs
QUIC (packet protection, ACKs, loss recovery, congestion control, pacing,
TLS 1.3) on its own thread without the GIL. This module puts it behind the
engine interface (:mod:`quicmesh.transport.quic.engine`, ``io="socket"``):

* :class:`NativeEngine` makes client connections on one client endpoint per
  transport and event loop (one UDP socket; the session tickets live there)
  and listeners (:class:`NativeListener`, one server endpoint each);
* :class:`NativeConnection` is the :class:`~.engine.SocketConnection`: aioquic's
  stream API (``get_next_available_stream_id``, ``send_stream_data``,
  ``reset_stream``, ``stop_stream``) over the extension's commands, and its
  events (:meth:`drain` batches, after its wake-up descriptor turned readable)
  turned into aioquic's event dataclasses, so aioquic's HTTP/3 layer, and with it
  quicmesh's H3 CONNECT tunnel session, runs on it unchanged.

Read-driven credit: quinn raises a peer's stream window only when data is taken
out of it, and this engine takes data out only with read requests. An untracked
stream (HTTP/3 control and QPACK streams) is read as fast as it arrives; a
tracked one (a tunnel's request stream) only while the payload delivered to the
application and not yet read (:meth:`NativeConnection.stream_delivered` /
:meth:`NativeConnection.stream_consumed`) is below :data:`READ_AHEAD` (or the
stream window, if smaller). A stalled reader therefore holds at most the stream
window in quinn and ``READ_AHEAD`` here, so its peer stops after about one stream
window, as with aioquic. (Until 2026-12-07 the engine read ahead up to a whole
stream window: a stalled stream took two windows, and its sender kept on twice as
long, taking the link from the connection's other streams meanwhile, docs/hol.md
"Stall isolation on the native engine".) The
first read of a stream the peer opens is the engine's own (``first_read``: what
Python's first request would ask for, :data:`READ_CHUNK`), so a new request's
bytes reach Python without a read request going to the engine and back.

Where the engine interface's aioquic-shaped hooks do not fit, this engine says so
rather than pretending:

* **Tickets and 0-RTT** are rustls's own: the server's tickets are stateful and
  single use (rustls takes a ticket out of its store when a client resumes with
  it, so a replayed first flight finds none), bound to the client identity they
  were issued to (a resumed connection keeps the client chain verified at issue);
  the client's tickets stay in its endpoint (memory only: rustls 0.23 has no
  encoding of a client session, docs/design.md "Native client tickets stay in
  memory"; a sidecar with ``tls.ticket_cache`` and native clusters warns at
  load, and a restarted client resumes nothing). So
  :attr:`~.engine.EngineTls.fetch_ticket`, :attr:`~.engine.EngineTls.ticket_issued`
  and :attr:`~.engine.EngineTls.ticket` are not used, no ``SessionTicketReceived``
  event is raised, and ``QuicTransport(ticket_cache=..., ticket_store=...)`` do
  not apply. The client's tickets are kept per server address and port (the
  server name it gives rustls is :func:`ticket_server_name`, never resolved).
  A 0-RTT connection's first flight waits in the engine until the commands of the
  turn that made it (the requests written in it) have run, at most 5 ms
  (native/src/hold.rs): quinn would send it as the connection is made, and on a
  path of a millisecond or less the server's answer then overtook the requests,
  which went in 1-RTT. When the server rejects a 0-RTT flight, quinn forgets the streams opened in
  it and hands out the same stream IDs again; the engine kept every byte written
  before the server answered and sends it again at once on the re-opened streams
  (:meth:`NativeConnection.resend_early_data`), so nothing is lost. The
  server's 0-RTT cap (``EARLY_RECEIVE_FACTOR`` times ``max_early_data``, plus
  ``EARLY_DATA_OVERHEAD``; QUIC requires ``max_early_data_size`` 0xffffffff in
  tickets, RFC 9001 4.6.1, so rustls cannot apply it) is checked when a 0-RTT
  connection's handshake completes, against the UDP bytes received from the client
  until then, resends and duplicates included (quinn does not count 0-RTT payload
  apart): over it, the connection is closed (H3_EXCESSIVE_LOAD). The ticket
  counters of :attr:`QuicTransport.counters` stay 0.
* **Listener admission** (issue 13) is the aioquic listener's
  (:mod:`quicmesh.transport._admission`, the same ``AdmissionConfig`` and
  counters), applied in Rust (native/src/admission.rs) to quinn's new
  connections before any handshake work: half-open caps per listener and per
  source IP (refused Initials are ignored), Retry always or while
  ``retry_threshold`` connections are half-open (quinn's tokens, bound to the
  address), the handshake timeout. Differences: quinn decrypts an Initial only
  when it is accepted, so one answered with a Retry is not checked first
  (the Retry is stateless and smaller than the Initial); quinn drops about 3/4
  of forged Initials (wrong reserved bits once unprotected) and Initials with
  invalid Retry tokens (INVALID_TOKEN) before the listener sees them, so those
  are not counted (``retry_tokens_invalid`` stays 0).
* **SPIFFE verification** happens inside the handshake, in Rust, with the rules
  of :func:`quicmesh.tls.verify_peer` (native/src/verify.rs); the driver checks
  the chain :meth:`NativeConnection.peer_certificate` gives again, as for any engine.
* **Certificate rotation**: :meth:`NativeListener.set_identity` gives the listener's
  endpoint a new server configuration (quinn's ``set_server_config``), so new
  handshakes get the new certificate and trust bundle and connections already made
  carry on; its single-use tickets stay valid under the same trust bundle. A client
  endpoint keeps its identity: a new identity gets a new client endpoint.
* **New-stream rate** (``max_stream_rate``, ``QuicTransport.set_stream_rate``,
  the sidecar's loop-lag governor): quinn grants MAX_STREAMS itself, so the
  identity's bucket is applied in this driver by holding streams beyond the rate
  in their slot (:meth:`NativeConnection.attach_stream_rate`): the peer then
  waits for credit, as with aioquic's withheld MAX_STREAMS. The engine reads a new
  stream at once only with a read permit (a token taken ahead, at most
  :data:`READ_PERMITS_AHEAD`): a held stream is never read before it is served, so
  its slot stays taken even when the peer reset it.
* **Liveness**: quinn sends the keepalive PINGs (``keep_alive``); the driver's
  liveness rules (``max_probe_timeouts``, ``dead_after``) run on quinn's
  counters, sampled (:meth:`NativeConnection.sample_liveness`,
  :class:`_LivenessSample`: probe timeouts are estimated from the RTT, quinn
  does not expose its count), so a hung peer fails the connection in seconds
  rather than at the idle timeout. ``rebind_after_ptos`` does not run on this
  engine.
* **ICMP unreachable**: the endpoint's socket is not connected, so the extension
  asks the kernel for ICMP errors (``IP_RECVERR``) and reads them off the
  socket's error queue (native/src/icmp.rs); each one reaches the connects and
  connections to the address it names as :class:`~.engine.PeerUnreachable`, and
  the driver applies the aioquic engine's rule: a connect in its handshake
  fails at once, an established connection is probed (:meth:`NativeConnection.send_ping`:
  quinn has no PING command, the extension makes it send MAX_DATA) and fails
  on the second error in a row. A server connection ignores them, as an aioquic
  listener does (:meth:`NativeConnection.unreachable`): a dead client is found by
  the liveness rules, in a few probe timeouts.
* **Paths**: migration is :meth:`NativeConnection.migrate` (``rebind``: the
  client endpoint's socket moves, with every connection on it; quinn sends a PING
  on the new path at once, and the old socket is read for ``OLD_SOCKET_GRACE``
  seconds, as on aioquic: native/src/rebind.rs, since quinn's own reading of it
  stalled mid-transfer and lost what the server had in flight). quinn validates
  a migrating client's new path itself and raises no event for it, so the
  extension samples each server connection every 50 ms (native/src/engine.rs
  ``PathWatch``: quinn's remote address and its count of PATH_RESPONSE frames
  received) and reports ``PeerAddressChanged``, then ``PathValidated`` when a
  PATH_RESPONSE arrived on the new path or ``PathAbandoned`` when quinn went
  back to the old one first: the listener's ``migrations_peer_address_change``
  and ``path_validations_*`` counters, as on aioquic. Sampled, so two changes
  within 50 ms count as one, and a response on the old path (quinn challenges
  it too) counts as the new path's validation.
* **Stateless resets**: quinn derives the tokens from
  :attr:`~.engine.EngineLimits.stateless_reset_key` (HMAC-SHA256 of the
  connection ID, as aioquic's engine here), so a restarted listener with the same
  key tells its old peers at once.
* **Splicing**: :meth:`NativeConnection.splice_stream` hands a request stream
  and a TCP socket to the engine (native/src/splice.rs), which copies both ways
  without Python (DATA framing in Rust); Python learns only the outcome. The
  stream's reader goes to the splice at once (:meth:`NativeConnection.
  hand_over_reading`: the engine adds what it gave that the session had not
  taken in), or stops first where it cannot (:meth:`NativeConnection.
  pause_reading`: the engine's ``read_paused`` event comes after every ``data``
  event it gave), so what Python already received goes to the socket first; the socket
  crosses to Rust over a Unix socket pair (SCM_RIGHTS, :func:`_hand_socket`).
  Not while a 0-RTT flight is unsettled (its bytes may have to be resent). The
  accepting side may instead have the engine connect the destination, answer the
  CONNECT and splice in one command (:meth:`NativeConnection.connect_splice`).
* **Packets**: ``max_datagram_size`` is quinn's initial datagram size, and
  path MTU discovery (``mtu_discovery``, DPLPMTUD) probes up to
  :data:`MTU_DISCOVERY_MAX`; ``ack_eliciting_threshold`` asks a native peer
  (ACK_FREQUENCY frames, draft-ietf-quic-ack-frequency) to acknowledge every
  N+1 ack-eliciting packets instead of every second one.
* **qlog**: with ``qlog_dir``, quinn-proto's own qlog (its ``qlog`` feature,
  JSON-SEQ) writes one file per connection there, named
  ``native-{client|server}-{pid}-{n}.sqlog``.
* **Closing**: quinn runs the closing and draining periods (RFC 9000 10.2)
  inside its endpoint and reports the end as they begin, so
  ``ConnectionTerminated`` comes at once (``is_draining`` is always False;
  aioquic raises it 3 PTO later). What the peer sent before its close and
  quinn still holds unread (read-driven credit leaves up to a stream window
  there) is delivered first: on the close the engine's receive tasks give it as
  ``data`` events before the ``closed`` one.
* **Buffered bytes** of a spliced stream (:meth:`NativeConnection.stream_unsent_bytes`,
  which ``max_buffered_per_connection`` adds up) are what its splice holds in
  Rust each way (``splice_buffered``), at most a chunk or two.
* **Connection window**: quinn's connection credit (``connection_window``) reopens
  as the engine reads, and the engine reads for Python; so the engine stops reading
  the streams Python has not drained once their unread payload adds up to
  ``connection_window`` (each within :data:`READ_AHEAD`), and reads on as Python
  reads. What quinn holds unread is bounded by the same window again, so a
  connection's stalled streams hold at most about twice ``connection_window`` here
  (plus a first read of 64 KiB a new stream; aioquic's and h2's credit: once); a
  review measured 1.5 to 3.3 times with 8 to 64 stalled streams. Spliced streams are
  bounded by their sockets instead. (Until 2026-12-07 only each stream was bounded:
  128 stalled streams could hold 128 stream windows.)
"""

from __future__ import annotations

import asyncio
import atexit
import bisect
import contextlib
import errno
import itertools
import logging
import math
import os
import re
import socket
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Any, Literal

from aioquic.quic import events as quic_events
from cryptography import x509

from ...errors import ConfigError, ConnectError, ConnectionLost, QuicmeshError
from ...logs import RateLimitedLog
from ...tls.spiffe import spiffe_id_of
from .._stream_rate import StreamRate
from .._udp import client_udp_socket
from ..native import accept_failure_text, log_accept_failure, native_module
from .engine import (
    Address,
    EngineError,
    EngineLimits,
    EngineTls,
    PathAbandoned,
    PathValidated,
    PeerAddressChanged,
    PeerCertificateRefused,
    PeerUnreachable,
    SocketConnection,
)
from .options import CRYPTO_ERROR_BAD_CERTIFICATE, EARLY_DATA_OVERHEAD, OLD_SOCKET_GRACE

EARLY_RECEIVE_FACTOR = 3
"""(server) The 0-RTT cap of a native listener is this many times ``max_early_data``,
plus ``EARLY_DATA_OVERHEAD``, of UDP bytes received before the handshake completed: quinn does
not count 0-RTT payload apart, and what it receives includes the client's resends
(probe timeouts) and the path's duplicates, so a client within its budget may deliver
twice its flight and more when a datagram is lost or duplicated. The cap bounds the
memory a resuming client can hold before its handshake, not the exact payload."""

logger = logging.getLogger("quicmesh.transport.quic")

H3_REQUEST_CANCELLED = 0x10C
"""The reset code given to streams of a rejected 0-RTT flight (RFC 9114 8.1)."""

H3_EXCESSIVE_LOAD = 0x107
H3_INTERNAL_ERROR = 0x102
"""The application close code of a connection that sent more 0-RTT data than
allowed (RFC 9114 8.1: behaving in a way that generates excessive load)."""

_PATH_EVENTS: dict[str, type[PathValidated | PathAbandoned | PeerAddressChanged]] = {
    "peer_address_changed": PeerAddressChanged,
    "path_validated": PathValidated,
    "path_abandoned": PathAbandoned,
}
"""The extension's path events (a server connection's, sampled: native/src/engine.rs
``PathWatch``) and the engine events they become."""

READ_CHUNK = 64 * 1024
"""The most one read request takes out of quinn."""

_RUSTLS_WRAPPING = re.compile(
    r"^(?:aborted by peer: )?the cryptographic handshake failed: error \d+: "
    r"(?:invalid peer certificate: )?"
)
"""What quinn and rustls put before a certificate verdict ("aborted by peer: the
cryptographic handshake failed: error 46: invalid peer certificate: ...": the side,
the TLS alert's number and its name)."""


def verifier_text(message: str) -> str:
    """A handshake failure's message without quinn's and rustls's wrapping: the verifier's
    own words, which the caller names the side of, as the other engines' messages do."""
    return _RUSTLS_WRAPPING.sub("", message) or message


TAKE_READY_MAX = 1 << 62
"""What one ``take_ready`` may take: all quinn holds (at most a stream window)."""

READ_AHEAD = 2 * READ_CHUNK
"""The most payload of a tracked stream the engine takes out of quinn ahead of the
application's reads (quinn reopens the peer's credit as it is taken out)."""

NOT_BUILT = (
    "the native QUIC engine is not built (no quicmesh._native extension): install "
    "quicmesh with Rust and cargo "
    "(pip install -e .; README, 'The native engine and machines without Rust') "
    "or use engine 'aioquic'"
)
"""The one-line error for ``engine="native"`` without the extension."""

READ_PERMITS_AHEAD = 16
"""(server, with a new-stream rate) Tokens taken ahead for the engine to read that many
new request streams at once (:meth:`NativeConnection.attach_stream_rate`): enough for a
busy client's streams between two of this side's looks, few enough that an identity's
idle connections do not sit on much of its bucket."""

MTU_DISCOVERY_MAX = 6550
"""The largest UDP payload quinn's path MTU discovery probes for, and the largest a
native endpoint accepts (its ``max_udp_payload_size`` transport parameter).

quinn sends up to 10 datagrams of the path's size in one segmentation-offload (GSO)
call (quinn 0.11's ``MAX_TRANSMIT_SEGMENTS``), and one call carries at most 65,507
bytes of UDP payload (the UDP length field less the IPv4 header), so 6550 is the
largest size GSO can carry: larger, a whole batch fails with EMSGSIZE and the search
falls back. On a path with a 1500-byte MTU the probes above it are lost (not counted
as congestion) and the size settles near 1472 (IPv4) or 1452 (IPv6); on loopback
(MTU 65536) and jumbo-frame networks it reaches 6550, as TCP's segments there grow
to the interface MTU. The size falls back to 1200 when probes of a size stop
arriving (quinn's black-hole detection)."""

RELEASE_TIMEOUT = 10.0
"""The longest a closed listener's ``wait_closed()`` waits for quinn to let go of its
socket: its closed connections drain for three probe timeouts, about 1 s at most for
one whose handshake never completed (an RTT of 333 ms assumed), well under 0.1 s on a
LAN; far longer means something still holds the socket (logged)."""

CONGESTION_NAMES = {"reno": "newreno", "newreno": "newreno", "cubic": "cubic", "bbr": "bbr"}
"""quicmesh's congestion-control names and quinn's."""


def ticket_server_name(address: Address) -> str:
    """The TLS server name a client connection to ``address`` gives rustls: rustls
    keys its session tickets by server name, and peers are known by IP address and
    port, so this names both (under ``.invalid``, RFC 2606: never resolved). The
    server ignores it (the SPIFFE ID in its certificate is what is checked)."""
    host = address[0].replace(".", "-").replace(":", "-").strip("-") or "any"
    return f"{host}-{address[1]}.quicmesh.invalid"


_NATIVE: ModuleType | None = native_module()


def native_available() -> bool:
    """Whether the extension ``quicmesh._native`` was built and imports."""
    return _NATIVE is not None


def _extension() -> Any:
    if _NATIVE is None:
        raise ConfigError(NOT_BUILT)
    return _NATIVE


def _endpoint(
    limits: EngineLimits,
    tls: EngineTls,
    address: Address,
    *,
    server: bool,
    early_data: bool,
) -> Any:
    """A ``_native.Endpoint`` bound to ``address`` with the connection settings."""
    native = _extension()
    congestion = CONGESTION_NAMES.get(limits.congestion_control)
    if congestion is None:
        valid = ", ".join(sorted(CONGESTION_NAMES))
        raise ConfigError(
            f"congestion control {limits.congestion_control!r} is not one of {valid} "
            "(native engine)"
        )
    options: dict[str, Any] = {
        "cert_chain_pem": tls.identity.cert_chain_pem(),
        "key_pem": tls.identity.private_key_pem(),
        "trust_pem": tls.trust.pem,
        "alpn": [protocol.encode() for protocol in limits.alpn],
        "server": server,
        "stream_receive_window": limits.stream_window,
        "send_window": limits.send_window,
        "receive_window": limits.connection_window,
        "idle_timeout": limits.idle_timeout,
        "keep_alive": limits.keep_alive,
        "max_bidi_streams": limits.max_streams,
        "congestion": congestion,
        "early_data": early_data,
    }
    newer: dict[str, Any] = {"reset_key": limits.stateless_reset_key}
    if server:
        admission = limits.admission
        newer.update(
            retry=admission.retry,
            retry_threshold=admission.retry_threshold,
            max_half_open=admission.max_half_open,
            max_half_open_per_source=admission.max_half_open_per_source,
            handshake_timeout=admission.handshake_timeout,
        )
    newer.update(
        initial_mtu=limits.max_datagram_size,
        mtu_discovery_max=MTU_DISCOVERY_MAX if limits.mtu_discovery else 0,
        # 1 is RFC 9000's default: no ACK_FREQUENCY frames at all.
        ack_eliciting_threshold=(
            limits.ack_eliciting_threshold if limits.ack_eliciting_threshold != 1 else None
        ),
        qlog_dir=limits.qlog_dir,
        # A new stream's first read (its request) is what Python would ask for at once.
        first_read=READ_CHUNK,
    )
    try:
        return native.Endpoint(address[0], address[1], **options, **newer)
    except TypeError as exc:
        # Only an option the extension does not know means a stale build; a value of
        # the wrong type is the caller's (say so, not "rebuild it").
        if "unexpected keyword argument" not in str(exc):
            raise ConfigError(f"native endpoint: {exc}") from None
    # An extension built before these options existed (a stale build in the tree):
    # run without them, and say so once.
    global _STALE_WARNED
    if not _STALE_WARNED:
        _STALE_WARNED = True
        logger.warning(
            "quicmesh._native is older than this quicmesh: the listener admission "
            "limits, the packet settings (initial_mtu, mtu_discovery_max, "
            "ack_eliciting_threshold) and qlog_dir (older still, the stateless reset key) are not "
            "applied; rebuild it (pip install -e .)"
        )
    try:
        return native.Endpoint(
            address[0], address[1], reset_key=limits.stateless_reset_key, **options
        )
    except TypeError:
        return native.Endpoint(address[0], address[1], **options)


_STALE_WARNED = False

H3_REQUEST_CANCELLED_CODE = 0x10C
"""The code a spliced flow is reset with when Python abandons it."""

_TOKENS = itertools.count(1)


def _connect_error(code: int, message: str) -> OSError:
    """The OSError of an engine's failed TCP connect (``errno`` and its message;
    :class:`TimeoutError` for ETIMEDOUT)."""
    return OSError(code, os.strerror(code) if message != "timed out" else message)


def _hand_socket(sock: socket.socket) -> int:
    """Send ``sock``'s descriptor to the engine (SCM_RIGHTS over the extension's Unix
    socket pair, with a token the engine checks); close ours. Returns the token."""
    global _CARRIER
    token = next(_TOKENS)
    try:
        if _CARRIER is None:
            fd = os.dup(_extension().fd_carrier())
            _CARRIER = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM, fileno=fd)
            atexit.register(_CARRIER.close)  # (no ResourceWarning at the interpreter's exit)
        socket.send_fds(_CARRIER, [token.to_bytes(8, "little")], [sock.fileno()])
    finally:
        sock.close()
    return token


_CARRIER: socket.socket | None = None
"""This process's end of the extension's descriptor carrier (made once)."""


class NativeTcpSocket:
    """A TCP connection the native engine made for a splice
    (:meth:`NativeConnection.connect_tcp`): it stays on the engine's thread until
    :meth:`NativeConnection.splice_stream` takes it; :meth:`detach` takes it out to
    Python instead, :meth:`close` resets it (RST)."""

    def __init__(self, token: int, endpoint: Any) -> None:
        self._token: int | None = token
        self._endpoint = endpoint

    def take(self) -> int:
        """The engine's token for the socket, for the splice (once)."""
        token, self._token = self._token, None
        if token is None:
            raise QuicmeshError("the engine's TCP connection was already handed on")
        return token

    def detach(self) -> socket.socket | None:
        """The connection as a socket of Python's own (non-blocking), or None if the
        engine no longer holds it."""
        token, self._token = self._token, None
        if token is None:
            return None
        fd = self._endpoint.tcp_release(token)
        return None if fd is None else socket.socket(fileno=fd)

    def close(self) -> None:
        """Reset the connection (RST), unless it was handed on."""
        token, self._token = self._token, None
        if token is not None:
            with contextlib.suppress(QuicmeshError):
                self._endpoint.tcp_abort(token)


class _ReadPaused:
    """Marks, among a connection's queued events, where the engine stopped reading a stream."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class _Forgotten:
    """Marks, among a connection's queued events, where a stream was forgotten
    (:meth:`NativeConnection._prune`): the session hears of it once every event of
    the stream before the mark was handed to it."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class _FlushedAtOnce:
    """An endpoint whose every command is flushed as it is given: for commands given once
    the event loop is closed (no end of a turn will flush them)."""

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._endpoint, name)

        def flushed(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            finally:
                flush = getattr(self._endpoint, "flush", None)
                if flush is not None:
                    flush()

        return flushed


_ENDPOINT_NUMBERS = itertools.count(1)


class _Pump:
    """Watches one endpoint's wake-up descriptor and routes its events to connections.

    Shared by a client endpoint (many connections) and a listener. Runs on the
    event loop's thread: ``loop.add_reader`` on :meth:`Endpoint.fileno`.
    """

    def __init__(
        self, endpoint: Any, loop: asyncio.AbstractEventLoop, limits: EngineLimits
    ) -> None:
        self.endpoint = endpoint
        self.number = next(_ENDPOINT_NUMBERS)
        """This endpoint's number in the process (for logs: each endpoint numbers its
        connections from 1)."""
        self.loop = loop
        self.stream_window = limits.stream_window
        self.connection_window = limits.connection_window
        self.congestion = limits.congestion_control
        self.connections: dict[int, NativeConnection] = {}
        self.connecting: dict[int, NativeConnection] = {}
        self.on_accepted: Callable[[NativeConnection], None] | None = None
        self.on_accept_failed: Callable[[str, str, str], None] | None = None
        self.on_admission: Callable[[str, str], None] | None = None
        self.max_early_bytes = EARLY_RECEIVE_FACTOR * limits.max_early_data + EARLY_DATA_OVERHEAD
        self.max_streams = limits.max_streams
        self.splices: dict[int, asyncio.Future[tuple[int, int, str, bool] | OSError]] = {}
        """Spliced flows by splice ID: their outcome (bytes each way, failure, whether the
        destination was connected) arrives even after their connection (an OSError: a
        :meth:`NativeConnection.connect_splice` could not connect)."""
        self.tcp_connects: dict[int, asyncio.Future[tuple[int, str]]] = {}
        """The engine's TCP connects for splices by token (:meth:`NativeConnection.connect_tcp`)."""
        self._fd = endpoint.fileno()
        defer_commands = getattr(endpoint, "defer_commands", None)
        if defer_commands is not None:  # None: an extension built before (runs them at once)
            defer_commands()
        self._flush_pending = False
        self._release_held = False
        """(client) A 0-RTT connection was made this turn: its first flight waits in the
        engine until the turn's commands (its requests) have run (native/src/hold.rs)."""
        self.closed = False
        self.retiring = False
        """(client) Replaced by the endpoint of a new identity: closed once idle."""
        self.tls: EngineTls | None = None
        """(client) The identity and trust its key names by ``id()``, kept alive so that
        no later object can take those ids while the endpoint is in use."""
        loop.add_reader(self._fd, self.pump)
        self._unwatch = weakref.finalize(self, _remove_reader, loop, self._fd)
        """Stops watching the endpoint's descriptor (once: at :meth:`close`, which closes
        it, else when the pump is collected)."""

    @property
    def commands(self) -> Any:
        """The endpoint, to give commands to: they run at the end of this turn of the loop.

        The endpoint holds its commands (``defer_commands``) until :meth:`flush`, which wakes
        the engine's thread once for every command given in the turn (a new flow gives six
        or so) instead of once each.
        """
        if self.loop.is_closed():
            return _FlushedAtOnce(self.endpoint)  # no turn will end to flush them
        if not self._flush_pending:
            self._flush_pending = True
            try:
                self.loop.call_soon(self.flush)
            except RuntimeError:  # the loop closed meanwhile
                self._flush_pending = False
                return _FlushedAtOnce(self.endpoint)
        return self.endpoint

    def release_held_after_this_turn(self) -> None:
        """Send the first flight of the 0-RTT connection just made once the commands of
        this turn have run, so that the requests written meanwhile leave in 0-RTT right
        behind it (the engine holds it until then, 5 ms at most)."""
        self._release_held = True
        self.commands  # noqa: B018 (schedules the end-of-turn flush)

    def flush(self) -> None:
        """Have the engine run the commands given so far."""
        self._flush_pending = False
        if self._release_held:
            self._release_held = False
            release = getattr(self.endpoint, "release_held", None)  # None: an older build
            if release is not None:
                release()
        flush = getattr(self.endpoint, "flush", None)
        if flush is not None:
            flush()

    def pump(self) -> None:
        """Drain the endpoint's events into its connections, then wake each one once."""
        for connection in self.route_waiting():
            self.run_contained(connection, connection.woke)
        if self._flush_pending:  # the answers to this batch go now, not a turn later
            self.flush()
        if self.retiring and not self.closed and self.idle:
            self.close()

    def route_waiting(self) -> list[NativeConnection]:
        """Drain the endpoint's events into its connections (taking its wake-up with
        them); the connections they went to, once each, for the caller to wake."""
        routed: dict[int, NativeConnection] = {}
        for event in self.endpoint.drain():
            connection = self._route(event)
            if connection is not None:
                routed[id(connection)] = connection
        return list(routed.values())

    @staticmethod
    def run_contained(connection: NativeConnection, step: Callable[[], None]) -> None:
        """Run ``step`` of ``connection``'s event handling; a failure closes that connection
        only. The pump serves every connection of the endpoint: without this, the
        connections after this one in the batch would keep their events unread until
        their next wake-up (a flow waiting for its last bytes hung). The failed
        connection's state is unknown: it is closed (its flows are reset on both sides),
        and why is logged."""
        try:
            step()
        except Exception:  # one connection's bug must not stall the others
            logger.exception("[%s] closing the connection: internal error", connection.log_id)
            connection.close(H3_INTERNAL_ERROR, reason_phrase="internal error")

    @property
    def idle(self) -> bool:
        """No connection, handshake or splice left on the endpoint."""
        return not (self.connections or self.connecting or self.splices)

    def retire(self) -> None:
        """(client) Close the endpoint now if idle, else once its last connection ends
        (an identity was rotated out: its endpoint's UDP socket is not kept)."""
        self.retiring = True
        if self.idle:
            self.close()

    def _route(self, event: tuple[Any, ...]) -> NativeConnection | None:
        kind = event[0]
        if kind == "connected":
            _, token, conn, early = event
            connection = self.connecting.pop(token, None)
            if connection is None:
                with contextlib.suppress(QuicmeshError):
                    self.commands.close_connection(conn)
                return None
            self.connections[conn] = connection
            connection.connected(conn, early)
            return connection
        if kind == "connect_failed":
            _, token, failure, message = event
            connection = self.connecting.pop(token, None)
            if connection is not None:
                connection.terminated(failure, message)
            return connection
        if kind == "connect_unreachable":
            _, token, errno, detail = event
            connection = self.connecting.get(token)
            if connection is not None:
                connection.unreachable(errno, detail)
            return connection
        if kind == "accepted":
            _, conn, early = event
            connection = NativeConnection(self, is_client=False)
            self.connections[conn] = connection
            connection.connected(conn, early)
            if self.on_accepted is not None:
                self.on_accepted(connection)
            return connection
        if kind == "accept_failed":
            if self.on_accept_failed is not None:
                source = event[3] if len(event) > 3 else ""  # (not from an older extension)
                self.on_accept_failed(event[1], event[2], source)
            return None
        if kind == "admission":
            if self.on_admission is not None:
                self.on_admission(event[1], event[2])
            return None
        if kind == "tcp_connected":
            _, token, error, message = event
            connecting = self.tcp_connects.pop(token, None)
            if connecting is not None and not connecting.done():
                connecting.set_result((error, message))
            elif not error:  # nobody waits for it any more
                with contextlib.suppress(QuicmeshError):
                    self.endpoint.tcp_abort(token)
            return None
        if kind == "spliced":
            _, conn, splice_id, _, sent, received, error, _, *connected = event
            waiter = self.splices.pop(splice_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(
                    (sent, received, error, bool(connected[0]) if connected else True)
                )
            return self.connections.get(conn)
        if kind == "splice_unconnected":
            _, conn, splice_id, _, code, message = event
            waiter = self.splices.pop(splice_id, None)
            if waiter is not None and not waiter.done():
                # A result, not an exception: a waiter given up meanwhile logs no
                # "exception never retrieved".
                waiter.set_result(_connect_error(code, message))
            return self.connections.get(conn)
        conn = event[2] if kind in ("stream_opened", "open_failed") else event[1]
        connection = self.connections.get(conn)
        if connection is None:
            return None
        if kind == "closed":
            del self.connections[connection.conn]
        connection.on_native_event(event)
        return connection

    def close(self) -> None:
        """Close the endpoint (every connection on it) and stop watching it."""
        if self.closed:
            return
        self.closed = True
        for splice_id in list(self.splices):
            with contextlib.suppress(QuicmeshError):
                self.endpoint.splice_abort(splice_id, H3_REQUEST_CANCELLED_CODE)
        self._unwatch()  # before the endpoint closes the descriptor (its number is reused)
        self.endpoint.close()
        self.pump()  # the closes already queued reach their connections
        for waiter in self.splices.values():
            # Their outcome can no longer be drained: the engine resets them itself.
            if not waiter.done():
                waiter.set_result((0, 0, "the endpoint was closed", False))
        self.splices.clear()
        for connecting in self.tcp_connects.values():
            if not connecting.done():
                connecting.set_result((errno.ECONNABORTED, "the endpoint was closed"))
        self.tcp_connects.clear()
        left = [*self.connections.values(), *self.connecting.values()]
        self.connections.clear()
        self.connecting.clear()
        for connection in left:
            connection.terminated("locally_closed", "the endpoint was closed")
            connection.woke()


def _check_route(address: Address) -> None:
    """Fail at once where this host has no route to ``address`` (no route at all, an
    ``unreachable`` or ``prohibit`` route, the interface down), as the aioquic engine
    does, whose client socket is connected to its peer.

    The endpoint's socket is not connected (one socket, many peers), and quinn-udp
    drops a datagram its ``sendmsg`` could not send with a log line: the handshake
    would wait out its whole timeout. Connecting a throwaway UDP socket asks the
    kernel's routing table the same question (three system calls a connection, not a
    flow); a route that goes away later is the liveness checks' to notice.

    :raises EngineError: the kernel refused, with its reason.
    """
    try:
        client_udp_socket(address, recverr=False).close()
    except OSError as exc:
        raise EngineError(
            f"cannot open a UDP socket to {address[0]}:{address[1]}: {exc.strerror or exc}"
        ) from None


def _remove_reader(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    if not loop.is_closed():
        loop.remove_reader(fd)


@dataclass
class _Stream:
    """What the engine keeps about one stream (quinn keeps the rest)."""

    unsent: int = 0
    """Bytes written that quinn has not taken yet (``written`` events)."""
    send_done: bool = False
    """FIN queued, reset sent, or STOP_SENDING received."""
    fin_unacked: bool = False
    """FIN queued and not yet acknowledged with all the data before it (``send_acked``):
    quinn still holds bytes of the stream, which a connection close would lose."""
    recv_done: bool = False
    """FIN or RESET_STREAM received, or STOP_SENDING sent."""
    reading: bool = False
    """A read request is outstanding."""
    chunks_given: int = 0
    """``data`` events the engine gave for the stream (:meth:`NativeConnection.woke`
    defers the read request after the first)."""
    tracked: bool = False
    buffered: int = 0
    """Payload delivered to the application and not read yet (tracked streams)."""
    splicing: bool = False
    """Handed (or being handed) to the engine's splice: Python reads it no more."""
    handed_over: bool = False
    """Its receiving half went to the splice without a pause (:meth:`NativeConnection.
    hand_over_reading`): what the engine gave it and the session had not taken in goes to
    the splice, so those events are dropped here."""
    received: int = 0
    """Stream bytes the session took in (``StreamDataReceived`` events it was given)."""
    splice_id: int | None = None
    paused: asyncio.Future[None] | None = None


class _LivenessSample:
    """What the driver's liveness rules read, made from quinn's counters.

    quinn keeps its probe-timeout count and its unacknowledged packets to itself;
    its connection stats count datagrams received, ACK frames received and frames
    sent by type. Sampled by the driver (``sample_liveness``), they give:

    * **heard from the peer**: the datagrams-received count grew since the last sample;
    * **awaiting an acknowledgement**: ack-eliciting frames (every kind but ACK,
      PADDING and CONNECTION_CLOSE) were sent after the sample at which the peer
      was last heard from;
    * **probe timeouts**: how many PTOs (RFC 9002 6.2, doubling each time) fit in
      the time since the later of those two, with a PTO estimated from quinn's
      smoothed RTT as ``2 * rtt + 25 ms`` (quinn's is ``rtt + 4 * rttvar +
      max_ack_delay``, 25 ms by default), so the count is never early by more
      than the variance allows.

    Each is as fresh as the last sample (every :data:`.engine.LIVENESS_SAMPLE`
    seconds while something awaits an acknowledgement): verdicts come up to
    that much later than on aioquic, where the driver sees every datagram.
    """

    MAX_ACK_DELAY = 0.025

    def __init__(self) -> None:
        self.received = -1
        self.eliciting_when_heard = 0
        self.heard_at: float | None = None
        self.awaiting_since: float | None = None
        self.awaiting = False
        self.probe_timeouts = 0

    def update(self, now: float, stats: dict[str, Any]) -> bool:
        """Take one sample of ``stats``; return whether the peer was heard from."""
        received = int(stats.get("datagrams_received", 0))
        eliciting = int(stats.get("ack_eliciting_frames_sent", 0))
        heard = received != self.received
        if heard:
            self.received = received
            self.eliciting_when_heard = eliciting
            self.heard_at = now
            self.awaiting_since = None
        self.awaiting = eliciting > self.eliciting_when_heard
        if not self.awaiting:
            self.awaiting_since = None
        elif self.awaiting_since is None:
            self.awaiting_since = now
        self.probe_timeouts = 0
        if self.awaiting and self.awaiting_since is not None:
            start = max(self.awaiting_since, self.heard_at or self.awaiting_since)
            pto = 2 * float(stats.get("rtt") or 0.0) + self.MAX_ACK_DELAY
            # After n timeouts, (2**n - 1) PTOs have passed.
            self.probe_timeouts = int(math.log2((now - start) / pto + 1))
        return heard


GONE_STREAM_IDS = 1 << 61
"""Stream IDs above this are handed out by a connection that is gone (quinn's own
stay far below: the peer would have to allow 2**59 streams of a kind)."""


class NativeConnection:
    """One QUIC connection of the native engine (see the module docstring)."""

    @property
    def _native(self) -> Any:
        """The endpoint, for this connection's commands (:attr:`_Pump.commands`)."""
        return self._pump.commands

    def __init__(self, pump: _Pump, *, is_client: bool) -> None:
        self._pump = pump
        self.conn = -1
        self.token: int | None = None
        """(client) The endpoint's token for the connect, until it is reported."""
        self._is_client = is_client
        self._events: list[Any] = []
        self._streams: dict[int, _Stream] = {}
        self._acks_reported = bool(getattr(_NATIVE, "SEND_ACKED_EVENTS", False))
        """Whether the extension reports ``send_acked`` (one built before it does not:
        a graceful close then waits only for FINs to be queued, as before)."""
        self._open_with_first_read = bool(getattr(_NATIVE, "OPEN_WITH_FIRST_READ", False))
        """Whether ``try_open_stream`` takes ``first_read`` (not in an extension built before)."""
        self._spare: dict[bool, list[int]] = {}
        """Streams opened ahead and not used yet, by direction (True: unidirectional),
        lowest ID first: by :meth:`get_next_available_stream_id`, or by quinn once the
        peer allowed the open :meth:`can_open_bidi_stream` asked for. There can be two:
        a stream quinn opened asynchronously is kept even when a synchronous open got
        one first (dropped, its ID would be opened implicitly at the peer by the next
        stream's first frame and hold one of its slots for good)."""
        self._opening = False
        self.on_forget: Callable[[int], None] | None = None
        """Called with a stream's ID once the connection forgot it and every event of
        it was handed out (the HTTP/3 session then forgets it too: aioquic's
        scheduler reports discarded streams the same way)."""
        self._gone_stream_ids = 0
        """Stream IDs handed out after the connection was gone (see
        :meth:`get_next_available_stream_id`)."""
        self._window = pump.stream_window
        self._connection_window = pump.connection_window
        self._buffered_total = 0
        """Payload delivered to the application and not read yet, over every stream:
        reads stop at ``connection_window`` (as aioquic's and h2's connection credit;
        quinn's reopens as the engine reads, and its reads are made for Python)."""
        self._stops_after_ready: dict[int, int] = {}
        """Streams whose peer's STOP_SENDING (its code) waits for a ``ready`` event
        (:meth:`_take_ready_first`)."""
        self._starved: dict[int, None] = {}
        """Tracked streams whose read waits for room in the connection's window, in
        order."""
        self._rate: StreamRate | None = None
        """(server) The peer identity's new-stream bucket (:meth:`attach_stream_rate`)."""
        self._free_streams = pump.max_streams
        """(server) Peer streams still served without a token (the first ``max_streams``)."""
        self._read_permits = 0
        """(server) Read permits the engine holds, as far as this side knows
        (:meth:`attach_stream_rate`)."""
        self._free_permits = 0
        """(server) How many of them are of the first ``max_streams`` (no token)."""
        self._held: deque[int] = deque()
        """(server) Peer bidirectional streams waiting for a token, oldest first."""
        self._held_stops: dict[int, int] = {}
        """(server) STOP_SENDING error codes of held streams, told when they are served."""
        self._release: asyncio.TimerHandle | None = None
        self._wake: Callable[[], None] | None = None
        self._reads_deferred: dict[int, None] | None = None
        """While the session takes in a batch of the engine's events: the streams whose
        read request for their second chunk waits two turns of the loop (:meth:`woke`)."""
        self._closed_reason: str | None = None
        self._last_stats: dict[str, Any] = {}
        """The engine's figures as last read: what :meth:`stats` says once it forgot the
        connection (they were all 0 then, counters going backwards)."""
        self._local_close: tuple[int, str] | None = None
        """The code and reason of this side's :meth:`close`, if it closed first."""
        self._early = False
        self._early_log: dict[int, list[tuple[bytes, bool]]] | None = None
        """(client, 0-RTT) What each stream opened before the server answered was
        given, in order (resent on the re-opened streams if 0-RTT is rejected)."""
        self._early_resets: dict[int, int] = {}
        self._resent = 0
        self.resend_allowed: Callable[[], bool] | None = None
        """(client, 0-RTT) Asked before a rejected flight is written again, with the
        server's certificate of the full handshake loaded: False when that server is not
        the one whose ticket the flight went under, so that none of its bytes reach it
        (the connection is refused next). Set by the connection that checks identities."""
        self._certificates: tuple[x509.Certificate | None, list[x509.Certificate]] | None = None
        self._liveness = _LivenessSample()
        self._remote: Address | None = None
        """The peer's address as quinn last gave it: a client's never changes; a server's
        is asked again after each path event."""
        self.on_verified: Callable[[str], None] | None = None
        self.ticket_identity: str | None = None
        # What aioquic's H3Connection reads of its QUIC connection besides the stream API
        # (and _remote_max_datagram_frame_size, below).
        self.configuration = SimpleNamespace(is_client=is_client)
        self._quic_logger = None

    # -- engine side -------------------------------------------------------------------

    @property
    def is_client(self) -> bool:
        """Whether this is the client side."""
        return self._is_client

    @property
    def log_id(self) -> str:
        """The endpoint's and the engine's connection numbers, for logs (quinn's IDs
        stay inside): ``native-E.C``."""
        return f"native-{self._pump.number}.{self.conn}"

    @property
    def _remote_max_datagram_frame_size(self) -> int | None:
        """Whether the peer announced max_datagram_frame_size (RFC 9221), as aioquic's
        H3Connection reads it: it refuses a peer's SETTINGS_H3_DATAGRAM=1 without it
        (RFC 9297 2.1.1). quinn gives the largest DATAGRAM the peer takes, or None."""
        if self.conn < 0:
            return None
        query = getattr(self._native, "peer_max_datagram_size", None)
        if query is None:  # an extension built before it existed
            return None
        try:
            size: int | None = query(self.conn)
        except QuicmeshError:  # gone
            return None
        return size

    @property
    def early(self) -> bool:
        """(client) The connection resumed with 0-RTT and the server has not answered."""
        return self._early

    def resumed_identity(self) -> str | None:
        """(client) The identity the server at this address was last verified as."""
        return self.ticket_identity

    def set_wake(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` (on the event loop's thread) after events for this
        connection were queued."""
        self._wake = wake

    def woke(self) -> None:
        """The endpoint routed events here: the session takes them in now.

        The read request the session makes meanwhile for a stream's second chunk (asked
        for as soon as the first arrived) waits until the tasks those events woke have
        run their next step (later chunks are asked for at once). A flow's handler that
        hands the stream to a splice in that step (both sidecars do, right after the
        CONNECT or its answer arrived) thus takes its reading over without a read
        request that the engine would serve and the splice then discard.
        """
        if self._wake is None:
            return
        outer = self._reads_deferred
        deferred: dict[int, None] = {}
        self._reads_deferred = deferred
        try:
            self._wake()
        finally:
            self._reads_deferred = outer
        if deferred:
            # Two turns on: the tasks the events woke run first, also those woken through
            # one future in between (``asyncio.shield``, as MeshStream.wait_accepted's).
            loop = self._pump.loop
            loop.call_soon(loop.call_soon, self._read_deferred, deferred)

    def _read_deferred(self, stream_ids: dict[int, None]) -> None:
        def read() -> None:
            for stream_id in stream_ids:
                state = self._streams.get(stream_id)
                if state is not None:
                    self._read(stream_id, state)

        self._pump.run_contained(self, read)

    def connected(self, conn: int, early: bool) -> None:
        """The endpoint reported the connection: handshake done (peer verified in
        Rust), or resumed with 0-RTT (``early``)."""
        self.conn = conn
        self.token = None
        if self._is_client and early:
            self._early = True  # HandshakeCompleted follows the server's answer
            self._early_log = {}
            return
        self._handshake_completed(early_data_accepted=early)

    def _handshake_completed(self, *, early_data_accepted: bool) -> None:
        if not self._load_certificates():
            # Gone before its handshake was seen here (a health check closes at
            # once): its close event follows. Reporting the handshake now would
            # show it without the peer's chain, as if resumed with no identity.
            return
        self.active_path()  # remembered: the peer's address is still told once closed
        certificate, _ = self.peer_certificate()
        if certificate is not None and self.on_verified is not None:
            identity = spiffe_id_of(certificate)
            if identity is not None:
                self.on_verified(identity)
        self._events.append(
            quic_events.HandshakeCompleted(
                alpn_protocol="h3",
                early_data_accepted=early_data_accepted,
                session_resumed=certificate is None,
            )
        )

    def terminated(self, kind: str, message: str, code: int = 0) -> None:
        """The connection ended (or never came up): ``ConnectionTerminated``. A
        ``violation`` is the engine closing it because the peer broke QUIC or HTTP/3
        (``code`` is the error code it closed with): this side's close, as aioquic's
        connection reports one."""
        if self._closed_reason is not None:
            return
        self._read_stats()  # (the last chance: the engine forgets the connection soon)
        self._closed_reason = message
        self._held.clear()
        self._held_stops.clear()
        if self._release is not None:
            self._release.cancel()
            self._release = None
        for state in self._streams.values():
            if state.paused is not None and not state.paused.done():
                state.paused.set_result(None)
        if kind in ("verification", "peer_refused"):
            message = verifier_text(message)
        if kind == "verification":
            whose = "server" if self._is_client else "client"
            message = f"{whose} certificate not trusted: {message}"
            self._events.append(PeerCertificateRefused(message))
        if kind == "violation":
            if self._local_close is None:
                self._local_close = (code, message)
        else:
            code = CRYPTO_ERROR_BAD_CERTIFICATE if kind in ("verification", "peer_refused") else 0
        if kind == "locally_closed" and self._local_close is not None:
            # quinn says only "closed": our close's code and reason are what happened.
            code, reason = self._local_close
            message = reason or message
        self._events.append(
            quic_events.ConnectionTerminated(
                error_code=code, frame_type=None, reason_phrase=message
            )
        )

    def on_native_event(self, event: tuple[Any, ...]) -> None:
        """Turn one of the extension's events into aioquic's (or engine.py's)."""
        kind = event[0]
        if kind == "data":
            _, _, stream_id, data, fin = event
            state = self._streams.get(stream_id)
            if state is None or state.handed_over:  # forgotten (a read that crossed its
                return  # end), or the splice has these bytes
            state.reading = False
            state.chunks_given += 1
            if fin:
                state.recv_done = True
            self._events.append(
                quic_events.StreamDataReceived(data=data, end_stream=fin, stream_id=stream_id)
            )
            if not fin and not state.tracked and stream_id & 2:
                self._read(stream_id, state)  # control and QPACK streams: read at once
            self._prune(stream_id, state)
        elif kind == "stream_accepted":
            _, _, stream_id, bidirectional, *rest = event
            read_started = bool(rest and rest[0])  # the engine's first read (first_read)
            permit_used = bool(rest[1:] and rest[1])  # with a read permit
            if bidirectional and not self._stream_admitted(stream_id, read_started, permit_used):
                return
            state = self._new_stream(stream_id)
            if not bidirectional:
                state.send_done = True
            if read_started:
                state.reading = True
            else:
                self._read(stream_id, state)
        elif kind == "written":
            _, _, stream_id, count = event
            written = self._streams.get(stream_id)
            if written is not None:
                written.unsent = max(0, written.unsent - count)
        elif kind == "send_acked":
            acked = self._streams.get(event[2])
            if acked is not None:
                acked.fin_unacked = False  # the driver's wake-up checks for idleness
                self._prune(event[2], acked)
        elif kind == "reset_received":
            _, _, stream_id, code = event
            state = self._streams.get(stream_id)
            if state is None or state.handed_over:  # forgotten, or the splice has the reset
                return
            state.recv_done = True
            self._events.append(quic_events.StreamReset(error_code=code, stream_id=stream_id))
            self._prune(stream_id, state)
        elif kind == "stop_sending_received":
            _, _, stream_id, code = event
            state = self._streams.get(stream_id)
            if state is None:
                if stream_id in self._held:
                    # Held, unknown to HTTP/3 yet, and held still: its STOP_SENDING
                    # reaches HTTP/3 when its token comes. Told now, the session
                    # aborted it and its slot was freed without a token, so a
                    # churner that stops its streams opened them past the rate.
                    self._held_stops[stream_id] = code
                return  # (or finished and forgotten)
            if not self._take_ready_first(stream_id, state, code):
                self._stopped(stream_id, state, code)
        elif kind == "ready":
            _, _, stream_id, data, fin = event
            code = self._stops_after_ready.pop(stream_id, None)
            state = self._streams.get(stream_id)
            if state is None or state.handed_over:
                return
            if data or fin:
                state.recv_done = state.recv_done or fin
                self._events.append(
                    quic_events.StreamDataReceived(data=data, end_stream=fin, stream_id=stream_id)
                )
            if code is not None:
                self._stopped(stream_id, state, code)
            else:
                self._prune(stream_id, state)
        elif kind == "early_data":
            accepted = bool(event[2])
            self._early = False
            log, self._early_log = self._early_log, None
            if not accepted and log:
                # Streams quinn opened after it took the rejection (before this event
                # came here: the HTTP/3 streams of a connection whose handshake beat
                # this side's first look) are 1-RTT ones: not lost, not resent (an
                # extension built before `early_kept` tells none).
                query = getattr(self._native, "early_kept", None)
                kept = set(query(self.conn)) if query is not None else set()
                lost = {sid: given for sid, given in log.items() if sid not in kept}
                self._resent = self._resend(lost) if lost and self._may_resend() else 0
            self._handshake_completed(early_data_accepted=accepted)
        elif kind == "handshake_done":
            self._check_early_data(received=event[2])
        elif kind == "early_data_rejected":
            # An old incarnation of a stream of the rejected 0-RTT flight: the stream
            # is opened again and its bytes resent when the server's answer arrives.
            pass
        elif kind == "stream_opened":
            _, _, _, stream_id = event
            self._opening = False
            if self._settled_by_reuse(stream_id):
                return  # it carries its old bytes: the caller's open is asked for again
            self._new_stream(stream_id)
            self._keep_spare(stream_id)
        elif kind == "open_failed":
            self._opening = False
        elif kind == "read_paused":
            self._events.append(_ReadPaused(event[2]))
        elif kind in _PATH_EVENTS:
            _, _, host, port = event
            self._remote = None
            self._events.append(_PATH_EVENTS[kind]((str(host), int(port))))
        elif kind == "unreachable":
            self.unreachable(event[2], event[3])
        elif kind == "closed":
            _, _, failure, message, *code = event  # (an older extension gives no code)
            self.terminated(failure, message, code[0] if code else 0)

    def unreachable(self, errno: int, detail: str) -> None:
        """An ICMP destination unreachable came back for the peer's address (the
        extension reads its socket's error queue): :class:`~.engine.PeerUnreachable`.

        A server connection ignores it, as an aioquic listener (whose socket sees no
        ICMP) does: after a client's NAT rebinding the server still answers the old
        address until the client's next packet, and the relay that closed that port
        answers with port unreachable; failing the connection then would lose every
        flow of a rebound client. A dead client is found by the liveness rules."""
        if self._closed_reason is None and self._is_client:
            self._events.append(PeerUnreachable(errno=errno, detail=detail))

    def _check_early_data(self, received: int) -> None:
        """(server) The handshake of a 0-RTT connection completed after ``received``
        bytes from the client: over :data:`EARLY_RECEIVE_FACTOR` times
        ``max_early_data``, plus ``EARLY_DATA_OVERHEAD``, the connection is closed (as the
        aioquic engine's driver closes one over its budget).

        quinn does not count 0-RTT payload apart, so this is the UDP payload received
        before the handshake completed (the client's Initial and Handshake packets, its
        resends and the path's duplicates included: hence the factor, which keeps a
        client within its budget served on a lossy path); the check runs when the
        handshake completes, before the streams' data is read (reads are driven from
        here)."""
        limit = self._pump.max_early_bytes
        if received <= limit:
            return
        reason = f"more than {limit} bytes received before the 0-RTT handshake completed"
        logger.warning("[%s] closing: %s (%d received)", self.log_id, reason, received)
        with contextlib.suppress(QuicmeshError):
            self._native.close_connection(self.conn, H3_EXCESSIVE_LOAD, reason)

    def _stream(self, stream_id: int) -> _Stream:
        """The record of a stream; for one finished and forgotten (:meth:`_prune`), a
        finished record that is not kept: late calls and events cannot bring it back."""
        state = self._streams.get(stream_id)
        if state is None:
            return _Stream(send_done=True, recv_done=True)
        return state

    def _prune(self, stream_id: int, state: _Stream) -> None:
        """Forget a stream once nothing more can come of it: both directions over,
        its FIN acknowledged, no splice, not part of an unsettled 0-RTT flight (the
        engine sends no event for it after that, but those that crossed its end,
        which find no record and are dropped)."""
        if (
            state.send_done
            and state.recv_done
            and not state.fin_unacked
            and state.splice_id is None
            and state.paused is None
            and not (self._early_log is not None and stream_id in self._early_log)
            and not any(stream_id in spares for spares in self._spare.values())
        ):
            # Its unread payload (the application stopped reading, or has not read the
            # end yet: a record no longer counts it) leaves the connection's window.
            self._set_buffered(state, 0)
            self._starved.pop(stream_id, None)
            forgotten = self._streams.pop(stream_id, None) is not None
            if forgotten and self.on_forget is not None:
                self._events.append(_Forgotten(stream_id))

    def _new_stream(self, stream_id: int) -> _Stream:
        """Record a stream the engine just opened or accepted."""
        state = self._streams.get(stream_id)
        if state is None:
            state = self._streams[stream_id] = _Stream()
            if stream_id & 2 and bool(stream_id & 1) != (not self._is_client):
                state.send_done = True  # the peer's unidirectional stream: receive only
            if stream_id & 2 and bool(stream_id & 1) == (not self._is_client):
                state.recv_done = True  # our unidirectional stream: send only
        return state

    def _settled_by_reuse(self, stream_id: int) -> bool:
        """Whether quinn just gave (to an open) the ID of a stream of the unsettled
        0-RTT flight: then it has taken the server's rejection already, and its
        ``early_data`` event is still on its way here (an open can fall between the
        two). The flight is resent now, ``stream_id`` (the first of its direction, as
        quinn counts again from the first ID) carrying its old bytes; the event then
        finds it settled. Without this the new stream and the flight's stream shared
        one record, and the flight's later ones could not be opened with their IDs."""
        log = self._early_log
        if log is None or stream_id not in log:
            return False
        self._early_log = None
        self._resent = self._resend(log, reopened=stream_id) if self._may_resend() else 0
        return True

    def _may_resend(self) -> bool:
        """Whether a rejected 0-RTT flight may be written again (:attr:`resend_allowed`)."""
        if self.resend_allowed is None:
            return True
        self._certificates = None  # the full handshake's, not the ticket's
        return self._load_certificates() and self.resend_allowed()

    def _resend(self, log: dict[int, list[tuple[bytes, bool]]], reopened: int | None = None) -> int:
        """0-RTT was rejected: quinn forgot the streams opened in it and gives the same
        IDs again; open them again in order and write what they were given
        (``reopened``: one quinn has opened again already)."""
        resent = 0
        for stream_id in sorted(log, key=lambda sid: (sid & 2, sid)):
            try:
                again = (
                    stream_id
                    if stream_id == reopened
                    else self._native.try_open_stream(self.conn, bidirectional=not stream_id & 2)
                )
            except QuicmeshError:
                again = None
            state = self._new_stream(stream_id)
            if again != stream_id:
                # Not the same ID (cannot happen with quinn 0.11): fail the stream.
                logger.warning("[%s] 0-RTT stream %d could not be resent", self.log_id, stream_id)
                state.send_done = state.recv_done = True
                self._events.append(
                    quic_events.StreamReset(error_code=H3_REQUEST_CANCELLED, stream_id=stream_id)
                )
                continue
            state.unsent = 0
            state.reading = False
            state.send_done = state.recv_done = False
            if stream_id & 2:
                state.recv_done = True  # ours, unidirectional
            for data, end_stream in log[stream_id]:
                self.send_stream_data(stream_id, data, end_stream)
            code = self._early_resets.get(stream_id)
            if code is not None:
                self.reset_stream(stream_id, code)
            if state.tracked or not stream_id & 2:
                self._read(stream_id, state)
            resent += 1
        self._early_resets.clear()
        return resent

    def _read(self, stream_id: int, state: _Stream) -> bool:
        """Ask quinn for the stream's next chunk (unless one is asked for already); for
        the second chunk, asked for while the session takes in events, two turns of the
        loop later (:meth:`woke`)."""
        if state.reading or state.recv_done or state.splicing or self._closed_reason is not None:
            return False
        if self._reads_deferred is not None and state.chunks_given == 1:
            self._reads_deferred[stream_id] = None
            return True
        size = READ_CHUNK
        if state.tracked:
            room = min(self._window, READ_AHEAD) - state.buffered
            if room <= 0:
                return False
            shared = self._connection_window - self._buffered_total
            if shared <= 0:
                self._starved[stream_id] = None
                return False
            size = min(size, room, shared)
        try:
            self._native.read(self.conn, stream_id, size)
        except QuicmeshError:  # the connection is gone: its close event follows
            return False
        state.reading = True
        return True

    # -- EngineConnection: streams ------------------------------------------------------

    def get_next_available_stream_id(self, is_unidirectional: bool = False) -> int:
        """The ID of the next stream we open; quinn opens it now (kept until used).

        :raises EngineError: the peer's stream limit allows no new stream now
            (:meth:`can_open_bidi_stream` says so first for request streams).
        """
        spares = self._spare.get(is_unidirectional)
        if spares:
            return spares[0]
        try:
            stream_id = self._try_open(bidirectional=not is_unidirectional)
        except QuicmeshError:
            # The connection is gone (its close event follows). aioquic still hands out
            # an ID there and drops what is written to it; so do we, with an ID quinn
            # never uses, so that the HTTP/3 layer's set-up (its control streams, made
            # when the handshake event arrives, which a peer may close at once: a
            # health check) does not raise into the event loop.
            self._gone_stream_ids += 1
            kind = (2 if is_unidirectional else 0) | (0 if self._is_client else 1)
            return GONE_STREAM_IDS + 4 * self._gone_stream_ids + kind
        if stream_id is None:
            raise EngineError("the peer's stream limit allows no new stream now")
        return stream_id

    def _try_open(self, *, bidirectional: bool) -> int | None:
        """Open a stream now: its ID, or None when the peer's stream limit is reached.

        :raises QuicmeshError: the connection is gone.
        """
        # A request stream's first read goes with the open (the answer is what it waits
        # for): one command less to the engine's thread per flow.
        # Not while a 0-RTT flight is unsettled: a rejection reopens its streams and reads
        # them again (_resend).
        reads_at_once = bidirectional and self._open_with_first_read and self._early_log is None
        stream_id: int | None = self._native.try_open_stream(
            self.conn,
            bidirectional=bidirectional,
            **({"first_read": min(READ_CHUNK, self._window)} if reads_at_once else {}),
        )
        if stream_id is not None and self._settled_by_reuse(stream_id):
            return self._try_open(bidirectional=bidirectional)  # a new one for the caller
        if stream_id is not None:
            self._keep_spare(stream_id)
            self._new_stream(stream_id).reading = reads_at_once
            if self._early_log is not None:
                self._early_log[stream_id] = []
        return stream_id

    def _take_ready_first(self, stream_id: int, state: _Stream, code: int) -> bool:
        """Before the peer's STOP_SENDING reaches the session (which aborts the stream, so
        the engine stops its receiving half and quinn drops what it holds), take what
        quinn holds of it (a ``ready`` event, then the STOP_SENDING). A peer that aborts
        after its FIN was acknowledged sends no RESET_STREAM: its answer sits complete in
        quinn beyond :data:`READ_AHEAD`, and read so it is still read to its end, as
        aioquic's engine, which holds it all, reads it. True: the STOP_SENDING is held."""
        if not state.tracked or state.recv_done or state.splicing:
            return False
        take_ready = getattr(self._native, "take_ready", None)  # None: an older build
        if take_ready is None or stream_id in self._stops_after_ready:
            return False
        try:
            take_ready(self.conn, stream_id, TAKE_READY_MAX)
        except QuicmeshError:  # its receiving half is over: nothing is held there
            return False
        self._stops_after_ready[stream_id] = code
        return True

    def _stopped(self, stream_id: int, state: _Stream, code: int) -> None:
        """The peer sent STOP_SENDING: nothing more goes out; HTTP/3 hears of it."""
        state.send_done = True
        state.fin_unacked = False
        state.unsent = 0
        self._events.append(quic_events.StopSendingReceived(error_code=code, stream_id=stream_id))
        self._prune(stream_id, state)

    def _keep_spare(self, stream_id: int) -> None:
        """Keep a stream opened ahead until it is used (lowest ID first)."""
        spares = self._spare.setdefault(bool(stream_id & 2), [])
        if stream_id not in spares:
            bisect.insort(spares, stream_id)

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Queue ``data`` (and FIN) on a stream."""
        spares = self._spare.get(bool(stream_id & 2))
        if spares and stream_id in spares:
            spares.remove(stream_id)
        state = self._stream(stream_id)
        if state.send_done:
            return  # reset or stopped: nothing more goes out
        early = self._early_log.get(stream_id) if self._early_log is not None else None
        if early is not None:
            early.append((data, end_stream))
        try:
            if data:
                self._native.write(self.conn, stream_id, data)
                state.unsent += len(data)
            if end_stream:
                self._native.finish(self.conn, stream_id)
                state.send_done = True
                state.fin_unacked = self._acks_reported
        except QuicmeshError:  # the stream or the connection ended: events follow
            # (a 0-RTT stream quinn just forgot is resent from the log instead)
            if early is None:
                state.send_done = True
        self._prune(stream_id, state)

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        """Abandon sending on a stream (RESET_STREAM); a spliced stream's splice fails
        (both sides reset)."""
        state = self._stream(stream_id)
        if state.splice_id is not None:
            with contextlib.suppress(QuicmeshError):
                self._native.splice_abort(state.splice_id, error_code)
            return
        if self._early_log is not None and stream_id in self._early_log:
            self._early_resets[stream_id] = error_code
        if not state.send_done or state.fin_unacked:
            with contextlib.suppress(QuicmeshError):
                self._native.reset(self.conn, stream_id, error_code)
        state.send_done = True
        state.fin_unacked = False
        state.unsent = 0
        self._prune(stream_id, state)

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        """Ask the peer to stop sending on a stream (STOP_SENDING)."""
        state = self._stream(stream_id)
        if state.splice_id is not None:
            return  # the splice's reset covers both directions
        if not state.recv_done:
            with contextlib.suppress(QuicmeshError):
                self._native.stop_sending(self.conn, stream_id, error_code)
        state.recv_done = True
        self._prune(stream_id, state)

    def next_event(self) -> Any:
        """The next pending event, or None."""
        while self._events:
            event = self._events.pop(0)
            if isinstance(event, quic_events.StreamDataReceived | quic_events.StreamReset):
                state = self._streams.get(event.stream_id)
                if state is not None and state.handed_over:
                    continue  # the splice took these bytes (or this reset) from the engine
                if state is not None and isinstance(event, quic_events.StreamDataReceived):
                    state.received += len(event.data)
            if isinstance(event, _Forgotten):
                if self.on_forget is not None:
                    self.on_forget(event.stream_id)
                continue
            if not isinstance(event, _ReadPaused):
                return event
            # Every event before it has been handed to the session now.
            state = self._streams.get(event.stream_id)
            paused = state.paused if state is not None else None
            if paused is not None and not paused.done():
                paused.set_result(None)
        return None

    # -- splicing ---------------------------------------------------------------------

    def can_splice(self, stream_id: int) -> bool:
        """Whether a request stream can be spliced now: open, not being spliced, and
        no 0-RTT flight unsettled on the connection."""
        state = self._streams.get(stream_id)
        return (
            state is not None
            and hasattr(self._native, "splice")  # not an extension built before splicing
            and not state.splicing
            and not state.send_done
            and self.conn >= 0
            and self._closed_reason is None
            and self._early_log is None
            and not self._early
            and not stream_id & 2
        )

    def hand_over_reading(self, stream_id: int) -> bool:
        """Give the stream's reading to the splice that :meth:`splice_stream` starts next,
        without :meth:`pause_reading`'s round trip through the engine: the engine keeps what
        it gave since Python's last read request, and the splice adds the part the session
        had not taken in (by :attr:`_Stream.received`). False where that cannot be done
        (an extension built before it, or the engine's reader already ended): pause then.
        A stream whose end the session has seen needs neither (True)."""
        state = self._stream(stream_id)
        hand_over = getattr(self._native, "hand_over_read", None)
        if hand_over is None or self._closed_reason is not None or state.splicing:
            return False
        if state.recv_done:
            state.splicing = True
            return True
        if not hand_over(self.conn, stream_id):
            return False
        state.splicing = state.handed_over = True
        state.reading = False
        return True

    async def pause_reading(self, stream_id: int) -> None:
        """Stop reading the stream; return once every byte the engine gave for it has
        been handed to the session (the driver processed the events before the mark)."""
        state = self._stream(stream_id)
        state.splicing = True
        if self._closed_reason is not None:
            return
        state.paused = asyncio.get_running_loop().create_future()
        self._native.pause_read(self.conn, stream_id)
        try:
            await state.paused
        finally:
            state.paused = None

    def can_connect_tcp(self) -> bool:
        """Whether the extension connects TCP sockets for splices itself
        (:meth:`connect_tcp`; not one built before it did)."""
        return hasattr(self._native, "tcp_connect")

    async def connect_tcp(self, host: str, port: int, timeout: float) -> NativeTcpSocket | None:
        """Connect a TCP socket to ``host:port`` on the engine's thread, for
        :meth:`splice_stream`: the socket stays there (no descriptor crosses to Python
        and back). None when ``host`` is not an IP address (the caller resolves and
        connects itself).

        :raises OSError: the connect failed (:class:`TimeoutError` once ``timeout``
            seconds passed).
        """
        native = self._native
        try:
            token: int = native.tcp_connect(host, port, timeout=timeout)
        except ConfigError:  # a name, not an address
            return None
        except QuicmeshError as exc:  # no socket to be had (out of descriptors)
            raise OSError(str(exc)) from None
        connecting = self._pump.loop.create_future()
        self._pump.tcp_connects[token] = connecting
        try:
            code, message = await connecting
        except asyncio.CancelledError:
            native.tcp_abort(token)
            raise
        finally:
            self._pump.tcp_connects.pop(token, None)
        if code:
            raise _connect_error(code, message)
        return NativeTcpSocket(token, native)

    async def splice_stream(
        self,
        stream_id: int,
        sock: socket.socket | NativeTcpSocket,
        *,
        to_tcp: bytes,
        to_quic: bytes,
        frame_type: int | None,
        frame_remaining: int,
        unparsed: bytes,
        recv_fin: bool,
        idle_timeout: float | None = None,
    ) -> tuple[int, int, str]:
        """Let the engine copy between the (paused) stream and ``sock`` (taken over)
        until both end (or no byte moved for ``idle_timeout`` seconds: a failure):
        returns the payload bytes sent and received, and the failure that reset both
        sides ("" if none)."""
        state = self._stream(stream_id)
        if self._closed_reason is not None:
            sock.close()
            raise ConnectionLost(f"QUIC connection closed: {self._closed_reason}")
        if isinstance(sock, NativeTcpSocket):
            token, engine_socket = sock.take(), True
        else:
            token, engine_socket = _hand_socket(sock), False
        splice_id: int = self._native.splice(
            self.conn,
            stream_id,
            token,
            engine_socket=engine_socket,
            to_tcp=to_tcp,
            to_quic=to_quic,
            unparsed=unparsed,
            frame_type=frame_type,
            frame_remaining=frame_remaining,
            recv_fin=recv_fin,
            idle_timeout=idle_timeout,
            **({"received": state.received} if state.handed_over else {}),
        )
        sent, received, error, _ = await self._spliced(stream_id, state, splice_id)
        return sent, received, error

    def can_connect_splice(self) -> bool:
        """Whether the extension connects, answers and splices in one command
        (:meth:`connect_splice`; not one built before it did)."""
        return hasattr(self._native, "connect_splice")

    async def connect_splice(
        self,
        stream_id: int,
        host: str,
        port: int,
        timeout: float,
        *,
        answer: bytes,
        to_tcp: bytes,
        frame_type: int | None,
        frame_remaining: int,
        unparsed: bytes,
        recv_fin: bool,
        idle_timeout: float | None = None,
    ) -> tuple[int, int, str, bool]:
        """(server) Have the engine connect ``host:port`` (an IP address), send ``answer``
        (the CONNECT's 200 HEADERS frame) once connected and splice the (handed over)
        stream onto the connection: :meth:`connect_tcp` and :meth:`splice_stream` in one
        command, with no wake-up of Python between them. Returns as
        :meth:`splice_stream`, and whether the destination was connected (False: the
        flow was aborted while it connected).

        :raises OSError: the connect failed (:class:`TimeoutError` once ``timeout``
            seconds passed): nothing was sent on the stream, its reading was stopped, and
            its sending side is the caller's again (to refuse the CONNECT).
        """
        state = self._stream(stream_id)
        if self._closed_reason is not None:
            raise ConnectionLost(f"QUIC connection closed: {self._closed_reason}")
        splice_id = self._command_connect_splice(
            stream_id,
            state,
            host,
            port,
            timeout,
            answer=answer,
            to_tcp=to_tcp,
            unparsed=unparsed,
            frame_type=frame_type,
            frame_remaining=frame_remaining,
            recv_fin=recv_fin,
            idle_timeout=idle_timeout,
        )
        return await self._spliced(stream_id, state, splice_id)

    def _command_connect_splice(
        self,
        stream_id: int,
        state: _Stream,
        host: str,
        port: int,
        timeout: float,
        *,
        answer: bytes,
        to_tcp: bytes,
        unparsed: bytes,
        frame_type: int | None,
        frame_remaining: int,
        recv_fin: bool,
        idle_timeout: float | None,
    ) -> int:
        """The engine's ``connect_splice`` command for the (handed over) stream: the
        splice's ID.

        :raises OSError: no socket to be had (the engine stops the reading it was handed).
        """
        try:
            splice_id: int = self._native.connect_splice(
                self.conn,
                stream_id,
                host,
                port,
                timeout=timeout,
                answer=answer,
                to_tcp=to_tcp,
                unparsed=unparsed,
                frame_type=frame_type,
                frame_remaining=frame_remaining,
                recv_fin=recv_fin,
                idle_timeout=idle_timeout,
                **({"received": state.received} if state.handed_over else {}),
            )
        except ConnectError as exc:  # no socket to be had (out of descriptors)
            state.recv_done = True  # the engine stops the reading it was handed
            raise OSError(str(exc)) from None
        return splice_id

    def has_spare_request_stream(self) -> bool:
        """Whether a bidirectional stream was opened ahead and is not used yet."""
        return bool(self._spare.get(False))

    def start_flow(
        self,
        acceptor: Any,
        flow: int,
        *,
        request: bytes,
        answer: bytes,
        timeout: float,
        idle_timeout: float | None = None,
    ) -> bool:
        """Start the connection ``acceptor`` (a ``_native.FlowAcceptor``) accepted as
        ``flow`` as an engine flow on this connection (:mod:`.native_flows`): False when
        the peer's stream limit allows no stream now or the connection is gone (the
        socket stays parked)."""
        if self._closed_reason is not None:
            return False
        try:
            return bool(
                self._native.start_flow(
                    acceptor,
                    flow,
                    self.conn,
                    request=request,
                    answer=answer,
                    timeout=timeout,
                    idle_timeout=idle_timeout,
                )
            )
        except ConnectionLost:
            return False

    def start_connect_splice(
        self,
        stream_id: int,
        host: str,
        port: int,
        timeout: float,
        *,
        answer: bytes,
        unparsed: bytes,
        recv_fin: bool,
        done: Callable[[tuple[int, int, str, bool] | OSError], None],
        idle_timeout: float | None = None,
    ) -> int:
        """(server) :meth:`connect_splice` of a stream the session never saw, without a
        task: ``unparsed`` is what followed the request's HEADERS frame in the data
        delivered so far. ``done`` gets the outcome (as :meth:`connect_splice` returns
        or raises it). Returns the splice's ID.

        :raises OSError: nothing was started (the stream cannot be spliced now, or no
            socket was to be had); the stream's sending side is the caller's.
        """
        if not self.hand_over_reading(stream_id):
            raise OSError(errno.EAGAIN, "the stream's reading could not be handed over")
        state = self._stream(stream_id)
        try:
            splice_id = self._command_connect_splice(
                stream_id,
                state,
                host,
                port,
                timeout,
                answer=answer,
                to_tcp=b"",
                unparsed=unparsed,
                frame_type=None,
                frame_remaining=0,
                recv_fin=recv_fin,
                idle_timeout=idle_timeout,
            )
        except QuicmeshError as exc:  # the connection went (its close event follows)
            state.recv_done = True
            raise OSError(errno.ECONNABORTED, str(exc)) from None

        def finished(waiter: asyncio.Future[tuple[int, int, str, bool] | OSError]) -> None:
            outcome = waiter.result()
            self._splice_over(stream_id, state, unconnected=isinstance(outcome, OSError))
            done(outcome)

        self._splice_waiter(state, splice_id).add_done_callback(finished)
        return splice_id

    def _splice_waiter(
        self, state: _Stream, splice_id: int
    ) -> asyncio.Future[tuple[int, int, str, bool] | OSError]:
        """Where the outcome of the stream's splice ``splice_id`` arrives."""
        state.splice_id = splice_id
        waiter: asyncio.Future[tuple[int, int, str, bool] | OSError] = (
            self._pump.loop.create_future()
        )
        self._pump.splices[splice_id] = waiter
        return waiter

    def _splice_over(self, stream_id: int, state: _Stream, *, unconnected: bool) -> None:
        """The stream's splice ended: the stream is over (its sending side too, unless a
        connect that failed left it to the caller)."""
        state.splice_id = None
        state.recv_done = True
        state.tracked = False
        self._set_buffered(state, 0)
        if not unconnected:
            state.send_done = True
            state.unsent = 0
        self._prune(stream_id, state)

    async def _spliced(
        self, stream_id: int, state: _Stream, splice_id: int
    ) -> tuple[int, int, str, bool]:
        """Wait for the outcome of the stream's splice ``splice_id`` (aborted if the
        caller is cancelled); the stream is over then. A :meth:`connect_splice` that could
        not connect raises OSError and leaves the stream's sending side open."""
        waiter = self._splice_waiter(state, splice_id)
        unconnected = False
        try:
            outcome = await asyncio.shield(waiter)
            if isinstance(outcome, OSError):
                unconnected = True
                raise outcome
        except asyncio.CancelledError:
            if waiter.done() and isinstance(waiter.result(), OSError):
                # The connect had failed, nothing was sent: the sending half is still
                # ours, and the caller's abort resets it.
                unconnected = True
            else:
                with contextlib.suppress(QuicmeshError):
                    self._native.splice_abort(splice_id, H3_REQUEST_CANCELLED_CODE)
            raise
        finally:
            self._splice_over(stream_id, state, unconnected=unconnected)
        return outcome

    def close(
        self, error_code: int = 0, frame_type: int | None = None, reason_phrase: str = ""
    ) -> None:
        """Close the connection with an application CONNECTION_CLOSE (quinn sends
        transport closes itself)."""
        if self.conn < 0:
            # Not reported yet: the endpoint gives it up (or closes it when it is reported:
            # the pump forgets the token).
            if self.token is not None:
                self._pump.connecting.pop(self.token, None)
                abort = getattr(self._native, "abort_connect", None)  # None: an older build
                if abort is not None:
                    abort(self.token)
            self.terminated("locally_closed", reason_phrase or "closed before the handshake")
            return
        if self._closed_reason is not None:
            return
        if self._local_close is None:
            self._local_close = (error_code, reason_phrase)
        with contextlib.suppress(QuicmeshError):
            self._native.close_connection(self.conn, error_code, reason_phrase)

    @property
    def closed_by_us(self) -> bool:
        """Whether this side closed the connection (:meth:`close`), not the peer or quinn
        (as the aioquic engine's connection says)."""
        return self._local_close is not None

    def send_ping(self, uid: int) -> None:
        """Have quinn send an ack-eliciting packet now (the driver's probe after an
        ICMP unreachable; quinn sends keepalive PINGs itself, ``keep_alive``). quinn
        0.11 has no PING command: the extension's ``ping`` makes it send MAX_DATA."""
        ping = getattr(self._native, "ping", None)  # None: an extension built before it
        if ping is None or self.conn < 0 or self._closed_reason is not None:
            return
        with contextlib.suppress(QuicmeshError):  # gone: its close event follows
            ping(self.conn)

    # -- read-driven credit and sender state --

    def track_stream(self, stream_id: int) -> None:
        """Read the stream only while its unread payload is below the stream window."""
        state = self._stream(stream_id)
        state.tracked = True
        self._read(stream_id, state)

    def _set_buffered(self, state: _Stream, buffered: int) -> None:
        """The stream's unread payload is now ``buffered``; streams waiting for room in the
        connection's window read again once there is some."""
        self._buffered_total += buffered - state.buffered
        state.buffered = buffered
        while self._starved and self._buffered_total < self._connection_window:
            stream_id = next(iter(self._starved))
            del self._starved[stream_id]
            waiting = self._streams.get(stream_id)
            if waiting is not None:
                self._read(stream_id, waiting)

    def stream_delivered(self, stream_id: int, stream_bytes: int, payload_bytes: int) -> None:
        """Count the payload now waiting for the application; read on if there is room."""
        state = self._streams.get(stream_id)
        if state is None or not state.tracked:
            return
        self._set_buffered(state, state.buffered + payload_bytes)
        self._read(stream_id, state)

    def stream_consumed(self, stream_id: int, payload_bytes: int) -> bool:
        """The application read ``payload_bytes``: ask quinn for more if that made room."""
        state = self._streams.get(stream_id)
        if state is None or not state.tracked:
            return False
        self._set_buffered(state, max(0, state.buffered - payload_bytes))
        return self._read(stream_id, state)

    def forget_stream(self, stream_id: int) -> None:
        """The stream is finished: its unread payload holds nothing back."""
        state = self._streams.get(stream_id)
        if state is not None:
            state.tracked = False
            self._set_buffered(state, 0)
            self._read(stream_id, state)

    def stream_unsent_bytes(self, stream_id: int) -> int:
        """Bytes written that quinn has not taken (within the peer's credit) yet; for a
        spliced stream, every byte its splice holds (both ways: read from the socket and
        not taken by quinn, received and not written to the socket), which Python's
        buffers would hold without the splice (what ``max_buffered_per_connection``
        measures)."""
        state = self._streams.get(stream_id)
        if state is None:
            return 0
        if state.splice_id is not None:
            with contextlib.suppress(QuicmeshError, AttributeError):
                return int(self._native.splice_buffered(state.splice_id))
            return 0
        return state.unsent

    def stream_spliced_bytes(self, stream_id: int) -> tuple[int, int] | None:
        """(to the stream, from it) the stream's splice moved so far; None when it has
        none running."""
        state = self._streams.get(stream_id)
        if state is None or state.splice_id is None:
            return None
        with contextlib.suppress(QuicmeshError, AttributeError):
            moved = self._native.splice_moved(state.splice_id)
            return None if moved is None else (int(moved[0]), int(moved[1]))
        return None

    def stream_is_open(self, stream_id: int) -> bool:
        """Whether either direction of the stream can still carry something."""
        state = self._streams.get(stream_id)
        if self._closed_reason is not None:
            return False
        return state is not None and not (state.send_done and state.recv_done)

    def has_request_streams(self) -> bool:
        """Whether a bidirectional stream is still open."""
        return any(
            not stream_id & 2 and (not (state.send_done and state.recv_done) or state.fin_unacked)
            for stream_id, state in self._streams.items()
        )

    def can_open_bidi_stream(self) -> bool:
        """Whether a bidirectional stream can be opened now; if not, the engine asks
        quinn to open one as soon as the peer allows it, and wakes the driver then."""
        if self._closed_reason is not None or self.conn < 0:
            return False
        try:
            if self._spare.get(False) or self._try_open(bidirectional=True) is not None:
                return True
        except QuicmeshError:  # the connection is gone: its close event follows
            return False
        if not self._opening:
            with contextlib.suppress(QuicmeshError):
                self._native.open_stream(self.conn, bidirectional=True)
                self._opening = True
        return False

    # -- TLS and tickets --

    def peer_certificate(self) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
        """The peer's certificate and chain, as rustls verified them (a resumed
        session restores the ones verified when its ticket was issued)."""
        if self._certificates is None or self._certificates[0] is None:
            self._load_certificates()
        return self._certificates or (None, [])

    def _load_certificates(self) -> bool:
        """Read the peer's chain from the engine; False if the connection is gone."""
        try:
            der = self._native.peer_certificates(self.conn)
        except QuicmeshError:  # gone: nothing to show
            return False
        chain = [x509.load_der_x509_certificate(item) for item in der]
        self._certificates = (chain[0], chain[1:]) if chain else (None, [])
        return True

    def resend_early_data(self, now: float) -> int:
        """0-RTT was rejected: the engine already re-opened the streams of the flight
        and wrote their bytes again (before ``HandshakeCompleted``); how many streams."""
        return self._resent

    # -- closing, liveness, paths --

    def closing_reason(self) -> str | None:
        """Why the connection ended, once the engine reported it."""
        return self._closed_reason

    def is_draining(self) -> bool:
        """quinn keeps the draining state to itself."""
        return False

    def sample_liveness(self, now: float) -> bool:
        """Read quinn's counters: whether a datagram arrived since the last sample
        (see :class:`_LivenessSample` for what the other answers are made of)."""
        try:
            stats = self._native.stats(self.conn) if self.conn >= 0 else None
        except QuicmeshError:  # gone: its close event follows
            stats = None
        if stats is None:
            return False
        return self._liveness.update(now, stats)

    def probe_timeouts(self) -> int:
        """Probe timeouts as quinn would have counted them by the last sample
        (quinn does not expose its count: estimated, see :class:`_LivenessSample`)."""
        return self._liveness.probe_timeouts

    def awaiting_ack(self) -> bool:
        """Whether ack-eliciting frames went out after the peer was last heard
        from (at the last sample)."""
        return self._liveness.awaiting

    def active_path(self) -> tuple[Any, bool] | None:
        """The peer's address (quinn validates paths before using them); a server's as of
        the last path sample (``PathWatch``, every 50 ms: it moves with the path events);
        once closed, the last one known (as aioquic's)."""
        if self.conn < 0:
            return None
        if self._remote is not None:
            return self._remote, True
        if self._closed_reason is not None:
            return None
        try:
            host, port = self._native.remote_address(self.conn)
        except QuicmeshError:  # gone
            return None
        self._remote = (str(host), int(port))
        return self._remote, True

    def spare_connection_ids(self) -> int:
        """Not exposed by quinn (it picks the next connection ID when it migrates)."""
        return 0

    def change_connection_id(self) -> None:
        """Nothing: quinn changes the connection ID on a new path itself."""

    def attach_stream_rate(self, bucket: Any) -> None:
        """(server) Serve the peer's new bidirectional streams no faster than
        ``bucket`` (a :class:`~quicmesh.transport._stream_rate.StreamRate`) allows.

        quinn grants new-stream credit (MAX_STREAMS) itself as streams end, so the
        credit is withheld by proxy: a stream beyond the rate is held, unread and
        unknown to HTTP/3, until a token comes (a timer). A held stream keeps its
        slot of ``max_streams``, so a peer with every slot held gets no new credit
        and waits, as with the aioquic engine; nothing is refused. The first
        ``max_streams`` streams of a connection take no token (as aioquic's first
        credit).

        The engine reads a new stream at once only with a *read permit*: the first
        ``max_streams``, then tokens taken ahead (:data:`READ_PERMITS_AHEAD` at most);
        a stream that came without one is left unread for this side to admit or hold.
        (A first read made regardless found a churner's reset when the engine came to
        the stream after it, under load, and quinn freed the slot it was to be held
        in: 1.5 to 6 times the rate got through.)"""
        self._rate = bucket
        # (An extension built before read permits reads every stream at once, or none:
        # the first ``max_streams`` are then counted here, as before.)
        if not self._is_client and hasattr(self._native, "grant_read_permits"):
            bucket.hold_tokens_for(self)
            self._free_permits, self._free_streams = self._free_streams, 0
            self._grant_read_permits(self._free_permits)

    def drop_tokens_held(self) -> None:
        """(server) The peer identity's rate was lowered: the engine's read permits,
        tokens taken at the old rate, are taken back, so the new rate applies from the
        next stream on (those of the first ``max_streams``, which take no token, are
        given again)."""
        try:
            left = self._native.revoke_read_permits(self.conn)
        except QuicmeshError:
            return
        self._read_permits = 0
        self._grant_read_permits(min(left, self._free_permits))

    def _grant_read_permits(self, count: int) -> None:
        if count > 0:
            self._read_permits += count
            with contextlib.suppress(QuicmeshError):
                self._native.grant_read_permits(self.conn, count)

    def _top_up_read_permits(self) -> None:
        """Take tokens ahead for the engine's read permits, while none is waiting."""
        rate = self._rate
        if rate is None or self._held or self._read_permits >= READ_PERMITS_AHEAD:
            return
        self._grant_read_permits(
            rate.take(READ_PERMITS_AHEAD - self._read_permits, time.monotonic())
        )

    def _stream_admitted(self, stream_id: int, read_started: bool, permit_used: bool) -> bool:
        """Whether the peer's new bidirectional stream is served now; if not, it is
        held until its token comes (:meth:`attach_stream_rate`). One the engine read
        at once took a read permit (a token taken ahead, or one of the first
        ``max_streams``), or came before the rate applied (the engine read it before
        this side attached the rate, just after the handshake): that one takes a token
        if there is one, and is served in any case (its slot may be gone)."""
        if self._is_client or self._rate is None:
            return True
        if permit_used:  # (counted against the free ones first)
            self._read_permits = max(0, self._read_permits - 1)
            self._free_permits = max(0, self._free_permits - 1)
        elif read_started:
            self._rate.take(1, time.monotonic())
        elif self._free_streams > 0:
            self._free_streams -= 1
        elif self._held or self._rate.take(1, time.monotonic()) == 0:
            self._held.append(stream_id)
            self._arm_release()
            return False
        self._top_up_read_permits()
        return True

    def _arm_release(self) -> None:
        if self._release is not None or self._rate is None:
            return
        delay = max(0.001, (1.0 - self._rate.tokens) / self._rate.rate)
        self._release = self._pump.loop.call_later(delay, self._release_held)

    def _release_held(self) -> None:
        """Serve the held streams the bucket has tokens for now; wait for the rest."""
        self._release = None
        if self._rate is None or self._closed_reason is not None:
            return
        now = time.monotonic()
        while self._held and self._rate.take(1, now) == 1:
            stream_id = self._held.popleft()
            state = self._new_stream(stream_id)
            self._read(stream_id, state)  # (a held stream was never read)
            code = self._held_stops.pop(stream_id, None)
            if code is not None:  # stopped while held: told now
                self._stopped(stream_id, state, code)
        if self._held:
            self._arm_release()
        else:
            self._top_up_read_permits()

    def _read_stats(self) -> dict[str, Any]:
        if self.conn >= 0 and self._closed_reason is None:
            with contextlib.suppress(QuicmeshError):  # gone: the last figures stay
                self._last_stats = dict(self._native.stats(self.conn))
        return self._last_stats

    def stats(self) -> dict[str, Any]:
        """:data:`~.engine.ENGINE_STATS` and the UDP counters of the connection (once it
        ended, the last figures read)."""
        native = self._read_stats()
        return {
            "rtt": native.get("rtt"),
            "rtt_min": native.get("min_rtt"),
            "cwnd": native.get("cwnd"),
            "bytes_in_flight": None,
            "congestion_control": self._pump.congestion,
            "packets_lost": int(native.get("lost_packets", 0)),
            "zero_rtt_packets_sent": 0,
            "bytes_sent": int(native.get("bytes_sent", 0)),
            "bytes_received": int(native.get("bytes_received", 0)),
            "packets_sent": int(native.get("datagrams_sent", 0)),
            "packets_received": int(native.get("datagrams_received", 0)),
            "send_calls": int(native.get("send_calls", 0)),
            "receive_calls": int(native.get("receive_calls", 0)),
            "mtu": native.get("mtu"),
            "mtu_probes_sent": int(native.get("mtu_probes_sent", 0)),
            "acks_sent": int(native.get("acks_sent", 0)),
            "acks_received": int(native.get("acks_received", 0)),
            "ack_frequency_sent": int(native.get("ack_frequency_sent", 0)),
            "ack_frequency_received": int(native.get("ack_frequency_received", 0)),
        }

    # -- SocketConnection --

    def flush(self) -> None:
        """Nothing to do here: the commands given reach the engine when the pump flushes
        them, at the end of the event batch being handled or of the loop's turn
        (:attr:`_Pump.commands`; flushing at each transmit would wake the engine's thread
        once per flow step again)."""

    async def migrate(self, local_address: Address | None) -> Address:
        """(client) Move the client endpoint to a new UDP socket; quinn uses a new
        connection ID there, sends a PING at once, and the server validates the path.
        The old socket is still read for :data:`~.options.OLD_SOCKET_GRACE` seconds
        (what the server sent there before it noticed the move: native/src/rebind.rs).
        Every connection of the endpoint moves (one socket per transport and event loop):
        refused while one of them is in its handshake, which a move would break (RFC
        9000 section 9; quinn sends its handshake packets from the new port, which the
        server takes for another client)."""
        if self._pump.connecting or any(c.early for c in self._pump.connections.values()):
            raise EngineError(
                "cannot migrate while another connection of this endpoint (moved with it) "
                "is in its handshake"
            )
        host = local_address[0] if local_address is not None else self.local_address()[0]
        port = local_address[1] if local_address is not None else 0
        try:
            new_host, new_port = self._native.rebind(host, port, OLD_SOCKET_GRACE)
        except QuicmeshError as exc:  # the extension raises ConfigError/ConnectError
            raise EngineError(f"cannot open a UDP socket on {host}:{port}: {exc}") from None
        return str(new_host), int(new_port)

    def local_address(self) -> Address:
        """The local address of the endpoint's socket."""
        host, port = self._native.local_address()
        return str(host), int(port)


class NativeListener:
    """(server) One native endpoint accepting connections (:class:`~.engine.EngineListener`)."""

    def __init__(self, pump: _Pump, wake: Callable[[], None]) -> None:
        self._pump = pump
        self._accepted: list[NativeConnection] = []
        self._refused: list[str] = []
        self._counted: Counter[str] = Counter()
        self._refusals = RateLimitedLog(logger)
        self._wake = wake
        self._closed_address: Address = ("", 0)
        pump.on_accepted = self._on_accepted
        pump.on_accept_failed = self._on_accept_failed
        pump.on_admission = self._on_admission

    def _on_accepted(self, connection: NativeConnection) -> None:
        self._accepted.append(connection)
        self._wake()

    def _on_accept_failed(self, kind: str, message: str, source: str = "") -> None:
        # Rate-limited: anyone who can send a datagram can fail a handshake at will.
        log_accept_failure(kind, message, source)
        self._refused.append(accept_failure_text(kind, message))
        self._wake()

    def _on_admission(self, counter: str, source: str) -> None:
        """The endpoint's admission dropped, refused, retried or timed out a new
        connection from ``source`` (as the aioquic listener, logged at most once per
        interval per kind)."""
        self._counted[counter] += 1
        if counter == "initials_refused_half_open":
            self._refusals.log(
                logging.WARNING,
                "half-open",
                "dropped an Initial from %s: too many connections half-open",
                source,
            )
        elif counter == "handshakes_timed_out":
            self._refusals.log(
                logging.INFO,
                "handshake-timeout",
                "dropped a connection from %s whose handshake took too long",
                source,
            )
        self._wake()

    def refused(self) -> list[str]:
        """Why each handshake refused since the last call failed."""
        refused, self._refused = self._refused, []
        return refused

    @property
    def half_open(self) -> int:
        """Connections accepted whose handshake has not completed."""
        return int(self._pump.endpoint.half_open())

    def counted(self) -> dict[str, int]:
        """Admission counters added since the last call."""
        counted, self._counted = dict(self._counted), Counter()
        return counted

    @property
    def address(self) -> Address:
        """The bound address."""
        host, port = self._pump.endpoint.local_address()
        return str(host), int(port)

    def accepted(self) -> Iterable[SocketConnection]:
        """Connections accepted since the last call (their first events wait)."""
        accepted, self._accepted = self._accepted, []
        return accepted

    def set_identity(self, tls: EngineTls) -> None:
        """Present ``tls.identity`` and trust ``tls.trust`` from the next handshake on
        (quinn's new server configuration); connections already made carry on."""
        if self._pump.closed:
            return
        try:
            self._pump.endpoint.set_identity(
                tls.identity.cert_chain_pem(), tls.identity.private_key_pem(), tls.trust.pem
            )
        except ConfigError as exc:
            raise EngineError(str(exc)) from None

    def close(self) -> None:
        """Close every connection (CONNECTION_CLOSE) and the socket."""
        if not self._pump.closed:
            self._closed_address = self.address
        self._pump.close()

    async def wait_released(self) -> None:
        """(after :meth:`close`) Return once quinn let go of the socket: its closed
        connections drain first (three probe timeouts, RFC 9000 section 10.2), at most
        :data:`RELEASE_TIMEOUT` seconds."""
        loop = asyncio.get_running_loop()
        released = await loop.run_in_executor(
            None, self._pump.endpoint.wait_released, RELEASE_TIMEOUT
        )
        if not released:
            logger.warning(
                "the QUIC socket on %s:%d was still held %.0f s after it was closed",
                *self._closed_address,
                RELEASE_TIMEOUT,
            )


class NativeEngine:
    """The native engine: quinn 0.11 + rustls in Rust (see the module docstring)."""

    name = "native"
    io: Literal["datagrams", "socket"] = "socket"

    def __init__(self) -> None:
        _extension()
        self._clients: dict[Any, _Pump] = {}
        self._retiring: weakref.WeakSet[_Pump] = weakref.WeakSet()
        """Client endpoints of rotated-out identities, closed once their connections end
        (held by those connections only: a closed one goes with them)."""
        self._server_identities: dict[Address, str] = {}
        """(client) The identity each server address was last verified as (what a
        resumed 0-RTT connection serves under until the server answers)."""

    def congestion_controls(self) -> list[str]:
        """``bbr``, ``cubic`` and ``reno`` (quinn's ``newreno``)."""
        return ["bbr", "cubic", "reno"]

    def server_identity(self, address: Address) -> str | None:
        """(client) The identity the server at ``address`` had at its last full handshake."""
        return self._server_identities.get(address)

    def _client_pump(self, limits: EngineLimits, tls: EngineTls, address: Address) -> _Pump:
        """The client endpoint for this loop, identity and settings (one UDP socket)."""
        loop = asyncio.get_running_loop()
        local = ("::", 0) if ":" in address[0] else ("0.0.0.0", 0)
        key = (id(loop), id(tls.identity), id(tls.trust), limits, local[0])
        pump = self._clients.get(key)
        if pump is None or pump.closed or pump.loop is not loop:
            endpoint = _endpoint(limits, tls, local, server=False, early_data=True)
            pump = _Pump(endpoint, loop, limits)
            pump.tls = tls
            self._clients = {k: p for k, p in self._clients.items() if not p.loop.is_closed()}
            for other_key, other in list(self._clients.items()):
                if other_key[0] == key[0] and other_key[3:] == key[3:]:
                    # The same loop and settings under another identity or trust: a
                    # rotated-out certificate, whose connections finish on it.
                    del self._clients[other_key]
                    self._retiring.add(other)
                    other.retire()
            self._clients[key] = pump
        return pump

    def connect(
        self,
        limits: EngineLimits,
        tls: EngineTls,
        address: Address,
        *,
        wake: Callable[[], None] | None = None,
        resume: bool = True,
    ) -> NativeConnection:
        """A client connection to ``address``, its first flight already on its way
        (0-RTT when the endpoint holds a ticket for that address: :attr:`NativeConnection.early`).

        :param resume: False: a full handshake (the server's certificate verified
            again) even with a ticket; the tickets the server sends are kept.

        :raises ConfigError: bad identity or settings.
        :raises EngineError: the connection cannot be started, or this host has no route
            to ``address``.
        """
        _check_route(address)
        pump = self._client_pump(limits, tls, address)
        connection = NativeConnection(pump, is_client=True)
        if wake is not None:
            connection.set_wake(wake)
        connection.on_verified = lambda identity: self._server_identities.__setitem__(
            address, identity
        )
        try:
            token = pump.endpoint.connect(
                address[0], address[1], server_name=ticket_server_name(address), resume=resume
            )
        except QuicmeshError as exc:  # ConfigError / ConnectError from the extension
            raise EngineError(f"cannot connect to {address[0]}:{address[1]}: {exc}") from None
        connection.token = token
        connection.ticket_identity = self._server_identities.get(address) if resume else None
        pump.connecting[token] = connection
        # A resumed connection is reported at once ("connected", early): take it now. The
        # drain takes the other connections' events too (and the endpoint's wake-up): they
        # are woken for them once this caller is done, as the pump would have.
        for other in pump.route_waiting():
            if other is not connection:
                pump.loop.call_soon(pump.run_contained, other, other.woke)
        if connection.early:
            pump.release_held_after_this_turn()
        return connection

    def close(self) -> None:
        """Let go of the client endpoints: each closes (with its UDP socket) now if it
        carries no connection, else once its last connection ends, so that connections
        still open are closed through their own objects, as on every transport (closing
        the endpoint at once reset them)."""
        pumps, self._clients = [*self._clients.values(), *self._retiring], {}
        self._retiring = weakref.WeakSet()
        for pump in pumps:
            if pump.closed:
                continue
            if pump.loop.is_closed():
                pump.endpoint.close()
                pump.closed = True
            else:
                self._retiring.add(pump)
                pump.retire()

    def accept(self, *args: Any, **kwargs: Any) -> Any:
        """Not for a socket engine: quinn accepts connections itself (:meth:`listen`)."""
        raise NotImplementedError("the native engine owns its sockets: use listen()")

    def listen(
        self,
        limits: EngineLimits,
        tls: EngineTls,
        address: Address,
        *,
        wake: Callable[[], None],
    ) -> NativeListener:
        """Listen on ``address`` (0-RTT with single-use tickets when
        ``tls.accept_early_data``).

        :raises EngineError: the socket cannot be bound, or a bad identity.
        """
        try:
            endpoint = _endpoint(
                limits,
                tls,
                address,
                server=True,
                early_data=tls.accept_early_data,
            )
        except ConfigError as exc:
            raise EngineError(str(exc)) from None
        return NativeListener(_Pump(endpoint, asyncio.get_running_loop(), limits), wake)
