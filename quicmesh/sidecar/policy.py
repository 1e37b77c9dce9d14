"""Authorization: may this peer identity reach this destination (inbound), and may this
server serve this cluster (outbound, :func:`server_refusal`)?

Sans-IO. A flow is allowed when its target is in the inbound listener's
``destinations`` allow-list and, if the listener has ``policies``, one policy
whose identity pattern matches the peer also lists the target. The answer is
``None`` (allowed) or the reason for refusing, which goes back to the peer in
the 403 response and into the access log.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection

from ..tunnel.connect import Target
from .config import (
    InboundListenerConfig,
    destination_matches,
    identity_matches,
    parse_address,
)


def split_target(target: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` as ``(host, port)``; None if malformed.

    A :class:`~quicmesh.tunnel.connect.Target` (what an inbound stream carries) was
    parsed by its tunnel session already: its parts are taken as they are.
    """
    if isinstance(target, Target):
        return target.host, target.port
    try:
        return parse_address(target)
    except ValueError:
        return None


def refusal_reason(
    config: InboundListenerConfig,
    identity: str,
    target: str,
    own: Collection[tuple[str, int]] = (),
) -> str | None:
    """Why ``identity`` may not reach ``target`` through this listener, or None if it may.

    :param own: the sidecar's own listening addresses (its admin endpoint, its
        listeners): never a destination, whatever the allow-lists say (a peer could
        otherwise drain the sidecar through its admin endpoint on loopback).
    """
    parsed = split_target(target)
    if parsed is None:
        return f"malformed destination {target!r}"
    host, port = parsed
    if is_own_address(host, port, own):
        return f"destination {target} is this sidecar's own listening address"
    if not any(destination_matches(rule, host, port) for rule in config.destinations):
        return f"destination {target} is not allowed by listener {config.name}"
    if config.policies is None:
        return None
    matching = [p for p in config.policies if identity_matches(p.identity, identity)]
    if not matching:
        return f"identity {identity} is not allowed by any policy of listener {config.name}"
    for policy in matching:
        if any(destination_matches(rule, host, port) for rule in policy.destinations):
            return None
    return f"identity {identity} may not reach {target}"


def server_refusal(identity: str, allowed: Collection[str]) -> str | None:
    """Why a cluster's endpoint presenting ``identity`` may not serve it (the cluster's
    ``server_identities``, SPIFFE IDs or ``prefix/*`` patterns; empty: any), or None."""
    if not allowed or any(identity_matches(pattern, identity) for pattern in allowed):
        return None
    listed = ", ".join(allowed)
    return f"peer certificate's identity {identity} is not one of server_identities ({listed})"


def allowed_nowhere(config: InboundListenerConfig, identity: str) -> bool:
    """Whether every stream ``identity`` can open on this listener will be refused:
    the listener has policies and none that matches it lists a destination."""
    if config.policies is None:
        return False
    return not any(
        policy.destinations
        for policy in config.policies
        if identity_matches(policy.identity, identity)
    )


def is_own_address(host: str, port: int, own: Collection[tuple[str, int]]) -> bool:
    """Whether ``host:port`` reaches one of the listening addresses ``own`` from this
    machine: the same port, and the same address, a loopback one (``localhost`` too), or
    any address when that listener is bound to all (``0.0.0.0``, ``::``). A host name
    other than ``localhost`` is not resolved here."""
    hosts = [own_host.strip("[]") for own_host, own_port in own if own_port == port]
    if not hosts:
        return False
    host = host.strip("[]")
    address = _ip_address(host)
    if address is None:
        loopback = host.lower().rstrip(".") == "localhost"
    else:
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        loopback = (
            address.is_loopback or address.is_unspecified or bool(mapped and mapped.is_loopback)
        )
    if loopback:
        return True
    for own_host in hosts:
        bound = _ip_address(own_host)
        if own_host.lower() == host.lower() or (
            bound is not None and (bound.is_unspecified or bound == address)
        ):
            return True
    return False


def _ip_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address, an IPv6 zone kept (``::1%lo`` is loopback too); None for
    a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
