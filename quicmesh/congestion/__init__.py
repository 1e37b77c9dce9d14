"""Congestion control for quicmesh's QUIC connections.

aioquic ships Reno and Cubic; this package adds BBR (BBRv3 after
draft-ietf-ccwg-bbr-01, with the loss response tuned for random loss, see
:mod:`quicmesh.congestion.bbr`) and registers it with aioquic as ``"bbr"`` when
imported. The layers:

- :mod:`~quicmesh.congestion.delivery`: per-packet delivery state and
  delivery-rate samples;
- :mod:`~quicmesh.congestion.filters`: the windowed max filter;
- :mod:`~quicmesh.congestion.bbr`: :class:`BbrModel`, the sans-IO model and state
  machine, fed with packet events and times;
- :mod:`~quicmesh.congestion.adaptor`: :class:`BbrCongestionControl`, aioquic's
  controller interface around the model, and :func:`enable_model_pacing`, which
  makes a connection's pacer run at the model's rate;
- :mod:`~quicmesh.congestion.host`: :func:`default_congestion_control`, the
  default of transports and sidecar clusters: the host's TCP algorithm.

A transport selecting BBR does::

    configuration = QuicConfiguration(congestion_control_algorithm="bbr", ...)
    connection = QuicConnection(configuration=configuration)
    enable_model_pacing(connection)
"""

from __future__ import annotations

from .adaptor import (
    BBR,
    BbrCongestionControl,
    ModelPacer,
    available_congestion_controls,
    congestion_controller,
    enable_model_pacing,
    ensure_registered,
)
from .bbr import BbrModel, BbrState
from .delivery import DeliveryRateSampler, RateSample
from .host import CONGESTION_CONTROLS, congestion_control_like, default_congestion_control

__all__ = [
    "BBR",
    "CONGESTION_CONTROLS",
    "BbrCongestionControl",
    "BbrModel",
    "BbrState",
    "DeliveryRateSampler",
    "ModelPacer",
    "RateSample",
    "available_congestion_controls",
    "congestion_control_like",
    "congestion_controller",
    "default_congestion_control",
    "enable_model_pacing",
    "ensure_registered",
]

ensure_registered()
