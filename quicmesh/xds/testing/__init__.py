"""A small ADS server for tests and ``quicmesh demo --xds``.

:class:`AdsServer` serves Envoy resources over the state-of-the-world
Aggregated Discovery Service on grpcio, the way any xDS control plane does:
it answers each subscription with the current version of the resources,
pushes a new version to every stream when :meth:`AdsServer.set_resources` is
called, and records what each client sent (versions, nonces, ACK/NACK and
``error_detail``) so tests can check the client's side of the protocol. It
holds no quicmesh-specific logic: a sidecar must work with any ADS server.
"""

from __future__ import annotations

from .server import AdsServer, ReceivedRequest

__all__ = ["AdsServer", "ReceivedRequest"]
