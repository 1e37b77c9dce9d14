"""Is the peer still there? Keepalive and dead-peer detection, sans-IO.

A QUIC connection whose peer died or hangs (``kill -9``, ``SIGSTOP``, a network
that started dropping its packets) otherwise lives until its idle timeout, a
minute by default, and so do the flows on it. :class:`Liveness` decides, from
what the adaptor tells it, when to probe the peer and when to give up:

* **Keepalive.** After ``keepalive_interval`` seconds in which nothing arrived
  and nothing awaits an acknowledgement, send a PING. An idle connection then
  always has a probe outstanding soon after its peer stops answering.
* **Dead after probe timeouts.** ``max_probe_timeouts`` consecutive probe
  timeouts (RFC 9002 section 6.2: ack-eliciting packets sent, none
  acknowledged, the PTO doubling each time) declare the peer unresponsive,
  once nothing has arrived for ``min_silence`` seconds either: on a fast path
  six PTOs take well under a second, less than a busy peer's event loop may
  stall.
* **Dead after seconds.** Ack-eliciting packets unacknowledged, and nothing
  received, for ``dead_after`` seconds declare it unresponsive too: a bound for
  long round trips, where PTOs are long.
* **Unreachable.** An ICMP port or host unreachable (a connected UDP socket
  reports it as ``ECONNREFUSED`` / ``EHOSTUNREACH``) is answered with an
  immediate PING; ``unreachable_limit`` of them in a row, with no packet from
  the peer in between, declare it unreachable. One stray (or forged) ICMP
  message is not enough; a closed port answers every probe.

The class never reads a clock or touches a socket: every method takes ``now``.
The QUIC adaptor (:mod:`quicmesh.transport.quic`) feeds it and arms one timer at
:meth:`Liveness.deadline`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import ConfigError
from .stream import check_seconds, check_whole

UNRESPONSIVE = "peer unresponsive"
"""How every unresponsive verdict's reason begins; it travels in the CONNECTION_CLOSE
reason phrase, so the peer knows why (:class:`~quicmesh.errors.PeerUnresponsive`)."""


MAX_LIVENESS_SECONDS = 86_400.0
"""The longest ``keepalive_interval`` and ``dead_after`` (a day, as the sidecar's
durations): 1e19 s overflowed the native engine's clock and aborted the process."""


@dataclass(frozen=True)
class LivenessConfig:
    """When to probe an idle peer and when to declare it dead (None: never)."""

    keepalive_interval: float | None = 1.0
    """Seconds of silence on an idle connection before a PING."""
    max_probe_timeouts: int | None = 6
    """Consecutive probe timeouts without an acknowledgement that declare the peer dead."""
    dead_after: float | None = 10.0
    """Seconds with ack-eliciting packets unacknowledged and nothing received that
    declare the peer dead."""
    unreachable_limit: int = 2
    """ICMP unreachable errors in a row, nothing received between them, that
    declare the peer unreachable."""
    min_silence: float = 2.0
    """Seconds without a packet from the peer that ``max_probe_timeouts`` also needs."""

    def __post_init__(self) -> None:
        if self.keepalive_interval is not None and not (
            0 < self.keepalive_interval <= MAX_LIVENESS_SECONDS
        ):
            raise ConfigError(
                f"keepalive_interval must be positive seconds up to {MAX_LIVENESS_SECONDS:g},"
                f" not {self.keepalive_interval}"
            )
        if self.max_probe_timeouts is not None and self.max_probe_timeouts < 1:
            raise ConfigError(
                f"max_probe_timeouts must be a whole number >= 1, not {self.max_probe_timeouts}"
            )
        if self.dead_after is not None and not 0 < self.dead_after <= MAX_LIVENESS_SECONDS:
            raise ConfigError(
                f"dead_after must be positive seconds up to {MAX_LIVENESS_SECONDS:g},"
                f" not {self.dead_after}"
            )
        if not self.min_silence >= 0:
            raise ConfigError(f"min_silence must be >= 0 seconds, not {self.min_silence}")
        if self.unreachable_limit < 1:
            raise ConfigError(
                f"unreachable_limit must be a whole number >= 1, not {self.unreachable_limit}"
            )


class Verdict(enum.Enum):
    """What :meth:`Liveness.check` asks of the adaptor."""

    ALIVE = "alive"
    """Nothing to do."""
    PING = "ping"
    """Send a PING now (keepalive, or a probe after an ICMP error)."""
    UNRESPONSIVE = "unresponsive"
    """The peer stopped acknowledging: fail the connection."""
    UNREACHABLE = "unreachable"
    """ICMP says nobody is listening there any more: fail the connection."""


class Liveness:
    """The liveness of one connection's peer.

    :param config: the thresholds.
    :param now: when the connection was established (counts as heard from).
    """

    def __init__(self, config: LivenessConfig, now: float) -> None:
        self.config = config
        self.last_received = now
        self.unreachable_errors = 0
        self.reason = ""
        """Why the last verdict declared the peer dead."""
        self._awaiting_since: float | None = None

    def received(self, now: float) -> None:
        """A datagram of this connection arrived from the peer."""
        self.last_received = now
        self.unreachable_errors = 0

    def unreachable(self, now: float) -> Verdict:
        """An ICMP unreachable error arrived for this connection: probe, or give up."""
        self.unreachable_errors += 1
        if self.unreachable_errors >= self.config.unreachable_limit:
            self.reason = (
                f"peer unreachable: {self.unreachable_errors} ICMP unreachable errors in a row"
            )
            return Verdict.UNREACHABLE
        return Verdict.PING

    def check(self, now: float, *, probe_timeouts: int, awaiting_ack: bool) -> Verdict:
        """Decide at ``now``.

        :param probe_timeouts: consecutive probe timeouts so far (reset by an ACK).
        :param awaiting_ack: whether ack-eliciting packets are unacknowledged.
        """
        config = self.config
        if not awaiting_ack:
            self._awaiting_since = None
        elif self._awaiting_since is None:
            self._awaiting_since = now
        if (
            config.max_probe_timeouts is not None
            and probe_timeouts >= config.max_probe_timeouts
            and now - self.last_received >= config.min_silence
        ):
            self.reason = f"{UNRESPONSIVE}: {probe_timeouts} probe timeouts without an ACK"
            return Verdict.UNRESPONSIVE
        if awaiting_ack and config.dead_after is not None:
            assert self._awaiting_since is not None
            silent = now - max(self.last_received, self._awaiting_since)
            if silent >= config.dead_after:
                self.reason = f"{UNRESPONSIVE}: no ACK for {silent:.1f}s"
                return Verdict.UNRESPONSIVE
        if (
            not awaiting_ack
            and config.keepalive_interval is not None
            and now - self.last_received >= config.keepalive_interval
        ):
            return Verdict.PING
        return Verdict.ALIVE

    def deadline(self, now: float, *, awaiting_ack: bool) -> float | None:
        """When :meth:`check` should run next, at the latest (probe timeouts are
        counted by the QUIC stack's own timer, after which the adaptor checks)."""
        config = self.config
        if awaiting_ack:
            deadlines = []
            silent_enough = self.last_received + config.min_silence
            if config.max_probe_timeouts is not None and silent_enough > now:
                deadlines.append(silent_enough)
            if config.dead_after is not None:
                since = self._awaiting_since
                start = self.last_received if since is None else max(self.last_received, since)
                deadlines.append(start + config.dead_after)
            return min(deadlines, default=None)
        if config.keepalive_interval is None:
            return None
        return self.last_received + config.keepalive_interval


def checked_liveness(
    keepalive_interval: float | None,
    dead_after: float | None,
    max_probe_timeouts: int | None = None,
) -> LivenessConfig:
    """A transport's liveness rules from its keyword arguments, checked as every
    transport option is (a one-line :class:`ConfigError` naming it): PINGs (or the
    kernel's keepalive) after ``keepalive_interval``, given up after ``dead_after`` or
    (QUIC) ``max_probe_timeouts`` probe timeouts in a row; over TCP (h2, tcp) there is
    no probe-timeout count, as TCP retransmits itself."""
    if keepalive_interval is not None:
        check_seconds("keepalive_interval", keepalive_interval, high=MAX_LIVENESS_SECONDS)
    if max_probe_timeouts is not None:
        check_whole("max_probe_timeouts", max_probe_timeouts, 1, 1 << 30)
    if dead_after is not None:
        check_seconds("dead_after", dead_after, high=MAX_LIVENESS_SECONDS)
    return LivenessConfig(
        keepalive_interval=keepalive_interval,
        max_probe_timeouts=max_probe_timeouts,
        dead_after=dead_after,
    )
