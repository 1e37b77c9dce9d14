"""Outbound flows the native engine runs from accept to end (native/src/outbound.rs).

A sidecar's outbound listener spends most of a new flow's Python time on work that
is the same for every flow: accept, open a stream, send the CONNECT, wait for the
200, hand both ends to the engine's splice. With a :class:`FlowAcceptor` the
engine accepts the listener's connections itself and tells Python of each in its
event batches; Python picks the flow's connection (the cluster's load balancer,
circuit breakers and pool, synchronously) and starts it with
:meth:`QuicPeerConnection.start_engine_flow
<quicmesh.transport.quic.connection.QuicPeerConnection.start_engine_flow>`. The
engine then opens the stream, sends the CONNECT Python encoded (static QPACK
table only, so valid on any connection), and splices once the answer is byte for
byte the plain 200; Python hears of the flow again at its end, with its byte
counts.

A flow that cannot go that way goes back to Python untouched: no connection ready
at once (Python starts nothing and :meth:`FlowAcceptor.release` gives it the
socket), or an answer that is not the plain 200, a reset, a lost connection or no
answer in time (``flow_unanswered``: the stream was cancelled, nothing was read from
the socket). A refusal comes with its HEADERS frame, decoded here (static table
only, as every answer to a quicmesh client is: :func:`read_static_response`) into
the :class:`~quicmesh.errors.StreamRefused` the usual way would have raised, so that
the peer is asked once per flow; for anything else Python opens the flow again its
own way, which decodes the answer and applies the cluster's retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from ..._aioquic import read_static_response
from ...errors import QuicmeshError, StreamRefused
from ...logs import RateLimitedLog
from ..base import EngineAcceptor, FlowEvents
from .native_engine import _extension, _hand_socket, _remove_reader, native_available

logger = logging.getLogger(__name__)

_ACCEPT_PAUSES = RateLimitedLog(logger, interval=1.0)
"""The engine's accept loop out of descriptors (it rests 0.1 s at a time): a line a second."""


def engine_flows_available() -> bool:
    """Whether the native extension can run outbound flows (one built with it)."""
    if not native_available():
        return False
    return hasattr(_extension(), "FlowAcceptor")


def _refusal(answer: bytes) -> StreamRefused | None:
    """The refusal an engine flow's answer (its first frame, or b"") carries, if it can be
    read here (a 200 with other fields is no refusal: the usual way reads it again)."""
    read = read_static_response(answer) if answer else None
    if read is None or read[0] == 200:
        return None
    return StreamRefused(*read)


class FlowAcceptor(EngineAcceptor):
    """The engine's accept loop on a listening socket (a duplicate of ``sock``; the
    caller keeps its own and closes it), reporting to ``events`` from the event loop.

    :meth:`stop` stops accepting; :meth:`close` stops watching the engine's events
    (call it once no flow runs).
    """

    def __init__(self, sock: socket.socket, events: FlowEvents) -> None:
        self.native: Any = _extension().FlowAcceptor(_hand_socket(sock.dup()))
        self._events = events
        self._loop = asyncio.get_running_loop()
        self._fd: int | None = self.native.fileno()
        self._loop.add_reader(self._fd, self._pump)

    def _pump(self) -> None:
        for event in self.native.drain():
            try:
                self._report(event)
            except Exception:  # one flow's failure must not lose the batch's others
                logger.exception("engine flow %s: its handler failed", event[1])

    def _report(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "flow_accepted":
            self._events.flow_accepted(event[1], (event[2], event[3]))
        elif kind == "flow_unanswered":
            _, flow, _, why, reason, answer = event
            refused = getattr(self._events, "flow_refused", None)
            refusal = _refusal(answer) if refused is not None else None
            if refusal is not None and refused is not None:
                refused(flow, refusal)
            else:
                self._events.flow_unanswered(flow, why, reason)
        elif kind == "spliced":
            _, _, flow, _, sent, received, error, _, _ = event
            self._events.flow_ended(flow, sent, received, error)
        elif kind == "accept_paused":  # out of descriptors or memory, as SocketServer says
            _ACCEPT_PAUSES.log(logging.ERROR, "paused", "accepting paused: %s", event[1])

    def release(self, flow: int) -> socket.socket | None:
        """The accepted connection ``flow`` as a non-blocking socket the caller owns, or
        None if it is not waiting (started, or the engine dropped it)."""
        fd = self.native.release(flow)
        if fd is None:
            return None
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        return sock

    def abort(self, flow: int, code: int) -> bool:
        """Reset a running engine flow both ways (the stream with ``code``); its end is
        reported as any other's. Whether it was still running."""
        with contextlib.suppress(QuicmeshError):
            return bool(self.native.abort(flow, code))
        return False

    def moved(self, flow: int) -> tuple[int, int] | None:
        moved = self.native.moved(flow)
        return None if moved is None else (int(moved[0]), int(moved[1]))

    def stop(self) -> None:
        """Stop accepting; accepted and running flows carry on."""
        self.native.stop()

    def close(self) -> None:
        """Stop accepting and stop watching the engine's events, once those already
        waiting were reported (a connection accepted before the stop is not lost)."""
        self.native.stop()
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        self._pump()
        _remove_reader(self._loop, fd)
