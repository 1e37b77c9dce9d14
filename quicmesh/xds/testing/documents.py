"""Envoy resources as YAML-shaped dicts (as a bootstrap or control plane writes them)."""

from __future__ import annotations

from typing import Any

PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
HCM_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"

_HTTP_OPTION = {
    "quic": "http3_protocol_options",
    "h2": "http2_protocol_options",
    "tcp": "http_protocol_options",
}


def cluster_doc(name: str, transport: str, *, lb: str = "ROUND_ROBIN") -> dict[str, Any]:
    """An EDS cluster whose upstream protocol says the transport."""
    return {
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": {"ads": {}}},
        "lb_policy": lb,
        "connect_timeout": "5s",
        "typed_extension_protocol_options": {
            PROTOCOL_OPTIONS: {
                "@type": f"type.googleapis.com/{PROTOCOL_OPTIONS}",
                "explicit_http_config": {_HTTP_OPTION[transport]: {}},
            }
        },
    }


def static_cluster_doc(
    name: str, transport: str, endpoints: list[tuple[str, int]]
) -> dict[str, Any]:
    """A STATIC cluster with its endpoints inline (``load_assignment``)."""
    doc = cluster_doc(name, transport)
    del doc["eds_cluster_config"]
    doc["type"] = "STATIC"
    doc["load_assignment"] = cla_doc(name, [(h, p, "HEALTHY", None) for h, p in endpoints])
    return doc


def cla_doc(name: str, endpoints: list[tuple[str, int, str, int | None]]) -> dict[str, Any]:
    """A ClusterLoadAssignment: ``(address, port, health_status, weight or None)``."""
    lb_endpoints = []
    for host, port, health, weight in endpoints:
        entry: dict[str, Any] = {
            "endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}},
            "health_status": health,
        }
        if weight is not None:
            entry["load_balancing_weight"] = weight
        lb_endpoints.append(entry)
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": lb_endpoints}]}


def outbound_listener_doc(name: str, port: int, cluster: str, target: str) -> dict[str, Any]:
    """A TCP listener tunnelling to ``target`` over CONNECT through ``cluster``."""
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": TCP_PROXY_TYPE,
                            "stat_prefix": name,
                            "cluster": cluster,
                            "tunneling_config": {"hostname": target},
                        },
                    }
                ]
            }
        ],
    }


def inbound_listener_doc(
    name: str, port: int, protocol: str, destinations: list[str]
) -> dict[str, Any]:
    """A CONNECT-terminating listener: UDP/HTTP3 (quic) or TCP/HTTP2 (h2)."""
    listener: dict[str, Any] = {
        "name": name,
        "address": {
            "socket_address": {"address": "127.0.0.1", "port_value": port, "protocol": protocol}
        },
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": HCM_TYPE,
                            "stat_prefix": name,
                            "codec_type": "HTTP3" if protocol == "UDP" else "HTTP2",
                            "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {"@type": ROUTER_TYPE},
                                }
                            ],
                            "route_config": {
                                "name": "local",
                                "virtual_hosts": [{"name": "local", "domains": destinations}],
                            },
                        },
                    }
                ]
            }
        ],
    }
    if protocol == "UDP":
        listener["udp_listener_config"] = {"quic_options": {}}
    return listener


def secret_docs(cert_chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> list[dict[str, Any]]:
    """The SDS secrets ``default`` (identity) and ``ROOTCA`` (trust bundle), inline."""
    return [
        {
            "name": "default",
            "tls_certificate": {
                "certificate_chain": {"inline_bytes": _b64(cert_chain_pem)},
                "private_key": {"inline_bytes": _b64(key_pem)},
            },
        },
        {
            "name": "ROOTCA",
            "validation_context": {"trusted_ca": {"inline_bytes": _b64(bundle_pem)}},
        },
    ]


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def listener(doc: dict[str, Any]) -> Any:
    """A Listener message from its document."""
    from ..resources import Listener, parse_message

    return parse_message(doc, Listener, "Listener")


def cluster(doc: dict[str, Any]) -> Any:
    """A Cluster message from its document."""
    from ..resources import Cluster, parse_message

    return parse_message(doc, Cluster, "Cluster")


def assignment(doc: dict[str, Any]) -> Any:
    """A ClusterLoadAssignment message from its document."""
    from ..resources import ClusterLoadAssignment, parse_message

    return parse_message(doc, ClusterLoadAssignment, "ClusterLoadAssignment")


def secret(doc: dict[str, Any]) -> Any:
    """A Secret message from its document."""
    from ..resources import Secret, parse_message

    return parse_message(doc, Secret, "Secret")
