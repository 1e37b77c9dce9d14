"""A UDP relay between an interop client and server: drops, rebinds, records.

The client talks to the relay's address; the relay forwards each client's
datagrams to the server from an upstream socket of its own (one per client
address, like a NAT) and the server's answers back. :class:`LinkPolicy` is the
sans-IO part: for each datagram it decides, from a seeded
:class:`random.Random` and packet counts, whether to drop it and when the
"NAT" gives the client a new upstream socket, on a new port (``rebind-port``) or
a new address in 127.0.0.0/8 (``rebind-addr``). :class:`Relay` moves bytes and
records every datagram it forwards to a trace (see :mod:`interop.trace`).
"""

from __future__ import annotations

import asyncio
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Address = tuple[str, int]

TO_SERVER = 0
TO_CLIENT = 1

_RECORD = struct.Struct("!dBHI")
"""Trace record header: time, direction, path number, datagram length."""


@dataclass
class LinkPolicy:
    """What the link does to datagrams.

    :param loss_to_server: probability of dropping a client-to-server datagram.
    :param loss_to_client: probability of dropping a server-to-client datagram.
    :param rebind: ``None``, ``"port"`` or ``"addr"``.
    :param rebind_every: short-header client datagrams between two rebinds.
    :param max_rebinds: rebinds at most, so that a run ends on a stable path.
    :param seed: seed of the loss model, so that a run can be replayed.
    """

    loss_to_server: float = 0.0
    loss_to_client: float = 0.0
    rebind: str | None = None
    rebind_every: int = 50
    max_rebinds: int = 8
    seed: int = 0
    rebinds: int = field(default=0, init=False)
    _random: random.Random = field(init=False, repr=False)
    _short_since_rebind: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.rebind not in (None, "port", "addr"):
            raise ValueError(f"rebind must be None, 'port' or 'addr', not {self.rebind!r}")
        self._random = random.Random(self.seed)

    def drop(self, direction: int) -> bool:
        """Whether to drop the next datagram going in ``direction``."""
        rate = self.loss_to_server if direction == TO_SERVER else self.loss_to_client
        return rate > 0 and self._random.random() < rate

    def should_rebind(self, datagram: bytes) -> bool:
        """Called for each forwarded client datagram: is it time for a new upstream socket?"""
        if self.rebind is None or self.rebinds >= self.max_rebinds:
            return False
        if datagram and not datagram[0] & 0x80:
            self._short_since_rebind += 1
            if self._short_since_rebind >= self.rebind_every:
                self._short_since_rebind = 0
                self.rebinds += 1
                return True
        return False

    def upstream_host(self, number: int) -> str:
        """The local address of the ``number``-th upstream socket."""
        if self.rebind == "addr":
            return f"127.0.0.{2 + number % 250}"
        return "127.0.0.1"


class TraceWriter:
    """Appends datagram records to a file: ``(time, direction, path, length) + bytes``."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("wb")

    def write(self, now: float, direction: int, path: int, data: bytes) -> None:
        self._file.write(_RECORD.pack(now, direction, path, len(data)))
        self._file.write(data)

    def close(self) -> None:
        self._file.close()


def read_trace(path: Path) -> list[tuple[float, int, int, bytes]]:
    """The records of a trace file, in order."""
    blob = path.read_bytes()
    records = []
    offset = 0
    while offset + _RECORD.size <= len(blob):
        now, direction, path_number, length = _RECORD.unpack_from(blob, offset)
        offset += _RECORD.size
        records.append((now, direction, path_number, blob[offset : offset + length]))
        offset += length
    return records


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, relay: Relay, client: Address, path: int) -> None:
        self.relay = relay
        self.client = client
        self.path = path
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.relay._from_server(self, data)


class Relay(asyncio.DatagramProtocol):
    """Forwards datagrams between clients and one server, applying a :class:`LinkPolicy`."""

    def __init__(self, server: Address, policy: LinkPolicy, trace: Path | None = None) -> None:
        self.server = server
        self.policy = policy
        self.address: Address = ("127.0.0.1", 0)
        self.forwarded = [0, 0]
        """Bytes forwarded to the server and to the client."""
        self.dropped = [0, 0]
        """Datagrams dropped towards the server and towards the client."""
        self._trace = TraceWriter(trace) if trace is not None else None
        self._transport: asyncio.DatagramTransport | None = None
        self._upstreams: dict[Address, _Upstream] = {}
        self._all_upstreams: list[_Upstream] = []
        self._opening: dict[Address, list[bytes]] = {}
        self._opened = 0
        self._pending: list[asyncio.Task[None]] = []
        self._loop = asyncio.get_event_loop()

    @classmethod
    async def start(
        cls, server: Address, policy: LinkPolicy, trace: Path | None = None, port: int = 0
    ) -> Relay:
        """Listen on 127.0.0.1:``port`` (any free port when 0)."""
        loop = asyncio.get_running_loop()
        _, relay = await loop.create_datagram_endpoint(
            lambda: cls(server, policy, trace), local_addr=("127.0.0.1", port)
        )
        assert relay._transport is not None
        relay.address = relay._transport.get_extra_info("sockname")[:2]
        return relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        client = (addr[0], addr[1])
        queued = self._opening.get(client)
        if queued is not None:
            queued.append(data)
            return
        upstream = self._upstreams.get(client)
        if upstream is None or self.policy.should_rebind(data):
            self._opening[client] = [data]
            self._pending.append(asyncio.ensure_future(self._open(client)))
            return
        self._to_server(upstream, data)

    async def _open(self, client: Address) -> None:
        number = self._opened
        self._opened += 1
        _, upstream = await self._loop.create_datagram_endpoint(
            lambda: _Upstream(self, client, number),
            local_addr=(self.policy.upstream_host(number), 0),
        )
        self._upstreams[client] = upstream
        self._all_upstreams.append(upstream)
        for data in self._opening.pop(client, []):
            self._to_server(upstream, data)

    def _to_server(self, upstream: _Upstream, data: bytes) -> None:
        if self.policy.drop(TO_SERVER):
            self.dropped[TO_SERVER] += 1
            return
        assert upstream.transport is not None
        upstream.transport.sendto(data, self.server)
        self.forwarded[TO_SERVER] += len(data)
        if self._trace is not None:
            self._trace.write(self._loop.time(), TO_SERVER, upstream.path, data)

    def _from_server(self, upstream: _Upstream, data: bytes) -> None:
        if self.policy.drop(TO_CLIENT):
            self.dropped[TO_CLIENT] += 1
            return
        assert self._transport is not None
        self._transport.sendto(data, upstream.client)
        self.forwarded[TO_CLIENT] += len(data)
        if self._trace is not None:
            self._trace.write(self._loop.time(), TO_CLIENT, upstream.path, data)

    @property
    def paths(self) -> int:
        """Upstream sockets opened so far (one per client, plus one per rebind)."""
        return len(self._all_upstreams)

    def close(self) -> None:
        """Close every socket and the trace."""
        for task in self._pending:
            task.cancel()
        for upstream in self._all_upstreams:
            if upstream.transport is not None:
                upstream.transport.close()
        if self._transport is not None:
            self._transport.close()
        if self._trace is not None:
            self._trace.close()
            self._trace = None
