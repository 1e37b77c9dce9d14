"""Configuration of an emulated link, and parsers for the units people type.

A :class:`LinkConfig` holds one :class:`DirectionConfig` per direction
(client to server, server to client) and a seed. Every config validates
itself on construction and raises :class:`quicmesh.errors.ConfigError`
naming the field at fault, so a bad value never reaches the forwarder.

The parsers turn ``"20ms"``, ``"2%"``, ``"20mbit"`` and ``"25pkt"`` into
numbers in SI base units (seconds, fractions, bits per second, packets or
bytes); they raise :class:`ConfigError` with a one-line message.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from quicmesh import duration
from quicmesh.errors import ConfigError

__all__ = [
    "DEFAULT_QUEUE_DELAY",
    "DirectionConfig",
    "GilbertElliottConfig",
    "LinkConfig",
    "QueueLimit",
    "parse_duration",
    "parse_percent",
    "parse_queue",
    "parse_rate",
]

#: Queue bound used when a rate is set and no queue is given: 100 ms at the rate.
DEFAULT_QUEUE_DELAY = 0.100

#: Smallest byte bound a queue may have: two full-size packets.
MIN_QUEUE_BYTES = 3000

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


@dataclass(frozen=True)
class GilbertElliottConfig:
    """Bursty loss: a two-state (good/bad) Markov chain evaluated once per packet.

    :param p_good_to_bad: probability of moving from the good to the bad state.
    :param p_bad_to_good: probability of moving from the bad to the good state;
        the mean time spent in the bad state is ``1 / p_bad_to_good`` packets.
    :param loss_in_good: loss probability while in the good state (usually 0).
    :param loss_in_bad: loss probability while in the bad state (usually 1).
    :param max_burst: if set, at most this many packets in a row are lost: after
        ``max_burst`` consecutive losses the chain is forced back to the good state.
    """

    p_good_to_bad: float
    p_bad_to_good: float
    loss_in_good: float = 0.0
    loss_in_bad: float = 1.0
    max_burst: int | None = None

    def __post_init__(self) -> None:
        for name in ("p_good_to_bad", "p_bad_to_good", "loss_in_good", "loss_in_bad"):
            _check_probability(f"burst {name}", getattr(self, name))
        if self.p_bad_to_good == 0.0:
            raise ConfigError("burst p_bad_to_good must be > 0 (else the loss never ends)")
        if self.max_burst is not None and self.max_burst < 1:
            raise ConfigError(f"burst max_burst must be >= 1, got {self.max_burst}")

    @classmethod
    def from_loss_and_burst(
        cls, loss: float, mean_burst: float, max_burst: int | None = None
    ) -> GilbertElliottConfig:
        """A chain losing a fraction ``loss`` of packets in bursts of mean length ``mean_burst``.

        Losses happen only in the bad state (``loss_in_bad=1``, ``loss_in_good=0``).
        With ``max_burst`` set the long-run loss is slightly below ``loss``.

        :param loss: long-run fraction of packets lost, in ``[0, 1)``.
        :param mean_burst: mean number of consecutive losses, ``>= 1``.
        :param max_burst: optional cap on consecutive losses.
        """
        _check_probability("loss", loss)
        if loss >= 1.0:
            raise ConfigError("loss must be < 100% when bursts are used")
        if not math.isfinite(mean_burst) or mean_burst < 1.0:
            raise ConfigError(f"burst length must be >= 1 packet, got {mean_burst}")
        p_bad_to_good = 1.0 / mean_burst
        # Stationary probability of the bad state is p / (p + r); solve for p.
        p_good_to_bad = loss * p_bad_to_good / (1.0 - loss)
        if p_good_to_bad > 1.0:
            raise ConfigError(
                f"loss {loss:.2%} with bursts of {mean_burst} packets is impossible; "
                "use longer bursts"
            )
        return cls(p_good_to_bad, p_bad_to_good, max_burst=max_burst)

    @property
    def mean_loss(self) -> float:
        """Long-run loss fraction of the chain (ignoring ``max_burst``)."""
        p, r = self.p_good_to_bad, self.p_bad_to_good
        bad = p / (p + r)
        return bad * self.loss_in_bad + (1.0 - bad) * self.loss_in_good


@dataclass(frozen=True)
class DirectionConfig:
    """Impairments applied to one direction of a link.

    Packets go through three stages, in this order: loss, then the rate limiter
    with its drop-tail queue, then the delay line.

    :param delay: one-way propagation delay in seconds.
    :param jitter: each packet's delay is drawn uniformly from
        ``[delay - jitter, delay + jitter]`` (floored at 0). Unless ``reorder`` is set a
        packet is never released before the one sent ahead of it, so jitter then only
        adds delay where it would have reordered.
    :param reorder: allow jitter to reorder packets.
    :param loss: probability that a packet is dropped at random (Bernoulli, seeded).
    :param burst: bursty (Gilbert-Elliott) loss instead of Bernoulli loss;
        ``loss`` must then be 0.
    :param rate_bps: bottleneck rate in bits per second of IP packet bytes
        (no framing overhead), or ``None`` for no limit.
    :param queue_packets: drop-tail bound on packets waiting for the bottleneck
        (the packet being serialised does not count).
    :param queue_bytes: the same bound in bytes.
    :param queue_delay: the same bound as seconds of transmission at ``rate_bps``.
        At most one of the three queue bounds may be given; with a rate and none of
        them the bound is :data:`DEFAULT_QUEUE_DELAY`.
    """

    delay: float = 0.0
    jitter: float = 0.0
    reorder: bool = False
    loss: float = 0.0
    burst: GilbertElliottConfig | None = None
    rate_bps: float | None = None
    queue_packets: int | None = None
    queue_bytes: int | None = None
    queue_delay: float | None = None

    def __post_init__(self) -> None:
        # A string such as "20ms" is named here; the checks below would fail on it with
        # a TypeError that says neither which option nor which unit.
        for name, kind in (
            ("delay", "seconds"),
            ("jitter", "seconds"),
            ("loss", "a fraction"),
            ("rate_bps", "bit/s"),
            ("queue_packets", "packets"),
            ("queue_bytes", "bytes"),
            ("queue_delay", "seconds"),
        ):
            value = getattr(self, name)
            if value is not None and not _is_number(value):
                raise ConfigError(f"{name} must be a number ({kind}), not {value!r}")
        _check_seconds("delay", self.delay)
        _check_seconds("jitter", self.jitter)
        _check_probability("loss", self.loss)
        if self.burst is not None and self.loss:
            raise ConfigError("give either loss or burst (bursty loss), not both")
        if self.rate_bps is not None and (not math.isfinite(self.rate_bps) or self.rate_bps <= 0):
            raise ConfigError(f"rate must be > 0 bit/s, got {self.rate_bps}")
        bounds = [
            name
            for name in ("queue_packets", "queue_bytes", "queue_delay")
            if getattr(self, name) is not None
        ]
        if len(bounds) > 1:
            raise ConfigError(f"give one queue bound, not {' and '.join(bounds)}")
        if bounds and self.rate_bps is None:
            raise ConfigError("a queue bound needs a rate (the queue fills only behind a rate)")
        if self.queue_packets is not None and self.queue_packets < 1:
            raise ConfigError(f"queue must hold >= 1 packet, got {self.queue_packets}")
        if self.queue_bytes is not None and self.queue_bytes < MIN_QUEUE_BYTES:
            raise ConfigError(f"queue must hold >= {MIN_QUEUE_BYTES} bytes, got {self.queue_bytes}")
        if self.queue_delay is not None:
            _check_seconds("queue", self.queue_delay)

    @property
    def queue_limit(self) -> QueueLimit | None:
        """The effective queue bound, or ``None`` when there is no rate limit."""
        if self.rate_bps is None:
            return None
        if self.queue_packets is not None:
            return QueueLimit(packets=self.queue_packets)
        if self.queue_bytes is not None:
            return QueueLimit(bytes=self.queue_bytes)
        seconds = DEFAULT_QUEUE_DELAY if self.queue_delay is None else self.queue_delay
        return QueueLimit(bytes=max(MIN_QUEUE_BYTES, int(self.rate_bps * seconds / 8)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (the inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DirectionConfig:
        """Rebuild from :meth:`to_dict` output."""
        values = dict(data)
        if values.get("burst") is not None:
            values["burst"] = GilbertElliottConfig(**values["burst"])
        return cls(**values)


@dataclass(frozen=True)
class QueueLimit:
    """A drop-tail bound: packets, bytes, or both (``None`` means unbounded)."""

    packets: int | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class LinkConfig:
    """Both directions of an emulated link, a seed, and the MTU of its interfaces.

    :param client_to_server: impairments on packets from the client namespace.
    :param server_to_client: impairments on packets from the server namespace.
    :param seed: seeds every random choice (loss, bursts, jitter), per direction,
        so a run can be replayed.
    :param mtu: MTU of both TUN interfaces.
    """

    client_to_server: DirectionConfig = field(default_factory=DirectionConfig)
    server_to_client: DirectionConfig = field(default_factory=DirectionConfig)
    seed: int = 0
    mtu: int = 1500

    def __post_init__(self) -> None:
        if not 576 <= self.mtu <= 65535:
            raise ConfigError(f"mtu must be between 576 and 65535, got {self.mtu}")

    @classmethod
    def symmetric(cls, *, seed: int = 0, mtu: int = 1500, **direction: Any) -> LinkConfig:
        """The same impairments in both directions.

        :param direction: keyword arguments of :class:`DirectionConfig`
            (``delay``, ``loss``, ``rate_bps``, ...).
        """
        known = {option.name for option in fields(DirectionConfig)}
        unknown = sorted(set(direction) - known)
        if unknown:
            raise ConfigError(f"unknown link option: {', '.join(unknown)}")
        config = DirectionConfig(**direction)
        return cls(client_to_server=config, server_to_client=config, seed=seed, mtu=mtu)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (the inverse of :meth:`from_dict`)."""
        return {
            "client_to_server": self.client_to_server.to_dict(),
            "server_to_client": self.server_to_client.to_dict(),
            "seed": self.seed,
            "mtu": self.mtu,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinkConfig:
        """Rebuild from :meth:`to_dict` output."""
        return cls(
            client_to_server=DirectionConfig.from_dict(data["client_to_server"]),
            server_to_client=DirectionConfig.from_dict(data["server_to_client"]),
            seed=int(data["seed"]),
            mtu=int(data["mtu"]),
        )


def _is_number(value: object) -> bool:
    """An int or a float, and not a bool (``True`` is an int to Python, not a delay)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_probability(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ConfigError(f"{name} must be between 0 and 1 (0% and 100%), got {value}")


def _check_seconds(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 3600.0):
        raise ConfigError(f"{name} must be between 0 and 3600 seconds, got {value}")


_RATE_UNITS = {
    "": 1.0,
    "bit": 1.0,
    "bps": 1.0,
    "kbit": 1e3,
    "kbps": 1e3,
    "mbit": 1e6,
    "mbps": 1e6,
    "gbit": 1e9,
    "gbps": 1e9,
}


def _split(text: str, what: str) -> tuple[float, str]:
    match = re.fullmatch(_NUMBER + r"\s*([a-zµ%]*)", text.strip().lower())
    if match is None:
        raise ConfigError(f"cannot read {what} {text!r}")
    number = float(match.group(1))
    if not math.isfinite(number):  # 1e999 (an OverflowError out of int() before)
        raise ConfigError(f"cannot read {what} {text!r}: the number is too large")
    return number, match.group(2)


def parse_duration(text: str) -> float:
    """``"20ms"``, ``"1.5s"``, ``"500us"`` or a bare number of seconds -> seconds.

    The grammar is :func:`quicmesh.duration.parse_duration`'s, shared with the
    sidecar's configuration; its error becomes a :class:`ConfigError`.
    """
    try:
        return duration.parse_duration(text)
    except ValueError as exc:
        raise ConfigError(f"cannot read duration: {exc}") from None


def parse_percent(text: str, *, bare: Literal["fraction", "percent"] = "fraction") -> float:
    """``"2%"`` -> 0.02; a bare number is a fraction (``"0.02"`` -> 0.02), or with
    ``bare="percent"`` a percentage (``"2"`` -> 0.02, as ``quicmesh netem --loss`` and the
    benchmarks' loss options read it)."""
    if bare not in ("fraction", "percent"):
        raise ValueError(f"bare must be 'fraction' or 'percent', not {bare!r}")
    number, unit = _split(text, "percentage")
    if unit == "%":
        value = number / 100.0
    elif unit == "":
        value = number if bare == "fraction" else number / 100.0
    else:
        example = "2% or 0.02" if bare == "fraction" else "2 or 2%"
        raise ConfigError(f"cannot read percentage {text!r}: write e.g. {example}")
    if value > 1.0:
        raise ConfigError(f"percentage {text!r} is above 100%")
    return value


def parse_rate(text: str) -> float:
    """``"20mbit"``, ``"500kbit"``, ``"1gbit"`` or a bare number of bit/s -> bit/s.

    Units follow ``tc``: ``kbit``/``mbit``/``gbit`` (also ``kbps``/``mbps``/``gbps``,
    read as bits, not bytes); multipliers are powers of 1000.
    """
    number, unit = _split(text, "rate")
    if unit not in _RATE_UNITS:
        raise ConfigError(f"cannot read rate {text!r}: unit must be bit, kbit, mbit or gbit")
    value = number * _RATE_UNITS[unit]
    if value <= 0:
        raise ConfigError(f"rate {text!r} must be above 0")
    return value


def parse_queue(text: str) -> dict[str, Any]:
    """A queue bound as :class:`DirectionConfig` keyword arguments.

    ``"25pkt"`` -> ``{"queue_packets": 25}``, ``"64kb"`` / ``"65536b"`` ->
    ``{"queue_bytes": ...}`` (kb = 1000 bytes), ``"60ms"`` -> ``{"queue_delay": 0.06}``.
    """
    number, unit = _split(text, "queue")
    if unit in ("pkt", "pkts", "p", "packets"):
        if number != int(number):
            raise ConfigError(f"queue {text!r}: packets must be a whole number")
        return {"queue_packets": int(number)}
    if unit in ("b", "bytes", "kb", "mb"):
        scale = {"b": 1, "bytes": 1, "kb": 1000, "mb": 1000_000}[unit]
        return {"queue_bytes": int(number * scale)}
    if unit in ("s", "ms", "us"):
        return {"queue_delay": parse_duration(text)}
    raise ConfigError(f"cannot read queue {text!r}: write e.g. 25pkt, 64kb or 60ms")
