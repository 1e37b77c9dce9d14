"""The sidecar's configuration: dataclasses and a validating YAML loader.

:func:`load_config` reads a YAML file (PyYAML ``safe_load``) into a frozen
:class:`SidecarConfig`. Every problem is reported as one
:class:`~quicmesh.errors.ConfigError` line naming the file, the field and what
is wrong, for example::

    sidecar.yaml: clusters[0].endpoints[1]: port 70000 is outside 1-65535

The loader does no networking and opens only the files the configuration names
as data (the endpoints files); certificates are loaded later by the runtime.
docs/config.md documents every field.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .. import duration
from ..congestion.host import default_congestion_control
from ..errors import ConfigError, InvalidTarget, os_error_text
from ..tls.ca import CA_CERT_FILE, CA_KEY_FILE
from ..transport.base import (
    ACK_ELICITING_THRESHOLD_MAX,
    DEFAULT_ACK_ELICITING_THRESHOLD,
    QUIC_ENGINE_NAMES,
    STATELESS_RESET_KEY_MIN_BYTES,
    default_quic_engine,
    exposed_secret,
    quic_engine_problem,
    ticket_cache_problem,
)
from ..tunnel.connect import Target, parse_authority, parse_host_name, parse_port, parse_target
from .accesslog import parse_log_format

Address = tuple[str, int]

TRANSPORT_NAMES = ("quic", "h2", "tcp")
"""Values of ``clusters[].transport`` and ``listeners.inbound[].transports``."""

CLUSTER_TRANSPORT_NAMES = (*TRANSPORT_NAMES, "auto")
"""Values of ``clusters[].transport``: ``auto`` is QUIC with HTTP/2 fallback."""

LB_POLICIES = ("round_robin", "least_request", "random")
"""Values of ``clusters[].load_balancing``."""

CONGESTION_CONTROLS = ("reno", "cubic", "bbr")
"""Values of ``clusters[].congestion_control`` (QUIC clusters only)."""

OUTBOUND_POLICIES = ("registry_only", "passthrough")
"""Values of ``intercept.outbound_policy``: what captured traffic to unknown destinations gets."""

MIN_IDLE_TIMEOUT = 0.1
"""The shortest ``clusters[].idle_timeout``: the pool sweeps idle connections every
half of it (a 1 ms one kept a core busy sweeping)."""

MIN_HEALTH_CHECK_INTERVAL = 0.1
"""The shortest ``clusters[].health_check.interval`` (and xDS health check ``interval``):
each round makes a handshake to every endpoint."""

MIN_KEEPALIVE_INTERVAL = 0.01
"""The shortest ``clusters[].liveness.keepalive_interval``: an idle connection PINGs
its peer this often (1 us kept both sidecars' cores busy)."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def is_name(value: str) -> bool:
    """Whether ``value`` is a quicmesh name (of a node, listener or cluster): a letter
    or digit, then up to 62 letters, digits, ``_``, ``.`` or ``-``."""
    return _NAME.fullmatch(value) is not None


_FIELD_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")


# -- the configuration --------------------------------------------------------


DEFAULT_FLOW_IDLE_TIMEOUT = 3600.0
"""Seconds a proxied flow may stay idle (no byte either way) before it is reset: Envoy's
``tcp_proxy`` default."""


@dataclass(frozen=True)
class NodeConfig:
    """Who this sidecar is."""

    name: str
    identity: str
    """This sidecar's SPIFFE ID, presented to peers in its certificate."""


@dataclass(frozen=True)
class TlsConfig:
    """Where the sidecar's certificate, key and trust bundle come from.

    Either ``ca_dir`` (a development CA written by :meth:`quicmesh.DevCA.save`,
    which issues ``node.identity`` at start) or all of ``cert``, ``key`` and
    ``trust_bundle`` (PEM files).
    """

    ca_dir: str | None = None
    cert: str | None = None
    key: str | None = None
    trust_bundle: str | None = None
    ticket_cache: str | None = None
    """A file keeping the QUIC session tickets peers issued, so that a restarted
    sidecar resumes (and sends 0-RTT on ``early_data`` clusters). None: memory only."""
    certificate_lifetime: float = 86400.0
    """(``ca_dir`` only) Seconds each certificate the sidecar issues itself is valid;
    a new one is issued two thirds into that time."""


@dataclass(frozen=True)
class AdminConfig:
    """The admin HTTP endpoint (``/metrics``, ``/stats``, ``/ready``, ...)."""

    address: Address


@dataclass(frozen=True)
class AccessLogConfig:
    """Where the access log goes: ``"-"`` is stdout, ``None`` disables it."""

    path: str | None = "-"
    format: str = "json"
    """``"json"`` or a template of ``{field}`` names (``text`` is loaded as its template)."""


@dataclass(frozen=True)
class DrainConfig:
    """How a drain (SIGTERM or ``POST /drain``) behaves."""

    grace_period: float = 10.0
    """Seconds live flows get to finish before connections are closed."""
    min_duration: float = 0.0
    """Seconds a drain lasts at least, live flows or not (Istio's
    ``terminationDrainDuration``, 5 s there): the outbound listeners keep taking the
    application's calls meanwhile. At most ``grace_period``."""


@dataclass(frozen=True)
class OutboundListenerConfig:
    """A local TCP listener whose connections are proxied to a cluster."""

    name: str
    address: Address
    cluster: str
    flow_idle_timeout: float | None = DEFAULT_FLOW_IDLE_TIMEOUT
    """Seconds a flow may move no byte either way before it is reset on both sides
    (Envoy's ``tcp_proxy`` ``idle_timeout``, with its default of an hour); None: never."""


@dataclass(frozen=True)
class DestinationRule:
    """One allowed destination: a host name, IP address or CIDR block, and a port.

    ``port`` is ``None`` for ``*`` (any port).
    """

    text: str
    host: str | None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    port: int | None


@dataclass(frozen=True)
class IdentityPolicy:
    """Which destinations peers with a matching identity may reach.

    ``identity`` is an exact SPIFFE ID, a prefix ending in ``/*``, or ``*``.
    """

    identity: str
    destinations: tuple[DestinationRule, ...]


@dataclass(frozen=True)
class InboundListenerConfig:
    """The tunnel listener that accepts flows from peer sidecars.

    QUIC listens on UDP and H2 or TCP on TCP, all on the same port number.
    """

    name: str
    address: Address
    transports: tuple[str, ...]
    destinations: tuple[DestinationRule, ...]
    policies: tuple[IdentityPolicy, ...] | None = None
    """None: no ``policies`` key, any verified peer may reach any allowed destination;
    a tuple (an empty one too, which allows nobody): only what a matching policy lists."""
    connect_timeout: float = 5.0
    max_streams: int = 128
    """Concurrent streams one peer connection may open (QUIC and H2)."""
    early_data: bool = True
    """Accept 0-RTT from QUIC peers resuming with a ticket (False: they resend it in 1-RTT)."""
    retry: str = "auto"
    """(QUIC) Address validation with Retry: ``auto`` (while ``retry_threshold``
    connections are half-open), ``always`` or ``never``."""
    retry_threshold: int = 64
    max_half_open: int = 1024
    """(QUIC) Connections in their handshake, at most; further Initials are dropped."""
    max_half_open_per_source: int = 128
    """(QUIC) The same, per source IP address."""
    handshake_timeout: float = 10.0
    """(QUIC) Seconds a peer may take to complete its handshake."""
    stateless_reset_key: str | None = None
    """(QUIC) File keeping the stateless reset key (created 0600 if missing), so that
    peers of a restarted sidecar learn at once that their connections are gone."""
    max_stream_rate: int = 1000
    """(QUIC) New streams per second one peer identity may open (over all its
    connections), granted through QUIC stream credit."""
    denied_stream_rate: int = 10
    """(QUIC) The same for an identity that no policy allows anywhere, from its first
    refused stream on (its every stream would be refused)."""
    engine: str = field(default_factory=default_quic_engine)
    """(QUIC) The QUIC engine serving the listener: ``native`` or ``aioquic`` (default:
    :func:`~quicmesh.transport.base.default_quic_engine`)."""
    max_datagram_size: int = 1200
    """(QUIC) UDP payload size the listener's connections send from the start (1200-1452)."""
    ack_eliciting_threshold: int = DEFAULT_ACK_ELICITING_THRESHOLD
    """(QUIC, native engine) ack-eliciting packets a native peer may receive before it
    must acknowledge (draft-ietf-quic-ack-frequency; 1: RFC 9000's every second packet)."""
    max_streams_per_identity: int = 1024
    """Concurrent inbound streams one peer identity may hold, over all its connections."""
    max_streams_total: int = 16384
    """Concurrent inbound streams in all."""
    overload_max_rss: int | None = None
    """MiB of resident memory counted as full by the overload manager (None: not watched)."""
    overload_max_descriptors: int | None = None
    """Open descriptors counted as full (None: the soft ``ulimit -n``)."""
    max_connections_per_identity: int = 256
    """Connections one peer identity may hold on this listener (all transports)."""
    max_buffered_per_connection: int = 32
    """MiB the inbound flows of one peer connection may hold in buffers (received and
    not yet written to the destination, read from it and not yet sent); beyond it
    the connection's fullest flows are reset."""
    max_buffered_total: int = 1024
    """MiB all inbound flows may hold in buffers: the overload manager's third
    resource (503 from 90 %, shedding from 98 %)."""
    overload_max_loop_lag: float = 0.05
    """Seconds of event-loop delay past which the peer identity opening the most
    streams gets its new-stream credit cut (QUIC; 0: off)."""
    splice: bool = True
    """(QUIC, native engine) Let the engine copy each accepted flow between its
    stream and the destination's TCP connection itself, after the CONNECT exchange
    (False: the sidecar copies in Python)."""
    flow_idle_timeout: float | None = DEFAULT_FLOW_IDLE_TIMEOUT
    """As :attr:`OutboundListenerConfig.flow_idle_timeout`, for each accepted flow."""

    def start_keys_changed(self, other: InboundListenerConfig) -> list[str]:
        """The keys ``other`` changes that a running listener does not take from a new
        configuration (all but :data:`INBOUND_LIVE_KEYS`), in declaration order: the
        transports, engine, limits, admission and overload are set when the listener
        starts, so a reload that changes one needs a new listener; none, and the
        reload updates it in place."""
        return [
            f.name
            for f in fields(self)
            if f.name not in INBOUND_LIVE_KEYS and getattr(self, f.name) != getattr(other, f.name)
        ]


INBOUND_LIVE_KEYS = (
    "destinations",
    "policies",
    "connect_timeout",
    "splice",
    "denied_stream_rate",
    "flow_idle_timeout",
)
"""Inbound listener keys a running listener applies on reload (each flow reads them)."""


INBOUND_LIMIT_KEYS = (
    "max_streams_per_identity",
    "max_streams_total",
    "overload_max_rss",
    "overload_max_descriptors",
    "max_connections_per_identity",
    "max_buffered_per_connection",
    "max_buffered_total",
)
"""Inbound listener keys for per-identity and total stream limits and overload."""

QUIC_ADMISSION_KEYS = (
    "retry",
    "retry_threshold",
    "max_half_open",
    "max_half_open_per_source",
    "handshake_timeout",
    "stateless_reset_key",
    "max_stream_rate",
    "denied_stream_rate",
)
"""Inbound listener keys for QUIC address validation and half-open limits."""


@dataclass(frozen=True)
class HealthCheckConfig:
    """Active health checking: a fresh transport handshake to each endpoint."""

    interval: float = 5.0
    timeout: float = 2.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1


@dataclass(frozen=True)
class OutlierDetectionConfig:
    """Passive ejection of endpoints that fail to connect."""

    consecutive_connect_failures: int = 5
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 100


@dataclass(frozen=True)
class CircuitBreakerConfig:
    """Limits on a cluster; a flow over a limit is refused and counted."""

    max_connections: int = 64
    max_concurrent_streams: int = 1024
    max_pending_opens: int = 256


@dataclass(frozen=True)
class FallbackConfig:
    """``transport: auto``: when to race HTTP/2, how long QUIC stays marked broken."""

    delay: float = 0.3
    broken_backoff: float = 300.0
    max_broken_backoff: float = 3600.0


@dataclass(frozen=True)
class LivenessSettings:
    """Keepalive and dead-peer detection (None: off), on every transport: QUIC's PINGs
    and probe timeouts, h2's PINGs and the kernel's TCP keepalive (``max_probe_timeouts``
    is QUIC's alone)."""

    keepalive_interval: float | None = 1.0
    max_probe_timeouts: int | None = 6
    dead_after: float | None = 10.0


@dataclass(frozen=True)
class ClusterConfig:
    """A set of peer sidecars reached over one transport."""

    name: str
    transport: str
    target: Target | None
    """The authority (``host:port``) sent in each CONNECT: where the peer forwards.
    Parsed at load with the tunnel's own grammar and carried parsed from there.
    None only for an xDS cluster no listener names a target for: its flows must
    bring their own (interception routes)."""
    endpoints: tuple[Address, ...]
    endpoints_file: str | None = None
    load_balancing: str = "round_robin"
    congestion_control: str = field(default_factory=default_congestion_control)
    """QUIC only; by default the host's TCP algorithm (``net.ipv4.tcp_congestion_control``)."""
    max_datagram_size: int = 1200
    """QUIC only: largest UDP payload the cluster's connections send (1200-1452)."""
    early_data: bool = False
    """QUIC only: resume with a cached ticket and send each new connection's first
    flows as 0-RTT. Only for destinations that tolerate a replayed first flight."""
    engine: str = field(default_factory=default_quic_engine)
    """QUIC only: the QUIC engine of the cluster's connections, ``native`` or ``aioquic``
    (default: :func:`~quicmesh.transport.base.default_quic_engine`)."""
    ack_eliciting_threshold: int = DEFAULT_ACK_ELICITING_THRESHOLD
    """QUIC only, native engine: ack-eliciting packets a native peer may receive before
    it must acknowledge (draft-ietf-quic-ack-frequency; 1: RFC 9000's every second packet)."""
    health_check: HealthCheckConfig | None = None
    outlier_detection: OutlierDetectionConfig = field(default_factory=OutlierDetectionConfig)
    circuit_breakers: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    connect_timeout: float = 5.0
    idle_timeout: float = 60.0
    """Seconds a pooled connection may carry no flow before it is closed; also the
    QUIC ``max_idle_timeout``."""
    connect_retries: int = 1
    services: tuple[Address, ...] = ()
    """Addresses (``ip:port``, e.g. a service VIP) whose captured connections go to this
    cluster, as the YAML lists them."""
    file_services: tuple[Address, ...] = ()
    """More such addresses, from the endpoints file (re-read when it changes)."""

    @property
    def all_services(self) -> tuple[Address, ...]:
        """:attr:`services` then the :attr:`file_services` not among them."""
        return merge_services(self.services, self.file_services)

    liveness: LivenessSettings = field(default_factory=LivenessSettings)
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    healthy_panic_threshold: int = 50
    """Percent: while fewer of the cluster's endpoints than this are healthy (not ejected,
    not failing health checks), flows go to all of them, health ignored, as Envoy's
    panic mode (its default, 50); 0: never (flows are refused ``no_healthy_endpoint``)."""
    server_identities: tuple[str, ...] = ()
    """The SPIFFE IDs (or ``prefix/*`` patterns) the cluster's endpoints may present: a
    connection to one presenting another identity is closed before any flow goes on it,
    as a handshake failure of that endpoint (Istio's expected service accounts; Envoy's
    ``match_typed_subject_alt_names``). Empty: any identity the trust bundle vouches for."""
    splice: bool = True
    """QUIC only, native engine: let the engine copy each flow between the local TCP
    connection and its stream itself, once the peer accepted the CONNECT (False:
    the sidecar copies in Python)."""

    def same_except_endpoints(self, other: ClusterConfig) -> bool:
        """True when only the endpoint list (and what the endpoints file says) differs:
        a reload can update the cluster in place. Its ``services`` count: a cluster kept
        on a reload that changed them went on with the old ones, which the next change
        of its endpoints file put back into the destination table."""
        return _replace_endpoints(self, ()) == _replace_endpoints(other, ())


XDS_IDENTITY_KEY = "quicmesh.identity"
"""The ``node.metadata`` key under which a sidecar reports its ``node.identity`` to its
control plane (reserved: ``xds.metadata`` may not set it)."""


@dataclass(frozen=True)
class XdsConfig:
    """Where listeners, clusters, endpoints and secrets come from: an ADS server."""

    address: Address
    """The control plane's gRPC address (plaintext HTTP/2: keep it on loopback or a
    trusted network)."""
    cluster: str = "quicmesh"
    """The ``node.cluster`` the sidecar reports."""
    metadata: tuple[tuple[str, str], ...] = ()
    """The ``node.metadata`` the sidecar reports (string values)."""
    initial_fetch_timeout: float | None = 15.0
    """Seconds the first sync waits for LDS and CDS (from the client's start), and then
    for the endpoints of warming clusters, before the sidecar becomes ready without them
    (Envoy's ``initial_fetch_timeout``); None (``0s``, as in Envoy): for ever."""


@dataclass(frozen=True)
class InterceptConfig:
    """The capture listeners that ``quicmesh intercept install`` redirects TCP to."""

    outbound_port: int = 15001
    inbound_port: int | None = 15006
    """None: no inbound capture listener."""
    outbound_policy: str = "registry_only"
    """What a captured connection to an address no cluster lists gets: ``registry_only``
    (refused with a reset, counted) or ``passthrough`` (connected directly)."""
    connect_timeout: float = 5.0
    """Seconds to connect to a passthrough or inbound original destination."""
    flow_idle_timeout: float | None = DEFAULT_FLOW_IDLE_TIMEOUT
    """As :attr:`OutboundListenerConfig.flow_idle_timeout`, for captured flows both ways."""


@dataclass(frozen=True)
class EndpointsDocument:
    """What an endpoints file holds: peer sidecars and, optionally, service addresses."""

    endpoints: tuple[Address, ...]
    services: tuple[Address, ...] = ()


@dataclass(frozen=True)
class SidecarConfig:
    """A whole sidecar configuration, as loaded from one YAML file."""

    source: str
    node: NodeConfig
    tls: TlsConfig
    admin: AdminConfig
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    drain: DrainConfig = field(default_factory=DrainConfig)
    outbound: tuple[OutboundListenerConfig, ...] = ()
    inbound: tuple[InboundListenerConfig, ...] = ()
    clusters: tuple[ClusterConfig, ...] = ()
    xds: XdsConfig | None = None
    """Set: listeners and clusters come from this ADS server (see docs/xds.md)."""
    intercept: InterceptConfig | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)
    """Problems that did not stop the load, one line each (e.g. a QUIC-only field on an
    h2 cluster, ignored): the CLI prints them, the sidecar logs them at start and reload."""

    def cluster(self, name: str) -> ClusterConfig:
        """The cluster called ``name`` (the loader guarantees listeners' clusters exist)."""
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view for ``/config_dump``."""
        return _plain(self)  # type: ignore[no-any-return]


def _replace_endpoints(cluster: ClusterConfig, endpoints: tuple[Address, ...]) -> ClusterConfig:
    from dataclasses import replace

    return replace(cluster, endpoints=endpoints, file_services=())


def _plain(value: Any) -> Any:
    from dataclasses import fields, is_dataclass

    if isinstance(value, DestinationRule):
        return value.text
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple | list):
        if len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
            return format_address(value)  # type: ignore[arg-type]
        return [_plain(item) for item in value]
    return value


# -- loading -------------------------------------------------------------------


def load_config(path: str | Path, *, xds_address: str | None = None) -> SidecarConfig:
    """Read and validate the sidecar configuration at ``path``.

    :param xds_address: ``xds.address``, from the command line (``--xds``): set before
        the file is validated, so a file with no listeners (xDS sends them) is valid.
    :raises ConfigError: one line, ``<file>: <field>: <problem>``.
    """
    path = Path(path)
    text = read_config_text(path, "cannot read")
    return parse_config(text, source=str(path), base_dir=path.parent, xds_address=xds_address)


MAX_CONFIG_BYTES = 16 * 2**20
"""The largest configuration or endpoints file read (``/dev/zero`` is not one)."""


def read_config_text(path: Path, cannot: str) -> str:
    """The UTF-8 text of a configuration file, at most :data:`MAX_CONFIG_BYTES`.

    :raises ConfigError: ``<file>: <cannot>: <why>``, too large, or not UTF-8.
    """
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: {cannot}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_CONFIG_BYTES // 2**20} MiB: not a configuration"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def parse_config(
    text: str, *, source: str, base_dir: Path | None = None, xds_address: str | None = None
) -> SidecarConfig:
    """Validate a YAML document; ``source`` names it in errors, relative paths use
    ``base_dir``; ``xds_address`` sets ``xds.address`` (see :func:`load_config`)."""
    document = _parse_yaml(text, source)
    if xds_address is not None and isinstance(document, dict):
        xds = document.get("xds")
        if xds is None:
            document["xds"] = {"address": xds_address}
        elif isinstance(xds, dict):
            xds["address"] = xds_address
    base = base_dir if base_dir is not None else Path(".")
    return _Loader(source, base).sidecar(_Field(source, "", document))


def load_endpoints_file(path: str | Path) -> tuple[Address, ...]:
    """Read an endpoints file: a YAML list of ``host:port``, or ``{endpoints: [...]}``.

    :raises ConfigError: naming the endpoints file, the entry and the problem.
    """
    return load_endpoints_document(path).endpoints


def load_endpoints_document(path: str | Path) -> EndpointsDocument:
    """Read an endpoints file, with the ``services`` (``ip:port``) of ``{endpoints, services}``.

    An empty file (or only comments) is refused, at start, on reload and when the
    watcher sees it change: a rewrite in place looks so halfway, and read as no
    endpoints it dropped every endpoint of a running cluster (``[]`` says none).

    :raises ConfigError: naming the endpoints file, the entry and the problem.
    """
    path = Path(path)
    text = read_config_text(path, "cannot read endpoints file")
    document = _parse_yaml(text, str(path))
    if document is None:
        raise ConfigError(
            f"{path}: the endpoints file is empty: write [] for a cluster with no endpoints"
        )
    node = _Field(str(path), "", document)
    services: tuple[Address, ...] = ()
    if isinstance(document, Mapping):
        node.only_keys({"endpoints", "services"})
        services = _given_once(
            node.child("services").items(allow_empty=True), lambda i: i.convert(parse_service)
        )
        node = node.child("endpoints")
    endpoints = _given_once(node.items(allow_empty=True), lambda item: item.address())
    return EndpointsDocument(endpoints, services)


def _given_once(items: list[_Field], read: Callable[[_Field], Address]) -> tuple[Address, ...]:
    """The addresses of a list, each given once (a second was silently dropped: most
    likely a typo for another endpoint or service)."""
    addresses: list[Address] = []
    for item in items:
        address = read(item)
        if address in addresses:
            raise item.error(f"{format_address(address)} is given twice")
        addresses.append(address)
    return tuple(addresses)


MAX_ALIAS_EXPANSION = 100_000
"""The most nodes YAML aliases may add to a document once expanded, or
:data:`MAX_ALIAS_FACTOR` times its own nodes if more (a document of nested aliases, a
"billion laughs", grows as the product of its levels; merge keys repeating a block of
defaults over thousands of entries, linearly)."""

MAX_ALIAS_FACTOR = 20


class StrictYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error:
    PyYAML keeps the last one, so a second ``admin:`` block or a repeated option
    silently replaced the first (keys a merge (``<<``) brings in may still be
    overridden, as YAML means them to be). Aliases may add at most
    :data:`MAX_ALIAS_EXPANSION` nodes, refer to no node that holds them, and a string
    must be Unicode that can be written (no lone surrogate, as ``"\\uD800"`` gives)."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            sizes: dict[int, int] = {}
            expanded = _expanded_size(node, sizes, set())
            allowed = max(MAX_ALIAS_EXPANSION, MAX_ALIAS_FACTOR * len(sizes))
            if expanded - len(sizes) > allowed:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"aliases expand the document to {expanded:,} nodes "
                    f"(at most {allowed:,} more than it has)",
                    None,
                )
        return node

    def construct_scalar(self, node: yaml.ScalarNode | yaml.MappingNode) -> Any:
        value = super().construct_scalar(node)
        if isinstance(value, str) and _SURROGATE.search(value):
            raise yaml.constructor.ConstructorError(
                None, None, "a string that is not Unicode text (a lone surrogate)", node.start_mark
            )
        return value

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the constructor says so
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"the key {key!r} is given twice",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _expanded_size(node: yaml.Node, sizes: dict[int, int], holding: set[int]) -> int:
    """How many nodes ``node`` stands for with every alias expanded; ``sizes`` memoises
    each distinct node's (their number is the document's own size)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    if id(node) in holding:
        raise yaml.composer.ComposerError(
            None, None, "an alias refers to a node that holds it", node.start_mark
        )
    holding.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        children: list[yaml.Node] = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    size = 1 + sum(_expanded_size(child, sizes, holding) for child in children)
    holding.discard(id(node))
    sizes[id(node)] = size
    return size


def load_yaml(text: str) -> Any:
    """A YAML document, with :class:`StrictYamlLoader` (yaml.YAMLError if invalid)."""
    return yaml.load(text, Loader=StrictYamlLoader)  # a SafeLoader


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return load_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        problem = (exc.problem or "invalid YAML").replace("\n", " ")
        raise ConfigError(f"{source}: {where}invalid YAML: {problem}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{source}: invalid YAML: {first}") from None


def parse_address(text: str) -> Address:
    """Parse ``host:port`` or ``[v6]:port`` (port 1-65535); ValueError says what is wrong.

    The grammar is the tunnel's own (:func:`quicmesh.tunnel.connect.parse_authority`,
    the one CONNECT targets are checked against), with white space around it ignored.
    Only destination rules (a CIDR block, port ``*``: :func:`parse_destination`) and
    service addresses (an IP literal: :func:`parse_service`) read a different one.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("expected host:port")
    return parse_authority(text.strip())


def parse_service(text: object) -> Address:
    """Parse a service address: ``ip:port`` or ``[ipv6]:port`` (an IP literal, no name)."""
    if not isinstance(text, str):
        raise ValueError(f"expected ip:port, got {_kind(text)}")
    host, port = parse_address(text)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(
            f"{host!r} is not an IP address (services match dialled addresses)"
        ) from None
    return host, port


def normalise_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address (IPv4-mapped IPv6 unmapped, a zone dropped), or None
    if it is a name: how services and dialled addresses are compared."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def loopback_only(host: str) -> bool:
    """Whether ``host`` (an IP literal or a name) is reachable from this host alone."""
    if host.lower().rstrip(".") == "localhost":
        return True
    address = normalise_ip(host)
    return address is not None and address.is_loopback


def wide_outbound_listener(address: Address) -> str | None:
    """Why an outbound listener at ``address`` deserves a warning, or None (on loopback).

    As the admin's warning: a workload's outbound listener is for the workloads of this
    host; bound wider, any host that reaches it sends flows into the mesh under this
    sidecar's identity. Said at load (and by ``--check``) for the configuration file's
    listeners, and as the control plane's listeners are applied (xDS).
    """
    if loopback_only(address[0]):
        return None
    return (
        f"{format_address(address)} takes flows from other hosts too, and sends them to the"
        " mesh as this sidecar's identity (a workload's listener belongs on 127.0.0.1)"
    )


def format_address(address: Address) -> str:
    """``host:port``, with IPv6 literals in brackets."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_destination(text: str) -> DestinationRule:
    """Parse a destination rule: ``host:port``, ``ip:port``, ``cidr:port``; port may be ``*``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("expected host:port or cidr:port")
    text = text.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses as [address]:port")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port or cidr:port")
    port = None if port_text == "*" else parse_port(port_text)
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    name: str | None = None
    try:
        network = _unmapped_network(ipaddress.ip_network(host, strict=False))
    except ValueError:
        try:
            # The tunnel's host-name grammar: a rule no CONNECT target can match
            # (10.0.0.999, a_b.svc) is refused here rather than loaded.
            name = parse_host_name(host).rstrip(".")
        except InvalidTarget:
            raise ValueError(f"{host!r} is not a host name, IP address or CIDR block") from None
    return DestinationRule(text=text, host=name, network=network, port=port)


_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmapped_network(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A network of IPv4-mapped IPv6 addresses as the IPv4 network it maps, as targets
    are matched (:func:`normalise_ip`): ``[::ffff:10.0.0.0/104]`` is ``10.0.0.0/8``."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_IPV4_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def parse_duration(value: object) -> float:
    """Seconds from a number or a duration string (:mod:`quicmesh.duration`'s grammar:
    ``"500ms"``, ``"2s"``, ``"1m"``), within 0-86400 seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5s or 500ms")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an integer too large for a float
            raise ValueError("duration is outside 0-86400 seconds") from None
    elif isinstance(value, str):
        seconds = duration.parse_duration(value)
    else:
        raise ValueError("expected a duration such as 5s or 500ms")
    if not math.isfinite(seconds) or seconds < 0 or seconds > 86400:
        raise ValueError(f"duration {value!r} is outside 0-86400 seconds")
    return seconds


def check_files(config: SidecarConfig) -> list[str]:
    """The files the sidecar writes: ``access_log.path`` and ``tls.ticket_cache`` must be
    files (made if missing) in a directory that exists, and writable; a listener's
    ``stateless_reset_key`` a readable file, or one that can be made. Checked by
    ``--check`` and at start, so that neither the start (a traceback, or exit 1, before)
    nor the first write long after it (a ticket cache that was a directory failed every
    save) finds the problem.

    :returns: warnings, one line each (a reset key that others may read: used, with the
        warning the start logs too).
    :raises ConfigError: ``<file>: <key>: <problem>``.
    """
    warnings: list[str] = []
    written: list[tuple[str, str | None, int]] = [
        ("access_log.path", config.access_log.path, os.W_OK),
        ("tls.ticket_cache", config.tls.ticket_cache, os.W_OK),
    ]
    written += [
        (f"listeners.inbound[{i}].stateless_reset_key", listener.stateless_reset_key, os.R_OK)
        for i, listener in enumerate(config.inbound)
    ]
    claimed: dict[object, str] = {_file_key(Path(config.source)): "the configuration itself"}
    # Files the sidecar reads its identity from: never written to (an access log on the
    # private key appended flow records to it) nor taken as a reset key.
    tls = config.tls
    read: list[tuple[str, str | None]] = [
        ("tls.cert", tls.cert),
        ("tls.key", tls.key),
        ("tls.trust_bundle", tls.trust_bundle),
    ]
    if tls.ca_dir is not None:
        read += [
            (f"tls.ca_dir's {name}", str(Path(tls.ca_dir) / name))
            for name in (CA_CERT_FILE, CA_KEY_FILE)
        ]
    for key, path in read:
        if path is not None:
            claimed.setdefault(_file_key(Path(path)), key)
    for key, path, access in written:
        if path is None or path == "-":
            continue
        target = Path(path)
        other = claimed.setdefault(_file_key(target), key)
        if other != key:
            raise ConfigError(f"{config.source}: {key}: {path} is also {other}")
        try:
            problem = _file_problem(target, key, access)
        except OSError as exc:  # a directory on the way we may not search, a long name
            problem = f"{path} cannot be checked: {os_error_text(exc)}"
        if problem:
            raise ConfigError(f"{config.source}: {key}: {problem}")
        if key.endswith("stateless_reset_key") and (exposed := _readable_by_others(target)):
            warnings.append(f"{config.source}: {key}: {exposed}")
    return warnings


def _readable_by_others(path: Path) -> str:
    """Why a secret file at ``path`` is exposed (:func:`exposed_secret`), or ""."""
    try:
        return exposed_secret(path, path.stat().st_mode)
    except OSError:
        return ""  # missing: made 0600


def _file_problem(target: Path, key: str, access: int) -> str:
    """Why the sidecar cannot write (``os.W_OK``) or read ``target`` for ``key``, or "".

    :raises OSError: ``target`` cannot be looked at.
    """
    path = str(target)
    if target.is_dir():
        return f"{path} is a directory"
    if not target.parent.is_dir():
        return f"no directory {target.parent} for {target.name}"
    if target.exists() and not os.access(target, access):
        return f"{path} is not {'writable' if access == os.W_OK else 'readable'}"
    if not target.exists() and not os.access(target.parent, os.W_OK):
        return f"{target.parent} is not writable (to make {target.name})"
    if key == "tls.ticket_cache" and (foreign := ticket_cache_problem(target)):
        return f"{path}: {foreign}"
    if key.endswith("stateless_reset_key"):
        return _short_key(target)
    return ""


def _file_key(path: Path) -> object:
    """What tells two names of one file apart from two files: its device and inode where
    it exists (a hard link, a symbolic one), else its resolved path."""
    try:
        status = path.stat()
    except OSError:
        try:
            return path.resolve()
        except (OSError, RuntimeError):  # a name too long, a loop of links
            return path.absolute()
    return (status.st_dev, status.st_ino)


def _short_key(path: Path) -> str:
    """Why the stateless reset key in ``path`` cannot be used (it is made if missing),
    or ``""``: the length :func:`~quicmesh.transport.quic.load_stateless_reset_key`
    checks at start."""
    try:
        size = path.stat().st_size
    except OSError:
        return ""  # missing (made at start) or unreadable (said above)
    if size >= STATELESS_RESET_KEY_MIN_BYTES:
        return ""
    return f"{path} is shorter than {STATELESS_RESET_KEY_MIN_BYTES} bytes ({size})"


def _distinct_addresses(host: str, other: str) -> bool:
    """Whether two listeners on one port bind apart: two different IP addresses, neither
    of them every address (``0.0.0.0``, ``::``). A host name may be either of them."""
    one, two = _ip_address(host), _ip_address(other)
    if one is None or two is None:
        return False
    return one != two and not one.is_unspecified and not two.is_unspecified


T = TypeVar("T")


class _Field:
    """A value in the document and where it is, for error messages."""

    def __init__(self, source: str, path: str, value: Any) -> None:
        self.source = source
        self.path = path
        self.value = value

    def error(self, problem: str) -> ConfigError:
        where = f"{self.path}: " if self.path else ""
        return ConfigError(f"{self.source}: {where}{problem}")

    def mapping(self) -> Mapping[str, Any]:
        if not isinstance(self.value, Mapping):
            raise self.error(f"expected a mapping, got {_kind(self.value)}")
        for key in self.value:
            if not isinstance(key, str):
                raise self.error(f"field names must be strings, got {_kind(key)} {key!r:.40}")
        return self.value

    def only_keys(self, allowed: set[str]) -> None:
        for key in self.mapping():
            if key not in allowed:
                raise self.child(key).error(
                    f"unknown field (expected one of: {', '.join(sorted(allowed))})"
                )

    def has(self, key: str) -> bool:
        return key in self.mapping() and self.mapping()[key] is not None

    def child(self, key: str) -> _Field:
        if not _FIELD_NAME.fullmatch(key):
            sub = f"{self.path}[{key!r:.40}]"
        else:
            sub = f"{self.path}.{key}" if self.path else key
        return _Field(self.source, sub, self.mapping().get(key))

    def items(self, *, allow_empty: bool = False) -> list[_Field]:
        if self.value is None and allow_empty:
            return []
        if not isinstance(self.value, list):
            raise self.error(f"expected a list, got {_kind(self.value)}")
        if not self.value and not allow_empty:
            raise self.error("must not be empty")
        return [_Field(self.source, f"{self.path}[{i}]", v) for i, v in enumerate(self.value)]

    def required(self) -> _Field:
        if self.value is None:
            raise self.error("is required")
        return self

    def string(self) -> str:
        if not isinstance(self.value, str):
            raise self.error(f"expected a non-empty string, got {_kind(self.value)}")
        if not self.value.strip():
            raise self.error("is empty: give a value or leave the key out")
        return self.value.strip()

    def name(self) -> str:
        text = self.string()
        if not is_name(text):
            shown = repr(text) if len(text) <= 60 else repr(text[:57] + "...")
            raise self.error(
                f"{shown} is not a name (1-63 letters, digits, '_', '.', '-', "
                "starting with a letter or digit)"
            )
        return text

    def integer(self, low: int, high: int) -> int:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise self.error(f"expected an integer, got {_kind(self.value)}")
        if not low <= self.value <= high:
            raise self.error(f"{self.value} is outside {low}-{high}")
        return self.value

    def boolean(self) -> bool:
        if not isinstance(self.value, bool):
            raise self.error(f"expected true or false, got {_kind(self.value)}")
        return self.value

    def choice(self, choices: tuple[str, ...]) -> str:
        if self.value not in choices:
            raise self.error(f"{self.value!r:.40} is not one of {', '.join(choices)}")
        return str(self.value)

    def convert(self, parse: Callable[[Any], T]) -> T:
        try:
            return parse(self.value)
        except (ValueError, TypeError) as exc:
            raise self.error(str(exc) or "invalid value") from None

    def address(self) -> Address:
        return self.convert(parse_address)

    def duration(self, *, positive: bool = True, minimum: float = 0.0) -> float:
        """Seconds, more than zero (``positive``) and at least ``minimum``."""
        seconds = self.convert(parse_duration)
        if positive and seconds <= 0:
            raise self.error("must be greater than zero")
        if seconds < minimum:
            given = self.value if isinstance(self.value, str) else f"{seconds:g}s"
            raise self.error(f"{given!s:.40} is below the minimum of {format_seconds(minimum)}")
        return seconds


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


class _Loader:
    """Turns a parsed YAML document into a :class:`SidecarConfig`."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir
        self.warnings: list[str] = []

    def path(self, node: _Field) -> str:
        text = node.string()
        if "\x00" in text:
            raise node.error("path contains a NUL character")
        return str(self.base_dir / text)

    def sidecar(self, root: _Field) -> SidecarConfig:
        if root.value is None:
            raise root.error("the file is empty: expected a mapping with node, tls and admin")
        root.only_keys(
            {
                "node",
                "tls",
                "admin",
                "access_log",
                "drain",
                "listeners",
                "clusters",
                "xds",
                "intercept",
            }
        )
        xds = self.xds(root.child("xds"))
        clusters = tuple(self.cluster(c) for c in root.child("clusters").items(allow_empty=True))
        names = [c.name for c in clusters]
        for index, name in enumerate(names):
            if name in names[:index]:
                field = root.child("clusters").items()[index].child("name")
                raise field.error(f"duplicate cluster {name!r}")
        outbound: tuple[OutboundListenerConfig, ...] = ()
        inbound: tuple[InboundListenerConfig, ...] = ()
        listeners = root.child("listeners")
        if listeners.value is not None:
            listeners.only_keys({"outbound", "inbound"})
            outbound = tuple(
                self.outbound(item, set(names))
                for item in listeners.child("outbound").items(allow_empty=True)
            )
            inbound = tuple(
                self.inbound(item) for item in listeners.child("inbound").items(allow_empty=True)
            )
        intercept = self.intercept(root.child("intercept"))
        if not outbound and not inbound and xds is None and intercept is None:
            raise root.child("listeners").error(
                "at least one outbound or inbound listener (or intercept) needed"
            )
        admin = self.admin(root.child("admin").required())
        self.check_ports(listeners, admin, outbound, inbound, intercept)
        self.check_services(root.child("clusters"), clusters)
        tls = self.tls(root.child("tls").required())
        self.check_ticket_cache(root.child("tls").child("ticket_cache"), tls, clusters)
        return SidecarConfig(
            source=self.source,
            node=self.node(root.child("node").required()),
            tls=tls,
            admin=admin,
            access_log=self.access_log(root.child("access_log")),
            drain=self.drain(root.child("drain")),
            outbound=outbound,
            inbound=inbound,
            clusters=clusters,
            xds=xds,
            intercept=intercept,
            warnings=tuple(self.warnings),
        )

    def check_ticket_cache(
        self, node: _Field, tls: TlsConfig, clusters: tuple[ClusterConfig, ...]
    ) -> None:
        """Warn that native clusters do not use ``tls.ticket_cache``: rustls 0.23 keeps
        a client's session tickets in memory and cannot export them (docs/design.md)."""
        if tls.ticket_cache is None:
            return
        native = [
            c.name for c in clusters if c.transport in ("quic", "auto") and c.engine == "native"
        ]
        if native:
            self.warnings.append(
                str(
                    node.error(
                        f"applies to aioquic clusters only: {', '.join(native)} on the native "
                        "engine keep their session tickets in memory (a restarted sidecar "
                        "resumes no session on them)"
                    )
                )
            )

    def xds(self, node: _Field) -> XdsConfig | None:
        if node.value is None:
            return None
        node.only_keys({"address", "cluster", "metadata", "initial_fetch_timeout"})
        metadata = node.child("metadata")
        pairs: list[tuple[str, str]] = []
        if metadata.value is not None:
            for key, value in metadata.mapping().items():
                if not isinstance(value, str):
                    raise metadata.child(key).error(f"expected a string, got {_kind(value)}")
                if key == XDS_IDENTITY_KEY:
                    raise metadata.child(key).error(
                        "is reserved: the sidecar reports node.identity under it"
                    )
                pairs.append((key, value))
        cluster = node.child("cluster")
        return XdsConfig(
            address=node.child("address").required().address(),
            cluster=cluster.name() if cluster.value is not None else "quicmesh",
            metadata=tuple(pairs),
            initial_fetch_timeout=_fetch_timeout(node.child("initial_fetch_timeout")),
        )

    def intercept(self, node: _Field) -> InterceptConfig | None:
        if node.value is None:
            return None
        node.only_keys(
            {
                "outbound_port",
                "inbound_port",
                "outbound_policy",
                "connect_timeout",
                "flow_idle_timeout",
            }
        )
        inbound = node.child("inbound_port")
        inbound_explicit_none = "inbound_port" in node.mapping() and inbound.value is None
        config = InterceptConfig(
            outbound_port=_int_or(node.child("outbound_port"), 15001, 1, 65535),
            inbound_port=None if inbound_explicit_none else _int_or(inbound, 15006, 1, 65535),
            outbound_policy=_or_default(
                node.child("outbound_policy"), "registry_only", OUTBOUND_POLICIES
            ),
            connect_timeout=_duration_or(node.child("connect_timeout"), 5.0),
            flow_idle_timeout=_flow_idle_timeout(node.child("flow_idle_timeout")),
        )
        if config.inbound_port == config.outbound_port:
            raise inbound.error(f"port {config.inbound_port} is also the outbound_port")
        return config

    def check_services(self, node: _Field, clusters: tuple[ClusterConfig, ...]) -> None:
        # Compared as the destination table compares them: an IPv4-mapped IPv6 address
        # is its IPv4 address (two spellings of one service passed here before, and the
        # table refused them at start, with a traceback).
        owners: dict[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | None, int], str] = {}
        for index, cluster in enumerate(clusters):
            for service in cluster.all_services:
                key = (normalise_ip(service[0]), service[1])
                if key in owners and owners[key] != cluster.name:
                    services = _Field(node.source, f"{node.path}[{index}].services", None)
                    # (Named as compared: an IPv4-mapped spelling is its IPv4 address.)
                    shown = format_address((str(key[0] or service[0]), service[1]))
                    raise services.error(f"{shown} is also a service of cluster {owners[key]!r}")
                owners[key] = cluster.name

    def check_ports(
        self,
        listeners: _Field,
        admin: AdminConfig,
        outbound: tuple[OutboundListenerConfig, ...],
        inbound: tuple[InboundListenerConfig, ...],
        intercept: InterceptConfig | None = None,
    ) -> None:
        ANY = ""  # the intercept's ports: every address
        tcp_ports: dict[int, list[tuple[str, str]]] = {
            admin.address[1]: [(admin.address[0], "admin.address")]
        }
        udp_ports: dict[int, list[tuple[str, str]]] = {}
        names: set[str] = set()

        # Owners are named by their whole path: a clash may be between two sections.
        document = _Field(listeners.source, "", None)

        def claim(
            table: dict[int, list[tuple[str, str]]], address: tuple[str, int], owner: str, kind: str
        ) -> None:
            host, port = address
            for other_host, other in table.get(port, []):
                if not _distinct_addresses(host, other_host):
                    raise document.error(f"{owner}: {kind} port {port} is also used by {other}")
            table.setdefault(port, []).append((host, owner))

        for index, out in enumerate(outbound):
            owner = f"{listeners.path}.outbound[{index}]"
            if out.name in names:
                raise document.error(f"{owner}.name: duplicate listener {out.name!r}")
            names.add(out.name)
            claim(tcp_ports, out.address, owner, "TCP")
        for index, inb in enumerate(inbound):
            owner = f"{listeners.path}.inbound[{index}]"
            if inb.name in names:
                raise document.error(f"{owner}.name: duplicate listener {inb.name!r}")
            names.add(inb.name)
            if "quic" in inb.transports:
                claim(udp_ports, inb.address, owner, "UDP")
            if "h2" in inb.transports or "tcp" in inb.transports:
                claim(tcp_ports, inb.address, owner, "TCP")
        if intercept is not None:
            claim(tcp_ports, (ANY, intercept.outbound_port), "intercept.outbound_port", "TCP")
            if intercept.inbound_port is not None:
                claim(tcp_ports, (ANY, intercept.inbound_port), "intercept.inbound_port", "TCP")

    def node(self, node: _Field) -> NodeConfig:
        node.only_keys({"name", "identity"})
        identity = node.child("identity").required()
        return NodeConfig(
            name=node.child("name").required().name(),
            identity=identity.convert(_spiffe_id),
        )

    def tls(self, node: _Field) -> TlsConfig:
        node.only_keys(
            {"ca_dir", "cert", "key", "trust_bundle", "ticket_cache", "certificate_lifetime"}
        )
        files = [key for key in ("cert", "key", "trust_bundle") if node.has(key)]
        ticket_cache = self.path(node.child("ticket_cache")) if node.has("ticket_cache") else None
        lifetime = node.child("certificate_lifetime")
        if node.has("ca_dir"):
            if files:
                raise node.child(files[0]).error("give either ca_dir or cert/key/trust_bundle")
            seconds = 86400.0 if lifetime.value is None else lifetime.duration()
            if seconds < 1.0:
                raise lifetime.error("must be at least 1s")
            return TlsConfig(
                ca_dir=self.path(node.child("ca_dir")),
                ticket_cache=ticket_cache,
                certificate_lifetime=seconds,
            )
        if lifetime.value is not None:
            raise lifetime.error("applies to ca_dir only (PEM files carry their own dates)")
        for key in ("cert", "key", "trust_bundle"):
            if not node.has(key):
                raise node.child(key).error("is required when ca_dir is not given")
        return TlsConfig(
            cert=self.path(node.child("cert")),
            key=self.path(node.child("key")),
            trust_bundle=self.path(node.child("trust_bundle")),
            ticket_cache=ticket_cache,
        )

    def admin(self, node: _Field) -> AdminConfig:
        node.only_keys({"address"})
        return AdminConfig(address=node.child("address").required().address())

    def access_log(self, node: _Field) -> AccessLogConfig:
        if node.value is None:
            return AccessLogConfig()
        node.only_keys({"path", "format"})
        fmt = node.child("format")
        log_format = fmt.convert(parse_log_format) if fmt.value is not None else "json"
        path = node.child("path")
        if path.value is None:
            disabled = "path" in node.mapping()  # path: null
            return AccessLogConfig(path=None if disabled else "-", format=log_format)
        if path.string() == "-":
            return AccessLogConfig(path="-", format=log_format)
        return AccessLogConfig(path=self.path(path), format=log_format)

    def drain(self, node: _Field) -> DrainConfig:
        if node.value is None:
            return DrainConfig()
        node.only_keys({"grace_period", "min_duration"})
        grace_node, minimum_node = node.child("grace_period"), node.child("min_duration")
        grace = DrainConfig.grace_period
        if grace_node.value is not None:
            grace = grace_node.duration(positive=False)
        minimum = 0.0
        if minimum_node.value is not None:
            minimum = minimum_node.duration(positive=False)
            if minimum > grace:
                raise minimum_node.error(
                    f"{minimum:g}s is longer than drain.grace_period ({grace:g}s), which"
                    " bounds the whole drain"
                )
        return DrainConfig(grace_period=grace, min_duration=minimum)

    def outbound(self, node: _Field, clusters: set[str]) -> OutboundListenerConfig:
        node.only_keys({"name", "address", "cluster", "flow_idle_timeout"})
        cluster_field = node.child("cluster").required()
        cluster = cluster_field.name()
        if cluster not in clusters:
            raise cluster_field.error(f"no cluster named {cluster!r}")
        address_field = node.child("address").required()
        address = address_field.address()
        wide = wide_outbound_listener(address)
        if wide is not None:
            self.warnings.append(str(address_field.error(wide)))
        return OutboundListenerConfig(
            name=node.child("name").required().name(),
            address=address,
            cluster=cluster,
            flow_idle_timeout=_flow_idle_timeout(node.child("flow_idle_timeout")),
        )

    def inbound(self, node: _Field) -> InboundListenerConfig:
        node.only_keys(
            {
                "name",
                "address",
                "transports",
                "destinations",
                "policies",
                "connect_timeout",
                "max_streams",
                "early_data",
                "engine",
                "splice",
                "max_datagram_size",
                "ack_eliciting_threshold",
                *QUIC_ADMISSION_KEYS,
                *INBOUND_LIMIT_KEYS,
                "overload_max_loop_lag",
                "flow_idle_timeout",
            }
        )
        transports_field = node.child("transports").required()
        transports = tuple(t.choice(TRANSPORT_NAMES) for t in transports_field.items())
        if len(set(transports)) != len(transports):
            raise transports_field.error("lists a transport twice")
        if "h2" in transports and "tcp" in transports:
            raise transports_field.error(
                "h2 and tcp both listen on TCP: give them separate inbound listeners"
            )
        # Given, even empty, the policies decide (an empty list allows nobody, as an
        # Istio ALLOW policy without rules); absent, any verified peer may reach any
        # allowed destination. The key with no value (every entry commented out) is
        # neither: refused, not read as absent (which would let every peer in).
        if "policies" in node.mapping() and node.child("policies").value is None:
            raise node.child("policies").error(
                "has no value: give a list of policies ([] allows no peer), or leave the "
                "key out to let every verified peer reach the listener's destinations"
            )
        policies = (
            tuple(self.policy(p) for p in node.child("policies").items(allow_empty=True))
            if node.has("policies")
            else None
        )
        destinations = self.destinations(node.child("destinations").required())
        if policies is not None:
            self._warn_unreachable_policy_rules(node.child("policies"), policies, destinations)
        timeout = node.child("connect_timeout")
        streams = node.child("max_streams")
        early = node.child("early_data")
        if early.value is not None and "quic" not in transports:
            raise early.error("applies to listeners serving quic only")
        engine = node.child("engine")
        splice = node.child("splice")
        datagram = node.child("max_datagram_size")
        ack_threshold = node.child("ack_eliciting_threshold")
        for option in (engine, splice, datagram, ack_threshold):
            if option.value is not None and "quic" not in transports:
                raise option.error("applies to listeners serving quic only")
        admission = self.quic_admission(node, "quic" in transports)
        for key in INBOUND_LIMIT_KEYS:
            if node.child(key).value is not None:
                admission[key] = node.child(key).integer(1, 1 << 40)
        loop_lag = node.child("overload_max_loop_lag")
        if loop_lag.value is not None:
            # Its action is a cut of QUIC stream credit: H2 and TCP have none to withhold
            # (it was accepted on them without effect).
            if "quic" not in transports:
                raise loop_lag.error("applies to listeners serving quic only")
            admission["overload_max_loop_lag"] = loop_lag.duration(positive=False)
        return InboundListenerConfig(
            name=node.child("name").required().name(),
            address=node.child("address").required().address(),
            transports=transports,
            destinations=destinations,
            policies=policies,
            connect_timeout=timeout.duration() if timeout.value is not None else 5.0,
            max_streams=streams.integer(1, 65536) if streams.value is not None else 128,
            early_data=early.boolean() if early.value is not None else True,
            engine=self.quic_engine(engine, check_built=True),
            splice=splice.boolean() if splice.value is not None else True,
            max_datagram_size=_int_or(datagram, 1200, 1200, 1452),
            ack_eliciting_threshold=_int_or(
                ack_threshold, DEFAULT_ACK_ELICITING_THRESHOLD, 0, ACK_ELICITING_THRESHOLD_MAX
            ),
            flow_idle_timeout=_flow_idle_timeout(node.child("flow_idle_timeout")),
            **admission,
        )

    def quic_engine(self, node: _Field, *, check_built: bool) -> str:
        """``engine``: one of :data:`QUIC_ENGINE_NAMES` (default: :func:`default_quic_engine`);
        with ``check_built``, one that can run here (the native one needs its extension)."""
        if node.value is None:
            return default_quic_engine()
        name = node.choice(QUIC_ENGINE_NAMES)
        problem = quic_engine_problem(name) if check_built else None
        if problem is not None:
            raise node.error(problem)
        return name

    def quic_admission(self, node: _Field, serves_quic: bool) -> dict[str, Any]:
        """The QUIC admission keys of an inbound listener (issue 13)."""
        result: dict[str, Any] = {}
        for key in QUIC_ADMISSION_KEYS:
            field_ = node.child(key)
            if field_.value is None:
                continue
            if not serves_quic:
                raise field_.error("applies to listeners serving quic only")
            if key == "retry":
                result[key] = field_.choice(("auto", "always", "never"))
            elif key == "handshake_timeout":
                result[key] = field_.duration()
            elif key == "stateless_reset_key":
                result[key] = self.path(field_)
            else:
                result[key] = field_.integer(1, 1_000_000)
        return result

    def destinations(self, node: _Field) -> tuple[DestinationRule, ...]:
        return tuple(item.convert(parse_destination) for item in node.items())

    def _warn_unreachable_policy_rules(
        self,
        node: _Field,
        policies: tuple[IdentityPolicy, ...],
        destinations: tuple[DestinationRule, ...],
    ) -> None:
        """A policy destination no listener destination overlaps allows nothing (the
        listener's allow-list is checked first): warned, as a likely mistake."""
        for policy_node, policy in zip(node.items(allow_empty=True), policies, strict=True):
            rules = policy_node.child("destinations").items()
            for rule_node, rule in zip(rules, policy.destinations, strict=True):
                if not any(rules_overlap(rule, allowed) for allowed in destinations):
                    self.warnings.append(
                        str(
                            rule_node.error(
                                f"{rule.text} is outside the listener's destinations:"
                                " no flow can reach it"
                            )
                        )
                    )

    def policy(self, node: _Field) -> IdentityPolicy:
        node.only_keys({"identity", "destinations"})
        return IdentityPolicy(
            identity=node.child("identity").required().convert(parse_identity_pattern),
            destinations=self.destinations(node.child("destinations").required()),
        )

    def cluster(self, node: _Field) -> ClusterConfig:
        node.only_keys(
            {
                "name",
                "transport",
                "target",
                "endpoints",
                "endpoints_file",
                "load_balancing",
                "congestion_control",
                "max_datagram_size",
                "ack_eliciting_threshold",
                "early_data",
                "engine",
                "splice",
                "health_check",
                "outlier_detection",
                "circuit_breakers",
                "connect_timeout",
                "idle_timeout",
                "connect_retries",
                "services",
                "liveness",
                "fallback",
                "server_identities",
                "healthy_panic_threshold",
            }
        )
        transport = node.child("transport").required().choice(CLUSTER_TRANSPORT_NAMES)
        services = _given_once(
            node.child("services").items(allow_empty=True), lambda i: i.convert(parse_service)
        )
        file_services: tuple[Address, ...] = ()
        endpoints: tuple[Address, ...] = ()
        endpoints_file: str | None = None
        if node.has("endpoints") and node.has("endpoints_file"):
            raise node.child("endpoints_file").error("give either endpoints or endpoints_file")
        if node.has("endpoints_file"):
            field = node.child("endpoints_file")
            endpoints_file = self.path(field)
            try:
                document = load_endpoints_document(endpoints_file)
            except ConfigError as exc:  # (it names the endpoints file; add where it is given)
                raise field.error(str(exc)) from None
            endpoints, file_services = document.endpoints, document.services
        elif node.has("endpoints"):
            endpoints = _given_once(node.child("endpoints").items(), lambda e: e.address())
        else:
            raise node.child("endpoints").error("is required (or endpoints_file)")
        # The tunnel's own grammar, the one every flow's CONNECT is checked against: a
        # target it refuses must fail here, not once per flow as a "connect failure".
        target = node.child("target").required().convert(parse_target)
        congestion = node.child("congestion_control")
        datagram = node.child("max_datagram_size")
        early = node.child("early_data")
        liveness = node.child("liveness")
        fallback = node.child("fallback")
        engine = node.child("engine")
        splice = node.child("splice")
        ack_threshold = node.child("ack_eliciting_threshold")
        if transport not in ("quic", "auto"):
            # Checked like on a quic cluster but ignored: switching a cluster's transport
            # is a one-line change (examples/README.md).
            # (liveness applies to h2 and tcp too: keepalive, and PINGs on h2; TCP
            # retransmits itself, so not max_probe_timeouts.)
            quic_only = [congestion, datagram, early, engine, splice, ack_threshold]
            if isinstance(liveness.value, dict):
                quic_only.append(liveness.child("max_probe_timeouts"))
            for option in quic_only:
                if option.value is not None:
                    self.warnings.append(
                        str(option.error(f"applies to quic clusters only: ignored for {transport}"))
                    )
        if transport != "auto" and fallback.value is not None:
            self.warnings.append(
                str(fallback.error(f"applies to auto clusters only: ignored for {transport}"))
            )
        if transport == "auto" and early.value is not None and early.boolean():
            # AutoTransport dials without 0-RTT (a race has no ticket to spend twice).
            self.warnings.append(
                str(early.error("applies to quic clusters only: ignored for auto"))
            )
        return ClusterConfig(
            name=node.child("name").required().name(),
            transport=transport,
            target=target,
            endpoints=endpoints,
            endpoints_file=endpoints_file,
            load_balancing=_or_default(node.child("load_balancing"), "round_robin", LB_POLICIES),
            congestion_control=_or_default(
                congestion, default_congestion_control(), CONGESTION_CONTROLS
            ),
            max_datagram_size=_int_or(datagram, 1200, 1200, 1452),
            ack_eliciting_threshold=_int_or(
                ack_threshold, DEFAULT_ACK_ELICITING_THRESHOLD, 0, ACK_ELICITING_THRESHOLD_MAX
            ),
            early_data=early.boolean() if early.value is not None else False,
            engine=self.quic_engine(engine, check_built=transport in ("quic", "auto")),
            health_check=self.health_check(node.child("health_check")),
            outlier_detection=self.outlier(node.child("outlier_detection")),
            circuit_breakers=self.circuit_breakers(node.child("circuit_breakers")),
            connect_timeout=_duration_or(node.child("connect_timeout"), 5.0),
            idle_timeout=_duration_or(node.child("idle_timeout"), 60.0, MIN_IDLE_TIMEOUT),
            connect_retries=_int_or(node.child("connect_retries"), 1, 0, 10),
            services=services,
            file_services=file_services,
            liveness=self.liveness(liveness),
            fallback=self.fallback(fallback),
            splice=splice.boolean() if splice.value is not None else True,
            server_identities=self.identity_patterns(node.child("server_identities")),
            healthy_panic_threshold=_int_or(node.child("healthy_panic_threshold"), 50, 0, 100),
        )

    def identity_patterns(self, node: _Field) -> tuple[str, ...]:
        """A list of SPIFFE IDs or ``prefix/*`` patterns, each given once; () if absent."""
        if node.value is None:
            return ()
        patterns: list[str] = []
        for item in node.items():
            pattern = item.convert(parse_identity_pattern)
            if pattern in patterns:
                raise item.error(f"{pattern} is given twice")
            patterns.append(pattern)
        return tuple(patterns)

    def liveness(self, node: _Field) -> LivenessSettings:
        if node.value is None:
            return LivenessSettings()
        node.only_keys({"keepalive_interval", "max_probe_timeouts", "dead_after"})

        def off_or(key: str, read: Callable[[_Field], Any], default: Any) -> Any:
            child = node.child(key)
            if child.value is None:
                return default
            if child.value == "off" or child.value is False:
                return None
            return read(child)

        return LivenessSettings(
            keepalive_interval=off_or(
                "keepalive_interval", lambda f: f.duration(minimum=MIN_KEEPALIVE_INTERVAL), 1.0
            ),
            max_probe_timeouts=off_or("max_probe_timeouts", lambda f: f.integer(1, 1000), 6),
            dead_after=off_or("dead_after", lambda f: f.duration(), 10.0),
        )

    def fallback(self, node: _Field) -> FallbackConfig:
        if node.value is None:
            return FallbackConfig()
        node.only_keys({"delay", "broken_backoff", "max_broken_backoff"})
        delay_node = node.child("delay")
        delay = 0.3 if delay_node.value is None else delay_node.duration(positive=False)
        backoff = _duration_or(node.child("broken_backoff"), 300.0)
        maximum_node = node.child("max_broken_backoff")
        maximum = _duration_or(maximum_node, max(3600.0, backoff))
        if maximum < backoff:
            raise maximum_node.error(f"must be at least broken_backoff ({backoff:g}s)")
        return FallbackConfig(delay=delay, broken_backoff=backoff, max_broken_backoff=maximum)

    def health_check(self, node: _Field) -> HealthCheckConfig | None:
        if node.value is None:
            return None
        node.only_keys({"interval", "timeout", "unhealthy_threshold", "healthy_threshold"})
        return HealthCheckConfig(
            interval=_duration_or(node.child("interval"), 5.0, MIN_HEALTH_CHECK_INTERVAL),
            timeout=_duration_or(node.child("timeout"), 2.0),
            unhealthy_threshold=_int_or(node.child("unhealthy_threshold"), 2, 1, 100),
            healthy_threshold=_int_or(node.child("healthy_threshold"), 1, 1, 100),
        )

    def outlier(self, node: _Field) -> OutlierDetectionConfig:
        if node.value is None:
            return OutlierDetectionConfig()
        node.only_keys(
            {"consecutive_connect_failures", "base_ejection_time", "max_ejection_percent"}
        )
        return OutlierDetectionConfig(
            consecutive_connect_failures=_int_or(
                node.child("consecutive_connect_failures"), 5, 1, 1000
            ),
            base_ejection_time=_duration_or(node.child("base_ejection_time"), 30.0),
            max_ejection_percent=_int_or(node.child("max_ejection_percent"), 100, 0, 100),
        )

    def circuit_breakers(self, node: _Field) -> CircuitBreakerConfig:
        if node.value is None:
            return CircuitBreakerConfig()
        node.only_keys({"max_connections", "max_concurrent_streams", "max_pending_opens"})
        return CircuitBreakerConfig(
            max_connections=_int_or(node.child("max_connections"), 64, 1, 100000),
            max_concurrent_streams=_int_or(node.child("max_concurrent_streams"), 1024, 1, 1000000),
            max_pending_opens=_int_or(node.child("max_pending_opens"), 256, 1, 1000000),
        )


def merge_services(first: tuple[Address, ...], second: tuple[Address, ...]) -> tuple[Address, ...]:
    """``first`` then the items of ``second`` not in it."""
    return first + tuple(item for item in second if item not in first)


def _or_default(node: _Field, default: str, choices: tuple[str, ...]) -> str:
    return default if node.value is None else node.choice(choices)


def _duration_or(node: _Field, default: float, minimum: float = 0.0) -> float:
    return default if node.value is None else node.duration(minimum=minimum)


def format_seconds(seconds: float) -> str:
    """``100ms``, ``10ms``, ``2s``: a duration as the configuration writes it."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def _fetch_timeout(node: _Field) -> float | None:
    """``xds.initial_fetch_timeout``: a duration; 0 waits for ever, as Envoy's."""
    if node.value is None:
        return 15.0
    return node.duration(positive=False) or None


def _flow_idle_timeout(node: _Field) -> float | None:
    """``flow_idle_timeout``: a duration, or ``off`` (or 0, as Envoy's) for none."""
    if node.value is None:
        return DEFAULT_FLOW_IDLE_TIMEOUT
    if node.value == "off" or node.value is False:
        return None
    seconds = node.duration(positive=False)  # (at most a day, as every duration here)
    return seconds or None


def _int_or(node: _Field, default: int, low: int, high: int) -> int:
    return default if node.value is None else node.integer(low, high)


def _spiffe_id(value: object) -> str:
    from ..tls.spiffe import validate_spiffe_id

    if not isinstance(value, str):
        raise ValueError(f"expected a SPIFFE ID string, got {_kind(value)}")
    return validate_spiffe_id(value)


def parse_identity_pattern(value: object) -> str:
    """A SPIFFE ID, a ``spiffe://domain/prefix/*`` pattern or ``*``, as policies and
    ``server_identities`` take them.

    :raises ValueError: anything else, saying why."""
    if value == "*":
        return "*"
    if isinstance(value, str) and value.endswith("/*"):
        _spiffe_id(value[:-2] + "/x")
        return value
    from ..tls.spiffe import names_a_trust_domain

    identity = _spiffe_id(value)
    if names_a_trust_domain(identity):  # (no peer may present one: the handshake refuses it)
        raise ValueError(
            f"{identity} names a trust domain, not a workload: no peer can present it"
            " (give a workload's ID, or a pattern such as '" + identity + "/*')"
        )
    return identity


def identity_matches(pattern: str, identity: str) -> bool:
    """Whether a peer identity matches a policy's ``identity`` pattern."""
    if pattern == "*":
        return True
    if pattern.endswith("/*"):
        return identity.startswith(pattern[:-1])
    return identity == pattern


def destination_matches(rule: DestinationRule, host: str, port: int) -> bool:
    """Whether a CONNECT target's host and port fall under ``rule``."""
    if rule.port is not None and rule.port != port:
        return False
    if rule.network is not None:
        # An IPv4-mapped IPv6 target reaches that IPv4 address: the IPv4 rules decide it
        # (mapped rules are read as IPv4 ones; until 2026-12-07 a "[::/0]" rule let
        # "[::ffff:127.0.0.1]" past an IPv4 allow-list that left loopback out).
        address = normalise_ip(host)
        return address is not None and address in rule.network
    return rule.host == host.lower().rstrip(".")


def rules_overlap(first: DestinationRule, second: DestinationRule) -> bool:
    """Whether some CONNECT target falls under both rules (a host name rule matches
    names only, a network rule IP addresses only)."""
    if first.port is not None and second.port is not None and first.port != second.port:
        return False
    if first.network is not None and second.network is not None:
        return first.network.version == second.network.version and first.network.overlaps(
            second.network
        )
    return first.host is not None and first.host == second.host


def ip_address_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address (no IPv6 zone), or None for a name."""
    return None if "%" in host else _ip_address(host)


@functools.lru_cache(maxsize=1024)
def _ip_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address, or None for a name (kept: flows repeat their targets)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
