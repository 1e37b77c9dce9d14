"""AutoTransport: QUIC when it works, HTTP/2 when UDP does not.

Many networks drop UDP. :class:`AutoTransport` connects with QUIC and, if the
QUIC handshake has not completed after ``fallback_delay`` (300 ms by default;
at most half the connect's timeout, so that HTTP/2 always gets the other half),
races an HTTP/2 connection to the same address, happy-eyeballs style (RFC
8305); the first to complete is used. The peer must accept both on one port
number (UDP for QUIC, TCP for HTTP/2), as a quicmesh inbound listener with
``transports: [quic, h2]`` and :meth:`AutoTransport.listen` do.

When QUIC fails to an address where HTTP/2 succeeds, or a QUIC connection to it
dies unresponsive mid-life (a path that started dropping UDP), QUIC is marked
broken for that address (:class:`BrokenQuicMemory`, sans-IO): connections go
straight to HTTP/2 while the mark lasts, ``broken_backoff`` seconds the first
time, doubling each time QUIC fails again, up to ``max_broken_backoff``. When a
mark expires while HTTP/2 fallback connections are open, one QUIC handshake is
tried; if it completes the fallback connections are retired (no new streams;
each closes once its streams end), so the next connections are QUIC again (the
first one is that handshake's). The same when QUIC loses the race by a little:
its handshake goes on, and once it completes the HTTP/2 connection that won is
retired and the QUIC one taken by the next connect.
Envoy's alternate-protocols cache and cloudflared's QUIC-to-HTTP/2 fallback do
the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import (
    ConfigError,
    ConnectError,
    PeerUnresponsive,
    PeerVerificationError,
    QuicmeshError,
    TunnelError,
)
from ..tls import Identity, TrustBundle
from .base import (
    Address,
    Authorizer,
    Listener,
    PeerConnection,
    StreamHandler,
    Transport,
    checked_address,
)
from .h2 import H2Transport
from .quic import QuicTransport
from .stream import check_seconds

logger = logging.getLogger("quicmesh.transport.auto")

DEFAULT_FALLBACK_DELAY = 0.3
"""Seconds a QUIC handshake gets before HTTP/2 is raced against it."""

DEFAULT_BROKEN_BACKOFF = 300.0
"""Seconds QUIC stays marked broken for an address the first time."""

DEFAULT_MAX_BROKEN_BACKOFF = 3600.0
"""The longest QUIC stays marked broken (the backoff doubles up to this)."""

SPARE_SECONDS = 30.0
"""How long a QUIC connection that completed after HTTP/2 won waits for the next
connect to its address before it is closed."""

RETIRE_TIMEOUT = 3600.0
"""Seconds a retired HTTP/2 fallback connection's streams get to finish."""

COUNTERS = (
    "connections_quic",
    "connections_h2",
    "fallbacks",
    "quic_marked_broken",
    "quic_retries",
    "quic_retries_ok",
)
"""Keys of :attr:`AutoTransport.fallback_counters`."""


@dataclass
class _Mark:
    failures: int = 0
    """Times QUIC failed since it last worked: the backoff is base * 2**(failures - 1)."""
    until: float | None = None


def _budget(seconds: float) -> float:
    """What is left of a connect's timeout for its HTTP/2 attempt, in whole
    milliseconds (at least one): its error says "timed out after 0.699s", as a
    configured timeout is written, not "after 0.699271s"."""
    return max(int(seconds * 1000) / 1000, 0.001)


class BrokenQuicMemory:
    """Which addresses QUIC is broken for, and until when (sans-IO).

    :param backoff: seconds of the first mark.
    :param max_backoff: the longest mark; each further failure doubles it up to this.
    """

    def __init__(
        self,
        backoff: float = DEFAULT_BROKEN_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BROKEN_BACKOFF,
    ) -> None:
        check_seconds("broken_backoff", backoff, high=None)
        check_seconds("max_broken_backoff", max_backoff, high=None)
        if not max_backoff >= backoff:
            raise ConfigError(
                f"max_broken_backoff ({max_backoff}) must be at least broken_backoff ({backoff})"
            )
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._marks: dict[object, _Mark] = {}

    def is_broken(self, key: object, now: float) -> bool:
        """Whether QUIC is marked broken for ``key`` at ``now``."""
        mark = self._marks.get(key)
        return mark is not None and mark.until is not None and now < mark.until

    def broken_until(self, key: object) -> float | None:
        """When the current (or last) mark for ``key`` ends."""
        mark = self._marks.get(key)
        return None if mark is None else mark.until

    def failed(self, key: object, now: float) -> float:
        """QUIC failed to ``key`` (where another protocol worked): mark it broken.

        Returns when the mark ends. A failure while marked (a retry that raced an
        expiry) does not extend it twice.
        """
        mark = self._marks.setdefault(key, _Mark())
        if self.is_broken(key, now):
            assert mark.until is not None
            return mark.until
        mark.failures += 1
        backoff = min(self.backoff * 2 ** min(mark.failures - 1, 62), self.max_backoff)
        mark.until = now + backoff
        return mark.until

    def worked(self, key: object) -> None:
        """A QUIC handshake to ``key`` completed: forget its failures."""
        self._marks.pop(key, None)

    def broken(self, now: float) -> list[object]:
        """The keys marked broken at ``now``."""
        return [key for key in self._marks if self.is_broken(key, now)]


class AutoListener(Listener):
    """A QUIC listener and an HTTP/2 listener on the same port number."""

    def __init__(self, listeners: Sequence[Listener]) -> None:
        self.listeners = list(listeners)
        self.address = self.listeners[0].address

    @property
    def connections(self) -> list[PeerConnection]:
        return [c for listener in self.listeners for c in listener.connections]

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*(listener.wait_closed() for listener in self.listeners))


class AutoTransport(Transport):
    """QUIC first, HTTP/2 when QUIC does not get through (see the module docstring).

    :param identity: this sidecar's certificate and key.
    :param trust: the CAs peers' certificates must chain to.
    :param quic: the QUIC transport to use (by default one with this identity).
    :param h2: the HTTP/2 transport to fall back to (likewise).
    :param fallback_delay: seconds a QUIC handshake gets before HTTP/2 is raced (at
        most half of :meth:`connect`'s ``timeout``: see there).
    :param broken_backoff: seconds QUIC stays marked broken for an address the
        first time it fails there.
    :param max_broken_backoff: the longest mark (the backoff doubles up to it).

    :attr:`fallback_counters` counts connections made per transport
    (``connections_quic``, ``connections_h2``), ``fallbacks`` (HTTP/2
    connections made because QUIC was broken or lost the race), every
    :meth:`connect` counted, a sidecar's health checks' included (the transport
    does not know what a connection is for),
    ``quic_marked_broken`` (marks set), ``quic_retries`` and ``quic_retries_ok``
    (QUIC tried again when a mark expired); :meth:`stats` adds the addresses
    marked broken now.
    """

    name = "auto"

    def __init__(
        self,
        *,
        identity: Identity,
        trust: TrustBundle,
        quic: QuicTransport | None = None,
        h2: H2Transport | None = None,
        fallback_delay: float = DEFAULT_FALLBACK_DELAY,
        broken_backoff: float = DEFAULT_BROKEN_BACKOFF,
        max_broken_backoff: float = DEFAULT_MAX_BROKEN_BACKOFF,
    ) -> None:
        super().__init__(identity=identity, trust=trust)
        check_seconds("fallback_delay", fallback_delay, high=None, zero=True)
        for name, given, kind in (("quic", quic, QuicTransport), ("h2", h2, H2Transport)):
            if given is not None and not isinstance(given, kind):
                raise ConfigError(f"{name} must be a {kind.__name__}, not {given!r}")
        self.memory = BrokenQuicMemory(broken_backoff, max_broken_backoff)
        self.quic = quic if quic is not None else QuicTransport(identity=identity, trust=trust)
        self.h2 = h2 if h2 is not None else H2Transport(identity=identity, trust=trust)
        self.fallback_delay = fallback_delay
        self.fallback_counters: Counter[str] = Counter({name: 0 for name in COUNTERS})
        self.counters = self.quic.counters
        """The QUIC transport's counters (0-RTT, tickets, migrations)."""
        self._fallbacks: dict[Address, list[PeerConnection]] = {}
        self._retry_timers: dict[Address, asyncio.TimerHandle] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._retiring: set[asyncio.Task[Any]] = set()
        self._late: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._spare_timers: dict[Address, asyncio.TimerHandle] = {}
        self._spares: dict[Address, PeerConnection] = {}
        """A QUIC connection per address that completed after HTTP/2 won (or a retry's
        probe), for the next :meth:`connect` to that address."""

    def identity_problem(self, identity: Identity, trust: TrustBundle) -> str | None:
        """Why QUIC's engine or HTTP/2's OpenSSL cannot take them (see :class:`Transport`)."""
        return self.quic.identity_problem(identity, trust) or self.h2.identity_problem(
            identity, trust
        )

    def set_identity(self, identity: Identity, trust: TrustBundle) -> None:
        """Present ``identity`` from the next handshake on, over QUIC and HTTP/2 (until
        2026-12-06 only this object's attribute changed: a rotated sidecar's ``auto``
        clusters kept presenting the old certificate). A spare QUIC connection, made
        with the old one, is closed."""
        super().set_identity(identity, trust)
        self.quic.set_identity(identity, trust)
        self.h2.set_identity(identity, trust)
        self._close_spares()

    def _close_spares(self) -> None:
        for address in list(self._spares):
            spare = self._take_spare(address)
            if spare is not None:
                self._close(spare)

    # -- listening -------------------------------------------------------------------

    async def listen(
        self,
        address: Address,
        handler: StreamHandler,
        authorize: Authorizer | None = None,
        *,
        early_data: bool = True,
    ) -> AutoListener:
        """Accept QUIC (UDP) and HTTP/2 (TCP) connections on one port number.

        With port 0 the QUIC listener picks the port and HTTP/2 takes the same
        number (tried a few times if that TCP port is taken). ``early_data`` is
        passed to the QUIC listener.
        """
        address = checked_address(address, "listen address")
        attempts = 5 if address[1] == 0 else 1
        for attempt in range(attempts):
            quic_listener = await self.quic.listen(
                address, handler, authorize, early_data=early_data
            )
            try:
                h2_listener = await self.h2.listen(
                    (address[0], quic_listener.address[1]), handler, authorize
                )
            except ConnectError:
                quic_listener.close()
                await quic_listener.wait_closed()
                if attempt + 1 == attempts:
                    raise
                continue
            return AutoListener([quic_listener, h2_listener])
        raise AssertionError("unreachable")

    # -- connecting ------------------------------------------------------------------

    async def connect(
        self, address: Address, *, timeout: float = 10.0, early_data: bool = False
    ) -> PeerConnection:
        """Connect with QUIC, or HTTP/2 if QUIC is broken or too slow (see the class).

        HTTP/2 is raced after ``fallback_delay``, or after half of ``timeout`` if that
        is sooner: with a delay as long as the timeout, HTTP/2 was started with
        nothing left of it (1 ms), and a peer whose UDP is blocked was never reached.
        ``early_data`` is ignored: a QUIC connection returned before its handshake
        would win the race with HTTP/2 whether or not QUIC gets through.

        After :meth:`aclose` it still connects, as every transport does, but starts
        nothing that would outlive the call: a QUIC handshake that loses the race is
        abandoned (not watched), and no mark schedules a retry.

        :raises ConfigError: ``address`` is not a ``(host, port)`` pair (checked
            before anything is tried, as on every transport).
        """
        address = checked_address(address, "connect address")
        check_seconds("timeout", timeout, high=None)
        loop = asyncio.get_running_loop()
        spare = self._take_spare(address)
        if spare is not None:
            if not (spare.is_closed or spare.going_away):
                return self._quic_used(address, spare)
            self._close(spare)
        if self.memory.is_broken(address, loop.time()):
            connection = await self.h2.connect(address, timeout=timeout)
            return self._h2_used(address, connection)
        identity = self.identity  # (a late QUIC connection is kept only if it is current)
        deadline = loop.time() + timeout  # the whole race's, as on every transport
        quic = loop.create_task(self.quic.connect(address, timeout=timeout))
        h2: asyncio.Task[PeerConnection] | None = None
        winner: PeerConnection | None = None
        watching_quic = False
        try:
            await asyncio.wait({quic}, timeout=min(self.fallback_delay, timeout / 2))
            if quic.done() and quic.exception() is None:
                winner = quic.result()
                return self._quic_used(address, winner)
            h2 = loop.create_task(self.h2.connect(address, timeout=_budget(deadline - loop.time())))
            pending: set[asyncio.Task[Any]] = {quic, h2}
            while pending:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if quic.done() and quic.exception() is None:
                    winner = quic.result()
                    return self._quic_used(address, winner)
                if h2.done() and h2.exception() is None:
                    winner = h2.result()
                    if quic.done():
                        self._quic_failed(address, quic.exception())
                    elif not self._closing:
                        watching_quic = True
                        self._watch_late_quic(address, quic, identity)
                    return self._h2_used(address, winner)
            failures = (quic.exception(), h2.exception())
            # A certificate refused either way is said as such (the same check runs on both).
            error = (
                PeerVerificationError
                if any(isinstance(f, PeerVerificationError) for f in failures)
                else ConnectError
            )
            raise error(
                f"{address[0]}:{address[1]}: QUIC: {failures[0]}; HTTP/2: {failures[1]}"
            ) from None
        finally:
            if not watching_quic:
                self._discard_loser(quic, winner)
            if h2 is not None:
                self._discard_loser(h2, winner)

    def _discard_loser(self, task: asyncio.Task[Any], winner: PeerConnection | None) -> None:
        if not task.done():
            task.cancel()
            task.add_done_callback(self._close_if_connected)
        elif not task.cancelled() and task.exception() is None and task.result() is not winner:
            self._close(task.result())

    def _close_if_connected(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._close(task.result())

    def _close(self, connection: PeerConnection) -> None:
        """Close a connection nobody uses (a race's loser, a retry's probe)."""

        async def close() -> None:
            connection.close()
            with contextlib.suppress(QuicmeshError, OSError):
                await connection.wait_closed()

        self._spawn(close())

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _watch_late_quic(
        self, address: Address, task: asyncio.Task[Any], identity: Identity
    ) -> None:
        """HTTP/2 won the race: the QUIC handshake goes on, to learn whether QUIC works."""
        self._late.add(task)
        task.add_done_callback(self._late.discard)

        def finished(task: asyncio.Task[Any]) -> None:
            if task.cancelled():
                return
            error = task.exception()
            if error is not None:
                self._quic_failed(address, error)
                return
            self.memory.worked(address)
            self._quic_works(address, task.result(), identity)

        task.add_done_callback(finished)

    def _quic_used(self, address: Address, connection: PeerConnection) -> PeerConnection:
        self.memory.worked(address)
        self.fallback_counters["connections_quic"] += 1
        add_lost_callback = getattr(connection, "add_lost_callback", None)
        if add_lost_callback is not None:

            def lost(error: TunnelError) -> None:
                if isinstance(error, PeerUnresponsive):
                    # Blackholed mid-life: the path may have started dropping UDP.
                    self._quic_failed(address, error)

            add_lost_callback(lost)
        return connection

    def _h2_used(self, address: Address, connection: PeerConnection) -> PeerConnection:
        self.fallback_counters["connections_h2"] += 1
        self.fallback_counters["fallbacks"] += 1
        fallbacks = self._fallbacks.setdefault(address, [])
        fallbacks[:] = [c for c in fallbacks if not c.is_closed]
        fallbacks.append(connection)
        return connection

    def _quic_failed(self, address: Address, error: BaseException | None) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.memory.is_broken(address, now):
            return
        until = self.memory.failed(address, now)
        self.fallback_counters["quic_marked_broken"] += 1
        logger.warning(
            "QUIC to %s:%d marked broken for %.0fs (HTTP/2 meanwhile): %s",
            address[0],
            address[1],
            until - now,
            error,
        )
        timer = self._retry_timers.pop(address, None)
        if timer is not None:
            timer.cancel()
        if not self._closing:  # (after aclose() the mark just lapses: no retry)
            self._retry_timers[address] = loop.call_at(until, self._mark_expired, address)

    def _mark_expired(self, address: Address) -> None:
        self._retry_timers.pop(address, None)
        fallbacks = [c for c in self._fallbacks.get(address, []) if not c.is_closed]
        self._fallbacks[address] = fallbacks
        logger.info(
            "QUIC to %s:%d no longer marked broken (%d HTTP/2 fallback connections open)",
            address[0],
            address[1],
            len(fallbacks),
        )
        if not fallbacks:
            return  # nothing to replace: the next connect tries QUIC anyway
        self._spawn(self._retry_quic(address))

    async def _retry_quic(self, address: Address) -> None:
        """The mark expired with HTTP/2 fallback connections open: try QUIC once; if
        it works, retire them so that the next connections are QUIC."""
        self.fallback_counters["quic_retries"] += 1
        identity = self.identity
        try:
            probe = await self.quic.connect(address, timeout=max(1.0, 10 * self.fallback_delay))
        except (QuicmeshError, OSError) as exc:
            self._quic_failed(address, exc)
            return
        self.fallback_counters["quic_retries_ok"] += 1
        self.memory.worked(address)
        self._quic_works(address, probe, identity)

    def _quic_works(self, address: Address, connection: PeerConnection, identity: Identity) -> None:
        """A QUIC connection to ``address`` completed while HTTP/2 fallback connections
        carry its flows (QUIC lost the race by a little, or a retry after a mark worked):
        the fallback connections are retired (no new streams; each closes once its
        streams end), so that their owner connects again, and this connection is kept
        for that connect (:meth:`connect` takes it). Closed if there is none to retire.
        Without it, HTTP/2 kept every flow of an endpoint whose QUIC handshake once
        took longer than ``fallback_delay``, for as long as its pooled connection lived."""
        retired = [c for c in self._fallbacks.pop(address, []) if not c.is_closed]
        if not retired or self._closing or identity is not self.identity:
            # Nothing to take over, the transport is closing, or it was made with a
            # certificate rotated out since.
            self._close(connection)
            if retired:
                self._fallbacks[address] = retired
            return
        previous = self._take_spare(address)
        if previous is not None:
            self._close(previous)
        self._spares[address] = connection
        # Not taken in SPARE_SECONDS (no new flow came): closed, not kept alive by its
        # keepalives for as long as the transport lives.
        self._spare_timers[address] = asyncio.get_running_loop().call_later(
            SPARE_SECONDS, self._expire_spare, address, connection
        )
        logger.info(
            "QUIC to %s:%d works: retiring %d HTTP/2 fallback connections",
            address[0],
            address[1],
            len(retired),
        )
        loop = asyncio.get_running_loop()
        for fallback in retired:
            # No new streams from now on; closed when its last stream ends.
            task = loop.create_task(fallback.aclose(RETIRE_TIMEOUT))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def _expire_spare(self, address: Address, connection: PeerConnection) -> None:
        self._spare_timers.pop(address, None)
        if self._spares.get(address) is connection:
            del self._spares[address]
            self._close(connection)

    def _take_spare(self, address: Address) -> PeerConnection | None:
        timer = self._spare_timers.pop(address, None)
        if timer is not None:
            timer.cancel()
        return self._spares.pop(address, None)

    # -- views -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """:attr:`fallback_counters`, plus ``endpoints_quic_broken``: addresses
        QUIC is marked broken for now."""
        now = asyncio.get_running_loop().time()
        return {**self.fallback_counters, "endpoints_quic_broken": len(self.memory.broken(now))}

    async def aclose(self) -> None:
        """Stop the background work (retry timers, QUIC retries) and wait until the
        connections it closed (race losers, probes) are closed. Later connects start
        none (see :meth:`connect`): a connect after it left a QUIC handshake running
        and, once that failed, a retry timer of up to ``max_broken_backoff``."""
        self._closing = True
        for timer in self._retry_timers.values():
            timer.cancel()
        self._retry_timers.clear()
        self._close_spares()
        for task in list(self._retiring):
            task.cancel()  # the connections stay retired; their owner closes them
        for task in list(self._late):
            task.cancel()  # QUIC handshakes still racing a won HTTP/2 connection
        while self._background or self._retiring or self._late:
            await asyncio.gather(
                *self._background, *self._retiring, *self._late, return_exceptions=True
            )
        await self.quic.aclose()
