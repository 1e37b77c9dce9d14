"""Measure how many packets per second the forwarder moves (``python -m quicmesh.netem.speed``).

Builds a perfect link (no delay, loss or rate), starts sender processes in the client
namespace that send UDP datagrams of the given size to a socket in the server namespace
as fast as they can, and reads the forwarder's counters over a window. The socket is
never read, so the server kernel drops what does not fit in its buffer: only the
forwarder is measured. Also reports what the senders offered and how many packets the
kernel dropped at the client TUN because the forwarder did not keep up. Needs root.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from quicmesh.netem.config import LinkConfig, parse_duration, parse_percent
from quicmesh.netem.link import Link
from quicmesh.netem.system import NetemError

__all__ = ["SpeedResult", "main", "measure"]

_SENDER = """
import socket, sys, time
size, seconds, address = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = bytes(size)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(1000):
        try:
            sock.sendto(payload, (address, 9))
        except OSError:
            pass
"""


@dataclass(frozen=True)
class SpeedResult:
    """One measurement: IP packet size, forwarded packets/s, offered packets/s, TUN drops."""

    packet_bytes: int
    forwarded_per_second: float
    offered_per_second: float
    dropped_at_tun: int

    @property
    def forwarded_bits_per_second(self) -> float:
        """Forwarded rate in bit/s of IP packets."""
        return self.forwarded_per_second * self.packet_bytes * 8


def _tun_tx_packets(link: Link) -> tuple[int, int]:
    out = subprocess.run(
        ["ip", "-n", link.client_ns, "-s", "-j", "link", "show", link.interface],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tx = json.loads(out)[0]["stats64"]["tx"]
    return int(tx["packets"]), int(tx["dropped"])


def measure(
    packet_bytes: int, seconds: float = 2.0, senders: int = 1, config: LinkConfig | None = None
) -> SpeedResult:
    """Measure the forwarder at one packet size (IP bytes, 28 to 1500).

    :param config: the link to measure (default: no impairments).
    """
    payload = max(0, packet_bytes - 28)
    with Link(config) as link:
        with link.entered("server"):
            sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sink:
            sink.bind((link.server_address, 9))
            for _ in range(senders):
                link.popen(
                    "client",
                    [sys.executable, "-c", _SENDER, str(payload), str(seconds + 1.0),
                     link.server_address],
                )  # fmt: skip
            # Skip the start-up of the senders, then measure over a window.
            deadline = time.monotonic() + 5.0
            while link.stats().client_to_server.packets_in < 1000:
                if time.monotonic() > deadline:
                    raise NetemError("the senders did not start")
                time.sleep(0.01)
            start, tx_start = link.stats().client_to_server, _tun_tx_packets(link)
            t0 = time.monotonic()
            time.sleep(seconds)
            end, tx_end = link.stats().client_to_server, _tun_tx_packets(link)
            elapsed = time.monotonic() - t0
    return SpeedResult(
        packet_bytes=payload + 28,
        forwarded_per_second=(end.packets_out - start.packets_out) / elapsed,
        offered_per_second=((tx_end[0] - tx_start[0]) + (tx_end[1] - tx_start[1])) / elapsed,
        dropped_at_tun=tx_end[1] - tx_start[1],
    )


def main(argv: list[str] | None = None) -> int:
    """Print packets/s for each ``--size``."""
    parser = argparse.ArgumentParser(prog="python -m quicmesh.netem.speed")
    parser.add_argument("--size", type=int, action="append", help="IP packet bytes (repeatable)")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--delay", type=parse_duration, default=0.0, help="one-way delay")
    parser.add_argument("--loss", type=parse_percent, default=0.0, help="random loss")
    args = parser.parse_args(argv)
    config = LinkConfig.symmetric(delay=args.delay, loss=args.loss)
    for size in args.size or [1500, 100]:
        result = measure(size, args.seconds, args.senders, config)
        print(
            f"{result.packet_bytes:5d} B packets: forwarded {result.forwarded_per_second:9.0f}/s "
            f"({result.forwarded_bits_per_second / 1e6:7.1f} Mbit/s), offered "
            f"{result.offered_per_second:9.0f}/s, dropped at the TUN {result.dropped_at_tun}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
