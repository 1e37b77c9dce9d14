"""Stream-open rate per peer identity, enforced through stream credit (sans-IO).

A QUIC peer may open a new stream each time one of its streams ends: aioquic
raises MAX_STREAMS by one for every stream it discards, so a peer that opens and
resets streams in a loop ("rapid reset", stream churn) makes the listener parse
and discard streams as fast as it can send them. Refusing such streams after
they arrive still costs their parsing; withholding the credit costs nothing.

:class:`StreamRate` is a token bucket: the credit a connection returns to its
peer for ended streams is granted at most ``rate`` per second over a burst of
``burst``, and the bucket is shared by every connection of one peer identity
(:class:`StreamRates`), so opening more connections does not multiply the rate.
The credit held back is granted as tokens refill; the connection's timer asks
for :meth:`StreamRate.next_at`. A compliant peer waits for MAX_STREAMS (its
streams beyond the credit are never sent); a peer that ignores it gets
STREAM_LIMIT_ERROR. The connection's first ``max_streams`` credit is not
counted: the bucket bounds the *rate* of new streams, the concurrency limit
stays ``max_streams``.

An overload action may lower one identity's rate for a while
(:meth:`StreamRates.set_rate`, the sidecar's event-loop delay governor): the
identity's bucket, shared by all its connections, then refills more slowly and
keeps at most a token, so that identity's new streams slow down at once while
other identities keep theirs.
"""

from __future__ import annotations

import weakref
from typing import Protocol

DEFAULT_STREAM_RATE = 1000.0
"""New streams per second one peer identity may open, over all its connections."""


UNLIMITED = 1e9
"""The rate a bucket gets when its identity is no longer limited."""


class TokenHolder(Protocol):
    """What keeps tokens of a :class:`StreamRate` taken ahead."""

    def drop_tokens_held(self) -> None:
        """Give up the tokens taken ahead: the rate was lowered."""


class StreamRate:
    """A token bucket of new-stream credit.

    :param rate: tokens per second.
    :param burst: the most tokens held (at least 1).
    :param now: the current time (seconds, the clock later calls use).
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0:
            raise ValueError("stream rate must be positive")
        self.rate = rate
        self.burst = max(1.0, burst)
        self._tokens = self.burst
        self._at = now
        self._holders: weakref.WeakSet[TokenHolder] = weakref.WeakSet()

    def hold_tokens_for(self, holder: TokenHolder) -> None:
        """``holder`` keeps tokens taken ahead (the native engine's read permits): it is
        told to give them up when the rate is lowered, so that it applies at once."""
        self._holders.add(holder)

    def take(self, wanted: int, now: float) -> int:
        """Grant up to ``wanted`` credits now; return how many."""
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
        granted = min(wanted, int(self._tokens))
        self._tokens -= granted
        return granted

    @property
    def tokens(self) -> float:
        """Tokens held at the last :meth:`take`."""
        return self._tokens

    def set_rate(self, rate: float, now: float) -> None:
        """Refill at ``rate`` from now on; a lower rate also empties the bucket
        down to one token (a throttled peer gets no burst)."""
        if rate <= 0:
            raise ValueError("stream rate must be positive")
        self.take(0, now)
        lowered = rate < self.rate
        if lowered:
            self._tokens = min(self._tokens, 1.0)
        self.rate = rate
        if lowered:
            for holder in list(self._holders):
                holder.drop_tokens_held()


class StreamRates:
    """One :class:`StreamRate` per peer identity, kept while a connection uses it.

    :param rate: new streams per second per identity (None: not limited).
    :param burst: the bucket's size.
    """

    def __init__(self, rate: float | None, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: weakref.WeakValueDictionary[str, StreamRate] = weakref.WeakValueDictionary()
        self._overrides: dict[str, float] = {}

    def for_identity(self, identity: str, now: float) -> StreamRate | None:
        """The bucket of ``identity`` (the same object for all its connections)."""
        rate = self._overrides.get(identity, self.rate)
        if rate is None:
            return None
        bucket = self._buckets.get(identity)
        if bucket is None:
            bucket = StreamRate(self.rate or UNLIMITED, self.burst, now)
            if identity in self._overrides:
                bucket.set_rate(rate, now)  # slowed down: no burst either
            self._buckets[identity] = bucket
        return bucket

    def set_rate(self, identity: str, rate: float | None, now: float) -> None:
        """Give ``identity`` its own ``rate`` (None: back to the transport's), for
        its connections now and later. A connection accepted while the transport
        had no rate at all carries no bucket and is not slowed."""
        if rate is None:
            self._overrides.pop(identity, None)
            rate = self.rate
        else:
            self._overrides[identity] = rate
        bucket = self._buckets.get(identity)
        if bucket is not None:
            # Unlimited again: a rate no peer reaches (the bucket stays attached).
            bucket.set_rate(rate if rate is not None else UNLIMITED, now)

    def rate_of(self, identity: str) -> float | None:
        """The rate ``identity``'s new streams get now (None: not limited)."""
        return self._overrides.get(identity, self.rate)
