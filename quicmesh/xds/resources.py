"""Envoy resource types: type URLs, and parsing them from YAML/JSON documents.

Importing this module registers every message the supported subset uses in
protobuf's default descriptor pool, so ``typed_config`` / ``Any`` fields with
an ``@type`` of one of them parse and unpack.
"""

from __future__ import annotations

from typing import Any, TypeVar

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.quic.v3 import quic_transport_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

Listener = listener_pb2.Listener
Cluster = cluster_pb2.Cluster
ClusterLoadAssignment = endpoint_pb2.ClusterLoadAssignment
Secret = secret_pb2.Secret
Bootstrap = bootstrap_pb2.Bootstrap
TcpProxy = tcp_proxy_pb2.TcpProxy
HttpConnectionManager = http_connection_manager_pb2.HttpConnectionManager
HttpProtocolOptions = http_protocol_options_pb2.HttpProtocolOptions
Router = router_pb2.Router
UpstreamTlsContext = tls_pb2.UpstreamTlsContext
QuicUpstreamTransport = quic_transport_pb2.QuicUpstreamTransport
TRANSPORT_SOCKETS = (UpstreamTlsContext, QuicUpstreamTransport)
"""The transport sockets a cluster may name (docs/xds.md), imported so that their
``typed_config`` parses: quicmesh uses its own mutual TLS in their place."""

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

RESOURCE_TYPES: dict[str, type[Message]] = {
    LISTENER_TYPE: Listener,
    CLUSTER_TYPE: Cluster,
    ENDPOINT_TYPE: ClusterLoadAssignment,
    SECRET_TYPE: Secret,
}
"""The four resource types the sidecar subscribes to, by type URL."""

SHORT_NAMES = {LISTENER_TYPE: "LDS", CLUSTER_TYPE: "CDS", ENDPOINT_TYPE: "EDS", SECRET_TYPE: "SDS"}
"""The discovery service of each type URL, for logs."""

M = TypeVar("M", bound=Message)


class ParseError(ValueError):
    """A document is not a valid Envoy message; the text says where."""


def parse_message(document: Any, message_type: type[M], where: str) -> M:
    """Parse a YAML/JSON value (dicts and lists) into ``message_type``.

    :raises ParseError: ``<where>: <what protobuf said>``, one line.
    """
    message: M = message_type()
    _check_shapes(document, message_type.DESCRIPTOR, where)
    try:
        json_format.ParseDict(document, message)
    except (
        json_format.ParseError,
        TypeError,
        ValueError,
        AttributeError,
        OverflowError,  # an enum given .inf
        RecursionError,
    ) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ParseError(f"{where}: {first}") from None
    return message


def _check_shapes(document: Any, descriptor: Any, where: str) -> None:
    """A message field given a list or a scalar, or a list field given something else,
    named (protobuf's ``ParseDict`` iterates whatever it is given: ``static_resources:
    []`` was an empty message, reported later as missing secrets). Well-known types
    (``google.protobuf.*``: durations as strings, wrappers as scalars, ``Struct``,
    ``Any``) are left to ``ParseDict``."""
    if not isinstance(document, dict):
        return
    for key, value in document.items():
        field = descriptor.fields_by_camelcase_name.get(key) or descriptor.fields_by_name.get(key)
        if field is None or field.message_type is None or value is None:
            continue
        kind = field.message_type
        if kind.full_name.startswith("google.protobuf."):
            continue
        path = f"{where}.{key}"
        if kind.GetOptions().map_entry:
            if not isinstance(value, dict):
                raise ParseError(f"{path}: expected a mapping, got {type(value).__name__}")
        elif field.is_repeated:
            if not isinstance(value, list):
                raise ParseError(f"{path}: expected a list, got {type(value).__name__}")
            for index, item in enumerate(value):
                if not isinstance(item, dict):
                    raise ParseError(
                        f"{path}[{index}]: expected a mapping, got {type(item).__name__}"
                    )
                _check_shapes(item, kind, f"{path}[{index}]")
        elif not isinstance(value, dict):
            raise ParseError(f"{path}: expected a mapping, got {type(value).__name__}")
        else:
            _check_shapes(value, kind, path)


def resource_name(message: Message) -> str:
    """The name a resource is known by: ``name``, or ``cluster_name`` for endpoints."""
    if isinstance(message, ClusterLoadAssignment):
        return str(message.cluster_name)
    return str(getattr(message, "name", ""))
