"""Admission of new QUIC connections on a listener, sans-IO: address validation and caps.

Anyone can send a 1200-byte datagram with a version-1 Initial header, from any
source address. What a listener spends on it is decided here, before aioquic
creates a connection:

* **Half-open caps.** A connection is half-open from its first Initial until its
  handshake completes. At most ``max_half_open`` per listener and
  ``max_half_open_per_source`` per source IP; Initials beyond are dropped
  (counted, and logged at most once per interval).
* **Retry** (RFC 9000 section 8.1.2). ``"always"``: every new client first
  proves it receives at its address (a stateless, address-bound token, one
  extra round trip). ``"auto"``: only while ``retry_threshold`` or more
  connections are half-open, i.e. under load. ``"never"``.
* **Handshake timeout**: a half-open connection is dropped after
  ``handshake_timeout`` seconds, not kept for the idle timeout.

The adaptor (:mod:`quicmesh.transport.quic`) also drops at once the state of a
connection whose first datagram did not decrypt, and counts everything in
:data:`ADMISSION_COUNTERS`.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass

from ..errors import ConfigError
from ..logs import RateLimitedLog as RateLimitedLog  # its home was here

ADMISSION_COUNTERS = (
    "initials_undecryptable",
    "initials_refused_half_open",
    "retries_sent",
    "retry_tokens_invalid",
    "handshakes_timed_out",
    "stateless_resets_sent",
)
"""Keys a QUIC listener adds to :attr:`QuicTransport.counters`."""

RETRY_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class AdmissionConfig:
    """Limits on connections that have not completed their handshake."""

    retry: str = "auto"
    """``"auto"`` (Retry while ``retry_threshold`` connections are half-open),
    ``"always"`` or ``"never"``."""
    retry_threshold: int = 64
    max_half_open: int = 1024
    max_half_open_per_source: int = 128
    handshake_timeout: float = 10.0
    """Seconds a connection may take to complete its handshake."""

    def __post_init__(self) -> None:
        if self.retry not in RETRY_MODES:
            raise ConfigError(f"retry must be one of {', '.join(RETRY_MODES)}, not {self.retry!r}")
        for name in ("retry_threshold", "max_half_open", "max_half_open_per_source"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, not {value!r}")
        if not self.handshake_timeout > 0:
            raise ConfigError(f"handshake_timeout must be > 0 s, not {self.handshake_timeout!r}")


class Decision(enum.Enum):
    """What to do with an Initial that would create a connection."""

    ADMIT = "admit"
    RETRY = "retry"
    """Answer with a Retry packet (when the Initial carries no token)."""
    REFUSE = "refuse"


class Admission:
    """The half-open connections of one listener and the decision for each new one."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self._half_open: dict[Hashable, str] = {}
        self._per_source: Counter[str] = Counter()

    @property
    def half_open(self) -> int:
        """Connections admitted whose handshake has not completed."""
        return len(self._half_open)

    def decide(self, source: str, has_token: bool) -> Decision:
        """Decide for an Initial from ``source`` (an IP) that would open a connection."""
        config = self.config
        if (
            len(self._half_open) >= config.max_half_open
            or self._per_source[source] >= config.max_half_open_per_source
        ):
            return Decision.REFUSE
        if has_token or config.retry == "never":
            return Decision.ADMIT
        if config.retry == "always" or len(self._half_open) >= config.retry_threshold:
            return Decision.RETRY
        return Decision.ADMIT

    def opened(self, key: Hashable, source: str) -> None:
        """A half-open connection was created for ``source``."""
        if key not in self._half_open:
            self._half_open[key] = source
            self._per_source[source] += 1

    def closed(self, key: Hashable) -> bool:
        """The connection completed its handshake or went away; True if it was half-open."""
        source = self._half_open.pop(key, None)
        if source is None:
            return False
        self._per_source[source] -= 1
        if self._per_source[source] <= 0:
            del self._per_source[source]
        return True

    def is_half_open(self, key: Hashable) -> bool:
        """Whether ``key`` is still waiting for its handshake."""
        return key in self._half_open
