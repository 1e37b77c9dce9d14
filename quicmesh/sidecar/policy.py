"""Inbound authorization: may this peer identity reach this destination?

Sans-IO. A flow is allowed when its target is in the inbound listener's
``destinations`` allow-list and, if the listener has ``policies``, one policy
whose identity pattern matches the peer also lists the target. The answer is
``None`` (allowed) or the reason for refusing, which goes back to the peer in
the 403 response and into the access log.
"""

from __future__ import annotations

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


def refusal_reason(config: InboundListenerConfig, identity: str, target: str) -> str | None:
    """Why ``identity`` may not reach ``target`` through this listener, or None if it may."""
    parsed = split_target(target)
    if parsed is None:
        return f"malformed destination {target!r}"
    host, port = parsed
    if not any(destination_matches(rule, host, port) for rule in config.destinations):
        return f"destination {target} is not allowed by listener {config.name}"
    if not config.policies:
        return None
    matching = [p for p in config.policies if identity_matches(p.identity, identity)]
    if not matching:
        return f"identity {identity} is not allowed by any policy of listener {config.name}"
    for policy in matching:
        if any(destination_matches(rule, host, port) for rule in policy.destinations):
            return None
    return f"identity {identity} may not reach {target}"


def allowed_nowhere(config: InboundListenerConfig, identity: str) -> bool:
    """Whether every stream ``identity`` can open on this listener will be refused:
    the listener has policies and none that matches it lists a destination."""
    if not config.policies:
        return False
    return not any(
        policy.destinations
        for policy in config.policies
        if identity_matches(policy.identity, identity)
    )
