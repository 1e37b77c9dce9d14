//! quicmesh's model-based congestion controller for the native engine (`congestion_control:
//! bbr`), plugged into quinn through its `Controller` trait.
//!
//! Why not quinn's own BBR: its bandwidth estimate is the largest of per-ACK samples taken
//! between two consecutive sends and two consecutive ACKs, which ACK and send bursts inflate
//! many times over. On the HOL benchmark's link (20 Mbit/s, 40 ms RTT, 60 ms drop-tail queue,
//! 2 % random loss) its window grew to about 1 MB, ten BDPs: the bottleneck queue stayed full
//! and dropped 44 % of what the server sent, so an 8 KiB interactive response lost packets
//! nearly every time and waited for several recoveries (`docs/performance.md`).
//!
//! This controller keeps BBR's model (delivery-rate samples as in
//! draft-ietf-ccwg-bbr / Linux's `tcp_rate.c`, a windowed maximum of them over 10 round
//! trips, the minimum RTT) and turns it into a window only: quinn paces at 1.25 x window /
//! smoothed RTT and offers no way to set a pacing rate. Startup grows the window by what is
//! acknowledged (doubling per round trip) until the bandwidth stops growing by 25 % for three
//! round trips or a round trip loses more than [`STARTUP_LOSS_THRESHOLD`]; after that the
//! window is the model's BDP plus a small queue allowance,
//! `max_bw x (1.25 x min_rtt + 4 ms) + 4 datagrams`: at most about a quarter of a BDP waits in
//! the bottleneck queue, and a link with more capacity shows it (the allowance is sent, the
//! RTT does not grow, the next samples are higher). Random loss does not lower the model (as
//! in BBRv1); persistent congestion (RFC 9002 7.6) starts over from the initial window. The
//! minimum RTT is this controller's own (the least RTT sample): when none came near it for
//! 10 s, ProbeRTT holds the window at half a BDP for 200 ms and takes the least sample of
//! that time as the new minimum, so a queue other flows keep standing (loss-based TCP) enters
//! the BDP and the window keeps this connection's share (without it: 12 % of the link next
//! to one TCP Cubic flow in a 4 s run; with it 44 %, 58 % in the second half of a 30 s run).
//! Next to kernel TCP BBR, whose own ProbeRTT shows the empty-queue RTT every 10 s, it still
//! gets almost nothing (`docs/performance.md`).
//!
//! The additive 4 ms keeps a path whose RTT is mostly processing (loopback, a busy host) from
//! shrinking its window with each sample: there the delivery rate is window / RTT with an RTT
//! well above `min_rtt`, and a window tied to `min_rtt` alone would spiral down.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// Round trips the bandwidth maximum is kept over.
const BW_FILTER_ROUNDS: u64 = 10;
/// Startup ends after this many round trips without 25 % more bandwidth.
const FULL_BW_ROUNDS: u32 = 3;
/// Startup ends after a round trip that lost more than this share of what it delivered.
const STARTUP_LOSS_THRESHOLD: f64 = 0.1;
/// The window in BDPs after Startup (before the additive allowance).
const CWND_GAIN: f64 = 1.25;
/// Queueing time allowed on top of the BDP, whatever the RTT.
const QUEUE_ALLOWANCE: Duration = Duration::from_millis(4);
/// Datagrams allowed on top of the model (a receiver acknowledges every second packet).
const EXTRA_DATAGRAMS: u64 = 4;
/// The minimum RTT is re-measured (ProbeRTT) when it was not seen for this long.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// How long ProbeRTT holds the window at [`PROBE_RTT_GAIN`] BDP (at least one RTT).
const PROBE_RTT_TIME: Duration = Duration::from_millis(200);
/// The window in BDPs during ProbeRTT (BBRv2/v3's, not BBRv1's four packets).
const PROBE_RTT_GAIN: f64 = 0.5;
/// Sent-packet records older than this behind the newest acknowledged one are dropped (they
/// were lost, or acknowledged without a sample).
const RECORD_HORIZON: Duration = Duration::from_secs(2);
/// At most this many sent-packet records are kept.
const MAX_RECORDS: usize = 1 << 16;

/// quicmesh's BBR-model controller factory.
#[derive(Debug, Clone)]
pub struct ModelBbrConfig {
    /// The window before any measurement (quinn's default initial window).
    pub initial_window: u64,
}

impl Default for ModelBbrConfig {
    fn default() -> Self {
        // quinn-proto's default: 14720 bytes (RFC 9002 7.2, ten 1472-byte datagrams).
        ModelBbrConfig {
            initial_window: 14720,
        }
    }
}

impl ControllerFactory for ModelBbrConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(ModelBbr::new(self.initial_window, current_mtu, now))
    }
}

/// What the connection had delivered when a batch of packets was sent.
#[derive(Debug, Clone, Copy)]
struct SentRecord {
    time: Instant,
    /// Bytes delivered (acknowledged) before this send.
    delivered: u64,
    /// When `delivered` was last increased, at this send.
    delivered_time: Instant,
    /// The send time of the newest packet acknowledged by then (`send_elapsed` starts there).
    first_sent_time: Instant,
}

/// One delivery-rate sample (bytes per second) and the delivered count of the packet it
/// came from.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rate: u64,
    prior_delivered: u64,
}

/// The controller (see the module documentation).
#[derive(Debug, Clone)]
pub struct ModelBbr {
    mtu: u64,
    initial_window: u64,
    /// Startup's window, grown by what is acknowledged.
    startup_cwnd: u64,
    in_startup: bool,
    full_bw: u64,
    full_bw_rounds: u32,
    delivered: u64,
    delivered_time: Instant,
    last_acked_sent_time: Instant,
    records: VecDeque<SentRecord>,
    /// The newest sample of the current ACK batch.
    batch_sample: Option<Sample>,
    batch_newest_prior_delivered: Option<u64>,
    batch_app_limited: bool,
    round: u64,
    next_round_delivered: u64,
    round_lost: u64,
    round_delivered_start: u64,
    /// Per-round bandwidth maxima, oldest first.
    bw_rounds: VecDeque<(u64, u64)>,
    /// The minimum RTT sample of the last [`MIN_RTT_WINDOW`] (or of the last ProbeRTT).
    min_rtt: Duration,
    min_rtt_stamp: Instant,
    /// While ProbeRTT runs: until when, and the smallest sample so far.
    probe_rtt_until: Option<Instant>,
    probe_min: Option<Duration>,
}

impl ModelBbr {
    pub fn new(initial_window: u64, mtu: u16, now: Instant) -> Self {
        let mtu = u64::from(mtu);
        let initial_window = initial_window.max(Self::min_window_for(mtu));
        ModelBbr {
            mtu,
            initial_window,
            startup_cwnd: initial_window,
            in_startup: true,
            full_bw: 0,
            full_bw_rounds: 0,
            delivered: 0,
            delivered_time: now,
            last_acked_sent_time: now,
            records: VecDeque::new(),
            batch_sample: None,
            batch_newest_prior_delivered: None,
            batch_app_limited: false,
            round: 0,
            next_round_delivered: 0,
            round_lost: 0,
            round_delivered_start: 0,
            bw_rounds: VecDeque::new(),
            min_rtt: Duration::ZERO,
            min_rtt_stamp: now,
            probe_rtt_until: None,
            probe_min: None,
        }
    }

    fn min_window_for(mtu: u64) -> u64 {
        4 * mtu
    }

    /// The bandwidth estimate: the largest sample of the last [`BW_FILTER_ROUNDS`] rounds.
    pub fn max_bw(&self) -> u64 {
        self.bw_rounds.iter().map(|&(_, bw)| bw).max().unwrap_or(0)
    }

    /// Whether Startup is over.
    pub fn past_startup(&self) -> bool {
        !self.in_startup
    }

    /// Whether ProbeRTT runs.
    pub fn probing_rtt(&self) -> bool {
        self.probe_rtt_until.is_some()
    }

    /// The minimum RTT the model uses.
    pub fn min_rtt(&self) -> Duration {
        self.min_rtt
    }

    fn model_window(&self) -> u64 {
        let bw = self.max_bw() as f64;
        if self.probe_rtt_until.is_some() {
            return (bw * PROBE_RTT_GAIN * self.min_rtt.as_secs_f64()) as u64;
        }
        let horizon = CWND_GAIN * self.min_rtt.as_secs_f64() + QUEUE_ALLOWANCE.as_secs_f64();
        (bw * horizon) as u64 + EXTRA_DATAGRAMS * self.mtu
    }

    fn add_bw_sample(&mut self, rate: u64) {
        match self.bw_rounds.back_mut() {
            Some((round, bw)) if *round == self.round => *bw = (*bw).max(rate),
            _ => self.bw_rounds.push_back((self.round, rate)),
        }
        while self
            .bw_rounds
            .front()
            .is_some_and(|&(round, _)| round + BW_FILTER_ROUNDS <= self.round)
        {
            self.bw_rounds.pop_front();
        }
    }

    fn record_for(&self, sent: Instant) -> Option<SentRecord> {
        let index = self.records.partition_point(|r| r.time < sent);
        self.records.get(index).filter(|r| r.time == sent).copied()
    }
}

impl Controller for ModelBbr {
    fn on_sent(&mut self, now: Instant, _bytes: u64, _last_packet_number: u64) {
        if self.records.back().is_some_and(|r| r.time == now) {
            return;
        }
        if self.records.len() >= MAX_RECORDS {
            self.records.pop_front();
        }
        self.records.push_back(SentRecord {
            time: now,
            delivered: self.delivered,
            delivered_time: self.delivered_time,
            first_sent_time: self.last_acked_sent_time,
        });
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        _rtt: &RttEstimator,
    ) {
        self.acknowledged(now, sent, bytes, app_limited);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        _in_flight: u64,
        app_limited: bool,
        _largest_packet_num_acked: Option<u64>,
    ) {
        self.end_of_acks(now, app_limited);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        _sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.round_lost += lost_bytes;
        if is_persistent_congestion {
            *self = ModelBbr {
                min_rtt: self.min_rtt,
                min_rtt_stamp: self.min_rtt_stamp,
                ..ModelBbr::new(self.initial_window, self.mtu as u16, now)
            };
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.initial_window = self.initial_window.max(Self::min_window_for(self.mtu));
    }

    fn window(&self) -> u64 {
        let floor = self.initial_window;
        if self.in_startup || self.max_bw() == 0 {
            return self.startup_cwnd.max(floor);
        }
        self.model_window().max(floor)
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut metrics = ControllerMetrics::default();
        metrics.congestion_window = self.window();
        metrics.pacing_rate = Some(self.max_bw() * 8);
        metrics
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.initial_window
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

impl ModelBbr {
    /// A packet sent at `sent` was acknowledged at `now` (quinn's `on_ack`).
    fn acknowledged(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool) {
        self.delivered += bytes;
        self.delivered_time = now;
        // The RTT sample (with the peer's ACK delay: the minimum over many is what counts).
        let sample = now.saturating_duration_since(sent);
        if let Some(least) = &mut self.probe_min {
            *least = (*least).min(sample);
        }
        if self.min_rtt.is_zero() || sample <= self.min_rtt {
            self.min_rtt = sample;
            self.min_rtt_stamp = now;
        }
        self.batch_app_limited |= app_limited;
        if self.in_startup && !app_limited {
            self.startup_cwnd += bytes;
        }
        if sent > self.last_acked_sent_time {
            self.last_acked_sent_time = sent;
        }
        let Some(record) = self.record_for(sent) else {
            return;
        };
        if self
            .batch_newest_prior_delivered
            .is_none_or(|prior| record.delivered >= prior)
        {
            self.batch_newest_prior_delivered = Some(record.delivered);
        }
        let send_elapsed = record
            .time
            .saturating_duration_since(record.first_sent_time);
        let ack_elapsed = now.saturating_duration_since(record.delivered_time);
        let interval = send_elapsed.max(ack_elapsed);
        // Shorter than the minimum RTT: ACK compression, not a rate (tcp_rate.c does the same).
        if interval.is_zero() || interval < self.min_rtt {
            return;
        }
        let rate = ((self.delivered - record.delivered) as f64 / interval.as_secs_f64()) as u64;
        if self
            .batch_sample
            .is_none_or(|s| record.delivered >= s.prior_delivered)
        {
            self.batch_sample = Some(Sample {
                rate,
                prior_delivered: record.delivered,
            });
        }
    }

    /// The end of one ACK frame's acknowledgements (quinn's `on_end_acks`).
    fn end_of_acks(&mut self, now: Instant, app_limited: bool) {
        // ProbeRTT (BBR): when no sample came near the minimum RTT for MIN_RTT_WINDOW, hold
        // the window at half a BDP for PROBE_RTT_TIME and take the least sample of that time
        // as the new minimum. Alone on a path, that drains this connection's queue and finds
        // the same minimum; next to flows that keep a queue standing (loss-based TCP), the
        // minimum grows to include their queue and the window with it, so this connection
        // keeps its share instead of shrinking to a BDP the path no longer has.
        match self.probe_rtt_until {
            Some(until) if now >= until => {
                if let Some(least) = self.probe_min.take().filter(|d| *d != Duration::MAX) {
                    self.min_rtt = least;
                }
                self.min_rtt_stamp = now;
                self.probe_rtt_until = None;
            }
            Some(_) => {}
            None if !self.in_startup
                && now.saturating_duration_since(self.min_rtt_stamp) > MIN_RTT_WINDOW =>
            {
                self.probe_rtt_until = Some(now + PROBE_RTT_TIME.max(self.min_rtt));
                self.probe_min = Some(Duration::MAX);
            }
            None => {}
        }
        let app_limited = app_limited || self.batch_app_limited;
        self.batch_app_limited = false;
        let round_start = self
            .batch_newest_prior_delivered
            .take()
            .is_some_and(|prior| prior >= self.next_round_delivered);
        if round_start {
            self.round += 1;
            self.next_round_delivered = self.delivered;
        }
        if let Some(sample) = self.batch_sample.take() {
            // An application-limited sample only counts where it shows more bandwidth.
            if !app_limited || sample.rate > self.max_bw() {
                self.add_bw_sample(sample.rate);
            }
        }
        if round_start {
            let delivered = self.delivered - self.round_delivered_start;
            let lossy =
                delivered > 0 && self.round_lost as f64 > STARTUP_LOSS_THRESHOLD * delivered as f64;
            self.round_lost = 0;
            self.round_delivered_start = self.delivered;
            if self.in_startup && !app_limited {
                let bw = self.max_bw();
                if bw as f64 >= self.full_bw as f64 * 1.25 {
                    self.full_bw = bw;
                    self.full_bw_rounds = 0;
                } else {
                    self.full_bw_rounds += 1;
                }
                if self.full_bw_rounds >= FULL_BW_ROUNDS || (lossy && bw > 0) {
                    self.in_startup = false;
                }
            }
        }
        // Drop records of packets that will not be acknowledged any more.
        let horizon = self.last_acked_sent_time.checked_sub(RECORD_HORIZON);
        while let (Some(front), Some(horizon)) = (self.records.front(), horizon) {
            if front.time >= horizon {
                break;
            }
            self.records.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTU: u64 = 1200;

    /// A bulk sender through one bottleneck: `rate` bytes/s, `rtt` propagation, a drop-tail
    /// queue of `queue` bytes, the controller's window bounding what is in flight and every
    /// packet acknowledged on its own. Returns (controller, delivered bytes, largest queue seen
    /// in the second half, packets dropped).
    fn simulate(rate: f64, rtt: Duration, queue: u64, seconds: f64) -> (ModelBbr, u64, u64, u64) {
        let start = Instant::now();
        let mut cc = ModelBbr::new(14720, MTU as u16, start);
        let serialize = Duration::from_secs_f64(MTU as f64 / rate);
        let mut now = start;
        let mut link_free = start;
        // (sent, acknowledged at, dropped)
        let mut in_flight: VecDeque<(Instant, Instant, bool)> = VecDeque::new();
        let mut delivered = 0;
        let mut dropped = 0;
        let mut max_queue = 0;
        let end = start + Duration::from_secs_f64(seconds);
        let mut packet = 0;
        while now < end {
            while (in_flight.len() as u64 + 1) * MTU <= cc.window() {
                packet += 1;
                cc.on_sent(now, MTU, packet);
                let queued = link_free.saturating_duration_since(now).as_secs_f64() * rate;
                if now > start + (end - start) / 2 {
                    max_queue = max_queue.max(queued as u64);
                }
                if queued as u64 + MTU > queue {
                    dropped += 1;
                    in_flight.push_back((now, now + rtt, true));
                } else {
                    link_free = link_free.max(now) + serialize;
                    in_flight.push_back((now, link_free + rtt, false));
                }
                // Distinct send times, as a real sender's clock gives.
                now += Duration::from_micros(1);
            }
            let (sent, acked_at, lost) = in_flight.pop_front().unwrap();
            now = now.max(acked_at);
            if lost {
                cc.on_congestion_event(now, sent, false, MTU);
            } else {
                delivered += MTU;
                cc.acknowledged(now, sent, MTU, false);
                cc.end_of_acks(now, false);
            }
        }
        (cc, delivered, max_queue, dropped)
    }

    #[test]
    fn the_window_settles_near_the_bdp_and_the_queue_stays_short() {
        // The HOL benchmark's link: 20 Mbit/s, 40 ms, 60 ms of queue (150 kB).
        let rate = 20e6 / 8.0;
        let rtt = Duration::from_millis(40);
        let (cc, delivered, max_queue, _) = simulate(rate, rtt, 150_000, 10.0);
        assert!(cc.past_startup());
        let bw = cc.max_bw() as f64;
        assert!(
            (0.9 * rate..=1.1 * rate).contains(&bw),
            "bandwidth estimate {bw}"
        );
        let bdp = rate * rtt.as_secs_f64();
        let window = cc.window() as f64;
        assert!(window < 1.6 * bdp, "window {window} against a BDP of {bdp}");
        // At most about a quarter of a BDP plus the allowance waits in the queue.
        assert!((max_queue as f64) < 0.5 * bdp, "queue {max_queue}");
        // And the link stays busy: over 85 % of it in 10 s, startup included.
        assert!(
            delivered as f64 > 0.85 * rate * 10.0,
            "delivered {delivered}"
        );
    }

    #[test]
    fn random_loss_does_not_shrink_the_model() {
        let start = Instant::now();
        let rtt = Duration::from_millis(40);
        let mut cc = ModelBbr::new(14720, MTU as u16, start);
        let (settled, ..) = simulate(20e6 / 8.0, rtt, 150_000, 5.0);
        let window = settled.window();
        cc.clone_from(&settled);
        for _ in 0..50 {
            cc.on_congestion_event(start, start, false, MTU);
        }
        assert_eq!(cc.window(), window);
        // Persistent congestion starts over from the initial window.
        cc.on_congestion_event(start, start, true, MTU);
        assert_eq!(cc.window(), 14720);
        assert!(!cc.past_startup());
    }

    #[test]
    fn probe_rtt_lets_the_minimum_rtt_grow_under_a_standing_queue() {
        // Settled alone on a 40 ms path, then another flow keeps 50 ms of queue standing.
        let rtt = Duration::from_millis(40);
        let (mut cc, ..) = simulate(20e6 / 8.0, rtt, 150_000, 3.0);
        assert!(cc.past_startup() && !cc.probing_rtt());
        let alone = cc.window();
        let mut now = cc.delivered_time;
        let mut packet = 1_000_000;
        // One datagram per 480 us: the link's 20 Mbit/s, now shared with the standing queue.
        let step = Duration::from_micros(480);
        let queued = Duration::from_millis(90);
        let mut probed = false;
        for _ in 0..((MIN_RTT_WINDOW + Duration::from_secs(2)).as_micros() / 480) {
            packet += 1;
            cc.on_sent(now, MTU, packet);
            now += step;
            // Every packet comes back after 90 ms (one sent 90 ms ago is acknowledged).
            // Without ProbeRTT the window would stay at the 40 ms BDP: 0.44 of what the path holds.
            let sent = now - queued;
            cc.on_sent(sent, MTU, packet);
            cc.acknowledged(now, sent, MTU, false);
            cc.end_of_acks(now, false);
            probed |= cc.probing_rtt();
            if probed && !cc.probing_rtt() {
                break;
            }
        }
        assert!(probed, "ProbeRTT never ran");
        assert_eq!(cc.min_rtt(), queued);
        assert!(cc.window() > alone, "{} <= {alone}", cc.window());
    }
}
