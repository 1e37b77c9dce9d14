"""The sidecar's state under Envoy's stat names, for ``/stats?format=text``: what Istio's
agent (pilot-agent) and Envoy users' scripts read from an Envoy's admin.

Istio's agent decides a proxy is ready from ``/stats?usedonly&filter=^(server\\.state|
listener_manager\\.workers_started)`` (``server.state: 0`` is LIVE, and the workers must
have started) and from the LDS and CDS ``update_success`` counters (configuration
received); with ``EXIT_ON_ZERO_ACTIVE_CONNECTIONS`` it polls the listeners'
``downstream_cx_active`` during a drain. Each value here is computed from the admin
snapshot (:meth:`~.runtime.Sidecar.snapshot`); names follow Envoy's
(``listener.<address>.``, its ``:`` written ``_``; ``cluster.<name>.``).
"""

from __future__ import annotations

from typing import Any

SERVER_STATES = {"LIVE": 0, "DRAINING": 1, "PRE_INITIALIZING": 2, "INITIALIZING": 3}
"""Envoy's ``server.state`` gauge values (``envoy.admin.v3.ServerInfo.State``)."""


def envoy_stats(snapshot: dict[str, Any]) -> dict[str, int]:
    """Envoy's stat names and their values, sorted by name.

    ``listener_manager.lds`` and ``cluster_manager.cds`` ``update_success`` and
    ``update_rejected`` count the control plane's LDS and CDS responses applied and
    refused when the configuration comes over xDS; for a configuration from a file, its
    loads (the first and each reload) that were applied and refused."""
    state = server_state(snapshot)
    listeners: dict[str, Any] = snapshot.get("listeners", {})
    clusters: dict[str, Any] = snapshot.get("clusters", {})
    stats: dict[str, int] = {
        "server.state": SERVER_STATES[state],
        "server.live": int(state == "LIVE"),
        "server.uptime": int(snapshot.get("uptime", 0)),
        "server.total_connections": sum(_downstream(v)[0] for v in listeners.values()),
        "listener_manager.workers_started": int(state != "INITIALIZING"),
        "listener_manager.total_listeners_active": len(listeners),
        "cluster_manager.active_clusters": len(clusters),
    }
    for service, prefix in (("LDS", "listener_manager.lds"), ("CDS", "cluster_manager.cds")):
        success, rejected = _updates(snapshot, service)
        stats[f"{prefix}.update_success"] = success
        stats[f"{prefix}.update_rejected"] = rejected
    for listener in listeners.values():
        prefix = f"listener.{_address_name(str(listener.get('address', '')))}"
        active, total = _downstream(listener)
        # (Listeners on one address, a QUIC and a TCP one, share its stats, as in Envoy.)
        for stat, value in (("downstream_cx_active", active), ("downstream_cx_total", total)):
            stats[f"{prefix}.{stat}"] = stats.get(f"{prefix}.{stat}", 0) + value
    for name, cluster in clusters.items():
        endpoints: dict[str, Any] = cluster.get("endpoints", {})
        for stat, key in (
            ("upstream_cx_total", "connections_total"),
            ("upstream_cx_connect_fail", "connect_failures"),
            ("upstream_rq_active", "streams_active"),
            ("upstream_rq_total", "streams_total"),
        ):
            stats[f"cluster.{name}.{stat}"] = sum(int(e.get(key, 0)) for e in endpoints.values())
        stats[f"cluster.{name}.upstream_cx_active"] = sum(
            len(e.get("connections", [])) for e in endpoints.values()
        )
        current = [e for e in endpoints.values() if e.get("health") != "removed"]
        stats[f"cluster.{name}.membership_total"] = len(current)
        stats[f"cluster.{name}.membership_healthy"] = sum(
            1 for e in current if e.get("health") == "healthy"
        )
    return dict(sorted(stats.items()))


def server_state(snapshot: dict[str, Any]) -> str:
    """Envoy's server state: ``LIVE`` once ready, ``DRAINING`` once draining, else
    ``INITIALIZING`` (starting, or not ready: ``/ready`` says why)."""
    if snapshot.get("draining"):
        return "DRAINING"
    return "LIVE" if snapshot.get("ready") else "INITIALIZING"


def envoy_stats_text(stats: dict[str, int]) -> str:
    """Envoy's ``/stats`` text: ``name: value``, a line each."""
    return "".join(f"{name}: {value}\n" for name, value in stats.items())


def _downstream(listener: dict[str, Any]) -> tuple[int, int]:
    """A listener's downstream connections (active, total): the application's
    connections on an outbound listener or capture, the peers' flows (each a tunnelled
    connection, as Envoy counts HBONE's) on an inbound listener."""
    unit = "streams" if listener.get("kind") == "inbound" else "connections"
    return int(listener.get(f"{unit}_active", 0)), int(listener.get(f"{unit}_total", 0))


def _updates(snapshot: dict[str, Any], service: str) -> tuple[int, int]:
    xds = snapshot.get("xds")
    if xds is not None:
        counts = xds.get("updates", {}).get(service, {})
        return int(counts.get("success", 0)), int(counts.get("rejected", 0))
    reloads = snapshot.get("reloads", {})
    return 1 + int(reloads.get("ok", 0)), int(reloads.get("rejected", 0))


def _address_name(address: str) -> str:
    """``127.0.0.1:15001`` as Envoy names a listener's stats: ``127.0.0.1_15001``
    (``[::]:15008``: ``[__]_15008``; a capture's ``*:15006``: ``0.0.0.0_15006``)."""
    if address.startswith("*:"):
        address = "0.0.0.0" + address[1:]
    return address.replace(":", "_")
