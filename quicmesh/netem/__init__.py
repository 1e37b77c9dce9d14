"""Link emulator: two network namespaces joined by TUN devices and a forwarder that impairs them.

This kernel has no netem qdisc, so quicmesh brings its own, after mahimahi's mm-delay,
mm-loss and mm-link: every IP packet between a *client* and a *server* network namespace
goes through a user-space forwarder that applies, per direction,

- a one-way ``delay`` with optional ``jitter`` (uniform in ``delay ± jitter``; packets
  are never reordered unless ``reorder=True``),
- random ``loss`` with a seed, or bursty loss from a Gilbert-Elliott chain (``burst``),
- a ``rate_bps`` bottleneck that serialises packets, behind a drop-tail queue bounded
  in packets, bytes or milliseconds at the rate.

TCP and UDP take the same path. The model is sans-IO
(:class:`~quicmesh.netem.model.DirectionModel`: fed ``(packet, now)``, asked what to
release at ``now`` and when the next release is) and is tested without any OS.

Library use (needs root)::

    from quicmesh.netem import Link, LinkConfig

    config = LinkConfig.symmetric(delay=0.020, loss=0.02, rate_bps=20e6, queue_delay=0.060, seed=1)
    with Link(config) as link:
        link.client_address, link.server_address    # 10.77.0.1, 10.77.0.2
        link.client_ns, link.server_ns              # unique namespace names
        server = link.popen("server", [sys.executable, "-m", "some.server"])
        future = link.run_in_thread("client", some_async_function, link.server_address)
        with link.entered("server"):                # sockets made here live in "server"
            listener = socket.create_server((link.server_address, 0))
        link.stats().client_to_server.dropped_by_loss

Per-direction impairments: ``LinkConfig(client_to_server=DirectionConfig(...),
server_to_client=DirectionConfig(...), seed=...)``. Parsers for command-line units:
:func:`parse_duration` (``"20ms"``), :func:`parse_percent` (``"2%"``),
:func:`parse_rate` (``"20mbit"``), :func:`parse_queue` (``"25pkt"``, ``"60ms"``).
Failures raise :class:`NetemError` (a :class:`quicmesh.errors.QuicmeshError`);
invalid settings raise :class:`quicmesh.errors.ConfigError`.

Command line: ``quicmesh netem --delay 20ms --loss 2% --rate 20mbit -- COMMAND`` (see
:mod:`quicmesh.netem.cli`).

Addresses: each link uses 10.77.0.1/30 (client) and 10.77.0.2/30 (server) on an
interface named ``netem0`` inside its own namespaces; links do not see each other, so
several can exist at once. IPv6 is disabled in both namespaces.

Packets: the TUN devices are opened without ``IFF_VNET_HDR``, so the kernel segments
TCP before the device and the forwarder only ever sees packets of at most the MTU
(no GSO super-packets; ethtool is not needed).

How fast the forwarder is (``python -m quicmesh.netem.speed``, 2-core VM, one UDP sender
process saturating the link from the other core): about 100k-155k packets/s with no
impairments, at 1500-byte packets (1.2-1.8 Gbit/s) and at 100-byte packets alike (the
cost is per packet); about 80k-125k packets/s with 20 ms delay and 1 % loss. A
20 Mbit/s link at MTU 1500 needs about 1.7k packets/s per direction. Keep emulated
rates well below the forwarder's speed: when it falls behind, packets queue (and drop)
in the kernel's TUN queue (500 packets), outside the model and its counters.

Timing: due times are computed exactly, but the forwarder's epoll timer has 1 ms
granularity, so each packet may be released up to about 1 ms late (mean about 0.5 ms).
"""

from __future__ import annotations

from quicmesh.netem.config import (
    DirectionConfig,
    GilbertElliottConfig,
    LinkConfig,
    QueueLimit,
    parse_duration,
    parse_percent,
    parse_queue,
    parse_rate,
)
from quicmesh.netem.link import (
    CLIENT_ADDRESS,
    SERVER_ADDRESS,
    Link,
    LinkStats,
    Side,
    cleanup_stale_namespaces,
)
from quicmesh.netem.model import DirectionModel, DirectionStats, PacketFate
from quicmesh.netem.system import NetemError

__all__ = [
    "CLIENT_ADDRESS",
    "SERVER_ADDRESS",
    "DirectionConfig",
    "DirectionModel",
    "DirectionStats",
    "GilbertElliottConfig",
    "Link",
    "LinkConfig",
    "LinkStats",
    "NetemError",
    "PacketFate",
    "QueueLimit",
    "Side",
    "cleanup_stale_namespaces",
    "parse_duration",
    "parse_percent",
    "parse_queue",
    "parse_rate",
]
