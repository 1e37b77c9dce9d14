"""The test ADS server (see :mod:`quicmesh.xds.testing`): grpcio, threads, SotW.

Each stream gets a reader thread (requests into a queue) and the gRPC handler
generator (responses out). A response is sent for a type when the client's
subscription asks for it and the client has not yet been sent the current
version, or when :meth:`AdsServer.set_resources` changes the version. LDS and
CDS responses carry every resource; EDS and SDS the ones the client named.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from ...sidecar.config import format_address
from ..resources import CLUSTER_TYPE, LISTENER_TYPE, resource_name

logger = logging.getLogger("quicmesh.xds.testing")

WILDCARD_TYPES = (LISTENER_TYPE, CLUSTER_TYPE)
"""Types whose responses hold every resource (and whose empty name list means all)."""

SERVER_OPTIONS = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 100),
    ("grpc.http2.max_ping_strikes", 0),
)
"""Accept a client's keepalive pings however often they come, on an idle stream too
(gRPC's default answers pings more often than every 5 minutes with GOAWAY
``too_many_pings``): tests give the client keepalive times of a second."""


@dataclass(frozen=True)
class ReceivedRequest:
    """One DiscoveryRequest a client sent, as the server saw it."""

    stream: int
    type_url: str
    version_info: str
    response_nonce: str
    resource_names: tuple[str, ...]
    error_detail: str
    node_id: str

    @property
    def is_nack(self) -> bool:
        """True when the request carries an ``error_detail``."""
        return bool(self.error_detail)


@dataclass
class _Stream:
    number: int
    outbox: queue.Queue[Any] = field(default_factory=queue.Queue)
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sent_version: dict[str, str] = field(default_factory=dict)
    last_nonce: dict[str, str] = field(default_factory=dict)
    node: str = ""
    closed: bool = False


class AdsServer:
    """An ADS server on ``host:port`` (port 0: any free port, see :attr:`port`).

    :param host: the address to listen on (an IPv6 literal without brackets).
    :param port: the port (0 picks one).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self.port = 0
        self._lock = threading.Lock()
        self._resources: dict[tuple[str, str], dict[str, Any]] = {}
        self._versions: dict[tuple[str, str], str] = {}
        self._streams: dict[int, _Stream] = {}
        self._stream_numbers = itertools.count(1)
        self._nonces = itertools.count(1)
        self.requests: list[ReceivedRequest] = []
        self._changed = threading.Condition(self._lock)
        self._server: grpc.Server | None = None

    # -- life -------------------------------------------------------------------

    def start(self) -> None:
        """Listen and serve (in gRPC's threads)."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=SERVER_OPTIONS)
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_Servicer(self), server)
        self.port = server.add_insecure_port(
            format_address((self.host, self._requested_port or self.port))
        )
        if self.port == 0:
            raise OSError(f"cannot listen on {format_address((self.host, self._requested_port))}")
        self._requested_port = self.port
        server.start()
        self._server = server

    def stop(self, grace: float | None = None) -> None:
        """Stop serving; open streams end (clients see the control plane go away)."""
        with self._lock:
            for stream in self._streams.values():
                stream.closed = True
                stream.outbox.put(None)
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    @property
    def address(self) -> str:
        """``host:port`` to give a sidecar's ``--xds`` (``[host]:port`` for IPv6)."""
        return format_address((self.host, self.port))

    # -- resources --------------------------------------------------------------

    def set_resources(
        self, type_url: str, resources: Iterable[Any], version: str, *, node: str = "*"
    ) -> None:
        """Make ``resources`` the current set of ``type_url`` at ``version``; push it.

        :param node: the node id these are for (as control planes keep a snapshot
            per node); ``"*"``: every node without one of its own.
        """
        with self._lock:
            self._resources[(node, type_url)] = {resource_name(r): r for r in resources}
            self._versions[(node, type_url)] = version
            for stream in self._streams.values():
                self._maybe_send(stream, type_url)
            self._changed.notify_all()

    def _snapshot_key(self, stream: _Stream, type_url: str) -> tuple[str, str] | None:
        for key in ((stream.node, type_url), ("*", type_url)):
            if key in self._versions:
                return key
        return None

    def requests_of(self, type_url: str) -> list[ReceivedRequest]:
        """The requests received for ``type_url``, oldest first."""
        with self._lock:
            return [r for r in self.requests if r.type_url == type_url]

    def wait_for(self, predicate: Any, timeout: float = 15.0) -> list[ReceivedRequest]:
        """Wait until ``predicate(requests)`` is true; return the requests.

        :raises TimeoutError: it did not become true within ``timeout`` seconds.
        """
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self.requests), timeout):
                raise TimeoutError(f"ADS server: condition not met after {timeout}s")
            return list(self.requests)

    @property
    def streams_opened(self) -> int:
        """How many streams clients have opened so far."""
        with self._lock:
            return len(self._streams)

    # -- the protocol -------------------------------------------------------------

    def _open(self) -> _Stream:
        with self._lock:
            stream = _Stream(next(self._stream_numbers))
            self._streams[stream.number] = stream
            return stream

    def _received(self, stream: _Stream, request: Any) -> None:
        with self._lock:
            self.requests.append(
                ReceivedRequest(
                    stream=stream.number,
                    type_url=request.type_url,
                    version_info=request.version_info,
                    response_nonce=request.response_nonce,
                    resource_names=tuple(request.resource_names),
                    error_detail=request.error_detail.message,
                    node_id=request.node.id,
                )
            )
            if request.node.id and not stream.node:
                stream.node = request.node.id
            type_url = request.type_url
            nonce = stream.last_nonce.get(type_url)
            if request.response_nonce and nonce is not None and request.response_nonce != nonce:
                # A stale nonce: the client answers an older response; wait for the newer.
                self._changed.notify_all()
                return
            names = tuple(request.resource_names)
            previous = stream.names.get(type_url)
            stream.names[type_url] = names
            if request.error_detail.message:
                logger.info(
                    "stream %d NACKed %s: %s", stream.number, type_url, request.error_detail.message
                )
            elif previous is None or previous != names:
                # A new or changed subscription: send what it covers now.
                stream.sent_version.pop(type_url, None)
            self._maybe_send(stream, type_url)
            self._changed.notify_all()

    def _maybe_send(self, stream: _Stream, type_url: str) -> None:
        key = self._snapshot_key(stream, type_url)
        if stream.closed or type_url not in stream.names or key is None:
            return
        version = self._versions[key]
        if stream.sent_version.get(type_url) == version:
            return
        names = stream.names[type_url]
        resources = self._resources.get(key, {})
        if type_url in WILDCARD_TYPES and not names:
            chosen = list(resources.values())
        else:
            chosen = [resources[n] for n in names if n in resources]
        packed = []
        for resource in chosen:
            wrapper = any_pb2.Any()
            wrapper.Pack(resource)
            packed.append(wrapper)
        nonce = str(next(self._nonces))
        stream.sent_version[type_url] = version
        stream.last_nonce[type_url] = nonce
        stream.outbox.put(
            discovery_pb2.DiscoveryResponse(
                version_info=version, resources=packed, type_url=type_url, nonce=nonce
            )
        )

    def _closed(self, stream: _Stream) -> None:
        with self._lock:
            stream.closed = True
            self._streams.pop(stream.number, None)
            self._changed.notify_all()


class _Servicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, server: AdsServer) -> None:
        self.server = server

    def StreamAggregatedResources(
        self, request_iterator: Iterator[Any], context: Any
    ) -> Iterator[Any]:
        stream = self.server._open()

        def read() -> None:
            try:
                for request in request_iterator:
                    self.server._received(stream, request)
            except grpc.RpcError:
                pass
            finally:
                stream.outbox.put(None)

        reader = threading.Thread(target=read, name=f"ads-stream-{stream.number}", daemon=True)
        reader.start()
        try:
            while context.is_active():
                try:
                    response = stream.outbox.get(timeout=0.5)
                except queue.Empty:
                    continue
                if response is None:
                    break
                yield response
        finally:
            self.server._closed(stream)
