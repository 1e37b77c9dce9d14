"""Where a captured connection goes, by the address the application dialled.

:class:`DestinationTable` is sans-IO: built from the clusters' service addresses
and endpoints, it answers :meth:`DestinationTable.route` with a :class:`Route`.
Lookups are two hash probes whatever the number of services:

1. the exact ``ip:port`` is a cluster's **service** (a VIP): the cluster, with its
   own ``target`` as the CONNECT authority;
2. the IP is the host of a cluster's **endpoint** (the peer sidecar fronting that
   workload): the cluster, pinned to that endpoint, with the dialled ``ip:port``
   as the CONNECT authority (the peer forwards to it locally). If several
   clusters share an endpoint host, the first cluster in the configuration wins;
3. otherwise the ``outbound_policy``: ``passthrough`` (connect directly) or
   ``registry_only`` (refuse).

Addresses are compared as IP addresses, so ``::ffff:10.0.0.1`` is ``10.0.0.1``
and IPv6 spellings do not matter.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from .config import Address, format_address, normalise_ip

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class RouteKind(enum.Enum):
    """What to do with a captured connection."""

    CLUSTER = "cluster"
    PASSTHROUGH = "passthrough"
    REFUSE = "registry_only"
    TUNNEL = "loop"
    """The destination is a peer sidecar's TCP tunnel address (an h2, tcp or auto
    cluster's endpoint, port and all): the sidecar's own tunnel connection, captured
    because the sidecar does not run as the user or group the rules exempt. Routed
    through its cluster, it would dial the same address again, and be captured again."""


@dataclass(frozen=True)
class Route:
    """The decision for one original destination."""

    kind: RouteKind
    cluster: str = ""
    target: str | None = None
    """The CONNECT authority; None: the cluster's configured ``target``."""
    endpoint: Address | None = None
    """The peer sidecar to use; None: the cluster's load balancer chooses."""

    @property
    def name(self) -> str:
        """The cluster's name, or ``passthrough`` / ``registry_only`` / ``loop``: a
        metrics label."""
        return self.cluster if self.kind is RouteKind.CLUSTER else self.kind.value


@dataclass(frozen=True)
class ClusterDestinations:
    """One cluster's part of the table."""

    cluster: str
    services: tuple[Address, ...]
    endpoints: tuple[Address, ...]
    tunnels_over_tcp: bool = True
    """The cluster's tunnels are TCP connections to its endpoints (h2, tcp, auto's
    fallback): a captured TCP connection to an endpoint's address is the sidecar's own.
    A QUIC tunnel is UDP, never captured by the TCP rules."""


class DuplicateService(ValueError):
    """Two clusters list the same service address."""


class DestinationTable:
    """Maps original destinations to routes.

    :param clusters: each cluster's services and endpoints, in configuration order.
    :param policy: ``registry_only`` or ``passthrough``, for unknown destinations.
    :raises DuplicateService: two clusters list the same service.
    """

    def __init__(self, clusters: Iterable[ClusterDestinations], policy: str) -> None:
        self.policy = RouteKind.PASSTHROUGH if policy == "passthrough" else RouteKind.REFUSE
        self._services: dict[tuple[IPAddress, int], str] = {}
        self._hosts: dict[IPAddress, tuple[str, Address]] = {}
        self._tunnels: set[tuple[IPAddress, int]] = set()
        for entry in clusters:
            for host, port in entry.services:
                ip = normalise_ip(host)
                if ip is None:
                    continue
                owner = self._services.get((ip, port))
                if owner is not None and owner != entry.cluster:
                    raise DuplicateService(
                        f"{format_address((host, port))} is a service of both clusters "
                        f"{owner!r} and {entry.cluster!r}"
                    )
                self._services[(ip, port)] = entry.cluster
            for endpoint in entry.endpoints:
                ip = normalise_ip(endpoint[0])
                if ip is not None:
                    self._hosts.setdefault(ip, (entry.cluster, endpoint))
                    if entry.tunnels_over_tcp:
                        self._tunnels.add((ip, endpoint[1]))

    def __len__(self) -> int:
        """Number of service addresses."""
        return len(self._services)

    def route(self, address: Address) -> Route:
        """The route for a connection the application made to ``address``."""
        host, port = address
        ip = normalise_ip(host)
        if ip is not None:
            cluster = self._services.get((ip, port))
            if cluster is not None:
                return Route(RouteKind.CLUSTER, cluster)
            if (ip, port) in self._tunnels:
                return Route(RouteKind.TUNNEL)
            fronted = self._hosts.get(ip)
            if fronted is not None:
                return Route(
                    RouteKind.CLUSTER,
                    fronted[0],
                    target=format_address((str(ip), port)),
                    endpoint=fronted[1],
                )
        return Route(self.policy)
