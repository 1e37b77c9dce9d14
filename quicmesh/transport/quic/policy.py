"""Sans-IO rules of a QUIC connection: the client's 0-RTT budget and automatic rebinding.

Plain classes fed with sizes, counts and outcomes, unit-tested without sockets
(``tests/transport/test_quic_policy.py``); the driver asks them and acts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EARLY_STREAM_COST = 64
"""What a CONNECT costs from the client's 0-RTT budget besides its target and headers."""


@dataclass
class EarlyDataBudget:
    """(client) Payload bytes that may still go as 0-RTT before the handshake completes.

    A CONNECT costs :data:`EARLY_STREAM_COST` plus its target and headers; stream
    payload costs its length. Once a stream's bytes have been deferred, all its
    later bytes are deferred too (they must stay in order). :meth:`settle` ends
    the budget when the handshake completes (or the connection is lost).

    :param remaining: bytes left; None once settled (no budget applies).
    """

    remaining: int | None
    _deferred: dict[int, int] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Whether the handshake is still pending (the budget applies)."""
        return self.remaining is not None

    def open_stream(self, target: str, headers: dict[str, str] | None) -> bool:
        """Spend the cost of a CONNECT; False when it does not fit (open it after
        the handshake). Always True once settled."""
        if self.remaining is None:
            return True
        cost = EARLY_STREAM_COST + len(target)
        cost += sum(len(k) + len(v) for k, v in (headers or {}).items())
        if cost > self.remaining:
            return False
        self.remaining -= cost
        return True

    def send(self, stream_id: int, size: int) -> bool:
        """Spend ``size`` bytes of stream ``stream_id``; False when they must wait
        for the handshake (then counted as deferred). Always True once settled."""
        if self.remaining is None:
            return True
        if stream_id in self._deferred or size > self.remaining:
            self._deferred[stream_id] = self._deferred.get(stream_id, 0) + size
            return False
        self.remaining -= size
        return True

    def deferred(self, stream_id: int) -> int:
        """Bytes of the stream waiting for the handshake."""
        return self._deferred.get(stream_id, 0)

    def forget(self, stream_id: int) -> bool:
        """The stream was reset: drop its deferred count; True if it had one."""
        return self._deferred.pop(stream_id, None) is not None

    def settle(self) -> None:
        """The handshake completed (or the connection was lost): no budget any more."""
        self.remaining = None
        self._deferred.clear()


@dataclass
class RebindRule:
    """(client) Move to a new UDP port after ``after_ptos`` consecutive probe timeouts,
    once per streak (as when a NAT mapping died); a streak ends with an
    acknowledgement (probe timeouts back to 0).

    :param after_ptos: consecutive probe timeouts that trigger a rebinding.
    """

    after_ptos: int
    _rebound_this_streak: bool = False
    _migrating: bool = False

    def check(self, probe_timeouts: int, *, established: bool) -> bool:
        """Called after each transmit: True when a rebinding should start now.

        :param probe_timeouts: the engine's consecutive probe timeouts.
        :param established: the handshake completed and the connection is open.
        """
        if probe_timeouts == 0:
            self._rebound_this_streak = False
            return False
        if (
            probe_timeouts >= self.after_ptos
            and not self._rebound_this_streak
            and not self._migrating
            and established
        ):
            self._rebound_this_streak = True
            self._migrating = True
            return True
        return False

    def finished(self) -> None:
        """The rebinding started by :meth:`check` finished (or failed)."""
        self._migrating = False
