"""BBR for aioquic: the congestion-control adaptor, its pacer and its registration.

aioquic chooses a congestion controller by name
(``QuicConfiguration(congestion_control_algorithm=...)``) from the factories given
to :func:`aioquic.quic.congestion.base.register_congestion_control`. This module
registers ``"bbr"``: :class:`BbrCongestionControl`, a thin
:class:`~aioquic.quic.congestion.base.QuicCongestionControl` that forwards
aioquic's packet events to a :class:`~quicmesh.congestion.bbr.BbrModel`, keying
the per-packet delivery state by ``(epoch, packet_number)`` (packet numbers
restart in each packet number space).

Application-limited detection reads the connection's stream send buffers
(:func:`has_pending_stream_data`), installed by :func:`enable_model_pacing`.

Pacing. aioquic's :class:`~aioquic.quic.recovery.QuicPacketPacer` is a token
bucket whose rate it sets, in ``QuicPacketRecovery``, to ``congestion_window /
smoothed_rtt`` after each RTT sample and each loss. For BBR that is wrong:
BBR's window is about twice the bandwidth-delay product, so the pacer would run at
about twice the estimated bandwidth and fill the window into the bottleneck queue.
aioquic offers no hook to choose the pacer, so :func:`enable_model_pacing`
replaces the connection's pacer, once, after the connection is created, with a
:class:`ModelPacer`: the same class and token-bucket arithmetic, fed
``smoothed_rtt = congestion_window / pacing_rate`` so that its rate is exactly
the model's ``pacing_rate``, refreshed whenever the model's rate or window has
changed before a send decision. Without that call BBR still runs, but paced at
``cwnd / srtt``.

aioquic exposes neither the controller nor the pacer of a connection; the few
private attributes this needs are read in :func:`congestion_controller`,
:func:`enable_model_pacing` and :func:`has_pending_stream_data` only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

from aioquic.quic.congestion import base, cubic, reno  # noqa: F401 (registers reno, cubic)
from aioquic.quic.congestion.base import QuicCongestionControl
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.quic.recovery import QuicPacketPacer
from aioquic.tls import Epoch

from .bbr import BbrModel

BBR = "bbr"
"""The name quicmesh registers BBR under."""

APP_LIMITED_MIN_GAP = 0.002
"""A pause between sends longer than this (and than four pacing intervals), with
the window not full, means the application had nothing to send."""


def _packet_key(packet: QuicSentPacket) -> tuple[Epoch, int]:
    return (packet.epoch, packet.packet_number)


class BbrCongestionControl(QuicCongestionControl):
    """aioquic's congestion-controller interface around a :class:`BbrModel`.

    Application-limited periods. aioquic does not tell a controller when the
    application runs out of data. :func:`enable_model_pacing` gives the
    controller :attr:`has_pending_data`, which looks at the connection's stream
    send buffers: a packet sent with the window not full and no stream data left
    to send marks the sender application-limited, as Linux does when its write
    queue runs empty. Without it (a controller aioquic created on its own), a
    packet sent after a pause that neither pacing nor a full window explains
    marks it (see :data:`APP_LIMITED_MIN_GAP`); that guess takes a sender whose
    event loop runs late (a busy CPU) for an idle one.

    :param max_datagram_size: the connection's packet size, bytes.
    """

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._max_datagram_size = max_datagram_size
        self.model = BbrModel(max_datagram_size=max_datagram_size, rng=random.Random())
        """The model this controller forwards to."""
        self.has_pending_data: Callable[[], bool] | None = None
        """Whether the connection holds stream data it has not sent yet (``None``: unknown)."""
        self._last_sent_time: float | None = None
        self._window_was_full = False
        self._sync()

    @property
    def pacing_rate(self) -> float:
        """The model's pacing rate, bytes per second."""
        return self.model.pacing_rate

    def on_packet_sent(self, *, packet: QuicSentPacket) -> None:
        """Record a packet that counts in flight."""
        now = packet.sent_time if packet.sent_time is not None else self._last_sent_time or 0.0
        if (
            self.has_pending_data is None
            and self._last_sent_time is not None
            and not self._window_was_full
        ):
            pacing_interval = self._max_datagram_size / self.model.pacing_rate
            if now - self._last_sent_time > max(4 * pacing_interval, APP_LIMITED_MIN_GAP):
                self.model.mark_app_limited()
        self.model.on_packet_sent(_packet_key(packet), size=packet.sent_bytes, now=now)
        self._last_sent_time = now
        self._window_was_full = (
            self.model.bytes_in_flight + self._max_datagram_size > self.model.congestion_window
        )
        if (
            self.has_pending_data is not None
            and not self._window_was_full
            and not self.has_pending_data()
        ):
            self.model.mark_app_limited()
        self._sync()

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        """Feed an acknowledged packet to the model."""
        self.model.on_packet_acked(_packet_key(packet), now=now)
        self._sync()

    def on_packets_expired(self, *, packets: Iterable[QuicSentPacket]) -> None:
        """Forget packets whose space was discarded or which a probe retransmitted."""
        self.model.on_packets_discarded(_packet_key(packet) for packet in packets)
        self._sync()

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        """Feed packets declared lost together to the model, as one loss event."""
        self.model.on_packets_lost((_packet_key(packet) for packet in packets), now=now)
        self._sync()

    def on_persistent_congestion(self) -> None:
        """Tell the model that persistent congestion was established."""
        self.model.on_persistent_congestion()
        self._sync()

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        """Ignored: the model takes an RTT sample from every acknowledged packet."""

    def get_log_data(self) -> dict[str, Any]:
        """The qlog ``metrics_updated`` fields, with BBR's state and rates."""
        data = super().get_log_data()
        data["pacing_rate"] = int(self.model.pacing_rate * 8)
        data["bbr_state"] = self.model.state.value
        data["bbr_bw"] = int(self.model.bw * 8)
        return data

    def _sync(self) -> None:
        self.congestion_window = self.model.congestion_window
        self.bytes_in_flight = self.model.bytes_in_flight


class ModelPacer(QuicPacketPacer):
    """aioquic's token-bucket pacer, running at a :class:`BbrCongestionControl`'s rate.

    The rate and bucket size are set by aioquic's own ``update_rate``, fed so that
    its rate is the model's. The send decision differs from aioquic's: aioquic lets
    a packet out on any positive credit and then forgives the rest of its time, so
    a timer that fires late lets two packets out instead of one (measured: 17 %
    over the set rate at 20 Mbit/s with timers up to 2 ms late). Here a packet
    needs a whole packet time of credit, and sends that bypass pacing (aioquic
    sends ACKs unpaced) leave a debt, so the average rate is the set rate.

    :param controller: the controller whose model sets the rate.
    :param max_datagram_size: the connection's packet size, bytes.
    """

    def __init__(self, *, controller: BbrCongestionControl, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._controller = controller
        self._rate = 0.0
        self._window = 0
        self._follow_model()

    @property
    def rate(self) -> float:
        """The rate the pacer currently runs at, bytes per second."""
        return self._rate

    def next_send_time(self, now: float) -> float:
        """When the next packet may leave (``None`` when it may leave now)."""
        self._follow_model()
        assert self.packet_time is not None
        self.update_bucket(now=now)
        missing = self.packet_time - self.bucket_time
        if missing > _PACING_TOLERANCE:
            return now + missing
        return None  # type: ignore[return-value]  # aioquic's annotation omits None

    def update_after_send(self, now: float) -> None:
        """Take a packet's time of credit from the bucket."""
        self._follow_model()
        assert self.packet_time is not None
        self.update_bucket(now=now)
        self.bucket_time = max(self.bucket_time - self.packet_time, -self.bucket_max)

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        """Ignore aioquic's ``cwnd / srtt`` rate and follow the model's."""
        self._follow_model()

    def _follow_model(self) -> None:
        model = self._controller.model
        rate = model.pacing_rate
        window = model.congestion_window
        if rate != self._rate or window != self._window:
            self._rate = rate
            self._window = window
            # aioquic's own arithmetic, at pacing rate window / (window / rate).
            super().update_rate(congestion_window=window, smoothed_rtt=window / rate)


_PACING_TOLERANCE = 1e-9
"""Credit short of a packet time by less than this (seconds) is float rounding."""


def congestion_controller(connection: QuicConnection) -> QuicCongestionControl:
    """The congestion controller an aioquic connection is using."""
    return connection._loss._cc


def enable_model_pacing(connection: QuicConnection) -> bool:
    """Make ``connection`` pace at its BBR model's rate (see the module docstring).

    Call it once, right after creating the connection. Returns whether the
    connection uses BBR (and now paces at its rate); other controllers keep
    aioquic's pacer.
    """
    controller = congestion_controller(connection)
    if not isinstance(controller, BbrCongestionControl):
        return False
    controller.has_pending_data = lambda: has_pending_stream_data(connection)
    recovery = connection._loss
    if not isinstance(recovery._pacer, ModelPacer):
        recovery._pacer = ModelPacer(
            controller=controller, max_datagram_size=controller._max_datagram_size
        )
    return True


def has_pending_stream_data(connection: QuicConnection) -> bool:
    """Whether any stream of ``connection`` has data (or a FIN) queued and not yet sent.

    Data waiting for retransmission counts; data blocked by the peer's flow
    control counts too (the sender is then window-limited, not idle). Called
    after each packet sent, when aioquic may show only the streams that have
    something to send (see :class:`quicmesh._aioquic.ActiveStreamScheduler`), so
    it is cheap.
    """
    for stream in connection._streams.values():
        sender = stream.sender
        if len(sender._pending) or sender._pending_eof:
            return True
    return False


def ensure_registered() -> None:
    """Register ``"bbr"`` with aioquic (idempotent; importing quicmesh.congestion does it)."""
    if BBR not in base._factories:
        base.register_congestion_control(BBR, BbrCongestionControl)


def available_congestion_controls() -> list[str]:
    """The names aioquic accepts as ``congestion_control_algorithm``, sorted."""
    ensure_registered()
    return sorted(base._factories)
