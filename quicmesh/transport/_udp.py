"""Receive batching for QUIC's UDP sockets.

asyncio's datagram transport reads one datagram per event-loop iteration, and
aioquic's protocol runs a full ``datagrams_to_send`` pass (ACKs, stream data,
the timer) after each. Under load the socket's receive queue fills while the
loop works through it one datagram at a time.

How quicmesh reads instead, in this one place: asyncio's reader still waits for
readiness and delivers the first datagram (so closing, pausing and error
handling stay asyncio's). :class:`BatchReader` then reads whatever else is
waiting, up to ``max_datagrams`` in all, with non-blocking ``recvfrom`` on a
``dup()`` of the transport's socket (the same kernel socket; asyncio's
``TransportSocket`` does not expose ``recvfrom``). Every datagram is processed
as it is read; a connection that received one defers its transmit
(:func:`defer_transmit`) and transmits once when the batch ends, so one pass of
``datagrams_to_send`` acknowledges the whole batch. A batch of one is what
asyncio alone does.

The batch is found through a context variable because on a server aioquic's
``QuicServer`` routes each datagram to its connection by connection ID: the
reader cannot know which connections a batch touches until they say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import socket
import sys
from collections.abc import Callable
from typing import Any

DEFAULT_MAX_DATAGRAMS = 64
"""Datagrams read per readiness event, the one asyncio delivered included."""

MAX_DATAGRAM_SIZE = 65535
"""Bytes asked of ``recvfrom``: the largest UDP payload, so nothing is truncated."""

Deliver = Callable[[bytes, Any], None]
ReportError = Callable[[OSError], None]

_batch: contextvars.ContextVar[dict[Callable[[], None], None] | None] = contextvars.ContextVar(
    "quicmesh_receive_batch", default=None
)


def defer_transmit(transmit: Callable[[], None]) -> bool:
    """Run ``transmit`` once when the batch being read ends; False outside a batch
    (the caller transmits now)."""
    pending = _batch.get()
    if pending is None:
        return False
    pending[transmit] = None
    return True


class BatchReader:
    """Reads every datagram waiting on a transport's socket when asyncio delivers one.

    :param transport: the datagram transport whose protocol owns this reader.
    :param deliver: processes one datagram (receive it, handle its events);
        transmits go through :func:`defer_transmit`.
    :param max_datagrams: datagrams per readiness event, at most; 1 reads one at
        a time, as asyncio does.
    :param on_error: called with an error the socket reported while the batch was
        read (an ICMP unreachable on a connected socket: ``ConnectionRefusedError``),
        as asyncio calls ``error_received``; without it such errors are dropped.

    The protocol calls :meth:`datagram_received` from its own
    ``datagram_received`` and :meth:`close` from ``connection_lost``.
    """

    def __init__(
        self,
        transport: asyncio.DatagramTransport,
        deliver: Deliver,
        *,
        max_datagrams: int = DEFAULT_MAX_DATAGRAMS,
        on_error: ReportError | None = None,
    ) -> None:
        self._transport = transport
        self._deliver = deliver
        self._on_error = on_error
        self._max_datagrams = max(1, max_datagrams)
        self._socket: socket.socket | None = None
        if self._max_datagrams > 1:
            shared = transport.get_extra_info("socket")
            if shared is not None:
                try:
                    self._socket = shared.dup()
                except OSError:
                    # Out of descriptors: one datagram a readiness event, as asyncio
                    # reads (it raised out of connection_made, and a connection that
                    # migrated onto this socket then heard nothing and died).
                    self._socket = None
                else:
                    self._socket.setblocking(False)
        self.batches = 0
        """Readiness events handled (each one batch)."""
        self.datagrams = 0
        """Datagrams delivered."""

    def datagram_received(self, data: bytes, addr: Any) -> None:
        """Deliver ``data`` and every datagram waiting behind it, then flush the
        connections' deferred transmits, each once."""
        pending: dict[Callable[[], None], None] = {}
        token = _batch.set(pending)
        try:
            self.batches += 1
            self.datagrams += 1
            self._deliver_one(data, addr)
            sock = self._socket
            if sock is not None:
                for _ in range(self._max_datagrams - 1):
                    if self._transport.is_closing():
                        break
                    try:
                        data, addr = sock.recvfrom(MAX_DATAGRAM_SIZE)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        # An ICMP error the kernel queued on the socket: reading it
                        # consumed it, so it is reported here or never.
                        if self._on_error is not None:
                            self._guard(self._on_error, exc)
                        break
                    self.datagrams += 1
                    self._deliver_one(data, addr)
        finally:
            _batch.reset(token)
            for transmit in pending:
                self._guard(transmit)

    def _deliver_one(self, data: bytes, addr: Any) -> None:
        self._guard(self._deliver, data, addr)

    def _guard(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception as exc:
            # What asyncio does when a protocol callback raises: report it, and carry
            # on with the rest of the batch (other datagrams, other connections).
            asyncio.get_running_loop().call_exception_handler(
                {
                    "message": f"Exception in {callback!r}",
                    "exception": exc,
                    "transport": self._transport,
                }
            )

    def close(self) -> None:
        """Release the duplicated socket (the transport closes its own)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


IP_RECVERR = 11
"""Linux's ``IP_RECVERR`` (``IPV6_RECVERR`` below), which Python 3.11's ``socket`` lacks."""
IPV6_RECVERR = 25


NO_ROUTE_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.ENETUNREACH, errno.EHOSTUNREACH})
"""What the kernel says, binding to a local address or connecting from it, when the
address is gone or no route leads from it to the peer."""


def has_route(local: tuple[Any, ...], peer: tuple[str, int]) -> bool:
    """Whether this host can send to ``peer`` from the address of ``local`` (a socket's
    own address, an IPv6 one with its flow info and scope) now: the address is still
    assigned and a route leads to the peer. A throwaway UDP socket bound to the address
    and connected asks the kernel (three system calls); a wildcard address only asks for
    the route. Anything else going wrong is no answer: True (the caller's peer spoke)."""
    try:
        (family, kind, proto, _, sockaddr), *_ = socket.getaddrinfo(
            peer[0], peer[1], type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST
        )
        with socket.socket(family, kind, proto) as sock:
            sock.bind((local[0], 0, *local[2:]))  # (a link-local address needs its scope)
            sock.connect(sockaddr)
    except OSError as exc:
        return exc.errno not in NO_ROUTE_ERRNOS
    return True


def client_udp_socket(address: tuple[str, int], *, recverr: bool = True) -> socket.socket:
    """A non-blocking UDP socket connected to ``address`` (an IP address and a port)
    that asks the kernel for every ICMP error its datagrams draw (Linux: ``IP_RECVERR``,
    and ``IPV6_RECVERR`` too on an IPv6 socket), unless ``recverr`` is False.

    Without the option Linux reports to a connected UDP socket only the ICMP errors it
    counts as fatal (port unreachable, administratively prohibited): a host or network
    unreachable was dropped, and an aioquic connect to such a peer waited out its whole
    timeout where the native engine (whose socket asks for them) failed at once. With
    it every error is also queued on the socket's error queue, charged to its receive
    buffer, which the aioquic client's receiver
    (:class:`~.quic.transport.ErrorQueueReceiver`) empties. The native engine connects
    one, without the option, only to ask the kernel for a route (``_check_route``).
    """
    (family, kind, proto, _, sockaddr), *_ = socket.getaddrinfo(
        address[0], address[1], type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST
    )
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        if recverr and sys.platform.startswith("linux"):
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
                # Best effort: an IPv4-mapped peer's errors come as IPv4 ones.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock
