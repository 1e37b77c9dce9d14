"""A UDP relay standing in for the network between two QUIC endpoints.

Used by the migration benchmark and the 0-RTT and migration tests. Each client
address gets its own upstream socket, as a NAT gives each inside address its own
outside port. The relay can

* **record** what clients send (``captured``), e.g. a first flight with 0-RTT;
* **replay** recorded datagrams to the server from a fresh socket, as an attacker
  who captured them would (:meth:`UdpRelay.replay`);
* **rebind**: give every client a new upstream socket, so the server sees the
  client's packets come from a new port (NAT rebinding, :meth:`UdpRelay.rebind`);
* **spoof**: send a copy of a datagram from another address
  (:meth:`UdpRelay.send_from_new_address`) and count what the server sends there;
* **blackhole** a client address (drop its datagrams both ways), as a NAT
  mapping that died;
* **hold** what the server sends to a client address and **release** it in one
  burst (:meth:`UdpRelay.hold`), as a queue that stalled and then drained;
* **delay** datagrams by a fixed one-way time in each direction.

:class:`TcpRelay` does the same for TCP (delay, and a rebinding that breaks
every connection, as it does to TCP through a NAT).

Everything runs on the caller's event loop; nothing sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Address = tuple[str, int]


@dataclass
class RelayStats:
    """Datagrams and bytes the relay forwarded."""

    to_server: int = 0
    to_client: int = 0
    dropped: int = 0
    rebinds: int = 0
    spoof_replies: dict[Address, int] = field(default_factory=dict)
    """Bytes the server sent to each address we spoofed or replayed from."""


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Any], None]) -> None:
        self._on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors (a closed port): UDP carries on


class UdpRelay:
    """Relay datagrams between clients and ``upstream``.

    :param upstream: the server's address.
    :param delay: one-way delay added in each direction, in seconds.
    :param record: keep every datagram clients send, in order, in :attr:`captured`.
    """

    def __init__(self, upstream: Address, *, delay: float = 0.0, record: bool = False) -> None:
        self.upstream = upstream
        self.delay = delay
        self.record = record
        self.captured: list[bytes] = []
        self.stats = RelayStats()
        self.blackholed: set[Address] = set()
        self.held: dict[Address, list[bytes]] = {}
        """Datagrams from the server held back per client address (:meth:`hold`)."""
        self.on_to_server: Callable[[bytes, Address], None] | None = None
        """Called with each datagram a client sends (before it is forwarded)."""
        self._loop = asyncio.get_running_loop()
        self._front: _Endpoint | None = None
        self._upstreams: dict[Address, _Endpoint] = {}
        self._opening: dict[Address, list[bytes]] = {}
        """Datagrams from clients whose upstream socket is being opened."""
        self._extra: list[_Endpoint] = []
        self._closed = False
        self.address: Address = ("", 0)

    async def start(self, host: str = "127.0.0.1") -> UdpRelay:
        """Bind the client-facing socket on ``host`` (any port); see :attr:`address`."""
        _, self._front = await self._loop.create_datagram_endpoint(
            lambda: _Endpoint(self._from_client), local_addr=(host, 0)
        )
        assert self._front.transport is not None
        self.address = self._front.transport.get_extra_info("sockname")[:2]
        return self

    def close(self) -> None:
        """Close every socket (datagrams still delayed in the relay are dropped)."""
        self._closed = True
        for endpoint in [self._front, *self._upstreams.values(), *self._extra]:
            if endpoint is not None and endpoint.transport is not None:
                endpoint.transport.close()
        self._upstreams.clear()
        self._extra.clear()

    def upstream_address(self, client: Address) -> Address | None:
        """The source address the server sees for ``client`` now."""
        endpoint = self._upstreams.get(client)
        if endpoint is None or endpoint.transport is None:
            return None
        sockname = endpoint.transport.get_extra_info("sockname")
        return (sockname[0], sockname[1])

    # -- forwarding ------------------------------------------------------------

    def _later(self, action: Callable[[], None]) -> None:
        if self.delay > 0:
            self._loop.call_later(self.delay, action)
        else:
            action()

    def _from_client(self, data: bytes, addr: Any) -> None:
        client = (addr[0], addr[1])
        if client in self.blackholed:
            self.stats.dropped += 1
            return
        if self.record:
            self.captured.append(data)
        if self.on_to_server is not None:
            self.on_to_server(data, client)
        self._later(lambda: self._forward_up(data, client))

    def _forward_up(self, data: bytes, client: Address) -> None:
        if self._closed:
            return
        endpoint = self._upstreams.get(client)
        if endpoint is None:
            # One upstream socket per client, as a NAT maps one inside address to one
            # outside port: what comes while it opens waits for it, in order.
            waiting = self._opening.get(client)
            if waiting is not None:
                waiting.append(data)
            else:
                self._opening[client] = []
                self._loop.create_task(self._open_upstream(client, data))
            return
        if endpoint.transport is not None and not endpoint.transport.is_closing():
            self.stats.to_server += 1
            endpoint.transport.sendto(data, self.upstream)

    async def _open_upstream(self, client: Address, first: bytes | None) -> _Endpoint:
        _, endpoint = await self._loop.create_datagram_endpoint(
            lambda: _Endpoint(lambda data, addr: self._from_server(data, client)),
            local_addr=(self.address[0], 0),
        )
        previous = self._upstreams.get(client)
        self._upstreams[client] = endpoint
        if previous is not None and previous.transport is not None:
            previous.transport.close()
        if first is not None and endpoint.transport is not None:
            for data in [first, *self._opening.pop(client, [])]:
                self.stats.to_server += 1
                endpoint.transport.sendto(data, self.upstream)
        return endpoint

    def _from_server(self, data: bytes, client: Address) -> None:
        if client in self.blackholed:
            self.stats.dropped += 1
            return
        held = self.held.get(client)
        if held is not None:
            held.append(data)
            return
        self._later(lambda: self._forward_down(data, client))

    def _forward_down(self, data: bytes, client: Address) -> None:
        front = self._front
        if front is not None and front.transport is not None and not front.transport.is_closing():
            self.stats.to_client += 1
            front.transport.sendto(data, client)

    # -- impairments -------------------------------------------------------------

    def freeze(self) -> None:
        """Drop every datagram of every client both ways from now on, as when the
        server hangs (SIGSTOP) or the path blackholes: no answer, no ICMP."""
        self.blackholed.update(self._upstreams)

    def hold(self, client: Address) -> None:
        """Hold what the server sends to ``client`` from now on, until :meth:`release`."""
        self.held.setdefault(client, [])

    def release(self, client: Address) -> int:
        """Deliver what was held for ``client`` at once, in order; returns how many
        datagrams (what comes next is relayed as usual)."""
        held = self.held.pop(client, [])
        for data in held:
            self._forward_down(data, client)
        return len(held)

    async def rebind(self) -> None:
        """NAT rebinding: every client's packets leave from a new port from now on."""
        for client in list(self._upstreams):
            await self._open_upstream(client, None)
        self.stats.rebinds += 1

    async def replay(self, datagrams: list[bytes]) -> Address:
        """Send recorded datagrams to the server from a fresh socket; returns its address.

        What the server answers is counted in ``stats.spoof_replies``.
        """
        return await self.send_from_new_address(datagrams)

    async def send_from_new_address(self, datagrams: list[bytes]) -> Address:
        """Send ``datagrams`` to the server from a socket nobody else uses."""
        replies = self.stats.spoof_replies

        def on_reply(data: bytes, addr: Any) -> None:
            replies[source] = replies.get(source, 0) + len(data)

        _, endpoint = await self._loop.create_datagram_endpoint(
            lambda: _Endpoint(on_reply), local_addr=(self.address[0], 0)
        )
        assert endpoint.transport is not None
        sockname = endpoint.transport.get_extra_info("sockname")
        source: Address = (sockname[0], sockname[1])
        replies[source] = 0
        self._extra.append(endpoint)
        for data in datagrams:
            endpoint.transport.sendto(data, self.upstream)
        return source


class _TcpPipe(asyncio.Protocol):
    """One side of a relayed TCP connection: what it reads goes to ``peer`` after the delay."""

    def __init__(self, relay: TcpRelay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.peer: _TcpPipe | None = None
        self._early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.relay._later(lambda: self._deliver(data))

    def _deliver(self, data: bytes) -> None:
        if self.relay.frozen:
            return
        if self.peer is None or self.peer.transport is None:
            self._early.append(data)
        elif not self.peer.transport.is_closing():
            self.peer.transport.write(data)

    def attach(self, peer: _TcpPipe) -> None:
        self.peer = peer
        for data in self._early:
            self._deliver(data)
        self._early.clear()

    def eof_received(self) -> bool:
        def shut() -> None:
            peer = self.peer.transport if self.peer is not None else None
            if peer is not None and not peer.is_closing() and peer.can_write_eof():
                peer.write_eof()

        self.relay._later(shut)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.abort()


class TcpRelay:
    """Relay TCP connections to ``upstream`` with a one-way ``delay`` in each direction.

    :meth:`rebind` is what a NAT rebinding does to TCP: the connections' address
    changes, the server answers the new port with RST, and both ends see the
    connection reset (here: both sides are aborted).
    """

    def __init__(self, upstream: Address, *, delay: float = 0.0) -> None:
        self.upstream = upstream
        self.delay = delay
        self.address: Address = ("", 0)
        self._loop = asyncio.get_running_loop()
        self._server: asyncio.Server | None = None
        self._pairs: list[tuple[_TcpPipe, _TcpPipe]] = []
        self.frozen = False
        """Drop every byte both ways (see :meth:`freeze`)."""

    def _later(self, action: Callable[[], None]) -> None:
        if self.delay > 0:
            self._loop.call_later(self.delay, action)
        else:
            action()

    async def start(self, host: str = "127.0.0.1") -> TcpRelay:
        """Listen on ``host`` (any port); see :attr:`address`."""
        self._server = await self._loop.create_server(self._accept, host, 0)
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        return self

    def _accept(self) -> _TcpPipe:
        front = _TcpPipe(self)
        self._loop.create_task(self._connect(front))
        return front

    async def _connect(self, front: _TcpPipe) -> None:
        try:
            _, back = await self._loop.create_connection(lambda: _TcpPipe(self), *self.upstream)
        except OSError:
            if front.transport is not None:
                front.transport.abort()
            return
        self._pairs.append((front, back))
        back.attach(front)
        front.attach(back)

    def freeze(self) -> None:
        """Deliver nothing more either way, close nothing, as when the server hangs
        (SIGSTOP) or the path blackholes; TCP keeps the connections open."""
        self.frozen = True

    def rebind(self) -> int:
        """Break every relayed connection (reset both ways); returns how many."""
        pairs, self._pairs = self._pairs, []
        for front, back in pairs:
            for pipe in (front, back):
                if pipe.transport is not None:
                    pipe.transport.abort()
        return len(pairs)

    def close(self) -> None:
        """Stop listening and break every connection."""
        self.rebind()
        if self._server is not None:
            self._server.close()
