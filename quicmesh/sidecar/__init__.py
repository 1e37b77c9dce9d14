"""The quicmesh sidecar: an Envoy-like proxy whose hop between sidecars is QUIC, H2 or TCP.

``quicmesh sidecar -c sidecar.yaml`` runs one (:mod:`.cli`). The parts, each in
its own module:

- :mod:`.config`: the YAML configuration and its validation (docs/config.md);
- :mod:`.lb`, :mod:`.health`, :mod:`.circuit`, :mod:`.policy`, :func:`.pool.plan_open`:
  sans-IO decisions (load balancing, health and outlier ejection, circuit
  breakers, inbound authorization, which connection takes a stream);
- :mod:`.pool`, :mod:`.cluster`: peer connection pools and clusters (asyncio);
- :mod:`.outbound`, :mod:`.inbound`: the listeners;
- :mod:`.admin`, :mod:`.metrics`, :mod:`.stats`, :mod:`.accesslog`: observability
  (and the admin actions ``POST /drain``, ``POST /migrate``);
- :mod:`.runtime`: the running sidecar, reload, drain and migration;
- :mod:`.launch`: running sidecar processes (the demo and the tests use it).
"""

from __future__ import annotations

from .config import SidecarConfig, load_config

__all__ = ["SidecarConfig", "load_config"]
