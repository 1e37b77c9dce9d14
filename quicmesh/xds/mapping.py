"""Envoy resources onto the sidecar's model, refusing what has no quicmesh meaning.

The mapping (docs/xds.md has the table):

- a ``Listener`` whose one filter is ``envoy.filters.network.tcp_proxy`` is an
  outbound listener (:class:`~quicmesh.sidecar.config.OutboundListenerConfig`);
  its ``tunneling_config.hostname`` (``host:port``) is the CONNECT target, which
  quicmesh keeps on the cluster;
- a ``Listener`` whose one filter is ``envoy.filters.network.http_connection_manager``
  with a CONNECT ``upgrade_configs`` is an inbound tunnel listener: UDP with
  ``codec_type: HTTP3`` is ``quic``, TCP with ``HTTP2`` (or ``AUTO``) is ``h2``,
  ``HTTP1`` is ``tcp``; its virtual hosts' ``domains`` (``host:port``) are the
  allowed destinations;
- a ``Cluster`` (type ``EDS`` or ``STATIC``) is a :class:`ClusterConfig`: its
  ``typed_extension_protocol_options`` ``envoy.extensions.upstreams.http.v3.HttpProtocolOptions``
  say the transport (explicit ``http3_protocol_options``: quic,
  ``http2_protocol_options``: h2, ``http_protocol_options``: tcp), ``lb_policy``
  the balancer, ``circuit_breakers``, ``outlier_detection``
  (``consecutive_local_origin_failure``), ``health_checks`` (``tcp_health_check``:
  a transport handshake) and ``connect_timeout`` the rest;
- a ``ClusterLoadAssignment`` gives the endpoints: those whose ``health_status``
  is ``UNHEALTHY``, ``DRAINING`` or ``TIMEOUT`` take no flows (as in Envoy);
  weights must be equal (quicmesh balances endpoints equally);
- a ``Secret`` with ``tls_certificate`` is the identity, one with
  ``validation_context`` the trust bundle (``trusted_ca``).

Every message is checked field by field: a set field outside the supported
subset raises :class:`MappingError` naming the resource and the field. The
functions are pure: resources in, configuration out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from ..errors import ConfigError, QuicmeshError
from ..sidecar.config import (
    DEFAULT_FLOW_IDLE_TIMEOUT,
    MIN_HEALTH_CHECK_INTERVAL,
    Address,
    CircuitBreakerConfig,
    ClusterConfig,
    DestinationRule,
    HealthCheckConfig,
    InboundListenerConfig,
    OutboundListenerConfig,
    OutlierDetectionConfig,
    format_seconds,
    parse_destination,
    parse_identity_pattern,
)
from ..tls._pem import read_file
from ..tunnel.connect import Target, parse_target
from .resources import (
    Cluster,
    ClusterLoadAssignment,
    HttpConnectionManager,
    HttpProtocolOptions,
    Listener,
    QuicUpstreamTransport,
    Router,
    Secret,
    TcpProxy,
    UpstreamTlsContext,
)

TCP_PROXY = "envoy.filters.network.tcp_proxy"
HTTP_CONNECTION_MANAGER = "envoy.filters.network.http_connection_manager"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ROUTER = "envoy.filters.http.router"

EXCLUDED_HEALTH = {2, 3, 4}
"""``HealthStatus`` values whose endpoints take no flows: UNHEALTHY, DRAINING, TIMEOUT."""

LB_POLICIES = {0: "round_robin", 1: "least_request", 3: "random"}
"""``Cluster.LbPolicy`` values quicmesh has, and their quicmesh names."""


class MappingError(QuicmeshError):
    """An Envoy resource uses something quicmesh does not support; one line."""


@dataclass
class EnvoyResources:
    """The resources of each type the sidecar holds, by name."""

    listeners: dict[str, Listener] = field(default_factory=dict)
    clusters: dict[str, Cluster] = field(default_factory=dict)
    assignments: dict[str, ClusterLoadAssignment] = field(default_factory=dict)
    secrets: dict[str, Secret] = field(default_factory=dict)


MISSING = " (missing)"
"""Marks, in :attr:`MappedConfig.warming`, a cluster a listener names that is not
defined at all (CDS has not given it)."""


@dataclass(frozen=True)
class MappedConfig:
    """What :func:`map_resources` makes of a set of resources."""

    outbound: tuple[OutboundListenerConfig, ...]
    inbound: tuple[InboundListenerConfig, ...]
    clusters: tuple[ClusterConfig, ...]
    warming: tuple[str, ...] = ()
    """Clusters (and the listeners using them) held back: no endpoints arrived yet."""
    static_targets: Mapping[str, Target] = field(default_factory=dict)
    """The CONNECT target listeners give a static cluster that had none (one no static
    listener uses): :func:`with_static` gives it to that cluster."""


# -- field checks ---------------------------------------------------------------


def _only(message: Message, allowed: Iterable[str], where: str) -> None:
    """Refuse any set field of ``message`` outside ``allowed``."""
    allowed = set(allowed)
    for descriptor, _ in message.ListFields():
        if descriptor.name not in allowed:
            raise MappingError(
                f"{where}: field {descriptor.name!r} is not supported by quicmesh "
                f"(supported: {', '.join(sorted(allowed)) or 'none'})"
            )


def _seconds(duration: Message) -> float:
    return float(duration.seconds) + float(duration.nanos) / 1e9


MAX_DURATION = 86400.0
"""The longest duration a resource may give (a day, as the YAML configuration's)."""


def _duration(
    parent: Message, name: str, default: float, where: str, minimum: float = 0.0
) -> float:
    """The ``Duration`` field ``name`` of ``parent`` in seconds (``default`` if unset), more
    than zero (and at least ``minimum``) and at most :data:`MAX_DURATION`, as the YAML
    configuration's durations.

    :raises MappingError: naming the field and its value.
    """
    if not parent.HasField(name):
        return default
    seconds = _seconds(getattr(parent, name))
    if not 0 < seconds <= MAX_DURATION:
        raise MappingError(
            f"{where}.{name}: {seconds:g}s is outside (0, {MAX_DURATION:g}s]: "
            "a duration must be more than zero and at most a day"
        )
    if seconds < minimum:
        raise MappingError(
            f"{where}.{name}: {seconds:g}s is below the minimum of {format_seconds(minimum)}"
        )
    return seconds


def _enum_name(message: Message, name: str) -> str:
    """The name of the value of ``message``'s enum field ``name``, or its number where this
    version of the API does not know it (protobuf keeps unknown enum values)."""
    value = getattr(message, name)
    known = message.DESCRIPTOR.fields_by_name[name].enum_type.values_by_number.get(value)
    return known.name if known is not None else f"{value} (unknown)"


def _socket_address(address: Message, where: str) -> tuple[Address, str]:
    """``(host, port)`` and ``"TCP"``/``"UDP"`` from an ``envoy.config.core.v3.Address``."""
    _only(address, {"socket_address"}, where)
    socket = address.socket_address
    _only(socket, {"address", "port_value", "protocol"}, f"{where}.socket_address")
    host = str(socket.address)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise MappingError(
            f"{where}.socket_address.address: {host!r} is not an IP address"
        ) from None
    port = int(socket.port_value)
    if not 1 <= port <= 65535:
        raise MappingError(f"{where}.socket_address.port_value: {port} is outside 1-65535")
    protocol = _enum_name(socket, "protocol")
    if protocol not in ("TCP", "UDP"):
        # (Not taken as TCP: a protocol this API version does not know is not TCP.)
        raise MappingError(f"{where}.socket_address: protocol {protocol} is not supported")
    return (host, port), protocol


def _name(value: str, where: str) -> str:
    from ..sidecar.config import is_name

    if not is_name(value):
        raise MappingError(
            f"{where}: {value!r} is not a quicmesh name (letters, digits, _ . -; up to 63)"
        )
    return value


# -- listeners -------------------------------------------------------------------


@dataclass(frozen=True)
class _Outbound:
    config: OutboundListenerConfig
    target: Target


def map_listener(listener: Listener) -> _Outbound | InboundListenerConfig:
    """One Listener: an outbound listener (and its CONNECT target) or an inbound one.

    :raises MappingError: naming the listener and the unsupported field.
    """
    where = f"Listener {listener.name!r}"
    _only(
        listener,
        {
            "name",
            "address",
            "filter_chains",
            "stat_prefix",
            "traffic_direction",
            "udp_listener_config",
        },
        where,
    )
    name = _name(listener.name, f"{where}: name")
    address, protocol = _socket_address(listener.address, f"{where}: address")
    if len(listener.filter_chains) != 1:
        raise MappingError(
            f"{where}: needs exactly one filter_chain, has {len(listener.filter_chains)}"
        )
    chain = listener.filter_chains[0]
    _only(chain, {"filters", "name"}, f"{where}: filter_chains[0]")
    if len(chain.filters) != 1:
        raise MappingError(
            f"{where}: filter_chains[0] needs exactly one filter, has {len(chain.filters)}"
        )
    network_filter = chain.filters[0]
    _only(network_filter, {"name", "typed_config"}, f"{where}: filter {network_filter.name!r}")
    type_name = network_filter.typed_config.TypeName()
    if type_name == TcpProxy.DESCRIPTOR.full_name:
        if protocol != "TCP":
            raise MappingError(f"{where}: a tcp_proxy listener listens on TCP, not UDP")
        if listener.HasField("udp_listener_config"):
            raise MappingError(f"{where}: udp_listener_config applies to UDP listeners only")
        proxy = _unpack(network_filter.typed_config, TcpProxy(), f"{where}: {TCP_PROXY}")
        return _map_tcp_proxy(name, address, proxy, where)
    if type_name == HttpConnectionManager.DESCRIPTOR.full_name:
        manager = _unpack(
            network_filter.typed_config,
            HttpConnectionManager(),
            f"{where}: {HTTP_CONNECTION_MANAGER}",
        )
        return _map_connect_terminator(name, address, protocol, manager, where)
    raise MappingError(
        f"{where}: filter {network_filter.name!r} ({type_name or 'no typed_config'}) is not "
        f"supported: use {TCP_PROXY} (outbound) or {HTTP_CONNECTION_MANAGER} with CONNECT (inbound)"
    )


M = TypeVar("M", bound=Message)


def _unpack(packed: Any, message: M, where: str) -> M:
    """``packed`` (an ``Any``) unpacked into ``message``.

    :raises MappingError: it holds another message type, or its bytes do not decode."""
    try:
        unpacked = packed.Unpack(message)
    except DecodeError as exc:
        raise MappingError(f"{where}: typed_config does not decode: {exc}") from None
    if not unpacked:
        raise MappingError(f"{where}: typed_config holds {packed.TypeName()!r}")
    return message


def _idle_timeout(parent: Message, name: str, where: str) -> float | None:
    """A flow idle timeout from the ``Duration`` field ``name``: unset is quicmesh's (and
    tcp_proxy's) hour, ``0s`` none, else more than zero and at most a day."""
    if parent.HasField(name) and _seconds(getattr(parent, name)) == 0:
        return None
    return _duration(parent, name, DEFAULT_FLOW_IDLE_TIMEOUT, where)


def _map_tcp_proxy(name: str, address: Address, proxy: TcpProxy, where: str) -> _Outbound:
    where = f"{where}: tcp_proxy"
    _only(proxy, {"stat_prefix", "cluster", "tunneling_config", "idle_timeout"}, where)
    if not proxy.cluster:
        raise MappingError(f"{where}: cluster is required (weighted_clusters is not supported)")
    if not proxy.HasField("tunneling_config"):
        raise MappingError(
            f"{where}: tunneling_config is required: quicmesh carries every flow over CONNECT"
        )
    _only(proxy.tunneling_config, {"hostname"}, f"{where}.tunneling_config")
    try:
        target = parse_target(proxy.tunneling_config.hostname)
    except ValueError as exc:
        raise MappingError(f"{where}.tunneling_config.hostname: {exc}") from None
    cluster = _name(proxy.cluster, f"{where}.cluster")
    # Envoy's default is an hour and 0s turns it off, as the YAML configuration's.
    config = OutboundListenerConfig(
        name=name,
        address=address,
        cluster=cluster,
        flow_idle_timeout=_idle_timeout(proxy, "idle_timeout", where),
    )
    return _Outbound(config, target)


def _map_connect_terminator(
    name: str, address: Address, protocol: str, manager: HttpConnectionManager, where: str
) -> InboundListenerConfig:
    where = f"{where}: http_connection_manager"
    _only(
        manager,
        {
            "stat_prefix",
            "codec_type",
            "route_config",
            "upgrade_configs",
            "http_filters",
            "http2_protocol_options",
            "http3_protocol_options",
            "stream_idle_timeout",
        },
        where,
    )
    codec = _enum_name(manager, "codec_type")
    if protocol == "UDP":
        if codec != "HTTP3":
            raise MappingError(f"{where}: a UDP listener needs codec_type HTTP3, not {codec}")
        transport = "quic"
    elif codec in ("HTTP2", "AUTO"):
        transport = "h2"
    elif codec == "HTTP1":
        transport = "tcp"
    else:
        raise MappingError(f"{where}: codec_type {codec} on a TCP listener is not supported")
    if not any(u.upgrade_type.upper() == "CONNECT" for u in manager.upgrade_configs):
        raise MappingError(f"{where}: upgrade_configs must include CONNECT")
    for index, upgrade in enumerate(manager.upgrade_configs):
        _only(upgrade, {"upgrade_type"}, f"{where}.upgrade_configs[{index}]")
    for index, http_filter in enumerate(manager.http_filters):
        if http_filter.name != ROUTER and http_filter.typed_config.TypeName() != (
            Router.DESCRIPTOR.full_name
        ):
            raise MappingError(
                f"{where}.http_filters[{index}]: {http_filter.name!r} is not supported "
                f"(only {ROUTER})"
            )
    _only(manager.route_config, {"name", "virtual_hosts"}, f"{where}.route_config")
    destinations: list[DestinationRule] = []
    for vh_index, host in enumerate(manager.route_config.virtual_hosts):
        vh_where = f"{where}.route_config.virtual_hosts[{vh_index}]"
        _only(host, {"name", "domains", "routes"}, vh_where)
        for domain in host.domains:
            try:
                destinations.append(parse_destination(domain))
            except ValueError as exc:
                raise MappingError(f"{vh_where}.domains: {exc}") from None
    if not destinations:
        raise MappingError(
            f"{where}.route_config: no virtual host domains: they are the allowed destinations"
        )
    return InboundListenerConfig(
        name=name,
        address=address,
        transports=(transport,),
        destinations=tuple(destinations),
        flow_idle_timeout=_idle_timeout(manager, "stream_idle_timeout", where),
    )


# -- clusters --------------------------------------------------------------------

_CLUSTER_FIELDS = {
    "name",
    "type",
    "eds_cluster_config",
    "connect_timeout",
    "lb_policy",
    "load_assignment",
    "health_checks",
    "circuit_breakers",
    "typed_extension_protocol_options",
    "outlier_detection",
    "transport_socket",
    "common_lb_config",
}


def cluster_transport(cluster: Cluster) -> str:
    """quic, h2 or tcp, from the cluster's ``HttpProtocolOptions`` (default h2).

    :raises MappingError: other options, or not an explicit HTTP version.
    """
    where = f"Cluster {cluster.name!r}: typed_extension_protocol_options"
    options = dict(cluster.typed_extension_protocol_options)
    for key in options:
        if key != HTTP_PROTOCOL_OPTIONS:
            raise MappingError(f"{where}: {key!r} is not supported (only {HTTP_PROTOCOL_OPTIONS})")
    if not options:
        return "h2"
    where = f"{where}[{HTTP_PROTOCOL_OPTIONS}]"
    parsed = _unpack(options[HTTP_PROTOCOL_OPTIONS], HttpProtocolOptions(), where)
    _only(parsed, {"explicit_http_config"}, where)
    which = parsed.explicit_http_config.WhichOneof("protocol_config")
    if which is None:
        raise MappingError(f"{where}: explicit_http_config with one HTTP version is required")
    return {
        "http3_protocol_options": "quic",
        "http2_protocol_options": "h2",
        "http_protocol_options": "tcp",
    }[which]


def _cluster_target(target: str | None, where: str) -> Target | None:
    if target is None:
        return None
    try:
        return parse_target(target)
    except ValueError as exc:
        raise MappingError(f"{where}: target: {exc}") from None


def map_cluster(
    cluster: Cluster, target: str | None, assignment: ClusterLoadAssignment | None
) -> ClusterConfig | None:
    """One Cluster (with its endpoints): a ClusterConfig, or None while it warms.

    :param target: the CONNECT target the listeners using it tunnel to (None: no
        listener names one).
    :param assignment: the ClusterLoadAssignment for an EDS cluster (None: not yet arrived).
    :raises MappingError: naming the cluster and the unsupported field.
    """
    where = f"Cluster {cluster.name!r}"
    _only(cluster, _CLUSTER_FIELDS, where)
    name = _name(cluster.name, f"{where}: name")
    kind = _enum_name(cluster, "type")
    if kind == "EDS":
        _only(
            cluster.eds_cluster_config,
            {"eds_config", "service_name"},
            f"{where}.eds_cluster_config",
        )
        if cluster.HasField("load_assignment"):
            raise MappingError(
                f"{where}: an EDS cluster takes its endpoints from EDS, not load_assignment"
            )
        if assignment is None:
            return None
    elif kind == "STATIC":
        if cluster.HasField("eds_cluster_config"):
            raise MappingError(f"{where}: eds_cluster_config applies to EDS clusters only")
        assignment = cluster.load_assignment
    else:
        raise MappingError(f"{where}: type {kind} is not supported (EDS or STATIC)")
    server_identities: tuple[str, ...] = ()
    if cluster.HasField("transport_socket"):
        socket = cluster.transport_socket
        if socket.name not in ("envoy.transport_sockets.tls", "envoy.transport_sockets.quic"):
            raise MappingError(
                f"{where}: transport_socket {socket.name!r} is not supported: quicmesh always "
                "uses mutual TLS with the sidecar's own identity"
            )
        server_identities = _server_identities(socket, f"{where}.transport_socket")
    if cluster.lb_policy not in LB_POLICIES:
        raise MappingError(
            f"{where}: lb_policy {_enum_name(cluster, 'lb_policy')} is not supported "
            "(ROUND_ROBIN, LEAST_REQUEST, RANDOM)"
        )
    connect_timeout = _duration(cluster, "connect_timeout", 5.0, where)
    return ClusterConfig(
        name=name,
        transport=cluster_transport(cluster),
        target=_cluster_target(target, where),
        endpoints=map_endpoints(assignment, where),
        load_balancing=LB_POLICIES[cluster.lb_policy],
        health_check=_health_check(cluster, where),
        outlier_detection=_outlier(cluster, where),
        circuit_breakers=_breakers(cluster, where),
        connect_timeout=connect_timeout,
        server_identities=server_identities,
        healthy_panic_threshold=_panic_threshold(cluster, where),
    )


def _panic_threshold(cluster: Cluster, where: str) -> int:
    """``common_lb_config.healthy_panic_threshold`` (a percent; unset: Envoy's 50),
    the cluster's ``healthy_panic_threshold``; the rest of ``common_lb_config`` is
    refused by name."""
    if not cluster.HasField("common_lb_config"):
        return 50
    common = cluster.common_lb_config
    _only(common, {"healthy_panic_threshold"}, f"{where}: common_lb_config")
    if not common.HasField("healthy_panic_threshold"):
        return 50
    value = common.healthy_panic_threshold.value
    if not 0 <= value <= 100:
        raise MappingError(
            f"{where}: common_lb_config.healthy_panic_threshold {value:g} is not a percent"
        )
    # Whole percents here; a threshold above 0 stays one (0.5 % panics with none healthy).
    return max(1, round(float(value))) if value > 0 else 0


def _server_identities(socket: Any, where: str) -> tuple[str, ...]:
    """The SPIFFE IDs a cluster's endpoints may present (``server_identities``), from its
    TLS transport socket's subject alternative name matchers, as Istio sends them (the
    destination's service accounts). The rest of the socket is quicmesh's own mutual TLS.

    :raises MappingError: a matcher quicmesh cannot hold to (only URIs, exact or a
        prefix ending in ``/``), rather than a cluster that would accept any identity.
    """
    if not socket.HasField("typed_config"):
        return ()
    if socket.typed_config.TypeName() == QuicUpstreamTransport.DESCRIPTOR.full_name:
        tls = _unpack(socket.typed_config, QuicUpstreamTransport(), where).upstream_tls_context
    else:
        tls = _unpack(socket.typed_config, UpstreamTlsContext(), where)
    common = tls.common_tls_context
    if common.HasField("combined_validation_context"):
        context = common.combined_validation_context.default_validation_context
        where = f"{where}: combined_validation_context.default_validation_context"
    else:
        context = common.validation_context
        where = f"{where}: validation_context"
    patterns: list[str] = []
    for index, typed in enumerate(context.match_typed_subject_alt_names):
        if typed.san_type != typed.URI:
            raise MappingError(
                f"{where}.match_typed_subject_alt_names[{index}]: san_type "
                f"{_enum_name(typed, 'san_type')} is not supported (URI: a SPIFFE ID)"
            )
        patterns.append(_san_pattern(typed.matcher, f"{where}.match_typed_subject_alt_names"))
    for index, matcher in enumerate(context.match_subject_alt_names):
        patterns.append(_san_pattern(matcher, f"{where}.match_subject_alt_names[{index}]"))
    return tuple(dict.fromkeys(patterns))


def _san_pattern(matcher: Any, where: str) -> str:
    """A ``StringMatcher`` on a SPIFFE ID as a quicmesh identity pattern."""
    kind = matcher.WhichOneof("match_pattern")
    value: str = getattr(matcher, kind) if kind in ("exact", "prefix") else ""
    try:
        if kind == "exact" and not matcher.ignore_case and "*" not in value:
            return parse_identity_pattern(value)
        if kind == "prefix" and not matcher.ignore_case and value.endswith("/"):
            return parse_identity_pattern(value + "*")
    except ValueError as exc:
        raise MappingError(f"{where}: {exc}") from None
    raise MappingError(
        f"{where}: only an exact SPIFFE ID or a prefix ending in '/' (case-sensitive) is"
        f" supported, not {kind or 'no matcher'} {value!r}"
    )


def map_endpoints(assignment: ClusterLoadAssignment, where: str) -> tuple[Address, ...]:
    """The addresses of the endpoints that may take flows.

    :raises MappingError: a priority other than 0, unequal weights, or a bad address.
    """
    where = f"{where}: ClusterLoadAssignment"
    _only(assignment, {"cluster_name", "endpoints"}, where)
    addresses: list[Address] = []
    weights: set[int] = set()
    for index, locality in enumerate(assignment.endpoints):
        loc_where = f"{where}.endpoints[{index}]"
        _only(locality, {"locality", "lb_endpoints", "load_balancing_weight"}, loc_where)
        for lb_index, lb_endpoint in enumerate(locality.lb_endpoints):
            ep_where = f"{loc_where}.lb_endpoints[{lb_index}]"
            _only(lb_endpoint, {"endpoint", "health_status", "load_balancing_weight"}, ep_where)
            _only(lb_endpoint.endpoint, {"address", "hostname"}, f"{ep_where}.endpoint")
            address, _ = _socket_address(
                lb_endpoint.endpoint.address, f"{ep_where}.endpoint.address"
            )
            if lb_endpoint.HasField("load_balancing_weight"):
                weights.add(lb_endpoint.load_balancing_weight.value)
            else:
                weights.add(1)
            health = _enum_name(lb_endpoint, "health_status")
            if health.endswith("(unknown)"):
                # Neither taken as healthy nor left out: the control plane meant something
                # this API version cannot say.
                raise MappingError(f"{ep_where}: health_status {health} is not supported")
            if lb_endpoint.health_status in EXCLUDED_HEALTH:
                continue
            addresses.append(address)
    if len(weights) > 1:
        raise MappingError(
            f"{where}: load_balancing_weight differs between endpoints ({sorted(weights)}): "
            "quicmesh balances endpoints equally"
        )
    return tuple(addresses)


def _health_check(cluster: Cluster, where: str) -> HealthCheckConfig | None:
    if not cluster.health_checks:
        return None
    if len(cluster.health_checks) > 1:
        raise MappingError(
            f"{where}: one health check is supported, not {len(cluster.health_checks)}"
        )
    check = cluster.health_checks[0]
    hc_where = f"{where}.health_checks[0]"
    _only(
        check,
        {"timeout", "interval", "unhealthy_threshold", "healthy_threshold", "tcp_health_check"},
        hc_where,
    )
    if not check.HasField("tcp_health_check"):
        raise MappingError(
            f"{hc_where}: only tcp_health_check (a transport handshake) is supported"
        )
    _only(check.tcp_health_check, set(), f"{hc_where}.tcp_health_check")
    return HealthCheckConfig(
        interval=_duration(check, "interval", 5.0, hc_where, MIN_HEALTH_CHECK_INTERVAL),
        timeout=_duration(check, "timeout", 2.0, hc_where),
        unhealthy_threshold=_bounded(check, "unhealthy_threshold", 2, 1, 100, hc_where),
        healthy_threshold=_bounded(check, "healthy_threshold", 1, 1, 100, hc_where),
    )


def _outlier(cluster: Cluster, where: str) -> OutlierDetectionConfig:
    if not cluster.HasField("outlier_detection"):
        return OutlierDetectionConfig()
    detection = cluster.outlier_detection
    od_where = f"{where}.outlier_detection"
    _only(
        detection,
        {
            "consecutive_local_origin_failure",
            "base_ejection_time",
            "max_ejection_percent",
            "split_external_local_origin_errors",
        },
        od_where,
    )
    return OutlierDetectionConfig(
        consecutive_connect_failures=_bounded(
            detection, "consecutive_local_origin_failure", 5, 1, 1000, od_where
        ),
        base_ejection_time=_duration(detection, "base_ejection_time", 30.0, od_where),
        max_ejection_percent=_bounded(detection, "max_ejection_percent", 100, 0, 100, od_where),
    )


def _breakers(cluster: Cluster, where: str) -> CircuitBreakerConfig:
    if not cluster.HasField("circuit_breakers"):
        return CircuitBreakerConfig()
    cb_where = f"{where}.circuit_breakers"
    _only(cluster.circuit_breakers, {"thresholds"}, cb_where)
    thresholds = cluster.circuit_breakers.thresholds
    if len(thresholds) > 1:
        raise MappingError(f"{cb_where}: one threshold (priority DEFAULT) is supported")
    if not thresholds:
        return CircuitBreakerConfig()
    limits = thresholds[0]
    t_where = f"{cb_where}.thresholds[0]"
    _only(limits, {"priority", "max_connections", "max_pending_requests", "max_requests"}, t_where)
    if limits.priority != 0:
        priority = _enum_name(limits, "priority")
        raise MappingError(f"{t_where}: priority {priority} is not supported (DEFAULT only)")
    return CircuitBreakerConfig(
        max_connections=_bounded(limits, "max_connections", 64, 1, 100000, t_where),
        max_concurrent_streams=_bounded(limits, "max_requests", 1024, 1, 1000000, t_where),
        # At least 1, as the YAML's max_pending_opens: with 0 every flow that had to dial
        # overflowed, so no connection was ever made.
        max_pending_opens=_bounded(limits, "max_pending_requests", 256, 1, 1000000, t_where),
    )


def _bounded(parent: Message, name: str, default: int, low: int, high: int, where: str) -> int:
    """The value of the ``UInt32Value`` field ``name`` of ``parent`` (``default`` if unset)."""
    if not parent.HasField(name):
        return default
    value = int(getattr(parent, name).value)
    if not low <= value <= high:
        raise MappingError(f"{where}.{name}: {value} is outside {low}-{high}")
    return value


# -- everything ------------------------------------------------------------------


def map_resources(
    resources: EnvoyResources,
    serving: Mapping[str, ClusterConfig] | None = None,
    static_clusters: Iterable[ClusterConfig] = (),
) -> MappedConfig:
    """Map a whole set of resources; clusters without endpoints yet are held back.

    A listener whose cluster is warming (or absent) is held back with it, as
    Envoy does not activate a listener before its clusters are ready. A cluster in
    ``serving`` (the clusters the sidecar runs now, by name) whose new version warms
    keeps its serving version, with its listeners, until the new one is warm, as
    Envoy keeps an active cluster while its update warms. A listener may name one of
    ``static_clusters`` (a bootstrap's or file's, kept beside xDS: :func:`with_static`),
    as in Envoy, if it tunnels to that cluster's CONNECT target.

    :raises MappingError: the first unsupported field or inconsistency found.
    """
    static = {cluster.name: cluster for cluster in static_clusters}
    outbound: list[_Outbound] = []
    inbound: list[InboundListenerConfig] = []
    for listener in resources.listeners.values():
        mapped = map_listener(listener)
        if isinstance(mapped, _Outbound):
            outbound.append(mapped)
        else:
            inbound.append(mapped)
    targets: dict[str, Target] = {}
    for out in outbound:
        cluster_of = static.get(out.config.cluster)
        if cluster_of is not None and cluster_of.target is not None:
            _check_static_target(out, cluster_of)
            continue
        previous = targets.setdefault(out.config.cluster, out.target)
        if previous != out.target:
            raise MappingError(
                f"Listener {out.config.name!r}: tunneling_config.hostname "
                f"{out.target.authority!r} differs from {previous.authority!r} of another "
                f"listener on cluster {out.config.cluster!r}: "
                "quicmesh keeps one CONNECT target per cluster"
            )
    clusters: dict[str, ClusterConfig] = {}
    warming: list[str] = []
    for cluster in resources.clusters.values():
        service = cluster.eds_cluster_config.service_name or cluster.name
        mapped_cluster = map_cluster(
            cluster, targets.get(cluster.name), resources.assignments.get(service)
        )
        if mapped_cluster is None:
            warming.append(cluster.name)
            if serving is not None and cluster.name in serving:
                clusters[cluster.name] = serving[cluster.name]
        else:
            clusters[mapped_cluster.name] = mapped_cluster
    usable = clusters.keys() | static.keys()
    ready_outbound = tuple(o.config for o in outbound if o.config.cluster in usable)
    # A listener whose cluster CDS has not given waits for it, as for a warming one.
    warming += {
        f"{o.config.cluster}{MISSING}"
        for o in outbound
        if o.config.cluster not in usable and o.config.cluster not in warming
    }
    return MappedConfig(
        outbound=ready_outbound,
        inbound=tuple(inbound),
        clusters=tuple(clusters.values()),
        warming=tuple(sorted(warming)),
        static_targets={name: target for name, target in targets.items() if name in static},
    )


def _check_static_target(out: _Outbound, cluster: ClusterConfig) -> None:
    """A dynamic listener on a static cluster with a CONNECT target (a static listener's)
    tunnels to that target (quicmesh keeps one a cluster)."""
    assert cluster.target is not None
    if cluster.target != out.target:
        raise MappingError(
            f"Listener {out.config.name!r}: tunneling_config.hostname "
            f"{out.target.authority!r} differs from {cluster.target.authority!r}, the CONNECT "
            f"target of static cluster {cluster.name!r}: quicmesh keeps one per cluster"
        )


def with_static(static: MappedConfig, dynamic: MappedConfig) -> MappedConfig:
    """The static listeners and clusters (a bootstrap's ``static_resources``, a
    configuration file's) with those LDS and CDS gave, as Envoy keeps both.

    :raises MappingError: a dynamic resource has the name of a static one (Envoy
        refuses to replace a static resource over xDS).
    """
    for kind, mine, theirs in (
        ("Listener", static.outbound + static.inbound, dynamic.outbound + dynamic.inbound),
        ("Cluster", static.clusters, dynamic.clusters),
    ):
        names = {item.name for item in mine}
        for item in theirs:
            if item.name in names:
                raise MappingError(
                    f"{kind} {item.name!r}: a static {kind.lower()} of the configuration "
                    "has that name (static resources are not replaced over xDS)"
                )
    clusters = tuple(
        replace(cluster, target=dynamic.static_targets[cluster.name])
        if cluster.target is None and cluster.name in dynamic.static_targets
        else cluster
        for cluster in static.clusters
    )
    return MappedConfig(
        outbound=static.outbound + dynamic.outbound,
        inbound=static.inbound + dynamic.inbound,
        clusters=clusters + dynamic.clusters,
        warming=dynamic.warming,
    )


def check_ports(mapped: MappedConfig, admin_port: int) -> None:
    """Refuse two listeners on one port (and protocol), or on the admin port.

    :raises MappingError: naming both.
    """
    tcp: dict[int, str] = {admin_port: "admin"}
    udp: dict[int, str] = {}
    for out in mapped.outbound:
        _claim(tcp, out.address[1], f"Listener {out.name!r}", "TCP")
    for inb in mapped.inbound:
        table = udp if "quic" in inb.transports else tcp
        _claim(table, inb.address[1], f"Listener {inb.name!r}", "UDP" if table is udp else "TCP")


def _claim(table: dict[int, str], port: int, owner: str, kind: str) -> None:
    if port in table:
        raise MappingError(f"{owner}: {kind} port {port} is also used by {table[port]}")
    table[port] = owner


def secrets_by_kind(
    secrets: Mapping[str, Secret], names: tuple[str, str] | None = None
) -> tuple[Secret | None, Secret | None]:
    """The Secret with a ``tls_certificate`` and the one with a ``validation_context``.

    :param names: the names the two must have (SDS: ``default`` for the identity,
        ``ROOTCA`` for the trust bundle, as Istio names them), so that a control plane
        that swapped them is told, not taken at its word; ``None``: any (a bootstrap's
        static secrets, which Envoy's transport sockets name freely).
    :raises MappingError: more than one of a kind, a kind under the other's name, or an
        unsupported field.
    """
    certificate: Secret | None = None
    validation: Secret | None = None
    for secret in secrets.values():
        where = f"Secret {secret.name!r}"
        _only(secret, {"name", "tls_certificate", "validation_context"}, where)
        if names is not None:
            for kind, name, what in (
                ("tls_certificate", names[0], "identity"),
                ("validation_context", names[1], "trust bundle"),
            ):
                if secret.HasField(kind) and secret.name != name:
                    raise MappingError(
                        f"{where}: has a {kind}, which only the {what}'s Secret {name!r} may carry"
                    )
        if secret.HasField("tls_certificate"):
            if certificate is not None:
                raise MappingError(
                    f"{where}: a second tls_certificate ({certificate.name!r} has one)"
                )
            _only(
                secret.tls_certificate,
                {"certificate_chain", "private_key"},
                f"{where}.tls_certificate",
            )
            certificate = secret
        if secret.HasField("validation_context"):
            if validation is not None:
                raise MappingError(
                    f"{where}: a second validation_context ({validation.name!r} has one)"
                )
            _only(secret.validation_context, {"trusted_ca"}, f"{where}.validation_context")
            validation = secret
    return certificate, validation


def data_source_bytes(source: Message, where: str) -> bytes:
    """The bytes of an ``envoy.config.core.v3.DataSource`` (file, inline bytes or string).

    :raises MappingError: an unsupported kind, or a file that cannot be read.
    """
    _only(source, {"filename", "inline_bytes", "inline_string"}, where)
    kind = source.WhichOneof("specifier")
    if kind == "inline_bytes":
        return bytes(source.inline_bytes)
    if kind == "inline_string":
        return str(source.inline_string).encode()
    if kind == "filename":
        try:
            return read_file(source.filename)
        except ConfigError as exc:
            raise MappingError(f"{where}: {exc}") from None
    raise MappingError(f"{where}: empty data source")
