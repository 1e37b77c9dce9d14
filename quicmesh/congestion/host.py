"""The default congestion control: whatever the host's TCP uses.

A careful operator compares like with like: the QUIC hop between sidecars should
back off the way the TCP hops beside it do. :func:`default_congestion_control`
reads Linux's ``net.ipv4.tcp_congestion_control`` (per network namespace) and
picks the same family for QUIC: ``bbr`` when TCP runs BBR, ``cubic`` or ``reno``
likewise, and ``cubic`` (aioquic's and Linux's usual default) for anything else
or when the setting cannot be read.
"""

from __future__ import annotations

from pathlib import Path

CONGESTION_CONTROLS = ("reno", "cubic", "bbr")
"""The congestion controls a QUIC connection can use."""

FALLBACK = "cubic"
"""The default when the host's TCP algorithm has no QUIC counterpart or cannot be read."""

HOST_TCP_SETTING = Path("/proc/sys/net/ipv4/tcp_congestion_control")
"""Where Linux keeps the TCP congestion control of the current network namespace."""


def congestion_control_like(tcp_algorithm: str) -> str:
    """The QUIC congestion control matching a Linux TCP algorithm name.

    ``bbr`` (and ``bbr2``, ``bbr3``...) -> ``bbr``; ``cubic`` -> ``cubic``;
    ``reno`` -> ``reno``; anything else -> :data:`FALLBACK`.
    """
    name = tcp_algorithm.strip().lower()
    if name.startswith("bbr"):
        return "bbr"
    return name if name in CONGESTION_CONTROLS else FALLBACK


def default_congestion_control(setting: Path = HOST_TCP_SETTING) -> str:
    """The QUIC congestion control that follows the host's TCP default (read now)."""
    try:
        text = setting.read_text(encoding="ascii", errors="replace")
    except OSError:
        return FALLBACK
    return congestion_control_like(text)
