//! Simulcast layer choice for one (subscriber, video track): which of the publisher's layers the
//! subscriber gets, from its bandwidth estimate, its own cap and which layers are live, and when
//! to switch. It only decides: sequence numbers are the `Forwarder`'s, the VP8 descriptor the
//! `Vp8Rewriter`'s, and keyframe requests go out through the shard.

use std::time::{Duration, Instant};

use super::throttle::KeyframeThrottle;

/// The most layers one track may have (publishers send 2 or 3).
pub const MAX_LAYERS: usize = 4;

/// How many events wait for [`LayerSelector::poll_event`] before the oldest is lost.
const EVENT_CAPACITY: usize = 8;

/// An estimate-driven downswitch this soon after an upswitch means the upswitch failed: the
/// next upswitch waits twice as long (up to [`MAX_HOLD_BACKOFF`] doublings). An upswitch that
/// lasts this long resets the wait.
const FAILED_UPSWITCH_WINDOW: Duration = Duration::from_secs(10);

/// At most 2^2 = 4 times [`LayerSelectorConfig::upswitch_hold`].
const MAX_HOLD_BACKOFF: u32 = 2;

/// What the publisher sends on one simulcast layer. Layers are given ordered low to high; a
/// layer's index is its position (the shard keeps the index ↔ rid map).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerInfo {
    /// Frame width in pixels; 0 while unknown.
    pub width: u32,
    /// Frame height in pixels; 0 while unknown.
    pub height: u32,
    /// What the layer is expected to cost, in bits per second, until it is measured
    /// ([`LayerSelector::measured_bitrate`]).
    pub bitrate_bps: u64,
}

/// A simulcast track's layers as the publisher's shard sees them, ranked low to high: what every
/// subscriber's [`LayerSelector`] is told with [`set_layers`](LayerSelector::set_layers) and
/// [`layer_live`](LayerSelector::layer_live).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerTable {
    pub layers: [LayerInfo; MAX_LAYERS],
    pub count: u8,
    /// Bit `i`: layer `i` is live (received packets lately and is not paused).
    pub live: u8,
    /// The publisher's own, stable name for the layer at each index (its position in the offer).
    /// Ranks can change (sizes and bitrates become known); these say which layer moved where.
    pub ids: [u8; MAX_LAYERS],
}

impl LayerTable {
    /// Before anything is measured: `count` layers, all live, with the bitrates a browser's
    /// usual three layers (quarter, half and full 720p) take.
    pub fn assumed(count: usize) -> LayerTable {
        let count = count.min(MAX_LAYERS);
        let mut t = LayerTable {
            count: count as u8,
            live: ((1u16 << count) - 1) as u8,
            ids: std::array::from_fn(|i| i as u8),
            ..Default::default()
        };
        for i in 0..count {
            t.layers[i].bitrate_bps = typical_bps(count, i);
        }
        t
    }

    /// The layers, low to high.
    pub fn infos(&self) -> &[LayerInfo] {
        &self.layers[..usize::from(self.count).min(MAX_LAYERS)]
    }

    pub fn is_live(&self, index: usize) -> bool {
        index < MAX_LAYERS && self.live & (1 << index) != 0
    }

    /// Where each of `old`'s layers is in this table (by id); `None` for one that is gone.
    /// `None` overall when no layer moved.
    pub fn moved_from(&self, old: &LayerTable) -> Option<[Option<usize>; MAX_LAYERS]> {
        let (n_old, n_new) = (usize::from(old.count), usize::from(self.count));
        let ids = &self.ids[..n_new.min(MAX_LAYERS)];
        let mut moved = [None; MAX_LAYERS];
        let mut any = false;
        for (i, slot) in moved.iter_mut().enumerate().take(n_old.min(MAX_LAYERS)) {
            *slot = ids.iter().position(|&id| id == old.ids[i]);
            any |= *slot != Some(i);
        }
        any.then_some(moved)
    }

    /// Give a selector this table: the layers, then each one's liveness.
    pub fn apply(&self, selector: &mut LayerSelector, now: Instant) {
        selector.set_layers(self.infos(), now);
        for i in 0..self.infos().len() {
            selector.layer_live(i, self.is_live(i), now);
        }
    }
}

/// A subscriber's named quality cap (`?layer=low|mid|high`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quality {
    /// The lowest layer.
    Low,
    /// The middle layer of three; the lower of two.
    Mid,
    /// The highest layer.
    High,
}

impl Quality {
    /// `low`, `mid` or `high` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        [("low", Self::Low), ("mid", Self::Mid), ("high", Self::High)]
            .into_iter()
            .find(|(name, _)| s.eq_ignore_ascii_case(name))
            .map(|(_, q)| q)
    }
}

/// The subscriber's own cap: its named quality and/or the largest picture it wants. With both,
/// the lower wins. Without either, no cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MaxLayer {
    /// `?layer=`.
    pub quality: Option<Quality>,
    /// `?max_height=`: the highest layer whose short side (the height of a landscape picture)
    /// is at most this, or the lowest layer if none is. A layer whose size is still unknown
    /// does not count as fitting.
    pub max_height: Option<u32>,
}

/// Tuning of a [`LayerSelector`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSelectorConfig {
    /// Taken off the estimate before video gets any: audio is never sacrificed for video.
    pub audio_reserve_bps: u64,
    /// Switch down as soon as the video budget is below the layer's bitrate × this
    /// percentage (below the lowest layer's, see [`pause_hold`](Self::pause_hold)). The
    /// layer switched to is the highest the budget carries with the upswitch hysteresis
    /// (the lowest if none does): an estimate that just fell has shown the link is full, and a
    /// layer at the very edge of it would be dropped again, at the cost of a second keyframe.
    pub downswitch_margin_pct: u32,
    /// Pause video only once the budget has stayed below the lowest layer (by the margin
    /// above) this long, unbroken; meanwhile the lowest layer is forwarded. An estimate
    /// collapses for a moment after a loss burst (a keyframe or a probe through a full
    /// bottleneck queue) and recovers while media flows: blanking the picture on the first
    /// low sample leaves nothing to recover with but padding.
    pub pause_hold: Duration,
    /// Switch up (or resume) only once the video budget has stayed at or above the layer's
    /// bitrate × (100 + this) % for [`upswitch_hold`](Self::upswitch_hold).
    pub upswitch_hysteresis_pct: u32,
    /// See [`upswitch_hysteresis_pct`](Self::upswitch_hysteresis_pct). For one layer, doubled
    /// (up to four times) after each upswitch to it that the estimate undoes within 10 s; an
    /// upswitch to a higher layer, which needs a budget well above the one that failed, keeps
    /// its own hold.
    pub upswitch_hold: Duration,
    /// While a switch waits for a keyframe, ask again this often, per layer (zero: on every
    /// call of `poll_keyframe_request`).
    pub keyframe_interval: Duration,
}

impl Default for LayerSelectorConfig {
    fn default() -> Self {
        Self {
            audio_reserve_bps: 64_000,
            downswitch_margin_pct: 100,
            pause_hold: Duration::from_secs(2),
            upswitch_hysteresis_pct: 15,
            upswitch_hold: Duration::from_millis(2_500),
            keyframe_interval: Duration::from_millis(500),
        }
    }
}

/// What to do with one packet of the track for this subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerDecision {
    /// A packet of the layer being forwarded: through the forwarder (`Forwarder::decide`).
    Forward,
    /// Not for this subscriber.
    Drop,
    /// The keyframe the switch waited for: the forwarded layer is now this one. Forward it as a
    /// continuation of the same outgoing stream (`Forwarder::switch_layer`).
    SwitchAndForward,
}

/// Why the forwarded layer changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SwitchReason {
    /// The first layer forwarded.
    Start,
    /// The bandwidth estimate (or a layer's measured bitrate) moved.
    Estimate,
    /// The subscriber's cap changed (or the layers' sizes did).
    Cap,
    /// The layer being forwarded (or switched to) stopped.
    LayerDied,
    /// A layer came back.
    LayerBack,
    /// Video paused: even the lowest layer does not fit (`to` is `None`).
    Pause,
    /// Video resumed after a pause (`from` is `None`).
    Resume,
}

/// One change of the forwarded layer, for the log and the metrics (count by reason), and for
/// the room (`Pause`, `Resume`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchEvent {
    /// The layer forwarded before, if any.
    pub from: Option<usize>,
    /// The layer forwarded from now on; `None` when video paused.
    pub to: Option<usize>,
    /// Why.
    pub reason: SwitchReason,
    /// When it took effect.
    pub at: Instant,
}

/// What the subscriber's bandwidth estimator should aim for, for str0m's
/// `rtc.bwe().set_bitrate(minimum, desired)` (summed over the subscriber's video tracks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BweTargets {
    /// Enough for the next layer up (with hysteresis and the audio reserve), so padding and
    /// probes can show whether it fits; 0 at the cap.
    pub minimum_bps: u64,
    /// Enough for the highest layer the subscriber may get.
    pub desired_bps: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Layer {
    info: LayerInfo,
    measured_bps: u64,
    live: bool,
}

/// Chooses one subscriber's simulcast layer of one video track.
///
/// State, as in LiveKit: **max**, the highest layer the subscriber's cap allows; **target**,
/// what the cap, the bandwidth estimate and the live layers allow now; **current**, the layer
/// being forwarded. A new target is taken on a keyframe of that layer (never mid-GOP), asked for
/// through [`poll_keyframe_request`](Self::poll_keyframe_request); meanwhile the current layer
/// keeps flowing. Downswitches are immediate (the estimate call that drops below
/// the current layer's bitrate × margin sets the lower target); upswitches wait until the
/// estimate has stayed above the higher layer's bitrate × (1 + hysteresis) for the hold time.
/// When even the lowest layer has not fitted for [`LayerSelectorConfig::pause_hold`], video
/// pauses (audio keeps its reserve), and resumes by the same hysteresis.
///
/// # Call-order contract
///
/// 1. Create one per (subscriber, simulcast video track) with [`new`](Self::new); give it the
///    layers with [`set_layers`](Self::set_layers) (again whenever they change, e.g. when a
///    layer's size becomes known; when the same layers are ranked in a new order, call
///    [`reorder`](Self::reorder) first), the subscriber's cap with [`set_max`](Self::set_max), and
///    mark the layers the track already receives with [`layer_live`](Self::layer_live). Layers
///    start not live; a packet on a layer, or `layer_live(_, true)`, makes it live; only
///    `layer_live(_, false)` makes it dead.
/// 2. On every bandwidth estimate call [`estimate`](Self::estimate); on every measurement of
///    a layer's bitrate [`measured_bitrate`](Self::measured_bitrate). Without any estimate,
///    bandwidth does not limit the choice.
/// 3. For every packet of every layer of the track (primary streams, not RTX), call
///    [`on_packet`](Self::on_packet) and act on the [`LayerDecision`] before the next packet.
/// 4. After the calls of a loop turn, call [`poll_keyframe_request`](Self::poll_keyframe_request)
///    once (if it names a layer, ask the publisher for a keyframe on that layer's rid, through
///    the publisher's throttle) and drain [`poll_event`](Self::poll_event) (log, count, tell
///    the room). Keep
///    [`poll_timeout`](Self::poll_timeout) in the timer heap and call
///    [`handle_timeout`](Self::handle_timeout) when it fires; packets also advance time.
/// 5. `now` never goes backwards. Nothing here reads a clock, allocates, or panics.
#[derive(Debug, Clone)]
pub struct LayerSelector {
    cfg: LayerSelectorConfig,
    layers: [Layer; MAX_LAYERS],
    count: usize,
    max: MaxLayer,
    estimate: Option<u64>,
    paused: bool,
    target: Option<usize>,
    /// Why the target is what it is; reported when the switch to it happens.
    target_reason: SwitchReason,
    current: Option<usize>,
    /// Per layer: since when the budget has covered its bitrate × (1 + hysteresis), unbroken.
    comfortable_since: [Option<Instant>; MAX_LAYERS],
    /// Per layer: the upswitch hold to it is `upswitch_hold << hold_backoff[i]`.
    hold_backoff: [u32; MAX_LAYERS],
    /// The last upswitch decided by the estimate (when, and to which layer), while it may
    /// still fail.
    last_upswitch: Option<(Instant, usize)>,
    /// Since when the budget has not kept even the lowest layer, unbroken (see
    /// [`LayerSelectorConfig::pause_hold`]).
    short_since: Option<Instant>,
    /// When a hold completes: evaluate again then.
    wake_at: Option<Instant>,
    throttles: [KeyframeThrottle; MAX_LAYERS],
    events: [Option<SwitchEvent>; EVENT_CAPACITY],
    event_head: usize,
    event_len: usize,
    events_lost: u64,
    switches: u64,
    pauses: u64,
    keyframe_requests: u64,
}

impl LayerSelector {
    /// A selector with no layers yet, no cap and no estimate.
    pub fn new(cfg: LayerSelectorConfig) -> Self {
        Self {
            cfg,
            layers: [Layer::default(); MAX_LAYERS],
            count: 0,
            max: MaxLayer::default(),
            estimate: None,
            paused: false,
            target: None,
            target_reason: SwitchReason::Start,
            current: None,
            comfortable_since: [None; MAX_LAYERS],
            hold_backoff: [0; MAX_LAYERS],
            last_upswitch: None,
            short_since: None,
            wake_at: None,
            throttles: std::array::from_fn(|_| KeyframeThrottle::new(cfg.keyframe_interval)),
            events: [None; EVENT_CAPACITY],
            event_head: 0,
            event_len: 0,
            events_lost: 0,
            switches: 0,
            pauses: 0,
            keyframe_requests: 0,
        }
    }

    // ---- inputs ----

    /// What the publisher sends, low to high (at most [`MAX_LAYERS`]; more are ignored). A
    /// layer keeps its liveness and measured bitrate across calls while its index exists; if
    /// the layer being forwarded no longer exists, nothing is forwarded until the next switch.
    pub fn set_layers(&mut self, layers: &[LayerInfo], now: Instant) {
        let count = layers.len().min(MAX_LAYERS);
        for (i, info) in layers.iter().take(count).enumerate() {
            self.layers[i].info = *info;
        }
        for layer in &mut self.layers[count..] {
            *layer = Layer::default();
        }
        self.count = count;
        if self.current.is_some_and(|c| c >= count) {
            self.current = None;
        }
        if self.target.is_some_and(|t| t >= count) {
            self.target = None;
        }
        self.evaluate(now, SwitchReason::Cap);
    }

    /// The publisher's layers were ranked anew: the layer at index `i` is now at `moved[i]`
    /// (`None`: gone). What is known of each layer, and which layers are current and target,
    /// move with them, so a new ranking alone never changes the layer forwarded. Give the new
    /// infos with [`set_layers`](Self::set_layers) right after.
    pub fn reorder(&mut self, moved: &[Option<usize>; MAX_LAYERS]) {
        let to = |i: usize| moved[i].filter(|&j| j < MAX_LAYERS);
        let layers = std::mem::replace(&mut self.layers, [Layer::default(); MAX_LAYERS]);
        let comfortable = std::mem::replace(&mut self.comfortable_since, [None; MAX_LAYERS]);
        let throttles = self.throttles.clone();
        for i in 0..self.count {
            if let Some(j) = to(i) {
                self.layers[j] = layers[i];
                self.comfortable_since[j] = comfortable[i];
                self.throttles[j] = throttles[i].clone();
            }
        }
        self.current = self.current.and_then(to);
        self.target = self.target.and_then(to);
    }

    /// A layer stopped (str0m's `StreamPaused { paused: true }`, or no packets for a while) or
    /// came back.
    pub fn layer_live(&mut self, index: usize, live: bool, now: Instant) {
        let Some(layer) = self.layers[..self.count].get_mut(index) else {
            return;
        };
        if layer.live != live {
            layer.live = live;
            let reason = if live {
                SwitchReason::LayerBack
            } else {
                SwitchReason::LayerDied
            };
            self.evaluate(now, reason);
        }
    }

    /// The layer's measured bitrate; replaces [`LayerInfo::bitrate_bps`] in every decision
    /// (0 goes back to it).
    pub fn measured_bitrate(&mut self, index: usize, bps: u64, now: Instant) {
        if let Some(layer) = self.layers[..self.count].get_mut(index) {
            layer.measured_bps = bps;
            self.evaluate(now, SwitchReason::Estimate);
        }
    }

    /// The subscriber's cap.
    pub fn set_max(&mut self, max: MaxLayer, now: Instant) {
        self.max = max;
        self.evaluate(now, SwitchReason::Cap);
    }

    /// The subscriber's egress bandwidth estimate (its share, if it receives several video
    /// tracks), in bits per second, audio included.
    pub fn estimate(&mut self, bps: u64, now: Instant) {
        self.estimate = Some(bps);
        self.evaluate(now, SwitchReason::Estimate);
    }

    /// Decides one packet of layer `layer`; `keyframe` when it starts a keyframe.
    pub fn on_packet(&mut self, layer: usize, keyframe: bool, now: Instant) -> LayerDecision {
        if layer >= self.count {
            return LayerDecision::Drop;
        }
        if !self.layers[layer].live {
            self.layers[layer].live = true;
            self.evaluate(now, SwitchReason::LayerBack);
        } else {
            self.handle_timeout(now);
        }
        if self.paused {
            return LayerDecision::Drop;
        }
        if self.current == Some(layer) {
            return LayerDecision::Forward;
        }
        let Some(target) = self.target else {
            return LayerDecision::Drop;
        };
        // The target's keyframe; with nothing forwarded yet, any live layer up to the target
        // gives a first picture sooner (the switch up to the target follows).
        let takes = layer == target
            || (self.current.is_none() && layer < target && self.allowed() & (1 << layer) != 0);
        if !keyframe || !takes {
            return LayerDecision::Drop;
        }
        let from = self.current.replace(layer);
        if from.is_some() {
            self.switches += 1;
        }
        self.push_event(SwitchEvent {
            from,
            to: Some(layer),
            reason: self.target_reason,
            at: now,
        });
        LayerDecision::SwitchAndForward
    }

    /// Re-evaluates what waits on time (a completed upswitch or resume hold).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.wake_at.is_some_and(|w| now >= w) {
            self.evaluate(now, SwitchReason::Estimate);
        }
    }

    // ---- outputs ----

    /// A layer to ask the publisher for a keyframe on, now: the target, while a switch to it
    /// waits; at most once per `keyframe_interval` per layer, repeated while it waits. Call it
    /// once per loop turn (it answers one layer at most).
    pub fn poll_keyframe_request(&mut self, now: Instant) -> Option<usize> {
        self.handle_timeout(now);
        let t = self.keyframe_wanted()?;
        let throttle = &mut self.throttles[t];
        let send = if throttle.next_due().is_some() {
            throttle.poll(now)
        } else {
            throttle.request(now)
        };
        if !send {
            return None;
        }
        if !self.cfg.keyframe_interval.is_zero() {
            // Hold the retry: if this keyframe is lost, ask again one interval later.
            throttle.request(now);
        }
        self.keyframe_requests += 1;
        Some(t)
    }

    /// The next switch, pause or resume that took effect, oldest first.
    pub fn poll_event(&mut self) -> Option<SwitchEvent> {
        if self.event_len == 0 {
            return None;
        }
        let e = self.events[self.event_head].take();
        self.event_head = (self.event_head + 1) % EVENT_CAPACITY;
        self.event_len -= 1;
        e
    }

    /// When [`handle_timeout`](Self::handle_timeout) (or a keyframe request) is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let keyframe = self
            .keyframe_wanted()
            .and_then(|t| self.throttles[t].next_due());
        match (self.wake_at, keyframe) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What str0m's bandwidth estimator should aim for; `None` while no layer is live.
    pub fn bwe_targets(&self) -> Option<BweTargets> {
        let allowed = self.allowed();
        if allowed == 0 {
            return None;
        }
        let with_margin = |i: usize| {
            self.cost(i)
                .saturating_mul(100 + u64::from(self.cfg.upswitch_hysteresis_pct))
                / 100
                + self.cfg.audio_reserve_bps
        };
        let top = highest(allowed);
        let next = match (self.paused, self.target) {
            (false, Some(t)) => next_above(allowed, t),
            _ => Some(lowest(allowed)),
        };
        Some(BweTargets {
            minimum_bps: next.map_or(0, with_margin),
            desired_bps: with_margin(top),
        })
    }

    // ---- state ----

    /// The highest layer the subscriber's cap allows (max); `None` without layers.
    pub fn max(&self) -> Option<usize> {
        self.cap()
    }

    /// The layer wanted now (target); `None` while paused or before any choice.
    pub fn target(&self) -> Option<usize> {
        self.target
    }

    /// The layer being forwarded (current); `None` before the first keyframe and while paused.
    pub fn current(&self) -> Option<usize> {
        self.current
    }

    /// Whether video is paused because even the lowest layer does not fit the estimate.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Layer-to-layer switches so far (not counting start, pauses and resumes).
    pub fn switch_count(&self) -> u64 {
        self.switches
    }

    /// Pauses so far.
    pub fn pause_count(&self) -> u64 {
        self.pauses
    }

    /// Keyframe requests returned by `poll_keyframe_request` so far.
    pub fn keyframe_requests(&self) -> u64 {
        self.keyframe_requests
    }

    /// Events lost because `poll_event` was not drained (the oldest go first).
    pub fn events_lost(&self) -> u64 {
        self.events_lost
    }

    // ---- the decision ----

    fn evaluate(&mut self, now: Instant, cause: SwitchReason) {
        let budget = self.budget();
        for i in 0..self.count {
            if self.comfortable(i, budget) {
                self.comfortable_since[i].get_or_insert(now);
            } else {
                self.comfortable_since[i] = None;
            }
        }
        if let Some((t, to)) = self.last_upswitch {
            if now.saturating_duration_since(t) >= FAILED_UPSWITCH_WINDOW {
                // It lasted: that layer, and every layer below it, is held the base time again.
                self.last_upswitch = None;
                self.hold_backoff[..=to].fill(0);
            }
        }
        self.wake_at = None;
        let allowed = self.allowed();
        if allowed == 0 {
            // Nothing live to choose from: nothing to forward, and no bandwidth question.
            self.short_since = None;
            return;
        }
        let lowest = lowest(allowed);

        if self.paused {
            if self.held(lowest, now) {
                self.paused = false;
                let best = self.best_held(allowed, now).unwrap_or(lowest);
                self.target = Some(best);
                self.target_reason = SwitchReason::Resume;
            }
            self.schedule_wake(allowed, now);
            return;
        }
        if self.keeps(lowest, budget) {
            self.short_since = None;
        } else if now.saturating_duration_since(*self.short_since.get_or_insert(now))
            >= self.cfg.pause_hold
        {
            self.short_since = None;
            self.paused = true;
            self.pauses += 1;
            self.target = None;
            let from = self.current.take();
            self.push_event(SwitchEvent {
                from,
                to: None,
                reason: SwitchReason::Pause,
                at: now,
            });
            self.schedule_wake(allowed, now);
            return;
        }

        // The highest layer that fits right now (the lowest does).
        let fits_now = self
            .highest(self.count, allowed, |i| self.keeps(i, budget))
            .unwrap_or(lowest);
        // Until the first picture, nothing can oscillate: follow what fits, at what such layers
        // usually cost (see `start_cost`).
        let fits_at_start = || {
            let margin = self.cfg.downswitch_margin_pct;
            self.highest(self.count, allowed, |i| {
                carries(budget, self.start_cost(i), margin)
            })
            .unwrap_or(lowest)
        };
        let (target, reason) = match self.target {
            None => (fits_at_start(), SwitchReason::Start),
            Some(_) if self.current.is_none() && self.target_reason == SwitchReason::Start => {
                (fits_at_start(), SwitchReason::Start)
            }
            Some(t) if allowed & (1 << t) == 0 => (fits_now, cause),
            Some(t) if !self.keeps(t, budget) => {
                let failed = self
                    .last_upswitch
                    .filter(|&(u, _)| now.saturating_duration_since(u) < FAILED_UPSWITCH_WINDOW);
                if let (SwitchReason::Estimate, Some((_, to))) = (cause, failed) {
                    self.hold_backoff[to] = (self.hold_backoff[to] + 1).min(MAX_HOLD_BACKOFF);
                    self.last_upswitch = None;
                }
                let settles = self.highest(t, allowed, |i| self.comfortable(i, budget));
                (settles.unwrap_or(lowest), cause)
            }
            Some(t) => match self.best_held(allowed, now) {
                Some(up) if up > t => {
                    if cause == SwitchReason::Estimate {
                        self.last_upswitch = Some((now, up));
                    }
                    (up, cause)
                }
                _ => (t, self.target_reason),
            },
        };
        if self.target != Some(target) {
            self.target = Some(target);
            self.target_reason = reason;
        }
        self.schedule_wake(allowed, now);
    }

    /// Sets `wake_at` to when the next hold that could move us up, or pause us, completes.
    fn schedule_wake(&mut self, allowed: u8, now: Instant) {
        let above = match (self.paused, self.target) {
            (false, Some(t)) => t + 1,
            _ => 0,
        };
        self.wake_at = (above..self.count)
            .filter(|&i| allowed & (1 << i) != 0)
            .filter_map(|i| Some((i, self.comfortable_since[i]?)))
            .map(|(i, since)| since.checked_add(self.hold(i)).unwrap_or(since))
            .chain(
                self.short_since
                    .map(|since| since.checked_add(self.cfg.pause_hold).unwrap_or(since)),
            )
            .filter(|&at| at > now)
            .min();
    }

    /// The highest allowed layer whose comfort has lasted the hold.
    fn best_held(&self, allowed: u8, now: Instant) -> Option<usize> {
        self.highest(self.count, allowed, |i| self.held(i, now))
    }

    /// The highest layer below `below` that `allowed` has and `fits` accepts.
    fn highest(&self, below: usize, allowed: u8, fits: impl Fn(usize) -> bool) -> Option<usize> {
        (0..below.min(self.count))
            .rev()
            .find(|&i| allowed & (1 << i) != 0 && fits(i))
    }

    fn held(&self, i: usize, now: Instant) -> bool {
        let hold = self.hold(i);
        self.comfortable_since[i].is_some_and(|since| now.saturating_duration_since(since) >= hold)
    }

    /// How long layer `i` must stay comfortable before an upswitch (or a resume) to it.
    fn hold(&self, i: usize) -> Duration {
        self.cfg.upswitch_hold * (1 << self.hold_backoff[i])
    }

    /// The target, while a switch to it waits for a keyframe.
    fn keyframe_wanted(&self) -> Option<usize> {
        let t = self.target.filter(|_| !self.paused)?;
        (self.current != Some(t) && self.layers[t].live).then_some(t)
    }

    /// Bits per second left for video; `None` (no limit) before the first estimate.
    fn budget(&self) -> Option<u64> {
        self.estimate
            .map(|e| e.saturating_sub(self.cfg.audio_reserve_bps))
    }

    fn cost(&self, i: usize) -> u64 {
        let l = &self.layers[i];
        if l.measured_bps > 0 {
            l.measured_bps
        } else {
            l.info.bitrate_bps
        }
    }

    /// What layer `i` is taken to cost for the first picture: at least what the layer of its
    /// rank usually takes ([`LayerTable::assumed`]). A publisher's upper layers are thin while
    /// its encoder ramps up from its own low starting estimate, and a start on a layer that only
    /// looked cheap sends that layer's keyframe into a link that cannot carry it.
    fn start_cost(&self, i: usize) -> u64 {
        self.cost(i).max(typical_bps(self.count, i))
    }

    /// The budget still carries layer `i`: no reason to leave it.
    fn keeps(&self, i: usize, budget: Option<u64>) -> bool {
        carries(budget, self.cost(i), self.cfg.downswitch_margin_pct)
    }

    /// The budget carries layer `i` with hysteresis to spare.
    fn comfortable(&self, i: usize, budget: Option<u64>) -> bool {
        carries(budget, self.cost(i), 100 + self.cfg.upswitch_hysteresis_pct)
    }

    /// The highest layer the cap allows.
    fn cap(&self) -> Option<usize> {
        let top = self.count.checked_sub(1)?;
        let mut cap = top;
        if let Some(q) = self.max.quality {
            cap = cap.min(match q {
                Quality::Low => 0,
                Quality::Mid => top / 2,
                Quality::High => top,
            });
        }
        if let Some(max_height) = self.max.max_height {
            let fits = (0..self.count).rev().find(|&i| {
                let LayerInfo { width, height, .. } = self.layers[i].info;
                width > 0 && height > 0 && width.min(height) <= max_height
            });
            cap = cap.min(fits.unwrap_or(0));
        }
        Some(cap)
    }

    /// Bit `i` set: layer `i` may be chosen. The live layers up to the cap; if none is live,
    /// the lowest live layer above it (a picture beats none).
    fn allowed(&self) -> u8 {
        let Some(cap) = self.cap() else {
            return 0;
        };
        let live = |i: &usize| self.layers[*i].live;
        let below = (0..=cap).filter(live).fold(0u8, |m, i| m | 1 << i);
        if below != 0 {
            return below;
        }
        (cap + 1..self.count).find(live).map_or(0, |i| 1 << i)
    }

    fn push_event(&mut self, e: SwitchEvent) {
        if self.event_len == EVENT_CAPACITY {
            self.event_head = (self.event_head + 1) % EVENT_CAPACITY;
            self.event_len -= 1;
            self.events_lost += 1;
        }
        let slot = (self.event_head + self.event_len) % EVENT_CAPACITY;
        self.events[slot] = Some(e);
        self.event_len += 1;
    }
}

/// What layer `i` of `count` usually costs: a browser's usual three layers (quarter, half and
/// full 720p) take 150, 500 and 1,500 kbit/s; with fewer layers the top ones, with a fourth
/// 3 Mbit/s.
fn typical_bps(count: usize, i: usize) -> u64 {
    const TYPICAL_BPS: [u64; MAX_LAYERS] = [150_000, 500_000, 1_500_000, 3_000_000];
    let skip = 3_usize.saturating_sub(count);
    TYPICAL_BPS[(i + skip).min(MAX_LAYERS - 1)]
}

/// `budget` (none: no limit) covers `cost` × `pct` %.
fn carries(budget: Option<u64>, cost: u64, pct: u32) -> bool {
    let need = cost.saturating_mul(u64::from(pct));
    budget.is_none_or(|b| b.saturating_mul(100) >= need)
}

fn lowest(mask: u8) -> usize {
    mask.trailing_zeros() as usize
}

fn highest(mask: u8) -> usize {
    7 - mask.leading_zeros() as usize
}

fn next_above(mask: u8, i: usize) -> Option<usize> {
    let above = mask & !((2u8 << i) - 1);
    (above != 0).then(|| lowest(above))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: Duration = Duration::from_millis(33);
    /// How long the simulated publisher takes to answer a keyframe request.
    const KEYFRAME_DELAY: Duration = Duration::from_millis(100);

    const LAYERS: [LayerInfo; 3] = [
        LayerInfo {
            width: 320,
            height: 180,
            bitrate_bps: 150_000,
        },
        LayerInfo {
            width: 640,
            height: 360,
            bitrate_bps: 500_000,
        },
        LayerInfo {
            width: 1280,
            height: 720,
            bitrate_bps: 1_500_000,
        },
    ];

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[derive(Debug, Clone, Copy)]
    struct Pkt {
        at: Instant,
        layer: usize,
        frame: u64,
        first: bool,
        key: bool,
        decision: LayerDecision,
    }

    /// A publisher sending three layers at 30 fps (two packets per frame per layer) that
    /// answers keyframe requests after [`KEYFRAME_DELAY`], and a shard driving one selector as
    /// the call-order contract says, with the estimate from a scripted trace.
    struct Sim {
        sel: LayerSelector,
        t0: Instant,
        frame: u64,
        sending: [bool; 3],
        answer_keyframes: bool,
        keyframe_due: [Option<Instant>; 3],
        last_estimate: Option<u64>,
        /// (when, estimate, target right after it was given)
        targets: Vec<(Duration, u64, Option<usize>)>,
        events: Vec<SwitchEvent>,
        requests: Vec<(Duration, usize)>,
        packets: Vec<Pkt>,
    }

    impl Sim {
        fn new(max: MaxLayer) -> Self {
            Self::with(LayerSelectorConfig::default(), max)
        }

        fn with(cfg: LayerSelectorConfig, max: MaxLayer) -> Self {
            let t0 = Instant::now();
            let mut sel = LayerSelector::new(cfg);
            sel.set_layers(&LAYERS, t0);
            sel.set_max(max, t0);
            for i in 0..3 {
                sel.layer_live(i, true, t0);
            }
            Self {
                sel,
                t0,
                frame: 0,
                sending: [true; 3],
                answer_keyframes: true,
                keyframe_due: [None; 3],
                last_estimate: None,
                targets: Vec::new(),
                events: Vec::new(),
                requests: Vec::new(),
                packets: Vec::new(),
            }
        }

        fn now(&self) -> Instant {
            self.t0 + FRAME * self.frame as u32
        }

        fn elapsed(&self) -> Duration {
            self.now() - self.t0
        }

        /// Runs frame by frame until `until`; the estimate is `trace(elapsed)`, given whenever
        /// it changes (as str0m reports it).
        fn run(&mut self, until: Duration, trace: impl Fn(Duration) -> u64) {
            while self.elapsed() < until {
                let now = self.now();
                let elapsed = self.elapsed();
                let e = trace(elapsed);
                if self.last_estimate != Some(e) {
                    self.sel.estimate(e, now);
                    self.last_estimate = Some(e);
                    self.targets.push((elapsed, e, self.sel.target()));
                }
                for layer in 0..3 {
                    if !self.sending[layer] {
                        continue;
                    }
                    let key = self.keyframe_due[layer].is_some_and(|due| now >= due);
                    if key {
                        self.keyframe_due[layer] = None;
                    }
                    for first in [true, false] {
                        let decision = self.sel.on_packet(layer, key && first, now);
                        if decision == LayerDecision::SwitchAndForward {
                            assert!(key && first, "switch only on a keyframe start");
                            assert_eq!(self.sel.current(), Some(layer));
                        }
                        self.packets.push(Pkt {
                            at: now,
                            layer,
                            frame: self.frame,
                            first,
                            key: key && first,
                            decision,
                        });
                    }
                }
                if let Some(layer) = self.sel.poll_keyframe_request(now) {
                    self.requests.push((elapsed, layer));
                    if self.answer_keyframes {
                        self.keyframe_due[layer].get_or_insert(now + KEYFRAME_DELAY);
                    }
                }
                while let Some(e) = self.sel.poll_event() {
                    self.events.push(e);
                }
                self.frame += 1;
            }
        }

        /// The layer forwarded in the frame at `at` (the last one, if a switch happened in it).
        fn forwarded_at(&self, at: Duration) -> Option<usize> {
            let frame = (at.as_nanos() / FRAME.as_nanos()) as u64;
            self.packets
                .iter()
                .filter(|p| p.frame == frame && p.decision != LayerDecision::Drop)
                .map(|p| p.layer)
                .next_back()
        }

        /// Every frame from `from` to the end forwards exactly `layer`.
        fn assert_forwarding_from(&self, from: Duration, layer: Option<usize>) {
            let first = (from.as_nanos() / FRAME.as_nanos()) as u64;
            for f in first..self.frame {
                let at = FRAME * f as u32;
                assert_eq!(self.forwarded_at(at), layer, "frame {f} at {at:?}");
            }
        }

        /// The switch events as (from, to, reason, when).
        fn switches(&self) -> Vec<(Option<usize>, Option<usize>, SwitchReason, Duration)> {
            self.events
                .iter()
                .map(|e| (e.from, e.to, e.reason, e.at - self.t0))
                .collect()
        }

        /// The switch events as (from, to).
        fn switched(&self) -> Vec<(Option<usize>, Option<usize>)> {
            self.events.iter().map(|e| (e.from, e.to)).collect()
        }

        fn request_layers(&self) -> Vec<usize> {
            self.requests.iter().map(|r| r.1).collect()
        }
    }

    fn step(at: Duration, before: u64, after: u64) -> impl Fn(Duration) -> u64 {
        move |t| if t < at { before } else { after }
    }

    fn start_on(sim: &Sim, layer: usize) {
        let (from, to, reason, at) = sim.switches()[0];
        assert_eq!((from, to, reason), (None, Some(layer), SwitchReason::Start));
        assert!(
            at <= FRAME * 5,
            "first picture within one keyframe delay: {at:?}"
        );
    }

    #[test]
    fn step_down_switches_on_the_first_lower_keyframe() {
        let mut sim = Sim::new(MaxLayer::default());
        sim.run(secs(20.0), step(secs(10.0), 3_000_000, 800_000));

        start_on(&sim, 2);
        // The estimate call that dropped below high's bitrate set the new target.
        let drop = sim.targets.iter().find(|t| t.1 == 800_000).unwrap();
        assert_eq!(drop.2, Some(1), "target moves within one decision");
        let s = sim.switches();
        assert_eq!(s.len(), 2);
        let (from, to, reason, at) = s[1];
        assert_eq!(
            (from, to, reason),
            (Some(2), Some(1), SwitchReason::Estimate)
        );
        assert!(at > secs(10.0) && at < secs(10.0) + KEYFRAME_DELAY + 2 * FRAME);
        // High flows until the mid keyframe arrives: no freeze.
        assert_eq!(sim.forwarded_at(secs(10.05)), Some(2));
        sim.assert_forwarding_from(at + FRAME, Some(1));
        assert_eq!(sim.sel.switch_count(), 1);
        assert_eq!(sim.request_layers(), [2, 1]);
        assert_eq!(sim.sel.keyframe_requests(), 2);
    }

    #[test]
    fn step_up_waits_for_the_hold_then_switches() {
        let mut sim = Sim::new(MaxLayer::default());
        sim.run(secs(20.0), step(secs(10.0), 800_000, 3_000_000));

        start_on(&sim, 1);
        assert_eq!(sim.forwarded_at(secs(12.4)), Some(1), "held back for 2.5 s");
        let s = sim.switches();
        assert_eq!(s.len(), 2);
        let (from, to, reason, at) = s[1];
        assert_eq!(
            (from, to, reason),
            (Some(1), Some(2), SwitchReason::Estimate)
        );
        // The estimate came with the frame at 10.032 s; the keyframe with the fourth frame
        // after the request.
        assert!(
            at >= secs(12.5) && at < secs(12.532) + KEYFRAME_DELAY + 2 * FRAME,
            "{at:?}"
        );
        sim.assert_forwarding_from(at + FRAME, Some(2));
        assert_eq!(sim.sel.switch_count(), 1);
        assert_eq!(sim.request_layers(), [1, 2]);
    }

    #[test]
    fn step_up_skips_a_layer_when_the_estimate_allows() {
        // 300 kbit/s: low only (236k for video). Then plenty: straight to high.
        let mut sim = Sim::new(MaxLayer::default());
        sim.run(secs(10.0), step(secs(5.0), 300_000, 5_000_000));
        start_on(&sim, 0);
        let s = sim.switches();
        assert_eq!(s.len(), 2);
        assert_eq!((s[1].0, s[1].1), (Some(0), Some(2)));
        assert_eq!(sim.request_layers(), [0, 2]);
    }

    #[test]
    fn sawtooth_faster_than_the_hold_does_not_oscillate() {
        // One second at 2.2 Mbit/s (high fits with hysteresis), one at 1.2 (only mid fits).
        let mut sim = Sim::new(MaxLayer::default());
        let saw = |t: Duration| {
            if (t.as_millis() / 1000).is_multiple_of(2) {
                2_200_000
            } else {
                1_200_000
            }
        };
        sim.run(secs(60.0), saw);
        start_on(&sim, 2);
        let s = sim.switches();
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!((s[1].0, s[1].1), (Some(2), Some(1)));
        sim.assert_forwarding_from(secs(1.3), Some(1));
        assert_eq!(sim.sel.switch_count(), 1);
        assert_eq!(sim.request_layers(), [2, 1]);
    }

    #[test]
    fn sawtooth_slower_than_the_hold_backs_off_after_a_failed_upswitch() {
        // 3.5 s comfortable for high, then 1 s below it, over and over.
        let mut sim = Sim::new(MaxLayer::default());
        let saw = |t: Duration| {
            if t.as_millis() % 4500 < 3500 {
                2_200_000
            } else {
                1_200_000
            }
        };
        sim.run(secs(60.0), saw);
        let s = sim.switches();
        // Down at 3.5 s, up once after the 2.5 s hold (7.0 s), down again at 8.0 s: that
        // upswitch failed, so the hold is now 5 s, longer than any comfortable stretch.
        assert_eq!(
            sim.switched(),
            [
                (None, Some(2)),
                (Some(2), Some(1)),
                (Some(1), Some(2)),
                (Some(2), Some(1))
            ]
        );
        assert!(s[2].3 >= secs(7.0) && s[2].3 < secs(7.3), "{:?}", s[2].3);
        assert!(s[3].3 >= secs(8.0) && s[3].3 < secs(8.3), "{:?}", s[3].3);
        assert_eq!(sim.sel.switch_count(), 3);
        assert_eq!(sim.request_layers(), [2, 1, 2, 1]);
    }

    #[test]
    fn backoff_resets_after_an_upswitch_that_lasts() {
        let mut sim = Sim::new(MaxLayer::default());
        // Fail once (up at 7.0, down at 8.0), then stay comfortable: up after 5 s, not 2.5.
        let trace = |t: Duration| {
            let t = t.as_secs_f64();
            if t < 3.5 || (4.5..8.0).contains(&t) || t >= 9.0 {
                2_200_000
            } else {
                1_200_000
            }
        };
        sim.run(secs(40.0), trace);
        let s = sim.switches();
        assert_eq!(s.len(), 5, "{s:?}");
        assert!(
            s[4].3 >= secs(14.0) && s[4].3 < secs(14.3),
            "hold doubled: {:?}",
            s[4].3
        );
        // That one lasted: a new dip and recovery is held 2.5 s again.
        let trace2 = move |t: Duration| {
            let t2 = t.as_secs_f64();
            if (40.0..41.0).contains(&t2) {
                1_200_000
            } else {
                trace(t)
            }
        };
        sim.run(secs(50.0), trace2);
        let s = sim.switches();
        assert_eq!(s.len(), 7, "{s:?}");
        assert!(s[6].3 >= secs(43.5) && s[6].3 < secs(43.8), "{:?}", s[6].3);
    }

    #[test]
    fn a_downswitch_lands_where_the_budget_has_room_to_spare() {
        // 600 kbit/s leaves 536 for video: mid (500) would just fit, with no room for the
        // hysteresis (575). The estimate has just shown the link is full, so down to low,
        // and up to mid only once the budget carries it with the hysteresis, after the hold.
        let mut sim = Sim::new(MaxLayer::default());
        let trace = |t: Duration| match t.as_secs_f64() {
            t if t < 5.0 => 3_000_000,
            t if t < 15.0 => 600_000,
            _ => 700_000,
        };
        sim.run(secs(25.0), trace);
        start_on(&sim, 2);
        let s = sim.switches();
        assert_eq!(
            sim.switched(),
            [(None, Some(2)), (Some(2), Some(0)), (Some(0), Some(1))]
        );
        assert!(s[1].3 >= secs(5.0) && s[1].3 < secs(5.3), "{:?}", s[1].3);
        assert!(s[2].3 >= secs(17.5) && s[2].3 < secs(17.8), "{:?}", s[2].3);
        sim.assert_forwarding_from(s[2].3 + FRAME, Some(1));
        assert_eq!(sim.request_layers(), [2, 0, 1]);
    }

    #[test]
    fn the_first_picture_is_not_chosen_on_a_thin_top_layer() {
        // The publisher's encoder is still ramping: every layer measures cheap. At 600 kbit/s
        // high would "fit" (536 for video), but a 720p layer usually takes 1.5 Mbit/s: start
        // on mid. Once the picture flows, the measurements count, and high follows the hold.
        let mut sim = Sim::new(MaxLayer::default());
        for (i, bps) in [100_000, 250_000, 300_000].into_iter().enumerate() {
            sim.sel.measured_bitrate(i, bps, sim.t0);
        }
        sim.run(secs(6.0), |_| 600_000);
        start_on(&sim, 1);
        let s = sim.switches();
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!((s[1].0, s[1].1), (Some(1), Some(2)));
        assert!(s[1].3 >= secs(2.5) && s[1].3 < secs(2.8), "{:?}", s[1].3);
        // With nothing measured, the typical bitrates are the costs: the same start.
        let mut sim = Sim::new(MaxLayer::default());
        sim.run(secs(1.0), |_| 3_000_000);
        start_on(&sim, 2);
    }

    #[test]
    fn a_failed_upswitch_holds_back_only_that_layer() {
        // Low, up to mid after the hold (at 7.5 s), and back to low at 8.0 s: mid's hold is now
        // 5 s. At 10 s the estimate jumps far above mid's: high is held its own 2.5 s.
        let mut sim = Sim::new(MaxLayer::default());
        let trace = |t: Duration| match t.as_secs_f64() {
            t if t < 1.0 => 3_000_000,
            t if t < 5.0 => 400_000,
            t if t < 8.0 => 700_000,
            t if t < 10.0 => 400_000,
            _ => 3_000_000,
        };
        sim.run(secs(20.0), trace);
        let s = sim.switches();
        assert_eq!(
            sim.switched(),
            [
                (None, Some(2)),
                (Some(2), Some(0)),
                (Some(0), Some(1)),
                (Some(1), Some(0)),
                (Some(0), Some(2))
            ]
        );
        assert!(s[2].3 >= secs(7.5) && s[2].3 < secs(7.8), "{:?}", s[2].3);
        assert!(s[4].3 >= secs(12.5) && s[4].3 < secs(12.8), "{:?}", s[4].3);
        // Mid itself still waits twice the hold after that failure.
        let mut sim = Sim::new(MaxLayer::default());
        let trace = move |t: Duration| {
            if t.as_secs_f64() < 10.0 {
                trace(t)
            } else {
                700_000
            }
        };
        sim.run(secs(20.0), trace);
        let s = sim.switches();
        assert_eq!(s.len(), 5, "{s:?}");
        assert_eq!((s[4].0, s[4].1), (Some(0), Some(1)));
        assert!(s[4].3 >= secs(15.0) && s[4].3 < secs(15.3), "{:?}", s[4].3);
    }

    #[test]
    fn reorder_moves_what_is_known_with_each_layer() {
        let t = Instant::now();
        let mut sel = LayerSelector::new(LayerSelectorConfig::default());
        // Published as [h, q, f] by some measure, then ranked [q, h, f].
        let old = LayerTable {
            layers: [LAYERS[1], LAYERS[0], LAYERS[2], LayerInfo::default()],
            count: 3,
            live: 0b011,
            ids: [1, 0, 2, 3],
        };
        old.apply(&mut sel, t);
        sel.measured_bitrate(0, 480_000, t);
        // Forwarding index 0 (h).
        assert_eq!(sel.on_packet(0, true, t), LayerDecision::SwitchAndForward);
        let new = LayerTable {
            layers: [LAYERS[0], LAYERS[1], LAYERS[2], LayerInfo::default()],
            ids: [0, 1, 2, 3],
            ..old
        };
        let moved = new.moved_from(&old).expect("layers moved");
        assert_eq!(&moved[..3], &[Some(1), Some(0), Some(2)]);
        assert_eq!(new.moved_from(&new), None);
        sel.reorder(&moved);
        new.apply(&mut sel, t);
        assert_eq!(sel.current(), Some(1), "still h");
        assert_eq!(sel.layers[1].measured_bps, 480_000);
        assert_eq!(sel.on_packet(1, false, t), LayerDecision::Forward);
        assert_eq!(sel.on_packet(0, false, t), LayerDecision::Drop);
    }

    #[test]
    fn layer_dying_and_coming_back() {
        let mut sim = Sim::new(MaxLayer::default());
        let plenty = |_| 3_000_000;
        sim.run(secs(5.0), plenty);
        start_on(&sim, 2);

        // High stops (str0m's StreamPaused).
        sim.sending[2] = false;
        let now = sim.now();
        sim.sel.layer_live(2, false, now);
        assert_eq!(sim.sel.target(), Some(1));
        sim.run(secs(10.0), plenty);
        let s = sim.switches();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[1].0, s[1].1, s[1].2),
            (Some(2), Some(1), SwitchReason::LayerDied)
        );
        assert!(s[1].3 < secs(5.0) + KEYFRAME_DELAY + 2 * FRAME);
        sim.assert_forwarding_from(s[1].3, Some(1));

        // High comes back: its first packet says so. The estimate has been comfortable all
        // along, so no hold: switch on its next keyframe.
        sim.sending[2] = true;
        sim.run(secs(15.0), plenty);
        let s = sim.switches();
        assert_eq!(s.len(), 3);
        assert_eq!(
            (s[2].0, s[2].1, s[2].2),
            (Some(1), Some(2), SwitchReason::LayerBack)
        );
        assert!(s[2].3 < secs(10.0) + KEYFRAME_DELAY + 2 * FRAME);
        sim.assert_forwarding_from(s[2].3 + FRAME, Some(2));
        assert_eq!(sim.sel.switch_count(), 2);
        assert_eq!(sim.request_layers(), [2, 1, 2]);
    }

    #[test]
    fn every_layer_dead_forwards_nothing_and_asks_nothing() {
        let mut sim = Sim::new(MaxLayer::default());
        sim.run(secs(2.0), |_| 3_000_000);
        sim.sending = [false; 3];
        let now = sim.now();
        for i in 0..3 {
            sim.sel.layer_live(i, false, now);
        }
        sim.run(secs(10.0), |_| 3_000_000);
        assert_eq!(sim.request_layers(), [2]);
        assert!(!sim.sel.paused());
        assert_eq!(sim.sel.bwe_targets(), None);
        // The publisher is back on low only.
        sim.sending[0] = true;
        sim.run(secs(12.0), |_| 3_000_000);
        let s = sim.switches();
        assert_eq!(
            (s[1].0, s[1].1, s[1].2),
            (Some(2), Some(0), SwitchReason::LayerBack)
        );
    }

    #[test]
    fn subscriber_cap_layer_low_then_lifted() {
        let low = MaxLayer {
            quality: Some(Quality::Low),
            max_height: None,
        };
        let mut sim = Sim::new(low);
        sim.run(secs(5.0), |_| 3_000_000);
        assert_eq!(sim.sel.max(), Some(0));
        start_on(&sim, 0);
        sim.assert_forwarding_from(secs(0.2), Some(0));

        let now = sim.now();
        sim.sel.set_max(MaxLayer::default(), now);
        assert_eq!(sim.sel.target(), Some(2), "comfortable for long: no hold");
        sim.run(secs(10.0), |_| 3_000_000);
        let s = sim.switches();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[1].0, s[1].1, s[1].2),
            (Some(0), Some(2), SwitchReason::Cap)
        );
        assert_eq!(sim.sel.switch_count(), 1);
        assert_eq!(sim.request_layers(), [0, 2]);
    }

    #[test]
    fn subscriber_cap_layer_mid_and_lowered_mid_stream() {
        let mid = MaxLayer {
            quality: Some(Quality::Mid),
            max_height: None,
        };
        let mut sim = Sim::new(mid);
        sim.run(secs(3.0), |_| 3_000_000);
        start_on(&sim, 1);
        let now = sim.now();
        sim.sel.set_max(
            MaxLayer {
                quality: Some(Quality::Low),
                max_height: None,
            },
            now,
        );
        sim.run(secs(6.0), |_| 3_000_000);
        let s = sim.switches();
        assert_eq!(
            (s[1].0, s[1].1, s[1].2),
            (Some(1), Some(0), SwitchReason::Cap)
        );
        assert_eq!(sim.sel.switch_count(), 1);
    }

    #[test]
    fn subscriber_cap_max_height_360_gets_640x360() {
        let cap = |h| MaxLayer {
            quality: None,
            max_height: Some(h),
        };
        let mut sim = Sim::new(cap(360));
        sim.run(secs(5.0), |_| 3_000_000);
        assert_eq!(sim.sel.max(), Some(1));
        start_on(&sim, 1);
        sim.assert_forwarding_from(secs(0.2), Some(1));
        assert_eq!(sim.request_layers(), [1]);

        let mut s = LayerSelector::new(LayerSelectorConfig::default());
        let t = Instant::now();
        s.set_layers(&LAYERS, t);
        for (h, want) in [
            (100, 0),
            (180, 0),
            (359, 0),
            (360, 1),
            (719, 1),
            (720, 2),
            (2160, 2),
        ] {
            s.set_max(cap(h), t);
            assert_eq!(s.max(), Some(want), "max_height={h}");
        }
        // With ?layer= too, the lower wins.
        s.set_max(
            MaxLayer {
                quality: Some(Quality::Low),
                max_height: Some(720),
            },
            t,
        );
        assert_eq!(s.max(), Some(0));
        // Portrait: the short side counts.
        let portrait = LAYERS.map(|l| LayerInfo {
            width: l.height,
            height: l.width,
            ..l
        });
        s.set_layers(&portrait, t);
        s.set_max(cap(360), t);
        assert_eq!(s.max(), Some(1));
    }

    #[test]
    fn max_height_waits_for_layer_sizes() {
        let unknown = LAYERS.map(|l| LayerInfo {
            width: 0,
            height: 0,
            ..l
        });
        let t = Instant::now();
        let mut s = LayerSelector::new(LayerSelectorConfig::default());
        s.set_layers(&unknown, t);
        s.set_max(
            MaxLayer {
                quality: None,
                max_height: Some(360),
            },
            t,
        );
        assert_eq!(s.max(), Some(0), "unknown sizes do not fit");
        for i in 0..3 {
            s.layer_live(i, true, t);
        }
        s.estimate(3_000_000, t);
        assert_eq!(s.target(), Some(0));
        // The shard read the sizes from each layer's keyframe (vp8::keyframe_size).
        s.set_layers(&LAYERS, t + ms(500));
        assert_eq!((s.max(), s.target()), (Some(1), Some(1)));
    }

    #[test]
    fn pause_below_the_lowest_layer_waits_the_hold_keeps_audio_and_resumes_with_hysteresis() {
        let trace = |t: Duration| match t.as_secs() {
            0..5 => 1_000_000,
            // Above low's 150 kbit/s, but not once audio's 64 kbit/s are kept.
            5..10 => 200_000,
            // 166k for video: low fits, but not with the hysteresis (172.5k).
            10..15 => 230_000,
            _ => 300_000,
        };
        let mut sim = Sim::new(MaxLayer::default());
        sim.run(secs(25.0), trace);
        let s = sim.switches();
        assert_eq!(s.len(), 4, "{s:?}");
        start_on(&sim, 1);
        // Down to the lowest layer at once; paused only once it has not fitted for the hold.
        assert_eq!(
            (s[1].0, s[1].1, s[1].2),
            (Some(1), Some(0), SwitchReason::Estimate)
        );
        assert!(s[1].3 >= secs(5.0) && s[1].3 < secs(5.0) + KEYFRAME_DELAY + 2 * FRAME);
        assert_eq!(
            (s[2].0, s[2].1, s[2].2),
            (Some(0), None, SwitchReason::Pause)
        );
        assert!(s[2].3 >= secs(7.0) && s[2].3 < secs(7.0) + FRAME);
        assert_eq!(sim.forwarded_at(secs(6.5)), Some(0));
        assert_eq!(
            (s[3].0, s[3].1, s[3].2),
            (None, Some(0), SwitchReason::Resume)
        );
        assert!(s[3].3 >= secs(17.5) && s[3].3 < secs(17.5) + KEYFRAME_DELAY + 2 * FRAME);
        // Nothing goes out while paused, and nothing is asked for.
        for at in [7.1, 9.0, 12.0, 17.4] {
            assert_eq!(sim.forwarded_at(secs(at)), None, "at {at}");
        }
        sim.assert_forwarding_from(s[3].3, Some(0));
        assert_eq!(sim.request_layers(), [1, 0, 0]);
        assert!(
            sim.requests[2].0 >= secs(17.5),
            "asked when resuming, not before"
        );
        assert_eq!((sim.sel.pause_count(), sim.sel.switch_count()), (1, 1));
        assert!(!sim.sel.paused());
    }

    #[test]
    fn a_dip_below_the_lowest_layer_shorter_than_the_hold_does_not_pause() {
        // A loss burst: the estimate collapses for 1.5 s, then recovers.
        let trace = |t: Duration| match t.as_millis() {
            0..5_000 => 300_000,
            5_000..6_500 => 120_000,
            _ => 300_000,
        };
        let mut sim = Sim::new(MaxLayer::default());
        sim.run(secs(12.0), trace);
        let s = sim.switches();
        assert!(
            s.iter().all(|e| e.2 != SwitchReason::Pause),
            "no pause: {s:?}"
        );
        assert_eq!(sim.sel.pause_count(), 0);
        // The lowest layer goes on through the dip.
        for at in [5.5, 6.0, 6.4] {
            assert_eq!(sim.forwarded_at(secs(at)), Some(0), "at {at}");
        }
    }

    #[test]
    fn paused_video_asks_the_estimator_for_the_lowest_layer() {
        let t = Instant::now();
        let mut s = LayerSelector::new(LayerSelectorConfig::default());
        s.set_layers(&LAYERS, t);
        for i in 0..3 {
            s.layer_live(i, true, t);
        }
        s.estimate(100_000, t);
        assert!(!s.paused(), "pause waits for the hold");
        assert_eq!(s.poll_timeout(), Some(t + ms(2_000)));
        let t = t + ms(2_000);
        s.handle_timeout(t);
        assert!(s.paused());
        assert_eq!(s.poll_keyframe_request(t), None);
        assert_eq!(
            s.bwe_targets(),
            Some(BweTargets {
                minimum_bps: 150_000 * 115 / 100 + 64_000,
                desired_bps: 1_500_000 * 115 / 100 + 64_000,
            })
        );
        s.estimate(800_000, t);
        assert!(s.paused(), "resume waits for the hold");
        assert_eq!(s.poll_timeout(), Some(t + ms(2_500)));
        s.handle_timeout(t + ms(2_500));
        assert!(!s.paused());
        assert_eq!(
            s.target(),
            Some(1),
            "resumes on the best layer held long enough"
        );
        assert_eq!(
            s.bwe_targets().unwrap().minimum_bps,
            1_500_000 * 115 / 100 + 64_000
        );
    }

    #[test]
    fn keyframe_requests_repeat_per_interval_until_the_keyframe_comes() {
        let mut sim = Sim::new(MaxLayer::default());
        sim.answer_keyframes = false;
        sim.run(secs(2.0), |_| 3_000_000);
        // Every 500 ms (rounded up to the next frame), for high only.
        assert_eq!(sim.request_layers(), [2, 2, 2, 2]);
        let at: Vec<_> = sim.requests.iter().map(|r| r.0.as_millis()).collect();
        assert_eq!(at, [0, 528, 1056, 1584]);
        assert_eq!(sim.sel.current(), None);
        assert!(sim.sel.poll_timeout().is_some());
        sim.answer_keyframes = true;
        sim.run(secs(4.0), |_| 3_000_000);
        assert_eq!(sim.sel.current(), Some(2));
        assert_eq!(sim.sel.keyframe_requests(), 5);
        assert_eq!(sim.sel.poll_timeout(), None, "nothing waits");
    }

    #[test]
    fn first_picture_comes_from_any_layer_up_to_the_target() {
        // The publisher's next keyframe is on low (a periodic one) before high answers.
        let mut sim = Sim::new(MaxLayer::default());
        sim.keyframe_due[0] = Some(sim.t0 + ms(40));
        sim.run(secs(3.0), |_| 3_000_000);
        let s = sim.switches();
        assert_eq!(
            (s[0].0, s[0].1, s[0].2),
            (None, Some(0), SwitchReason::Start)
        );
        assert_eq!((s[1].0, s[1].1), (Some(0), Some(2)));
        assert!(s[0].3 < s[1].3 && s[1].3 < KEYFRAME_DELAY + 2 * FRAME);
        assert_eq!(sim.request_layers(), [2]);
    }

    #[test]
    fn without_an_estimate_bandwidth_does_not_limit() {
        let t = Instant::now();
        let mut s = LayerSelector::new(LayerSelectorConfig::default());
        s.set_layers(&LAYERS, t);
        assert_eq!(s.target(), None, "no live layer yet");
        assert_eq!(s.on_packet(0, false, t), LayerDecision::Drop);
        assert_eq!(s.target(), Some(0), "a packet made low live");
        assert_eq!(s.on_packet(2, false, t), LayerDecision::Drop);
        assert_eq!(
            s.target(),
            Some(2),
            "before the first picture the target follows"
        );
        assert_eq!(s.on_packet(2, true, t), LayerDecision::SwitchAndForward);
        assert_eq!(s.on_packet(2, false, t), LayerDecision::Forward);
        assert_eq!(s.on_packet(1, true, t), LayerDecision::Drop);
        assert_eq!(
            s.on_packet(7, true, t),
            LayerDecision::Drop,
            "unknown layer"
        );
    }

    #[test]
    fn measured_bitrate_replaces_the_nominal_one() {
        let t = Instant::now();
        let mut s = LayerSelector::new(LayerSelectorConfig::default());
        s.set_layers(&LAYERS, t);
        for i in 0..3 {
            s.layer_live(i, true, t);
        }
        s.estimate(1_700_000, t);
        assert_eq!(s.target(), Some(2));
        // High really costs 2.5 Mbit/s: it no longer fits.
        s.measured_bitrate(2, 2_500_000, t + ms(100));
        assert_eq!(s.target(), Some(1));
    }

    #[test]
    fn events_are_not_lost_silently() {
        let t = Instant::now();
        let mut s = LayerSelector::new(LayerSelectorConfig::default());
        s.set_layers(&LAYERS, t);
        s.layer_live(0, true, t);
        // Twenty pauses and resumes, never drained.
        for i in 0..20u64 {
            let at = t + Duration::from_secs(10 * i);
            s.estimate(10_000, at);
            let at = at + ms(2_000);
            s.estimate(10_000, at);
            s.estimate(1_000_000, at);
            s.handle_timeout(at + ms(2_500));
            assert_eq!(
                s.on_packet(0, true, at + ms(2_500)),
                LayerDecision::SwitchAndForward
            );
        }
        // A pause and a resume each time.
        assert_eq!(s.events_lost(), 40 - EVENT_CAPACITY as u64);
        let mut n = 0;
        while s.poll_event().is_some() {
            n += 1;
        }
        assert_eq!(n, EVENT_CAPACITY);
    }

    #[test]
    fn quality_names_parse() {
        assert_eq!(Quality::parse("low"), Some(Quality::Low));
        assert_eq!(Quality::parse("MID"), Some(Quality::Mid));
        assert_eq!(Quality::parse("High"), Some(Quality::High));
        assert_eq!(Quality::parse("medium"), None);
        // Two layers: mid is the lower one.
        let t = Instant::now();
        let mut s = LayerSelector::new(LayerSelectorConfig::default());
        s.set_layers(&LAYERS[1..], t);
        s.set_max(
            MaxLayer {
                quality: Some(Quality::Mid),
                max_height: None,
            },
            t,
        );
        assert_eq!(s.max(), Some(0));
    }

    #[test]
    fn forwarded_stream_is_continuous_across_switches_pauses_and_layer_loss() {
        use super::super::{
            Decision, Forwarder, ForwarderConfig, PictureId, PictureIdWidth, SourcePacket,
            TemporalLayer, Vp8Descriptor, Vp8Rewriter,
        };
        let trace = |t: Duration| match t.as_secs() {
            0..4 => 3_000_000,
            4..8 => 800_000,
            8..12 => 100_000,
            _ => 3_000_000,
        };
        let mut sim = Sim::new(MaxLayer::default());
        sim.run(secs(22.0), trace);
        sim.sending[2] = false;
        let now = sim.now();
        sim.sel.layer_live(2, false, now);
        sim.run(secs(26.0), trace);
        sim.sending[2] = true;
        sim.run(secs(30.0), trace);
        let path: Vec<_> = sim.switches().iter().map(|e| (e.1, e.2)).collect();
        use SwitchReason::*;
        assert_eq!(
            path,
            [
                (Some(2), Start),
                (Some(1), Estimate),
                (Some(0), Estimate),
                (None, Pause),
                // Everything has fitted since 12 s: the resume hold covers every layer.
                (Some(2), Resume),
                (Some(1), LayerDied),
                (Some(2), LayerBack)
            ]
        );

        // The shard's side: each layer's RTP and VP8 numbering has its own random base.
        let ssrc = [0x100, 0x101, 0x102];
        let seq0: [u16; 3] = [65_000, 100, 30_000];
        let ts0: [u32; 3] = [u32::MAX - 50_000, 7, 1 << 31];
        let pid0: [u16; 3] = [32_700, 5, 16_000];
        let tl00: [u8; 3] = [250, 0, 100];
        let mut f = Forwarder::new(
            ForwarderConfig {
                clock_rate: 90_000,
                is_video: true,
            },
            77,
        );
        let mut rw = Vp8Rewriter::new();
        let mut last: Option<(u64, u32, u16, u8)> = None;
        let mut last_at = sim.t0;
        let mut forwarded = 0;
        for p in &sim.packets {
            let l = p.layer;
            let frame = p.frame as u32;
            let sp = SourcePacket {
                ssrc: ssrc[l],
                seq: seq0[l].wrapping_add((2 * frame) as u16 + u16::from(!p.first)),
                timestamp: ts0[l].wrapping_add(frame * 3000),
                marker: !p.first,
                keyframe: p.key,
                arrival: p.at,
            };
            let d = Vp8Descriptor {
                extended: true,
                non_reference: false,
                start_of_partition: p.first,
                partition_index: 0,
                picture_id: Some(PictureId {
                    value: ((u32::from(pid0[l]) + frame) % 32_768) as u16,
                    width: PictureIdWidth::Bits15,
                }),
                tl0_pic_idx: Some(tl00[l].wrapping_add(frame as u8)),
                temporal: Some(TemporalLayer {
                    tid: 0,
                    layer_sync: false,
                }),
                key_idx: None,
            };
            let decision = match p.decision {
                LayerDecision::Drop => continue,
                LayerDecision::Forward => f.decide(&sp, p.at),
                LayerDecision::SwitchAndForward => {
                    rw.resync();
                    f.switch_layer(&sp, p.at)
                }
            };
            let Decision::Forward { seq, timestamp, .. } = decision else {
                panic!("the forwarder follows the selector: {decision:?} for {p:?}");
            };
            let r = rw.rewrite(sp.ssrc, &d);
            assert!(r.in_place());
            let (pid, tl0) = (r.picture_id().unwrap(), r.tl0_pic_idx().unwrap());
            if let Some((lseq, lts, lpid, ltl0)) = last {
                assert_eq!(seq, lseq + 1, "{p:?}");
                if p.first {
                    // The timestamp follows wall-clock time, across pauses too.
                    let advance = timestamp.wrapping_sub(lts);
                    let elapsed = ((p.at - last_at).as_micros() * 9 / 100) as u32;
                    assert!(
                        advance > 0 && advance.abs_diff(elapsed) <= 3000,
                        "ts {advance} {p:?}"
                    );
                    assert_eq!(pid, (lpid + 1) % 32_768, "{p:?}");
                    assert_eq!(tl0, ltl0.wrapping_add(1), "{p:?}");
                } else {
                    assert_eq!((timestamp, pid, tl0), (lts, lpid, ltl0), "{p:?}");
                }
            }
            last = Some((seq, timestamp, pid, tl0));
            last_at = p.at;
            forwarded += 1;
        }
        assert!(forwarded > 1000, "{forwarded}");
    }
}
