"""``/metrics``: the sidecar's counters in the Prometheus text format.

A :class:`SnapshotCollector` is registered in a private
:class:`prometheus_client.CollectorRegistry` (not the global one, so several
sidecars can share a process in tests). At each scrape it turns the runtime's
snapshot, the same dictionary ``/stats`` serves, into metric families, so the
two views can never disagree. Metric names start with ``quicmesh_``; see
docs/config.md for the list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .circuit import LIMITS as CIRCUIT_LIMITS
from .overload import STATES as OVERLOAD_STATES

Snapshot = dict[str, Any]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Content-Type of ``/metrics``."""

_LISTENER_COUNTERS = (
    (
        "connections_total",
        "connections",
        "Connections accepted (outbound) or made to destinations (inbound).",
    ),
    (
        "streams_total",
        "streams",
        "Tunnel streams the peer accepted (outbound) or CONNECTs received (inbound, refused "
        "ones included).",
    ),
    ("bytes_received", "bytes_received", "Bytes received from the downstream side."),
    ("bytes_sent", "bytes_sent", "Bytes sent to the downstream side."),
    (
        "streams_spliced",
        "streams_spliced",
        "Flows the QUIC engine copied itself (splice), not the sidecar.",
    ),
    (
        "engine_flows",
        "engine_flows",
        "Flows the native engine ran from accept (outbound) or from the CONNECT (inbound) "
        "to the end.",
    ),
    (
        "engine_flows_returned",
        "engine_flows_returned",
        "Outbound engine flows given back to the sidecar without a plain 200.",
    ),
    (
        "idle_timeouts",
        "idle_timeouts",
        "Flows reset because no byte moved either way for flow_idle_timeout.",
    ),
)
_LISTENER_GAUGES = (
    ("connections_active", "connections_active", "Connections open now."),
    ("streams_active", "streams_active", "Tunnel streams open now."),
)
_CLUSTER_COUNTERS = (
    ("connections_total", "connections", "Peer connections opened."),
    ("streams_total", "streams", "Flows opened through the cluster (the peer accepted them)."),
    ("bytes_sent", "bytes_sent", "Bytes sent into the tunnel."),
    ("bytes_received", "bytes_received", "Bytes received from the tunnel."),
    ("connect_failures", "connect_failures", "Failed connects or stream opens."),
    ("retries", "retries", "Flows retried on another endpoint."),
    (
        "panic_flows",
        "panic_flows",
        "Endpoint choices made while the cluster was in panic (Envoy's lb_healthy_panic).",
    ),
)
_CLUSTER_FALLBACK_COUNTERS = (
    (
        "fallbacks",
        "HTTP/2 connections made because QUIC was broken or too slow, health checks'"
        " included (auto).",
    ),
    ("quic_marked_broken", "Times QUIC was marked broken for an endpoint (auto)."),
    ("quic_retries", "QUIC handshakes tried when a broken mark expired (auto)."),
    ("quic_retries_ok", "Of those, the ones that completed: HTTP/2 fallbacks retired (auto)."),
)
_CLUSTER_GAUGES = (
    ("connections_active", "connections_active", "Peer connections open now."),
    ("streams_active", "streams_active", "Flows open now."),
    (
        "panic",
        "panic",
        "1 while the cluster is in panic (fewer healthy endpoints than "
        "healthy_panic_threshold: flows go to every endpoint).",
    ),
)
_XDS_COUNTERS = (
    ("acks", "acks", "Control-plane responses applied and acknowledged (ACK)."),
    ("nacks", "nacks", "Control-plane responses refused (NACK), the running configuration kept."),
    ("streams", "streams", "Streams opened to the control plane."),
    ("stream_failures", "stream_failures", "Streams to the control plane that failed."),
)
_CONNECTION_GAUGES = (
    ("rtt", "rtt_seconds", "Smoothed round-trip time of the peer connection."),
    ("cwnd", "cwnd_bytes", "Congestion window of the peer connection."),
    ("streams_active", "streams_active", "Streams open on the peer connection."),
)
_CONNECTION_COUNTERS = (
    ("packets_lost", "packets_lost", "Packets declared lost on the peer connection."),
    ("packets_sent", "packets_sent", "Packets sent on the peer connection."),
    ("bytes_sent", "bytes_sent", "Bytes sent on the peer connection (wire)."),
    ("bytes_received", "bytes_received", "Bytes received on the peer connection (wire)."),
    ("zero_rtt_packets_sent", "zero_rtt_packets_sent", "Packets sent as 0-RTT (QUIC)."),
)
_MIGRATION_CAUSES = ("active", "auto_rebind", "peer_address_change")
"""``cause`` label of the migration counters (keys ``migrations_<cause>`` of QUIC's counters)."""
_ADMISSION_EVENTS = (
    "initials_undecryptable",
    "initials_refused_half_open",
    "retries_sent",
    "retry_tokens_invalid",
    "handshakes_timed_out",
    "stateless_resets_sent",
)
"""``event`` label of the QUIC admission counters (the transport's
``ADMISSION_COUNTERS``, kept equal by a test)."""
_PEER_VIOLATIONS = (
    "peer_violations",
    "protocol",
    ("quic", "http3"),
    "peer_violations_{}",
    "QUIC connections closed because the peer broke QUIC, or HTTP/3 or QPACK (each"
    " logged, rate-limited, with the peer's identity and address).",
)
"""A QUIC family of clusters and inbound listeners alike."""
_CLUSTER_QUIC = (
    (
        "zero_rtt",
        "result",
        ("attempted", "accepted", "rejected"),
        "zero_rtt_{}",
        "Peer connections that attempted 0-RTT, and whether the peer accepted it.",
    ),
    (
        "migrations",
        "cause",
        _MIGRATION_CAUSES,
        "migrations_{}",
        "QUIC connection migrations: active (POST /migrate), auto_rebind (after PTOs).",
    ),
    (
        "path_validations",
        "result",
        ("ok", "failed"),
        "path_validations_{}",
        "QUIC path validations (PATH_CHALLENGE answered, or abandoned).",
    ),
    (
        "session_tickets",
        "result",
        ("received",),
        "tickets_{}",
        "QUIC session tickets received from peers (for resumption and 0-RTT).",
    ),
    _PEER_VIOLATIONS,
)
_LISTENER_QUIC = (
    (
        "zero_rtt",
        "result",
        ("accepted",),
        "zero_rtt_{}",
        "QUIC peer connections whose 0-RTT this listener accepted (resumed with a ticket"
        " it issued; the peer's cluster sends 0-RTT only with early_data on, and the"
        " listener's early_data: false refuses it).",
    ),
    (
        "session_tickets",
        "result",
        ("issued", "redeemed", "refused"),
        "tickets_{}",
        "QUIC session tickets issued to peers, redeemed by a resuming peer (once each),"
        " and refused (unknown, used already, or expired).",
    ),
    (
        "migrations",
        "cause",
        _MIGRATION_CAUSES,
        "migrations_{}",
        "QUIC peers seen moving to a new address (peer_address_change).",
    ),
    (
        "path_validations",
        "result",
        ("ok", "failed"),
        "path_validations_{}",
        "QUIC path validations of peers' new addresses.",
    ),
    _PEER_VIOLATIONS,
    (
        "quic_admission",
        "event",
        _ADMISSION_EVENTS,
        "{}",
        "What a QUIC listener did with traffic before a handshake completed: Initials"
        " that did not decrypt (no state kept), refused over the half-open caps, Retry"
        " packets sent, invalid Retry tokens, handshakes timed out, stateless resets sent.",
    ),
)
HEALTH_STATES = ("healthy", "unhealthy", "ejected", "removed")


class SnapshotCollector:
    """A prometheus-client collector that reads a snapshot callable at each scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        """No fixed description: families depend on the configuration."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Build every metric family from one snapshot."""
        snap = self._snapshot()
        yield from _sidecar_families(snap)
        yield from _listener_families(snap.get("listeners", {}))
        yield from _cluster_families(snap.get("clusters", {}))
        yield from _intercept_families(snap.get("intercept", {}))


def _intercept_families(intercept: dict[str, Any]) -> Iterator[Metric]:
    if not intercept:
        return
    flows = CounterMetricFamily(
        "quicmesh_intercept_flows",
        "Captured flows by original destination and route (a cluster, passthrough, "
        "registry_only: refused, local: inbound, not_redirected: refused, loop: refused, "
        "the sidecar's own connection captured again).",
        labels=["direction", "original_destination", "route"],
    )
    for entry in intercept["destinations"]:
        flows.add_metric(
            [entry["direction"], entry["original_destination"], entry["route"]], entry["flows"]
        )
    yield flows
    services = GaugeMetricFamily(
        "quicmesh_intercept_services", "Service addresses in the destination table."
    )
    services.add_metric([], intercept["services"])
    yield services


def _sidecar_families(snap: Snapshot) -> Iterator[Metric]:
    ready = GaugeMetricFamily(
        "quicmesh_ready", "1 when the sidecar takes traffic.", labels=["node"]
    )
    ready.add_metric([snap["node"]], 1.0 if snap["ready"] else 0.0)
    yield ready
    draining = GaugeMetricFamily("quicmesh_draining", "1 while draining.", labels=["node"])
    draining.add_metric([snap["node"]], 1.0 if snap["draining"] else 0.0)
    yield draining
    reloads = CounterMetricFamily(
        "quicmesh_config_reloads", "Configuration reloads by result.", labels=["result"]
    )
    for result, count in snap["reloads"].items():
        reloads.add_metric([result], count)
    yield reloads
    suppressed = CounterMetricFamily(
        "quicmesh_access_log_suppressed",
        "Access-log lines of refused flows left out by the per-identity limit, by outcome.",
        labels=["outcome"],
    )
    for outcome, count in snap.get("access_log", {}).get("suppressed", {}).items():
        suppressed.add_metric([outcome], count)
    yield suppressed
    if "started_at" in snap:
        started = GaugeMetricFamily(
            "quicmesh_start_time_seconds",
            "When the sidecar started, in seconds since the Unix epoch (/stats uptime).",
            labels=["node"],
        )
        started.add_metric([snap["node"]], snap["started_at"])
        yield started
    xds = snap.get("xds")
    if xds is not None:
        for key, name, doc in _XDS_COUNTERS:
            family = CounterMetricFamily(f"quicmesh_xds_{name}", doc)
            family.add_metric([], xds[key])
            yield family
        connected = GaugeMetricFamily(
            "quicmesh_xds_connected", "1 while the stream to the control plane is open."
        )
        connected.add_metric([], 1.0 if xds["connected"] else 0.0)
        yield connected
    yield from _certificate_families(snap)


def _certificate_families(snap: Snapshot) -> Iterator[Metric]:
    certificate = snap.get("certificate")
    if certificate is not None:
        valid = GaugeMetricFamily(
            "quicmesh_certificate_valid",
            "1 when our own certificate is valid and trusted by our own bundle.",
            labels=["identity"],
        )
        valid.add_metric([certificate["spiffe_id"]], 0.0 if certificate["problem"] else 1.0)
        yield valid
        expiry = GaugeMetricFamily(
            "quicmesh_certificate_expires_in_seconds",
            "Seconds until our own certificate expires.",
            labels=["identity"],
        )
        expiry.add_metric([certificate["spiffe_id"]], certificate["expires_in"])
        yield expiry
        rotations = CounterMetricFamily(
            "quicmesh_certificate_rotations",
            "Times our certificate was replaced (renewed, files changed, or SDS).",
            labels=["identity"],
        )
        rotations.add_metric([certificate["spiffe_id"]], certificate["rotations"])
        yield rotations
    failures = snap.get("handshake_failures")
    if failures is not None:
        family = CounterMetricFamily(
            "quicmesh_handshake_failures",
            "TLS handshakes that failed, by our role and reason.",
            labels=["role", "reason"],
        )
        for role, reasons in failures.items():
            for reason, count in reasons.items():
                family.add_metric([role, reason], count)
        yield family


def _listener_families(listeners: dict[str, Any]) -> Iterator[Metric]:
    for key, name, doc in _LISTENER_COUNTERS:
        family = CounterMetricFamily(f"quicmesh_listener_{name}", doc, labels=["listener", "kind"])
        for listener, data in listeners.items():
            family.add_metric([listener, data["kind"]], data[key])
        yield family
    for key, name, doc in _LISTENER_GAUGES:
        gauge = GaugeMetricFamily(f"quicmesh_listener_{name}", doc, labels=["listener", "kind"])
        for listener, data in listeners.items():
            gauge.add_metric([listener, data["kind"]], data[key])
        yield gauge
    flows = CounterMetricFamily(
        "quicmesh_listener_flows", "Flows ended, by outcome.", labels=["listener", "outcome"]
    )
    for listener, data in listeners.items():
        for outcome, count in data["outcomes"].items():
            flows.add_metric([listener, outcome], count)
    yield flows
    durations = HistogramMetricFamily(
        "quicmesh_listener_flow_duration_seconds",
        "How long the listener's flows lasted (Envoy's downstream_cx_length_ms).",
        labels=["listener", "kind"],
    )
    for listener, data in listeners.items():
        histogram = data.get("flow_duration_seconds")
        if histogram is not None:
            buckets = [(repr(float(bound)), count) for bound, count in histogram["buckets"]]
            durations.add_metric(
                [listener, data["kind"]],
                [*buckets, ("+Inf", histogram["count"])],
                histogram["sum"],
            )
    yield durations
    yield from _overload_families(listeners)
    for name, label, values, key, doc in _LISTENER_QUIC:
        family = CounterMetricFamily(
            f"quicmesh_listener_{name}", doc, labels=["listener", "kind", label]
        )
        for listener, data in listeners.items():
            quic = data.get("quic")
            if quic is not None:
                for value in values:
                    family.add_metric(
                        [listener, data["kind"], value], quic.get(key.format(value), 0)
                    )
        yield family


def _cluster_families(clusters: dict[str, Any]) -> Iterator[Metric]:
    for key, name, doc in _CLUSTER_COUNTERS:
        family = CounterMetricFamily(
            f"quicmesh_cluster_{name}", doc, labels=["cluster", "transport"]
        )
        for cluster, data in clusters.items():
            family.add_metric([cluster, data["transport"]], data[key])
        yield family
    for key, name, doc in _CLUSTER_GAUGES:
        gauge = GaugeMetricFamily(f"quicmesh_cluster_{name}", doc, labels=["cluster", "transport"])
        for cluster, data in clusters.items():
            gauge.add_metric([cluster, data["transport"]], data[key])
        yield gauge
    overflows = CounterMetricFamily(
        "quicmesh_cluster_circuit_breaker_overflows",
        "Flows refused because a circuit-breaker limit was reached.",
        labels=["cluster", "limit"],
    )
    outcomes = CounterMetricFamily(
        "quicmesh_cluster_flows", "Flows ended, by outcome.", labels=["cluster", "outcome"]
    )
    for cluster, data in clusters.items():
        for limit in CIRCUIT_LIMITS:
            overflows.add_metric([cluster, limit], data["circuit_breaker_overflows"].get(limit, 0))
        for outcome, count in data["outcomes"].items():
            outcomes.add_metric([cluster, outcome], count)
    yield overflows
    yield outcomes
    opened = CounterMetricFamily(
        "quicmesh_cluster_connections_by_transport",
        "Peer connections opened, by the transport that carried them (auto clusters: quic or h2).",
        labels=["cluster", "transport", "via"],
    )
    for cluster, data in clusters.items():
        for via in ("quic", "h2", "tcp"):
            count = data.get("connections_by_transport", {}).get(via)
            if count is not None or data["transport"] in (via, "auto"):
                opened.add_metric([cluster, data["transport"], via], count or 0)
    yield opened
    for key, doc in _CLUSTER_FALLBACK_COUNTERS:
        family = CounterMetricFamily(
            f"quicmesh_cluster_{key}", doc, labels=["cluster", "transport"]
        )
        for cluster, data in clusters.items():
            if "fallback" in data:
                family.add_metric([cluster, data["transport"]], data["fallback"][key])
        yield family
    broken = GaugeMetricFamily(
        "quicmesh_cluster_endpoints_quic_broken",
        "Endpoints QUIC is marked broken for now (auto clusters use HTTP/2 there).",
        labels=["cluster", "transport"],
    )
    for cluster, data in clusters.items():
        if "fallback" in data:
            broken.add_metric(
                [cluster, data["transport"]], data["fallback"]["endpoints_quic_broken"]
            )
    yield broken
    for name, label, values, key, doc in _CLUSTER_QUIC:
        family = CounterMetricFamily(
            f"quicmesh_cluster_{name}", doc, labels=["cluster", "transport", label]
        )
        for cluster, data in clusters.items():
            quic = data.get("quic")
            if quic is not None:
                for value in values:
                    family.add_metric([cluster, data["transport"], value], quic[key.format(value)])
        yield family
    yield from _endpoint_families(clusters)


def _overload_families(listeners: dict[str, Any]) -> Iterator[Metric]:
    """The inbound listeners' limits and overload manager (:mod:`.overload`)."""
    state = GaugeMetricFamily(
        "quicmesh_listener_overload_state",
        "1 for the inbound listener's overload state (normal, stop_accepting, shed).",
        labels=["listener", "state"],
    )
    pressure = GaugeMetricFamily(
        "quicmesh_listener_overload_pressure",
        "Use of a watched resource as a fraction of its limit (memory, descriptors, buffers).",
        labels=["listener", "resource"],
    )
    refusals = CounterMetricFamily(
        "quicmesh_listener_limit_refusals",
        "Inbound streams refused by a limit: per_identity, total, overloaded,"
        " connections_per_identity (also counts connections closed for it).",
        labels=["listener", "reason"],
    )
    shed = CounterMetricFamily(
        "quicmesh_listener_overload_shed",
        "Inbound flows reset to shed load.",
        labels=["listener"],
    )
    buffered = GaugeMetricFamily(
        "quicmesh_listener_buffered_bytes",
        "Bytes the inbound flows held in buffers at the last sample.",
        labels=["listener"],
    )
    loop_lag = GaugeMetricFamily(
        "quicmesh_listener_event_loop_lag_seconds",
        "Largest delay of the event loop probed in the last second (overload action's input).",
        labels=["listener"],
    )
    rate_cuts = CounterMetricFamily(
        "quicmesh_listener_overload_stream_rate_cuts",
        "Times the heaviest peer identity's new-stream rate was cut for event-loop delay.",
        labels=["listener"],
    )
    slowed = GaugeMetricFamily(
        "quicmesh_listener_overload_slowed_identities",
        "Peer identities whose new-stream rate is cut now.",
        labels=["listener"],
    )
    denied = GaugeMetricFamily(
        "quicmesh_listener_denied_identities_held",
        "Peer identities no policy allows, held at denied_stream_rate new streams/s.",
        labels=["listener"],
    )
    buffer_resets = CounterMetricFamily(
        "quicmesh_listener_buffer_resets",
        "Inbound flows reset because their connection passed max_buffered_per_connection.",
        labels=["listener"],
    )
    for listener, data in listeners.items():
        overload = data.get("overload")
        if overload is None:
            continue
        for value in OVERLOAD_STATES:
            state.add_metric([listener, value], 1.0 if overload["state"] == value else 0.0)
        for resource, fraction in overload["pressure"].items():
            pressure.add_metric([listener, resource], fraction)
        for reason in ("per_identity", "total", "overloaded", "connections_per_identity"):
            refusals.add_metric([listener, reason], overload["refusals"].get(reason, 0))
        shed.add_metric([listener], overload["shed"])
        buffered.add_metric([listener], overload.get("buffered", 0))
        buffer_resets.add_metric([listener], overload.get("buffer_resets", 0))
        loop_lag.add_metric([listener], overload.get("loop_lag", 0.0))
        rate_cuts.add_metric([listener], overload.get("rate_cuts", 0))
        slowed.add_metric([listener], len(overload.get("slowed", {})))
        denied.add_metric([listener], len(overload.get("denied", {})))
    yield state
    yield pressure
    yield refusals
    yield shed
    yield buffered
    yield buffer_resets
    yield loop_lag
    yield rate_cuts
    yield slowed
    yield denied


def _endpoint_families(clusters: dict[str, Any]) -> Iterator[Metric]:
    labels = ["cluster", "endpoint"]
    health = GaugeMetricFamily(
        "quicmesh_endpoint_health",
        "1 for the endpoint's current health state.",
        labels=[*labels, "state"],
    )
    counters = {
        key: CounterMetricFamily(f"quicmesh_endpoint_{key}", doc, labels=labels)
        for key, doc in (
            ("streams_total", "Flows opened to the endpoint (the peer accepted them)."),
            ("connect_failures", "Failed connects to the endpoint."),
            ("ejections", "Times the endpoint was ejected."),
            ("connections_total", "Peer connections opened to the endpoint."),
        )
    }
    streams_active = GaugeMetricFamily(
        "quicmesh_endpoint_streams_active", "Flows open to the endpoint.", labels=labels
    )
    conn_labels = [*labels, "connection", "transport"]
    conn_gauges = {
        key: GaugeMetricFamily(f"quicmesh_peer_connection_{name}", doc, labels=conn_labels)
        for key, name, doc in _CONNECTION_GAUGES
    }
    conn_counters = {
        key: CounterMetricFamily(f"quicmesh_peer_connection_{name}", doc, labels=conn_labels)
        for key, name, doc in _CONNECTION_COUNTERS
    }
    for cluster, data in clusters.items():
        for endpoint, ep in data["endpoints"].items():
            for state in HEALTH_STATES:
                health.add_metric([cluster, endpoint, state], 1.0 if ep["health"] == state else 0.0)
            for key, family in counters.items():
                family.add_metric([cluster, endpoint], ep[key])
            streams_active.add_metric([cluster, endpoint], ep["streams_active"])
            for conn in ep["connections"]:
                transport = conn.get("cluster_transport", data["transport"])
                values = [cluster, endpoint, str(conn["id"]), transport]
                for key, gauge in conn_gauges.items():
                    if isinstance(conn.get(key), int | float):
                        gauge.add_metric(values, float(conn[key]))
                for key, counter in conn_counters.items():
                    if isinstance(conn.get(key), int | float):
                        counter.add_metric(values, float(conn[key]))
    yield health
    yield from counters.values()
    yield streams_active
    yield from conn_gauges.values()
    yield from conn_counters.values()


class Metrics:
    """The sidecar's Prometheus registry and its text exposition."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot))

    def exposition(self) -> bytes:
        """The ``/metrics`` body."""
        return generate_latest(self.registry)
