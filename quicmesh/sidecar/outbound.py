"""Outbound listeners: local TCP connections proxied through a cluster.

Each accepted connection becomes one flow: the cluster opens a tunnel stream on
a pooled peer connection and :func:`quicmesh.splice` copies bytes both ways. The
flow starts a trace: its CONNECT carries a ``traceparent`` whose trace id is the
``flow_id`` of both sidecars' access-log lines. A flow the cluster cannot open
is answered with a TCP reset, so the local client sees a failure rather than an
empty response, and is logged with its reason.
A flow opened in 0-RTT learns of a refusal only once it is spliced; it is
logged as refused all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._timeouts import wait_within
from ..errors import PeerUnresponsive, QuicmeshError, StreamRefused, TunnelError
from ..splice import SpliceResult, moved_so_far, reset_socket, splice, splice_accepted
from ..transport.base import EngineAcceptor, engine_failure_text
from ..transport.stream import MeshStream
from .acceptor import SocketServer
from .accesslog import FlowRecord, Outcome
from .cluster import Cluster, Endpoint, EngineFlow, FailedOpen, FlowRefused, refusal_outcome
from .config import Address, OutboundListenerConfig, format_address
from .flows import FLUSH_TIMEOUT, FlowTracker, wait_sent
from .stats import ListenerStats
from .tracing import HEADER as TRACE_HEADER
from .tracing import TraceContext

logger = logging.getLogger("quicmesh.sidecar.outbound")

REFUSAL_WAIT = 1.0
"""Seconds a failed 0-RTT flow waits for the peer's answer, to tell a refusal from a reset."""


class OutboundListener:
    """A local TCP server: each connection is a flow through the configured cluster.

    Where the cluster's connections run on the native QUIC engine and are spliced
    (``engine: native``, ``splice: true``, the default), the engine accepts the
    listener's connections and runs each flow it can start at once from accept to
    end (:mod:`quicmesh.transport.quic.native_flows`); Python counts and logs it as
    any other. The others (no connection ready, an answer other than a plain 200,
    other transports) are carried by :func:`proxy_to_cluster`.

    :param config: the listener's configuration (replaceable on reload).
    :param clusters: looks up the current cluster by name at each new connection.
    :param stats: counters, kept across reloads.
    :param flows: the sidecar's live-flow tracker (for drains).
    :param log: called with each flow's access-log record.
    """

    def __init__(
        self,
        config: OutboundListenerConfig,
        clusters: Callable[[str], Cluster],
        stats: ListenerStats,
        flows: FlowTracker,
        log: Callable[[FlowRecord], None],
    ) -> None:
        self._config = config
        self._clusters = clusters
        self.stats = stats
        self._flows = flows
        self._log = log
        self._server: SocketServer | None = None
        self._engine: list[_EngineFlows] = []
        """The engine's accept loops (one per listening socket) while the cluster takes
        engine flows; those stopped keep reporting until their last flow ends."""

    @property
    def config(self) -> OutboundListenerConfig:
        """The listener's configuration; replace it on reload."""
        return self._config

    @config.setter
    def config(self, config: OutboundListenerConfig) -> None:
        self._config = config
        self._choose_acceptor()

    async def start(self) -> None:
        """Bind and start accepting (plain sockets: a spliced flow needs no asyncio
        transport, :mod:`.acceptor`; or the engine's accept loop, see the class).

        :raises OSError: the address cannot be bound.
        """
        host, port = self.config.address
        self._server = await SocketServer.start(host, port, self._handle)
        self._choose_acceptor()

    @property
    def engine_accepting(self) -> bool:
        """Whether the native engine accepts this listener's connections now."""
        return any(not engine.stopped for engine in self._engine)

    def _choose_acceptor(self) -> None:
        """Accept in the engine while the cluster takes engine flows, else in Python
        (checked at start and at each reload, which may change the cluster)."""
        server = self._server
        if server is None or server.closed:
            return
        try:
            wanted = self._clusters(self.config.cluster).takes_engine_flows
        except KeyError:
            wanted = False
        if wanted and not self.engine_accepting:
            acceptor_of = self._clusters(self.config.cluster).transport.engine_acceptor
            engines: list[_EngineFlows] = []
            try:
                for sock in server.sockets:
                    engines.append(_EngineFlows(self, acceptor_of, sock))
            except (QuicmeshError, OSError) as exc:
                for engine in engines:
                    engine.stop()
                logger.warning(
                    "listener %s: accepting in Python, the engine cannot: %s",
                    self.config.name,
                    exc,
                )
                return
            server.pause()
            self._engine += engines
        elif not wanted and self.engine_accepting:
            self._stop_engine()
            server.resume()

    def _stop_engine(self) -> None:
        for engine in self._engine:
            engine.stop()
        self._engine = [engine for engine in self._engine if engine.running]

    def close(self) -> None:
        """Stop accepting; flows already accepted carry on."""
        if self._server is not None:
            self._server.close()
        self._stop_engine()

    async def _handle(self, sock: socket.socket, peer: Any) -> None:
        await self._proxy(sock, peer)

    def _begin(self, peer: Any, cluster: Cluster) -> tuple[FlowRecord, float]:
        """Count a new flow from ``peer`` (a live one, until :meth:`_end`); its record
        and when it started (``time.monotonic()``)."""
        self._flows.begin()
        stats = self.stats
        stats.connections_total += 1
        stats.connections_active += 1
        record = FlowRecord(
            start=time.time(),
            duration=0.0,
            listener=self.config.name,
            direction="outbound",
            downstream=format_address((peer[0], peer[1])) if peer else "",
            target=cluster.config.target or "",
            transport=cluster.config.transport,
            peer_identity="",
            endpoint="",
            bytes_sent=0,
            bytes_received=0,
            outcome=Outcome.COMPLETED,
        )
        return record, time.monotonic()

    def _end(self, record: FlowRecord, started: float, cluster: Cluster) -> None:
        """The flow :meth:`_begin` counted ended: count its outcome and log it."""
        stats = self.stats
        stats.connections_active -= 1
        record.duration = time.monotonic() - started
        stats.flow_logged(record)
        cluster.stats.outcomes[record.outcome.value] += 1
        self._log(record)
        self._flows.end()

    async def _proxy(
        self,
        sock: socket.socket,
        peer: Any,
        counted: tuple[Cluster, FlowRecord, float] | None = None,
        trace: TraceContext | None = None,
        chosen: Endpoint | None = None,
        failed: FailedOpen | None = None,
    ) -> None:
        """Carry one accepted connection through the cluster in Python (a flow counted
        already when the engine accepted it: its cluster, record and start, trace, and
        the endpoint the load balancer chose for it, or its first attempt, failed)."""
        if counted is None:
            cluster = self._cluster_or_reset(sock)
            if cluster is None:
                return
            record, started = self._begin(peer, cluster)
        else:
            cluster, record, started = counted
        try:
            await proxy_to_cluster(
                cluster,
                sock,
                None,
                record,
                self.stats,
                trace=trace,
                chosen=chosen,
                failed=failed,
                idle_timeout=self.config.flow_idle_timeout,
            )
        except Exception as exc:
            # A fault of ours (a review met one: an exception from a pooled connection
            # the peer had refused): logged as reset, not as completed or not at all
            # (proxy_to_cluster and splice reset both sides, each where it knows who
            # owns the socket by then).
            record.outcome = Outcome.RESET
            record.reason = f"internal error: {type(exc).__name__}: {exc}"
            logger.exception("listener %s: a flow failed", self.config.name)
        finally:
            self._end(record, started, cluster)

    def _cluster_or_reset(self, sock: socket.socket | None) -> Cluster | None:
        """The listener's cluster; None, with the accepted connection reset, when a
        reload removed the cluster with the listener (a connection accepted as it went)."""
        try:
            return self._clusters(self.config.cluster)
        except KeyError:
            logger.warning(
                "listener %s: a connection was reset: cluster %s is gone",
                self.config.name,
                self.config.cluster,
            )
            if sock is not None:
                reset_socket(sock)
            return None

    def _in_python(
        self,
        engine: _EngineFlows,
        flow: int,
        running: _Running,
        chosen: Endpoint | None,
        failed: FailedOpen | None = None,
    ) -> None:
        """Carry a flow the engine accepted in Python (:func:`proxy_to_cluster`); one whose
        engine attempt failed (``failed``) only if its client is still there."""
        sock = engine.release(flow)
        record = running.record
        if sock is not None and failed is not None and _was_reset(sock):
            sock.close()
            sock = None
        if sock is None:  # the engine dropped it (closed meanwhile), or the client reset
            record.outcome = Outcome.RESET
            record.reason = "the connection was gone before it was proxied"
            self._end(record, running.started, running.cluster)
            return
        assert self._server is not None  # (it started the acceptor)
        self._server.spawn(
            self._proxy(
                sock,
                None,
                (running.cluster, record, running.started),
                running.trace,
                chosen,
                failed,
            )
        )


def _was_reset(sock: socket.socket) -> bool:
    """Whether the peer of a non-blocking connected socket reset it (nothing is read)."""
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET:
            return True
        sock.recv(1, socket.MSG_PEEK)
    except ConnectionResetError:
        return True
    except OSError:
        return False
    return False


@dataclass
class _Running:
    """An engine flow: what the listener and the cluster counted for it."""

    cluster: Cluster
    record: FlowRecord
    started: float
    trace: TraceContext
    flow: EngineFlow | None = None


class _EngineFlows:
    """One listening socket's engine accept loop and the flows it runs (the
    :class:`~quicmesh.transport.base.FlowEvents` of the listener)."""

    def __init__(self, listener: OutboundListener, acceptor_of: Any, sock: socket.socket) -> None:
        self._listener = listener
        self.running: dict[int, _Running] = {}
        self.stopped = False
        acceptor = acceptor_of(sock, self)
        if acceptor is None:
            raise QuicmeshError("the cluster's transport runs no engine flows")
        self.acceptor: EngineAcceptor = acceptor

    def stop(self) -> None:
        """Stop accepting; connections accepted meanwhile go the usual way, and the
        flows running are reported until the last one ended."""
        if not self.stopped:
            self.stopped = True
            self.acceptor.stop()
        self._close_when_idle()

    def _close_when_idle(self) -> None:
        if self.stopped and not self.running:
            self.acceptor.close()

    def flow_accepted(self, flow: int, peer: tuple[str, int]) -> None:
        listener = self._listener
        try:
            cluster = listener._clusters(listener.config.cluster)
        except KeyError:  # (a reload removed it with the listener)
            listener._cluster_or_reset(self.release(flow))
            return
        record, started = listener._begin(peer, cluster)
        trace = TraceContext.new()
        record.flow_id = trace.trace_id
        running = _Running(cluster, record, started, trace)
        opened: EngineFlow | Endpoint | None = None
        # After a stop, or for a cluster that takes none (a reload), the usual way.
        if not self.stopped and cluster.takes_engine_flows:
            try:
                opened = cluster.start_engine_flow(
                    self.acceptor,
                    flow,
                    {TRACE_HEADER: trace.header()},
                    listener.config.flow_idle_timeout,
                )
            except Exception:  # the flow still gets the usual way
                logger.exception(
                    "listener %s: an engine flow could not start", listener.config.name
                )
        if not isinstance(opened, EngineFlow):
            listener._in_python(self, flow, running, opened)
            return
        running.flow = opened
        record.endpoint = opened.endpoint.name
        record.peer_identity = opened.connection.peer_identity
        listener.stats.streams_active += 1  # (in streams_total once it got its 200: at its end)
        self.running[flow] = running
        acceptor = self.acceptor

        def moved() -> tuple[int, int]:
            return acceptor.moved(flow) or (0, 0)

        listener.stats.live.add(record, moved)
        running.cluster.stats.live.add(opened, moved)

    def flow_refused(self, flow: int, refusal: StreamRefused) -> None:
        self.flow_unanswered(flow, "answered", str(refusal), refusal)

    def flow_unanswered(
        self, flow: int, kind: str, reason: str, refusal: StreamRefused | None = None
    ) -> None:
        running = self.running.pop(flow, None)
        if running is None:
            return
        logger.debug("flow %s goes the usual way (%s): %s", running.record.flow_id, kind, reason)
        stats = self._listener.stats
        stats.streams_active -= 1
        stats.engine_flows_returned += 1
        engine_flow, running.flow = running.flow, None
        assert engine_flow is not None
        stats.live.discard(running.record)  # (nothing moved: it was not answered)
        running.cluster.stats.live.discard(engine_flow)
        # A refusal the engine read is the flow's answer (the peer is asked once); a
        # draining peer's 503 and a timeout were the flow's first attempt, and the usual
        # way makes the retries. A timeout counts against the endpoint, as a failed open
        # does; a connection lost does not (the usual way opens again, once, on another
        # connection without counting it). Another answer or a reset is the endpoint's
        # answer: ask it again (the usual way reads it); after a timeout or a loss the
        # balancer chooses.
        timeout = kind == "timeout"
        lost = engine_flow.connection.lost_error if kind == "lost" else None
        failed = running.cluster.engine_flow_unanswered(
            engine_flow,
            reason if timeout else None,
            refusal,
            # A connection its liveness checks failed: the endpoint is dead or hung, and
            # the flow's next attempt goes elsewhere (not a new connection to it).
            unresponsive=lost if isinstance(lost, PeerUnresponsive) else None,
        )
        again = None if kind in ("timeout", "lost") or failed else engine_flow.endpoint
        self._listener._in_python(self, flow, running, again, failed)
        self._close_when_idle()

    def release(self, flow: int) -> socket.socket | None:
        """The accepted connection ``flow`` as a socket the caller owns; None when the
        engine dropped it (closed meanwhile) or it could not be taken (logged)."""
        try:
            return self.acceptor.release(flow)
        except (QuicmeshError, OSError) as exc:  # the socket could not be taken: lost
            logger.warning(
                "listener %s: a connection was lost: %s", self._listener.config.name, exc
            )
            return None

    def flow_ended(self, flow: int, sent: int, received: int, error: str) -> None:
        running = self.running.pop(flow, None)
        if running is None:
            return
        stats = self._listener.stats
        stats.streams_active -= 1
        stats.streams_total += 1
        stats.streams_spliced += 1
        stats.engine_flows += 1
        record = running.record
        record.bytes_sent, record.bytes_received = sent, received
        assert running.flow is not None
        running.cluster.engine_flow_finished(running.flow, sent, received)
        if error:
            lost = running.flow.connection.lost_error
            record.outcome, record.reason = Outcome.RESET, engine_failure_text(error, lost)
        self._listener._end(record, running.started, running.cluster)
        self._close_when_idle()


async def proxy_to_cluster(
    cluster: Cluster,
    reader: asyncio.StreamReader | socket.socket,
    writer: asyncio.StreamWriter | None,
    record: FlowRecord,
    stats: ListenerStats,
    *,
    target: str | None = None,
    endpoint: Address | None = None,
    trace: TraceContext | None = None,
    chosen: Endpoint | None = None,
    failed: FailedOpen | None = None,
    idle_timeout: float | None = None,
) -> None:
    """Carry one local TCP connection through ``cluster``, filling in ``record``.

    The connection is asyncio's ``reader`` and ``writer``, or an accepted socket as
    ``reader`` (``writer`` None), which asyncio wraps only if the flow is copied in
    Python (:func:`~quicmesh.splice.splice_accepted`).

    A flow the cluster cannot open is answered with a TCP reset. ``target`` and
    ``endpoint`` override the cluster's CONNECT authority and endpoint choice
    (see :meth:`Cluster.open_flow`), as ``chosen`` passes on the load balancer's
    choice for the flow's first attempt and ``failed`` a first attempt made already.
    The flow starts a trace (``trace``, or a new one): its CONNECT carries a
    ``traceparent`` whose trace id is ``record.flow_id``. A flow that moves no byte
    either way for ``idle_timeout`` seconds is reset on both sides (None: never).
    """
    if trace is None:
        trace = TraceContext.new()
    record.flow_id = trace.trace_id
    try:
        flow = await cluster.open_flow(
            target=target,
            endpoint=endpoint,
            headers={TRACE_HEADER: trace.header()},
            chosen=chosen,
            failed=failed,
        )
    except FlowRefused as exc:
        record.outcome, record.reason, record.endpoint = exc.outcome, exc.reason, exc.endpoint
        record.peer_identity = exc.peer_identity or record.peer_identity
        if isinstance(reader, socket.socket):
            reset_socket(reader)
        else:
            assert writer is not None
            reset_connection(writer)
        return
    except Exception:  # a fault of ours before the flow began: its client is reset
        if isinstance(reader, socket.socket):
            reset_socket(reader)
        elif writer is not None:
            reset_connection(writer)
        raise
    record.endpoint = flow.endpoint.name
    record.peer_identity = flow.connection.peer_identity
    # (An `auto` cluster's flow goes over QUIC or, while UDP is broken, h2: say which.)
    record.transport = flow.stream.transport
    stats.streams_total += 1
    stats.streams_active += 1
    progress = SpliceResult()

    def moved() -> tuple[int, int]:
        return moved_so_far(flow.stream, progress)

    stats.live.add(record, moved)
    cluster.stats.live.add(flow, moved)
    try:
        if isinstance(reader, socket.socket):
            result = await splice_accepted(
                flow.stream,
                reader,
                offload=cluster.config.splice,
                idle_timeout=idle_timeout,
                progress=progress,
            )
        else:
            assert writer is not None
            result = await splice(
                flow.stream,
                reader,
                writer,
                offload=cluster.config.splice,
                idle_timeout=idle_timeout,
                progress=progress,
            )
        if not result.error and not result.offloaded:
            # (A splice ended once the peer acknowledged every byte: nothing is left.)
            await wait_sent(flow.stream, FLUSH_TIMEOUT)
    except BaseException:
        # Abandoned, or a fault of ours (splice reset the TCP side): the stream is reset,
        # the flow's slot given back, and what its running count showed stays counted.
        flow.stream.abort()
        cluster.flow_finished(flow, 0, 0)
        raise
    finally:
        stats.streams_active -= 1
    stats.streams_spliced += result.offloaded
    record.bytes_sent = result.bytes_to_stream
    record.bytes_received = result.bytes_from_stream
    cluster.flow_finished(flow, result.bytes_to_stream, result.bytes_from_stream)
    if result.error:
        record.outcome, record.reason = Outcome.RESET, result.error
        refusal = await _refusal(flow.stream) if flow.early else None
        if refusal is not None:
            record.outcome, record.reason = refusal_outcome(refusal), str(refusal)


async def _refusal(stream: MeshStream) -> StreamRefused | None:
    """The peer's refusal of a stream opened without waiting for its answer, if it refused."""
    try:
        await wait_within(stream.wait_accepted(), REFUSAL_WAIT)
    except StreamRefused as exc:
        return exc
    except (TunnelError, TimeoutError):
        return None
    return None


def reset_connection(writer: asyncio.StreamWriter) -> None:
    """Close a local TCP connection with RST (SO_LINGER 0), so the client sees a failure."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
