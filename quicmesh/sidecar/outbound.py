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
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from ..errors import StreamRefused, TunnelError
from ..splice import reset_socket, splice, splice_accepted
from ..transport.stream import MeshStream
from .acceptor import SocketServer
from .accesslog import FlowRecord, Outcome
from .cluster import Cluster, FlowRefused
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
        self.config = config
        self._clusters = clusters
        self.stats = stats
        self._flows = flows
        self._log = log
        self._server: SocketServer | None = None

    async def start(self) -> None:
        """Bind and start accepting (plain sockets: a spliced flow needs no asyncio
        transport, :mod:`.acceptor`).

        :raises OSError: the address cannot be bound.
        """
        host, port = self.config.address
        self._server = await SocketServer.start(host, port, self._handle)

    def close(self) -> None:
        """Stop accepting; flows already accepted carry on."""
        if self._server is not None:
            self._server.close()

    async def _handle(self, sock: socket.socket, peer: Any) -> None:
        with self._flows.track():
            await self._proxy(sock, peer)

    async def _proxy(self, sock: socket.socket, peer: Any) -> None:
        start, started = time.time(), time.monotonic()
        downstream = format_address((peer[0], peer[1])) if peer else ""
        stats = self.stats
        stats.connections_total += 1
        stats.connections_active += 1
        cluster = self._clusters(self.config.cluster)
        record = FlowRecord(
            start=start,
            duration=0.0,
            listener=self.config.name,
            direction="outbound",
            downstream=downstream,
            target=cluster.config.target or "",
            transport=cluster.config.transport,
            peer_identity="",
            endpoint="",
            bytes_sent=0,
            bytes_received=0,
            outcome=Outcome.COMPLETED,
        )
        try:
            await proxy_to_cluster(cluster, sock, None, record, stats)
        finally:
            stats.connections_active -= 1
            record.duration = time.monotonic() - started
            stats.flow_ended(record.outcome, record.bytes_sent, record.bytes_received)
            cluster.stats.outcomes[record.outcome.value] += 1
            self._log(record)


async def proxy_to_cluster(
    cluster: Cluster,
    reader: asyncio.StreamReader | socket.socket,
    writer: asyncio.StreamWriter | None,
    record: FlowRecord,
    stats: ListenerStats,
    *,
    target: str | None = None,
    endpoint: Address | None = None,
) -> None:
    """Carry one local TCP connection through ``cluster``, filling in ``record``.

    The connection is asyncio's ``reader`` and ``writer``, or an accepted socket as
    ``reader`` (``writer`` None), which asyncio wraps only if the flow is copied in
    Python (:func:`~quicmesh.splice.splice_accepted`).

    A flow the cluster cannot open is answered with a TCP reset. ``target`` and
    ``endpoint`` override the cluster's CONNECT authority and endpoint choice
    (see :meth:`Cluster.open_flow`). The flow starts a trace: its CONNECT carries
    a ``traceparent`` whose trace id is ``record.flow_id``.
    """
    trace = TraceContext.new()
    record.flow_id = trace.trace_id
    try:
        flow = await cluster.open_flow(
            target=target, endpoint=endpoint, headers={TRACE_HEADER: trace.header()}
        )
    except FlowRefused as exc:
        record.outcome, record.reason, record.endpoint = exc.outcome, exc.reason, exc.endpoint
        if isinstance(reader, socket.socket):
            reset_socket(reader)
        else:
            assert writer is not None
            reset_connection(writer)
        return
    record.endpoint = flow.endpoint.name
    record.peer_identity = flow.connection.peer_identity
    stats.streams_total += 1
    stats.streams_active += 1
    try:
        if isinstance(reader, socket.socket):
            result = await splice_accepted(flow.stream, reader, offload=cluster.config.splice)
        else:
            assert writer is not None
            result = await splice(flow.stream, reader, writer, offload=cluster.config.splice)
        if not result.error:
            await wait_sent(flow.stream, FLUSH_TIMEOUT)
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
            record.outcome, record.reason = Outcome.REFUSED, str(refusal)


async def _refusal(stream: MeshStream) -> StreamRefused | None:
    """The peer's refusal of a stream opened without waiting for its answer, if it refused."""
    try:
        await asyncio.wait_for(stream.wait_accepted(), REFUSAL_WAIT)
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
