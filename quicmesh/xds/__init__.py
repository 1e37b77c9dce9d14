"""xDS: Envoy's data-plane API as a source of sidecar configuration.

- :mod:`quicmesh.xds.resources`: type URLs and parsing Envoy resources (protobuf
  messages from ``xds-protos``) from YAML/JSON documents.
- :mod:`quicmesh.xds.mapping`: Envoy Listener / Cluster / ClusterLoadAssignment /
  Secret onto the sidecar's own model (:mod:`quicmesh.sidecar.config`); fields
  with no quicmesh meaning are refused with a one-line :class:`MappingError`
  (the ADS client sends it back as a NACK's ``error_detail``).
- :mod:`quicmesh.xds.bootstrap`: an Envoy bootstrap file (``static_resources``,
  ``dynamic_resources``) as a sidecar configuration.
- :mod:`quicmesh.xds.client`: the ADS client that drives a running sidecar.
- :mod:`quicmesh.xds.testing`: a small ADS server for tests and ``quicmesh demo --xds``.

docs/xds.md lists the supported subset.
"""

from __future__ import annotations
