"""``--engine aioquic|native`` for the benchmarks that build a :class:`~quicmesh.QuicTransport`.

The QUIC cases of ``quicmesh bench hol``, ``congestion``, ``ttfb`` and
``migration`` run on the engine named (``QuicTransport(engine=...)``); the
others (h2, tcp, kernel TCP) are the same whatever it is, so a run on each engine
puts the two side by side against the same baselines.
"""

from __future__ import annotations

import argparse

from ..transport.base import QUIC_ENGINE_NAMES, default_quic_engine, quic_engine_problem


def add_engine_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--engine`` (default: :func:`default_quic_engine`)."""
    default = default_quic_engine()
    parser.add_argument(
        "--engine",
        default=default,
        help=f"QUIC engine of the quic cases: {', '.join(QUIC_ENGINE_NAMES)} "
        f"(default here: {default})",
    )


def engine_problem(name: str) -> str | None:
    """Why ``--engine name`` cannot run here (unknown, or the native extension is not
    built), in one line, or None."""
    problem = quic_engine_problem(name)
    return f"--engine: {problem}" if problem is not None else None
