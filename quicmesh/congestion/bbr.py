"""The BBR congestion-control model, sans-IO.

This is BBRv3 as specified in draft-ietf-ccwg-bbr-01 ("BBR Congestion Control",
Cardwell, Swett, Beshay, October 2024). The function names in the draft map onto
the private methods here (``BBRUpdateProbeBWCyclePhase`` is
:meth:`BbrModel._update_probe_bw_cycle_phase`, and so on), so the two can be read
side by side. The parameters are the draft's defaults, except the loss threshold.

:class:`BbrModel` never reads a clock or touches a socket: it is fed packet events
(sent, acknowledged, lost, discarded) with their times and exposes what a sender
needs, :attr:`~BbrModel.pacing_rate` and :attr:`~BbrModel.congestion_window`.
Units are bytes, seconds and bytes per second.

Where this departs from the draft, and why:

- The draft updates the model once per ACK; aioquic reports acknowledged packets
  one at a time, so the model takes one rate sample per acknowledged packet (from
  that packet), which is what the draft's per-ACK sample reduces to when an ACK
  covers one packet. Round trips, filters and gains are unchanged.
- There is no TCP-style fast-recovery state in QUIC, so the draft's
  recovery-specific cwnd modulation (packet conservation on entering recovery) is
  not applied; loss reaches the model through the v3 loss bounds below. Persistent
  congestion is handled as the draft handles an RTO: cwnd becomes what is in
  flight plus one packet.
- A "loss event" for Startup's high-loss exit is one batch of packets that the
  transport declared lost together, standing in for the draft's discontiguous
  lost sequence ranges.
- The loss response (``inflight_hi``, ``bw_lo``, ``inflight_lo``) is the draft's,
  with two changes so that random, non-congestive loss does not collapse the rate:
  the loss threshold is :data:`LOSS_THRESH` (10 %) instead of the draft's
  :data:`DRAFT_LOSS_THRESH` (2 %, which the draft calls a default), and the
  short-term bounds are lowered only after a round trip whose loss rate exceeded
  that threshold, where the draft lowers them after any round trip with a loss.
  Measured with the simulator in ``tests/congestion`` (20 Mbit/s, 40 ms RTT, 60 ms
  queue, 20 s), the draft's response keeps 98 / 76 / 84 / 34 / 12 % of the link at
  0 / 0.5 / 1 / 2 / 5 % random loss: every round trip with a loss ratchets ``bw_lo``
  down by at least the pacing margin, and each probe ends at its first lossy
  sample. With these changes: 98 / 97 / 97 / 96 / 89 %. A bottleneck overflowed by
  bandwidth probing loses far more than 10 % in that round, so the response still
  bounds self-inflicted loss on shallow buffers: with a 5 ms queue 0.5 % of the
  data is lost (draft: 0.2 %; no loss response, as in BBRv1: 2.1 %).
  ``BbrModel(loss_threshold=DRAFT_LOSS_THRESH)`` restores the draft's threshold,
  but not its any-loss reaction of the short-term bounds.
- ``bw_probe_samples`` is cleared when the round after a probe ends (the end of
  ``ACKS_PROBE_STOPPING``), as Linux's BBRv3 does; the draft clears it only when
  a probe meets too much loss. Without this, a probe that ended on a bandwidth
  plateau left it set, and a chance cluster of random losses while cruising or
  in ProbeRTT then lowered ``inflight_hi``: cruising at 85 % of it held the
  window under one BDP for the rest of the flow (the simulator at 2 % loss: 93-95 %
  of the link before, 96 % after).
- A standing-queue check the draft does not have
  (:meth:`BbrModel._check_standing_queue`): in ProbeBW_DOWN or CRUISE, when
  every RTT sample of four consecutive round trips stays 50 % above
  ``min_rtt``, ``max_bw`` is remeasured as the delivery rate over those rounds.
  In user space, ACK arrival times are taken when the event loop gets to the
  datagram; on a busy host that is late by milliseconds, and a late timestamp
  at the start of a sample's ACK interval shortens it. The max filter keeps the
  highest of those samples: on the emulated 20 Mbit/s link the estimate ran 5
  to 13 % above the bottleneck, so pacing at it built a standing queue of about
  one BDP, bounded only by the window (``docs/congestion.md``). The rate over
  several queued round trips is a measurement of the bottleneck that such jitter
  barely moves, if it is the slope fitted through every acknowledgement of those
  rounds: the rate between their first and last ACK took a late timestamp at
  either end whole, and on the emulated link landed up to 2.3 % below the
  bottleneck, leaving the link that much idle until the next probe (fitted: the
  estimates read 19.35-19.94 Mbit/s against 19.62 over three runs, most within
  0.2 %).
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Hashable, Iterable

from .delivery import DeliveryRateSampler, PacketDeliveryState, RateSample
from .filters import WindowedMaxFilter

STARTUP_PACING_GAIN = 4 * math.log(2)
"""Pacing gain in Startup: doubles the sending rate every round trip."""
STARTUP_CWND_GAIN = 2.0
DRAIN_PACING_GAIN = 0.35
"""Pacing gain in Drain, below 1 / STARTUP_CWND_GAIN so Startup's queue drains in a round."""
DEFAULT_CWND_GAIN = 2.0
PROBE_BW_DOWN_PACING_GAIN = 0.9
PROBE_BW_UP_PACING_GAIN = 1.25
PROBE_BW_UP_CWND_GAIN = 2.25
PACING_MARGIN = 0.01
"""Pace this fraction below the estimated bandwidth, to keep the bottleneck queue short."""
LOSS_THRESH = 0.10
"""The highest loss rate per round trip treated as random rather than congestive."""
DRAFT_LOSS_THRESH = 0.02
"""The draft's default for :data:`LOSS_THRESH`."""
BETA = 0.7
"""Multiplicative decrease of the short-term bounds per round trip with loss."""
HEADROOM = 0.15
"""Share of ``inflight_hi`` left free for other flows while cruising."""
MIN_PIPE_CWND_PACKETS = 4
FULL_BW_THRESH = 1.25
FULL_BW_COUNT = 3
STARTUP_FULL_LOSS_COUNT = 6
EXTRA_ACKED_PERIOD_ROUNDS = 5
"""The ACK-aggregation filter covers two periods of this many rounds (10 in the draft)."""
MIN_RTT_FILTER_LEN = 10.0
PROBE_RTT_CWND_GAIN = 0.5
PROBE_RTT_DURATION = 0.2
PROBE_RTT_INTERVAL = 5.0
MAX_PROBE_UP_ROUNDS = 30
MAX_RENO_COEXISTENCE_ROUNDS = 63
STANDING_QUEUE_ROUNDS = 4
"""Round trips a standing queue must last while not probing before ``max_bw`` is remeasured."""
STANDING_QUEUE_DELAY = 0.5
"""A round trip's smallest RTT above ``min_rtt`` by this fraction of it means a standing queue."""
INITIAL_WINDOW_PACKETS = 10


class BbrState(enum.Enum):
    """BBR's states, with ProbeBW split into its four phases as in BBRv3."""

    STARTUP = "startup"
    DRAIN = "drain"
    PROBE_BW_DOWN = "probe_bw_down"
    PROBE_BW_CRUISE = "probe_bw_cruise"
    PROBE_BW_REFILL = "probe_bw_refill"
    PROBE_BW_UP = "probe_bw_up"
    PROBE_RTT = "probe_rtt"

    @property
    def is_probe_bw(self) -> bool:
        """Whether this is one of the ProbeBW phases."""
        return self in _PROBE_BW_STATES


_PROBE_BW_STATES = frozenset(
    {
        BbrState.PROBE_BW_DOWN,
        BbrState.PROBE_BW_CRUISE,
        BbrState.PROBE_BW_REFILL,
        BbrState.PROBE_BW_UP,
    }
)


class _AckPhase(enum.Enum):
    INIT = 0
    PROBE_STARTING = 1
    PROBE_FEEDBACK = 2
    PROBE_STOPPING = 3
    REFILLING = 4


class BbrModel:
    """BBRv3's model of the path and the sending rate and window it derives.

    Feed it every packet that counts in flight: :meth:`on_packet_sent` when it
    leaves, then exactly one of :meth:`on_packet_acked`, :meth:`on_packets_lost`
    or :meth:`on_packets_discarded`. Read :attr:`pacing_rate` and
    :attr:`congestion_window` after each event.

    :param max_datagram_size: the sender's packet size (the draft's SMSS), bytes.
    :param now: the time the connection starts, seconds; by default the send time
        of the first packet (a controller is often created before its clock is known,
        and timers dated from a wrong origin would, for one, start the connection
        in ProbeRTT).
    :param rng: the randomness used to spread bandwidth probes (seed it to replay).
    :param loss_threshold: the loss rate per round trip above which loss counts as
        congestion (see the module docstring for why this is not the draft's 2 %).
    """

    def __init__(
        self,
        *,
        max_datagram_size: int,
        now: float | None = None,
        rng: random.Random | None = None,
        loss_threshold: float = LOSS_THRESH,
    ) -> None:
        if not 0.0 < loss_threshold < 1.0:
            raise ValueError(f"loss_threshold must be between 0 and 1, not {loss_threshold}")
        self._loss_thresh = loss_threshold
        self._clock_started = now is not None
        if now is None:
            now = 0.0
        self._mss = max_datagram_size
        self._rng = rng if rng is not None else random.Random()
        self._initial_cwnd = INITIAL_WINDOW_PACKETS * max_datagram_size
        self._min_pipe_cwnd = MIN_PIPE_CWND_PACKETS * max_datagram_size
        self.sampler = DeliveryRateSampler(now=now)
        """The per-packet delivery state and connection counters."""

        self.state = BbrState.STARTUP
        """The current state."""
        self.congestion_window = self._initial_cwnd
        """The most bytes the sender may have in flight."""
        self.pacing_rate = STARTUP_PACING_GAIN * self._initial_cwnd / 0.001
        """The rate the sender should pace at, bytes per second."""
        self.pacing_gain = STARTUP_PACING_GAIN
        self.cwnd_gain = STARTUP_CWND_GAIN

        # The path model.
        self._max_bw_filter = WindowedMaxFilter()
        self.max_bw = 0.0
        """The long-term bandwidth estimate: windowed max over two ProbeBW cycles."""
        self.bw = 0.0
        """The bandwidth the model uses: ``max_bw`` bounded by ``bw_lo``."""
        self.bw_lo = math.inf
        """Short-term bandwidth bound lowered by loss, or infinity."""
        self.inflight_hi = math.inf
        """Long-term bound on data in flight set by loss while probing, or infinity."""
        self.inflight_lo = math.inf
        """Short-term bound on data in flight lowered by loss, or infinity."""
        self._bw_latest = 0.0
        self._inflight_latest = 0
        self.min_rtt = math.inf
        """The windowed minimum RTT (10 s), seconds."""
        self._min_rtt_stamp = now
        self._probe_rtt_min_delay = math.inf
        self._probe_rtt_min_stamp = now
        self._probe_rtt_expired = False
        self._probe_rtt_done_stamp: float | None = None
        self._probe_rtt_round_done = False
        self._prior_cwnd = 0
        self._idle_restart = False
        self.extra_acked = 0.0
        """Recent ACK aggregation beyond what ``bw`` explains, bytes."""
        self._extra_acked_filter = WindowedMaxFilter()
        self._extra_acked_interval_start = now
        self._extra_acked_delivered = 0
        self._extra_acked_period_start_round = 0
        self._max_inflight = float(self._initial_cwnd)

        # Standing-queue check (not in the draft; see the module docstring).
        self._round_min_rtt = math.inf
        self._standing_rounds = 0
        self._round_deliveries: list[tuple[float, int]] = []
        self._standing_deliveries: list[tuple[float, int]] = []
        self.bw_corrections = 0
        """Times a standing queue showed ``max_bw`` too high and it was remeasured."""

        # Round-trip counting.
        self._next_round_delivered = 0
        self.round_count = 0
        """Round trips counted so far."""
        self._round_start = False
        self._rounds_since_bw_probe = 0
        self._cwnd_limited_round = -2

        # Startup's full-pipe detection, also reused by ProbeBW_UP.
        self.full_bw_reached = False
        """Whether Startup has found the bottleneck's bandwidth."""
        self._full_bw_now = False
        self._full_bw = 0.0
        self._full_bw_count = 0

        # Loss rounds.
        self._loss_round_delivered = 0
        self._loss_round_start = False
        self._loss_events_in_round = 0
        self._lost_in_round = 0
        self._delivered_at_loss_round = 0

        # ProbeBW cycling.
        self._cycle_stamp = now
        self._ack_phase = _AckPhase.INIT
        self._bw_probe_wait = 0.0
        self._bw_probe_samples = False
        self._probe_up_cnt = math.inf
        self._bw_probe_up_acks = 0
        self._bw_probe_up_rounds = 0

        self._enter_startup()

    # --- what the sender reads ---------------------------------------------------

    @property
    def bytes_in_flight(self) -> int:
        """Bytes sent and not yet acknowledged, lost or discarded."""
        return self.sampler.bytes_in_flight

    @property
    def bdp(self) -> float:
        """The estimated bandwidth-delay product, bytes (0.0 before an RTT sample)."""
        return 0.0 if math.isinf(self.min_rtt) else self.bw * self.min_rtt

    @property
    def minimum_window(self) -> int:
        """The smallest congestion window the model ever sets (the draft's BBRMinPipeCwnd)."""
        return self._min_pipe_cwnd

    # --- events --------------------------------------------------------------------

    def on_packet_sent(self, key: Hashable, *, size: int, now: float) -> None:
        """A packet that counts in flight was sent.

        :param key: identifies the packet in later events.
        :param size: its size, bytes.
        :param now: the send time, seconds.
        """
        if not self._clock_started:
            self._start_clock(now)
        if self.sampler.bytes_in_flight == 0 and self.sampler.app_limited_until:
            self._handle_restart_from_idle(now)
        self.sampler.on_packet_sent(key, size=size, now=now)
        if self.sampler.bytes_in_flight + self._mss > self.congestion_window:
            self._cwnd_limited_round = self.round_count

    def _start_clock(self, now: float) -> None:
        self._clock_started = True
        self._min_rtt_stamp = self._probe_rtt_min_stamp = now
        self._extra_acked_interval_start = now
        self._cycle_stamp = now

    def on_packet_acked(self, key: Hashable, *, now: float) -> None:
        """A packet was acknowledged; update the model, the rate and the window.

        :param key: the key it was sent with; unknown keys are ignored.
        :param now: when the acknowledgement arrived, seconds.
        """
        rs = self.sampler.on_packet_acked(key, now=now)
        if rs is None:
            return
        self._update_model_and_state(rs, now)
        self._set_pacing_rate_with_gain(self.pacing_gain)
        self._set_cwnd(rs)

    def on_packets_lost(self, keys: Iterable[Hashable], *, now: float) -> None:
        """Packets were declared lost together (one loss event).

        :param keys: the keys they were sent with; unknown keys are ignored.
        :param now: when the loss was detected, seconds.
        """
        any_lost = False
        for key in keys:
            packet = self.sampler.on_packet_lost(key)
            if packet is None:
                continue
            any_lost = True
            self._lost_in_round += packet.size
            self._handle_lost_packet(packet, now)
        if any_lost:
            self._loss_events_in_round += 1
            self._bound_cwnd_for_model()

    def on_packets_discarded(self, keys: Iterable[Hashable]) -> None:
        """Packets left flight without being acknowledged or declared lost."""
        for key in keys:
            self.sampler.on_packet_discarded(key)

    def on_persistent_congestion(self) -> None:
        """The transport established persistent congestion (RFC 9002 section 7.6).

        Handled as the draft handles a retransmission timeout.
        """
        self._prior_cwnd = self._saved_cwnd()
        self.congestion_window = max(self.bytes_in_flight + self._mss, self._min_pipe_cwnd)

    def mark_app_limited(self) -> None:
        """The sender has less to send than the model allows (see the sampler)."""
        self.sampler.mark_app_limited()

    # --- BBRUpdateModelAndState ----------------------------------------------------

    def _update_model_and_state(self, rs: RateSample, now: float) -> None:
        self._update_latest_delivery_signals(rs)
        self._update_congestion_signals(rs)
        self._update_ack_aggregation(rs, now)
        self._check_full_bw_reached(rs)
        self._check_startup_done()
        self._check_drain(now)
        self._update_probe_bw_cycle_phase(rs, now)
        self._update_min_rtt(rs, now)
        self._check_standing_queue(rs, now)
        self._check_probe_rtt(rs, now)
        self._advance_latest_delivery_signals(rs)
        self.bw = min(self.max_bw, self.bw_lo)

    def _update_latest_delivery_signals(self, rs: RateSample) -> None:
        self._loss_round_start = False
        self._bw_latest = max(self._bw_latest, rs.delivery_rate)
        self._inflight_latest = max(self._inflight_latest, rs.delivered)
        if rs.prior_delivered >= self._loss_round_delivered:
            self._loss_round_delivered = self.sampler.delivered
            self._loss_round_start = True

    def _advance_latest_delivery_signals(self, rs: RateSample) -> None:
        if self._loss_round_start:
            self._bw_latest = rs.delivery_rate
            self._inflight_latest = rs.delivered

    def _update_congestion_signals(self, rs: RateSample) -> None:
        self._update_round(rs)
        if rs.is_valid and (rs.delivery_rate >= self.max_bw or not rs.is_app_limited):
            self.max_bw = self._max_bw_filter.update(rs.delivery_rate)
        if not self._loss_round_start:
            return
        delivered = self.sampler.delivered - self._delivered_at_loss_round
        too_lossy = self._lost_in_round > self._loss_thresh * (delivered + self._lost_in_round)
        if too_lossy and self.state is BbrState.STARTUP and not self.full_bw_reached:
            self._check_startup_high_loss()
        if too_lossy and not self._is_probing_bw():
            if math.isinf(self.bw_lo):
                self.bw_lo = self.max_bw
            if math.isinf(self.inflight_lo):
                self.inflight_lo = self.congestion_window
            self.bw_lo = max(self._bw_latest, BETA * self.bw_lo)
            self.inflight_lo = max(self._inflight_latest, BETA * self.inflight_lo)
        self._loss_events_in_round = 0
        self._lost_in_round = 0
        self._delivered_at_loss_round = self.sampler.delivered

    def _check_startup_high_loss(self) -> None:
        if self._loss_events_in_round >= STARTUP_FULL_LOSS_COUNT:
            self.full_bw_reached = True
            self.inflight_hi = max(self._bdp_multiple(1.0), float(self._inflight_latest))

    def _update_round(self, rs: RateSample) -> None:
        if rs.prior_delivered >= self._next_round_delivered:
            self._start_round()
            self.round_count += 1
            self._rounds_since_bw_probe += 1
            self._round_start = True
        else:
            self._round_start = False

    def _start_round(self) -> None:
        self._next_round_delivered = self.sampler.delivered

    def _is_probing_bw(self) -> bool:
        return self.state in (
            BbrState.STARTUP,
            BbrState.PROBE_BW_REFILL,
            BbrState.PROBE_BW_UP,
        )

    def _update_ack_aggregation(self, rs: RateSample, now: float) -> None:
        expected = self.bw * (now - self._extra_acked_interval_start)
        if self._extra_acked_delivered <= expected:
            self._extra_acked_delivered = 0
            self._extra_acked_interval_start = now
            expected = 0.0
        self._extra_acked_delivered += rs.newly_acked
        extra = min(self._extra_acked_delivered - expected, float(self.congestion_window))
        period = EXTRA_ACKED_PERIOD_ROUNDS if self.full_bw_reached else 1
        if self._round_start and (
            self.round_count - self._extra_acked_period_start_round >= period
        ):
            self._extra_acked_filter.advance()
            self._extra_acked_period_start_round = self.round_count
        self.extra_acked = self._extra_acked_filter.update(extra)

    def _check_full_bw_reached(self, rs: RateSample) -> None:
        if self._full_bw_now or not self._round_start or rs.is_app_limited or not rs.is_valid:
            return
        if rs.delivery_rate >= self._full_bw * FULL_BW_THRESH:
            self._reset_full_bw()
            self._full_bw = rs.delivery_rate
            return
        self._full_bw_count += 1
        self._full_bw_now = self._full_bw_count >= FULL_BW_COUNT
        if self._full_bw_now:
            self.full_bw_reached = True

    def _reset_full_bw(self) -> None:
        self._full_bw = 0.0
        self._full_bw_count = 0
        self._full_bw_now = False

    def _check_startup_done(self) -> None:
        if self.state is BbrState.STARTUP and self.full_bw_reached:
            self._enter_drain()

    def _check_drain(self, now: float) -> None:
        if self.state is BbrState.DRAIN and self.bytes_in_flight <= self._inflight(1.0):
            self._enter_probe_bw(now)

    # --- ProbeBW -------------------------------------------------------------------

    def _update_probe_bw_cycle_phase(self, rs: RateSample, now: float) -> None:
        if not self.full_bw_reached:
            return
        self._adapt_upper_bounds(rs, now)
        state = self.state
        if state is BbrState.PROBE_BW_DOWN:
            if self._is_time_to_probe_bw(now):
                return
            if self._is_time_to_cruise():
                self._start_probe_bw_cruise()
        elif state is BbrState.PROBE_BW_CRUISE:
            self._is_time_to_probe_bw(now)
        elif state is BbrState.PROBE_BW_REFILL:
            if self._round_start:
                self._bw_probe_samples = True
                self._start_probe_bw_up(rs)
        elif state is BbrState.PROBE_BW_UP and self._is_time_to_go_down(rs):
            self._start_probe_bw_down(now)

    def _adapt_upper_bounds(self, rs: RateSample, now: float) -> None:
        if self._ack_phase is _AckPhase.PROBE_STARTING and self._round_start:
            self._ack_phase = _AckPhase.PROBE_FEEDBACK
        if self._ack_phase is _AckPhase.PROBE_STOPPING and self._round_start:
            # The probe's last samples are in: later losses are not the probe's
            # (Linux's BBRv3 clears bw_probe_samples here; the draft omits it).
            self._bw_probe_samples = False
            self._ack_phase = _AckPhase.INIT
            if self.state.is_probe_bw and not rs.is_app_limited:
                self._max_bw_filter.advance()
                self.max_bw = self._max_bw_filter.best
        if self._is_inflight_too_high(rs.lost, rs.tx_in_flight):
            if self._bw_probe_samples:
                self._handle_inflight_too_high(rs.is_app_limited, rs.tx_in_flight, now)
            return
        if math.isinf(self.inflight_hi):
            return
        if rs.tx_in_flight > self.inflight_hi:
            self.inflight_hi = rs.tx_in_flight
        if self.state is BbrState.PROBE_BW_UP:
            self._probe_inflight_hi_upward(rs)

    def _is_inflight_too_high(self, lost: int, tx_in_flight: int) -> bool:
        return lost > tx_in_flight * self._loss_thresh

    def _handle_inflight_too_high(
        self, is_app_limited: bool, tx_in_flight: float, now: float
    ) -> None:
        self._bw_probe_samples = False
        if not is_app_limited:
            self.inflight_hi = max(tx_in_flight, self._target_inflight() * BETA)
        if self.state is BbrState.PROBE_BW_UP:
            self._start_probe_bw_down(now)

    def _handle_lost_packet(self, packet: PacketDeliveryState, now: float) -> None:
        if not self._bw_probe_samples:
            return
        lost = self.sampler.lost - packet.lost
        if self._is_inflight_too_high(lost, packet.tx_in_flight):
            # The inflight at which the loss rate crossed LOSS_THRESH.
            inflight_prev = packet.tx_in_flight - packet.size
            lost_prev = lost - packet.size
            lost_prefix = (self._loss_thresh * inflight_prev - lost_prev) / (1 - self._loss_thresh)
            self._handle_inflight_too_high(packet.is_app_limited, inflight_prev + lost_prefix, now)

    def _probe_inflight_hi_upward(self, rs: RateSample) -> None:
        if not self._is_cwnd_limited() or self.congestion_window < self.inflight_hi:
            return
        self._bw_probe_up_acks += rs.newly_acked
        if self._bw_probe_up_acks >= self._probe_up_cnt:
            delta = int(self._bw_probe_up_acks // self._probe_up_cnt)
            self._bw_probe_up_acks -= int(delta * self._probe_up_cnt)
            self.inflight_hi += delta * self._mss
        if self._round_start:
            self._raise_inflight_hi_slope()

    def _raise_inflight_hi_slope(self) -> None:
        growth_this_round = 1 << self._bw_probe_up_rounds
        self._bw_probe_up_rounds = min(self._bw_probe_up_rounds + 1, MAX_PROBE_UP_ROUNDS)
        self._probe_up_cnt = max(self.congestion_window / growth_this_round, float(self._mss))

    def _is_time_to_probe_bw(self, now: float) -> bool:
        if now > self._cycle_stamp + self._bw_probe_wait or self._is_reno_coexistence_probe_time():
            self._start_probe_bw_refill()
            return True
        return False

    def _is_reno_coexistence_probe_time(self) -> bool:
        reno_rounds = self._target_inflight() / self._mss
        return self._rounds_since_bw_probe >= min(reno_rounds, MAX_RENO_COEXISTENCE_ROUNDS)

    def _is_time_to_cruise(self) -> bool:
        if self.bytes_in_flight > self._inflight_with_headroom():
            return False
        return self.bytes_in_flight <= self._inflight(1.0)

    def _is_time_to_go_down(self, rs: RateSample) -> bool:
        if self._is_cwnd_limited() and self.congestion_window >= self.inflight_hi:
            self._reset_full_bw()
            self._full_bw = rs.delivery_rate
        elif self._full_bw_now:
            return True
        return False

    def _is_cwnd_limited(self) -> bool:
        return self.round_count - self._cwnd_limited_round <= 1

    # --- state entry ---------------------------------------------------------------

    def _set_state(self, state: BbrState, pacing_gain: float, cwnd_gain: float) -> None:
        self.state = state
        self.pacing_gain = pacing_gain
        self.cwnd_gain = cwnd_gain

    def _enter_startup(self) -> None:
        self._set_state(BbrState.STARTUP, STARTUP_PACING_GAIN, STARTUP_CWND_GAIN)

    def _enter_drain(self) -> None:
        self._set_state(BbrState.DRAIN, DRAIN_PACING_GAIN, STARTUP_CWND_GAIN)

    def _enter_probe_bw(self, now: float) -> None:
        self._start_probe_bw_down(now)

    def _start_probe_bw_down(self, now: float) -> None:
        self._reset_congestion_signals()
        self._probe_up_cnt = math.inf
        self._rounds_since_bw_probe = self._rng.randint(0, 1)
        self._bw_probe_wait = 2.0 + self._rng.random()
        self._cycle_stamp = now
        self._ack_phase = _AckPhase.PROBE_STOPPING
        self._start_round()
        self._set_state(BbrState.PROBE_BW_DOWN, PROBE_BW_DOWN_PACING_GAIN, DEFAULT_CWND_GAIN)

    def _start_probe_bw_cruise(self) -> None:
        self._set_state(BbrState.PROBE_BW_CRUISE, 1.0, DEFAULT_CWND_GAIN)

    def _start_probe_bw_refill(self) -> None:
        self._reset_lower_bounds()
        self._bw_probe_up_rounds = 0
        self._bw_probe_up_acks = 0
        self._ack_phase = _AckPhase.REFILLING
        self._start_round()
        self._set_state(BbrState.PROBE_BW_REFILL, 1.0, DEFAULT_CWND_GAIN)

    def _start_probe_bw_up(self, rs: RateSample) -> None:
        self._ack_phase = _AckPhase.PROBE_STARTING
        self._start_round()
        self._reset_full_bw()
        self._full_bw = rs.delivery_rate
        self._set_state(BbrState.PROBE_BW_UP, PROBE_BW_UP_PACING_GAIN, PROBE_BW_UP_CWND_GAIN)
        self._raise_inflight_hi_slope()

    def _reset_congestion_signals(self) -> None:
        self._loss_events_in_round = 0
        self._lost_in_round = 0
        self._bw_latest = 0.0
        self._inflight_latest = 0

    def _reset_lower_bounds(self) -> None:
        self.bw_lo = math.inf
        self.inflight_lo = math.inf

    def _check_standing_queue(self, rs: RateSample, now: float) -> None:
        """Remeasure ``max_bw`` when pacing at it keeps a queue standing.

        Paced at the estimated bandwidth (ProbeBW_DOWN and CRUISE), the bottleneck
        queue drains unless the estimate is above the real bandwidth. When every
        RTT sample of :data:`STANDING_QUEUE_ROUNDS` consecutive round trips stays
        above ``min_rtt`` by :data:`STANDING_QUEUE_DELAY`, the bottleneck was busy
        all along, so the delivery rate over those rounds (:func:`_delivery_slope`)
        is its bandwidth, measured over several round trips instead of one:
        ``max_bw`` falls to it.
        """
        self._round_min_rtt = min(self._round_min_rtt, rs.rtt)
        self._round_deliveries.append((now, self.sampler.delivered))
        if not self._round_start:
            return
        standing = (
            self.state in (BbrState.PROBE_BW_DOWN, BbrState.PROBE_BW_CRUISE)
            and not rs.is_app_limited
            and self._round_min_rtt > self.min_rtt * (1.0 + STANDING_QUEUE_DELAY)
        )
        self._round_min_rtt = math.inf
        deliveries, self._round_deliveries = self._round_deliveries, []
        if not standing:
            self._standing_rounds = 0
            self._standing_deliveries = []
            return
        self._standing_rounds += 1
        self._standing_deliveries += deliveries
        if self._standing_rounds < STANDING_QUEUE_ROUNDS:
            return
        rate = _delivery_slope(self._standing_deliveries)
        self._standing_rounds = 0
        self._standing_deliveries = []
        if rate is not None and rate < self.max_bw:
            self._max_bw_filter.reset(rate)
            self.max_bw = rate
            self.bw_corrections += 1

    # --- ProbeRTT ------------------------------------------------------------------

    def _update_min_rtt(self, rs: RateSample, now: float) -> None:
        self._probe_rtt_expired = now > self._probe_rtt_min_stamp + PROBE_RTT_INTERVAL
        if rs.rtt < self._probe_rtt_min_delay or self._probe_rtt_expired:
            self._probe_rtt_min_delay = rs.rtt
            self._probe_rtt_min_stamp = now
        min_rtt_expired = now > self._min_rtt_stamp + MIN_RTT_FILTER_LEN
        if self._probe_rtt_min_delay < self.min_rtt or min_rtt_expired:
            self.min_rtt = self._probe_rtt_min_delay
            self._min_rtt_stamp = self._probe_rtt_min_stamp

    def _check_probe_rtt(self, rs: RateSample, now: float) -> None:
        if (
            self.state is not BbrState.PROBE_RTT
            and self._probe_rtt_expired
            and not self._idle_restart
        ):
            self._set_state(BbrState.PROBE_RTT, 1.0, PROBE_RTT_CWND_GAIN)
            self._prior_cwnd = self._saved_cwnd()
            self._probe_rtt_done_stamp = None
            self._ack_phase = _AckPhase.PROBE_STOPPING
            self._start_round()
        if self.state is BbrState.PROBE_RTT:
            self._handle_probe_rtt(now)
        if rs.delivered > 0:
            self._idle_restart = False

    def _handle_probe_rtt(self, now: float) -> None:
        # Samples taken at ProbeRTT's low rate must not lower the bandwidth estimate.
        self.sampler.mark_app_limited()
        if self._probe_rtt_done_stamp is None:
            if self.bytes_in_flight <= self._probe_rtt_cwnd():
                self._probe_rtt_done_stamp = now + PROBE_RTT_DURATION
                self._probe_rtt_round_done = False
                self._start_round()
            return
        if self._round_start:
            self._probe_rtt_round_done = True
        if self._probe_rtt_round_done:
            self._check_probe_rtt_done(now)

    def _check_probe_rtt_done(self, now: float) -> None:
        if self._probe_rtt_done_stamp is not None and now > self._probe_rtt_done_stamp:
            self._probe_rtt_min_stamp = now
            self.congestion_window = max(self.congestion_window, self._prior_cwnd)
            self._reset_lower_bounds()
            if self.full_bw_reached:
                self._start_probe_bw_down(now)
                self._start_probe_bw_cruise()
            else:
                self._enter_startup()

    def _handle_restart_from_idle(self, now: float) -> None:
        self._idle_restart = True
        self._extra_acked_interval_start = now
        if self.state.is_probe_bw:
            self._set_pacing_rate_with_gain(1.0)
        elif self.state is BbrState.PROBE_RTT:
            self._check_probe_rtt_done(now)

    def _saved_cwnd(self) -> int:
        if self.state is BbrState.PROBE_RTT:
            return max(self._prior_cwnd, self.congestion_window)
        return self.congestion_window

    # --- BBRUpdateControlParameters ------------------------------------------------

    def _set_pacing_rate_with_gain(self, gain: float) -> None:
        rate = gain * self.bw * (1.0 - PACING_MARGIN)
        if self.full_bw_reached or rate > self.pacing_rate:
            # Never zero: before the first bandwidth sample keep a minimal rate.
            self.pacing_rate = max(rate, self._mss / 1.0)

    def _set_cwnd(self, rs: RateSample) -> None:
        inflight = self._bdp_multiple(self.cwnd_gain) + self.extra_acked
        self._max_inflight = self._quantization_budget(inflight)
        cwnd = self.congestion_window
        if self.full_bw_reached:
            cwnd = int(min(cwnd + rs.newly_acked, self._max_inflight))
        elif cwnd < self._max_inflight or self.sampler.delivered < self._initial_cwnd:
            cwnd += rs.newly_acked
        self.congestion_window = max(cwnd, self._min_pipe_cwnd)
        if self.state is BbrState.PROBE_RTT:
            self.congestion_window = min(self.congestion_window, int(self._probe_rtt_cwnd()))
        self._bound_cwnd_for_model()

    def _bound_cwnd_for_model(self) -> None:
        cap = math.inf
        if self.state.is_probe_bw and self.state is not BbrState.PROBE_BW_CRUISE:
            cap = self.inflight_hi
        elif self.state in (BbrState.PROBE_RTT, BbrState.PROBE_BW_CRUISE):
            cap = self._inflight_with_headroom()
        cap = max(min(cap, self.inflight_lo), self._min_pipe_cwnd)
        if cap < self.congestion_window:
            self.congestion_window = int(cap)

    def _bdp_multiple(self, gain: float) -> float:
        if math.isinf(self.min_rtt):
            return float(self._initial_cwnd)
        return gain * self.bw * self.min_rtt

    def _quantization_budget(self, inflight: float) -> float:
        send_quantum = min(max(self.pacing_rate * 0.001, 2 * self._mss), 65536)
        inflight = max(inflight, 3 * send_quantum, self._min_pipe_cwnd)
        if self.state is BbrState.PROBE_BW_UP:
            inflight += 2 * self._mss
        return inflight

    def _inflight(self, gain: float) -> float:
        return self._quantization_budget(self._bdp_multiple(gain))

    def _probe_rtt_cwnd(self) -> float:
        return max(self._bdp_multiple(PROBE_RTT_CWND_GAIN), self._min_pipe_cwnd)

    def _target_inflight(self) -> float:
        return min(self.bdp, self.congestion_window)

    def _inflight_with_headroom(self) -> float:
        if math.isinf(self.inflight_hi):
            return math.inf
        headroom = max(self._mss, HEADROOM * self.inflight_hi)
        return max(self.inflight_hi - headroom, self._min_pipe_cwnd)


def _delivery_slope(deliveries: list[tuple[float, int]]) -> float | None:
    """Bytes per second delivered, the least-squares slope of (ACK time, delivered).

    Every acknowledgement counts, so one ACK processed late at either end of the
    interval barely moves the result, where the rate between the first and last
    ACK would take the whole error (a few percent over four round trips).
    """
    if len(deliveries) < 2:
        return None
    n = len(deliveries)
    mean_t = sum(t for t, _ in deliveries) / n
    mean_d = sum(d for _, d in deliveries) / n
    variance = sum((t - mean_t) ** 2 for t, _ in deliveries)
    if variance <= 0.0:
        return None
    return sum((t - mean_t) * (d - mean_d) for t, d in deliveries) / variance
