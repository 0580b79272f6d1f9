//! How much each target (a webhook, a callback host: `target_key`) may be sent now, learnt from
//! the outcomes of its own attempts. The dispatcher asks [`Targets::allowance`] before starting a
//! job; every attempt reports to [`Targets::observe`]. Three mechanisms, one state per target:
//!
//! - **adaptive concurrency** (AIMD): the in-flight limit doubles per round trip until the first
//!   overload (slow start), then grows by one per round trip while answers are 2xx within the
//!   latency budget, and is multiplied by `decrease_factor` on 429, 503, timeouts, connection
//!   errors or a 2xx far above the baseline latency. One decrease per round trip: answers to
//!   requests started before the last decrease say nothing new. Within one of the limit where
//!   the last overload happened it grows four times slower, so it settles just under the
//!   receiver's capacity instead of bouncing off it; once two past that point without an
//!   overload it doubles per round trip again (the receiver's capacity rose: find it fast).
//! - **circuit breaker**: open after `failure_ratio` of ≥ `min_requests` attempts in `window_ms`
//!   failed, or `consecutive_failures` in a row; open means no attempts (allowance 0) until
//!   `cool_down_ms` passed; then one probe (half-open, allowance 1) closes or reopens it.
//! - **pause**: a `Retry-After` on 429/503 stops the whole target until then, not only the event.
//!
//! The state is per process and kept in memory: a restart starts every target afresh (closed,
//! initial limit), which costs at most one window of failures.
//!
//! Lock order: the engine's `in_flight` lock may be held while this one is taken, never the
//! reverse (nothing here calls back into the engine).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::retry::AttemptResult;
use crate::config::{AdaptiveSettings, BreakerSettings};
use crate::metrics::Metrics;

/// Targets with a series in the per-target gauges; beyond it a target is controlled all the
/// same but not exported (webhooks are few and user-made; callback hosts could be many).
pub const MAX_TARGET_SERIES: usize = 200;

/// A target idle this long with nothing to remember (closed, not paused) is forgotten.
const FORGET_IDLE: Duration = Duration::from_secs(600);

/// After a counted failure a target is "failing recently" this long: new Kafka deliveries for it
/// are parked in the store instead of holding their partition while they retry.
const RECENT_FAILURE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

impl Breaker {
    pub fn label(&self) -> &'static str {
        match self {
            Breaker::Closed => "closed",
            Breaker::Open { .. } => "open",
            Breaker::HalfOpen => "half_open",
        }
    }
    /// The gauge value: 0 closed, 1 half-open, 2 open.
    fn gauge(&self) -> i64 {
        match self {
            Breaker::Closed => 0,
            Breaker::HalfOpen => 1,
            Breaker::Open { .. } => 2,
        }
    }
}

struct Target {
    limit: f64,
    slow_start: bool,
    /// The limit at the last overload (growth slows just below it).
    ceiling: Option<f64>,
    last_decrease: Option<Instant>,
    /// Baseline latency of 2xx answers, seconds.
    baseline: Option<f64>,
    /// Counted attempts in the breaker's window.
    window: Window,
    consecutive: u32,
    breaker: Breaker,
    paused_until: Option<Instant>,
    last_failure: Option<Instant>,
    /// Wall-clock ms of the first failure since the last success (prolonged-failure disable).
    failing_since: Option<i64>,
    last_seen: Instant,
    series: bool,
    /// Its webhook is disabled: nothing goes, its pending events are kept (not dead-lettered)
    /// until it is enabled again.
    held: bool,
}

impl Target {
    fn sheds_memory(&self, now: Instant, longest_wait: Duration) -> bool {
        self.held || self.breaker != Breaker::Closed || self.paused_until.is_some_and(|p| p > now + longest_wait)
    }
}

/// The attempts counted for a breaker's failure ratio: the last `window_ms`, at most 10,000 of
/// them (a ratio over the last 10,000 is as good), with their failures counted as they come and
/// go, so an answer costs the same whatever the window holds (it was a scan of the window per
/// answer: 2 % of relay CPU in the embedded benchmark's profile).
#[derive(Default)]
struct Window {
    /// (when, failed), oldest first.
    entries: VecDeque<(Instant, bool)>,
    failures: usize,
}

impl Window {
    fn push(&mut self, now: Instant, failed: bool, max_age: Duration) {
        self.entries.push_back((now, failed));
        self.failures += failed as usize;
        while self
            .entries
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > max_age || self.entries.len() > 10_000)
        {
            let (_, f) = self.entries.pop_front().expect("front exists");
            self.failures -= f as usize;
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.failures = 0;
    }
}

/// What one attempt changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The breaker opened (`webhook:failing`).
    pub opened: bool,
    /// The breaker closed after a successful probe (`webhook:recovered`).
    pub closed: bool,
    /// Wall-clock ms of the first failure since the last success, while failing.
    pub failing_since: Option<i64>,
}

/// What an attempt's result means to its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Success,
    /// Overloaded: the limit shrinks. `failure`: also counts against the breaker.
    Overload {
        failure: bool,
    },
    /// Counts against the breaker only.
    Failure,
    /// Says nothing about the target (a refused address, a payload too large).
    Neutral,
}

fn signal(result: &AttemptResult) -> Signal {
    match result {
        AttemptResult::Status { code, .. } if (200..300).contains(code) => Signal::Success,
        // 429: the receiver is alive and says how much it takes: the limit's business only.
        AttemptResult::Status { code: 429, .. } => Signal::Overload { failure: false },
        AttemptResult::Status { code: 503, .. } => Signal::Overload { failure: true },
        AttemptResult::Status { code: 413, .. } => Signal::Neutral,
        AttemptResult::Status { .. } => Signal::Failure,
        AttemptResult::Timeout | AttemptResult::Connect => Signal::Overload { failure: true },
        AttemptResult::Other => Signal::Failure,
        AttemptResult::BlockedAddress => Signal::Neutral,
    }
}

pub struct Targets {
    adaptive: AdaptiveSettings,
    breaker: BreakerSettings,
    metrics: Metrics,
    map: Mutex<HashMap<String, Target>>,
    series: Mutex<usize>,
}

impl Targets {
    pub fn new(adaptive: AdaptiveSettings, breaker: BreakerSettings, metrics: Metrics) -> Targets {
        Targets {
            adaptive,
            breaker,
            metrics,
            map: Mutex::new(HashMap::new()),
            series: Mutex::new(0),
        }
    }

    fn fresh(&self, now: Instant) -> Target {
        Target {
            limit: self.adaptive.initial as f64,
            slow_start: true,
            ceiling: None,
            last_decrease: None,
            baseline: None,
            window: Window::default(),
            consecutive: 0,
            breaker: Breaker::Closed,
            paused_until: None,
            last_failure: None,
            failing_since: None,
            last_seen: now,
            series: false,
            held: false,
        }
    }

    /// How many requests this target may have in progress now, under `cap` (its configured
    /// cap): 0 while its breaker is open or it is paused, 1 while half-open (the probe), else
    /// its adaptive limit. An open breaker whose cool-down passed turns half-open here.
    pub fn allowance(&self, key: &str, cap: usize, now: Instant) -> usize {
        let mut map = self.map.lock().expect("lock");
        let Some(t) = map.get_mut(key) else {
            return self.initial(cap);
        };
        if t.held || t.paused_until.is_some_and(|p| p > now) {
            return 0;
        }
        match t.breaker {
            Breaker::Open { until } if until > now => 0,
            Breaker::Open { .. } => {
                t.breaker = Breaker::HalfOpen;
                self.metrics.breaker_transitions.with_label_values(&["half_open"]).inc();
                self.export(key, t);
                1
            }
            Breaker::HalfOpen => 1,
            Breaker::Closed => self.limit_of(t, cap),
        }
    }

    fn initial(&self, cap: usize) -> usize {
        if self.adaptive.enabled {
            self.adaptive.initial.min(cap).max(1)
        } else {
            cap
        }
    }

    fn limit_of(&self, t: &Target, cap: usize) -> usize {
        if !self.adaptive.enabled {
            return cap;
        }
        (t.limit.floor() as usize).clamp(self.adaptive.min.min(cap), cap)
    }

    /// Targets that may have nothing in progress now (open, or paused), and the next instant
    /// one of them may change (cool-down or pause over). An open breaker whose cool-down passed
    /// turns half-open here, so its probe is found even when none of its jobs is looked at.
    pub fn blocked(&self, now: Instant) -> (Vec<String>, Option<Instant>) {
        let mut map = self.map.lock().expect("lock");
        let mut keys = Vec::new();
        let mut next: Option<Instant> = None;
        for (k, t) in map.iter_mut() {
            let mut until = t.paused_until.filter(|p| *p > now);
            if let Breaker::Open { until: u } = t.breaker {
                if u > now {
                    until = Some(until.map_or(u, |x: Instant| x.max(u)));
                } else {
                    t.breaker = Breaker::HalfOpen;
                    self.metrics.breaker_transitions.with_label_values(&["half_open"]).inc();
                    self.export(k, t);
                }
            }
            if let Some(u) = until {
                keys.push(k.clone());
                next = Some(next.map_or(u, |n| n.min(u)));
            } else if t.held {
                // Until enabled (which wakes the dispatcher itself).
                keys.push(k.clone());
            }
        }
        (keys, next)
    }

    /// Must this target's memory (Kafka) deliveries leave memory for the store? Its breaker is
    /// open (or half-open), it is held (disabled), or a Retry-After pauses it for longer than a
    /// memory job may wait (`longest_wait`): holding them would hold their partitions' offsets
    /// and buffers for as long as the receiver asked, up to an hour.
    pub fn sheds_memory(&self, key: &str, now: Instant, longest_wait: Duration) -> bool {
        let map = self.map.lock().expect("lock");
        map.get(key).is_some_and(|t| t.sheds_memory(now, longest_wait))
    }

    /// Did this target fail recently, or must its memory deliveries leave memory (above)?
    pub fn unhealthy(&self, key: &str, longest_wait: Duration) -> bool {
        let now = Instant::now();
        let map = self.map.lock().expect("lock");
        map.get(key).is_some_and(|t| {
            t.sheds_memory(now, longest_wait) || t.last_failure.is_some_and(|f| now.duration_since(f) < RECENT_FAILURE)
        })
    }

    /// Is this target held (its webhook disabled)?
    pub fn is_held(&self, key: &str) -> bool {
        self.map.lock().expect("lock").get(key).is_some_and(|t| t.held)
    }

    /// Hold a target (its webhook was disabled: keep its events, send nothing) or release it
    /// (enabled: it starts afresh, breaker closed and failure clock stopped).
    pub fn hold(&self, key: &str, held: bool) {
        let now = Instant::now();
        let mut map = self.map.lock().expect("lock");
        if held {
            let t = map.entry(key.to_string()).or_insert_with(|| self.fresh(now));
            t.held = true;
        } else if map.get(key).is_some_and(|t| t.held) {
            if let Some(t) = map.remove(key) {
                self.unexport(key, &t);
            }
        }
    }

    /// `Retry-After` on a 429/503: no request to this target before `until`.
    pub fn pause(&self, key: &str, until: Instant) {
        let now = Instant::now();
        let mut map = self.map.lock().expect("lock");
        let t = map.entry(key.to_string()).or_insert_with(|| self.fresh(now));
        t.paused_until = Some(t.paused_until.map_or(until, |p| p.max(until)));
        self.metrics.target_pauses.inc();
    }

    /// One attempt's answer. `started`: when its request went out; `latency`: how long it took;
    /// `in_flight`: the target's requests in progress when it was started (the limit grows only
    /// while it is used); `now_ms`: wall clock, for the prolonged-failure clock.
    pub fn observe(
        &self,
        key: &str,
        result: &AttemptResult,
        started: Instant,
        latency: Duration,
        in_flight: usize,
        now_ms: i64,
    ) -> Observed {
        let now = Instant::now();
        let sig = signal(result);
        let mut map = self.map.lock().expect("lock");
        let t = map.entry(key.to_string()).or_insert_with(|| self.fresh(now));
        t.last_seen = now;
        let mut out = Observed::default();
        // ---- adaptive limit
        let lat = latency.as_secs_f64();
        let slow = sig == Signal::Success
            && t.baseline.is_some_and(|b| {
                lat > b * self.adaptive.latency_factor && lat * 1000.0 > self.adaptive.latency_floor_ms as f64
            });
        let overload = matches!(sig, Signal::Overload { .. }) || slow;
        if overload {
            // One decrease per round trip: a burst of refusals to requests sent together is
            // one signal, not many.
            if t.last_decrease.is_none_or(|d| started >= d) {
                let before = t.limit;
                t.limit = (t.limit * self.adaptive.decrease_factor).max(self.adaptive.min as f64);
                t.ceiling = Some(before);
                t.slow_start = false;
                t.last_decrease = Some(now);
                let why = match result {
                    AttemptResult::Status { code: 429, .. } => "http_429",
                    AttemptResult::Status { code: 503, .. } => "http_503",
                    AttemptResult::Timeout => "timeout",
                    AttemptResult::Connect => "connect_error",
                    _ => "latency",
                };
                self.metrics.adaptive_decreases.with_label_values(&[why]).inc();
            }
        } else if sig == Signal::Success {
            // A 2xx within the budget: the baseline learns fast downwards, slowly upwards.
            t.baseline = Some(match t.baseline {
                None => lat,
                Some(b) if lat < b => (b + lat) / 2.0,
                Some(b) => b * 0.95 + lat * 0.05,
            });
            // Grow only a limit in use (at least half of it in flight): an idle target's limit
            // says nothing of its receiver.
            if ((in_flight + 1) * 2) as f64 >= t.limit.floor() {
                let l = t.limit.max(1.0);
                match t.ceiling {
                    _ if t.slow_start => t.limit += 1.0,
                    // Just around the last overload: four times slower.
                    Some(c) if l >= c - 1.0 && l <= c + 1.0 => t.limit += 0.25 / l,
                    _ => t.limit += 1.0 / l,
                }
                if t.ceiling.is_some_and(|c| t.limit > c + 2.0) {
                    // Well past the last overload without a new one: the receiver takes more
                    // now; find out how much as fast as at the start.
                    t.ceiling = None;
                    t.slow_start = true;
                }
            }
        }
        // Never beyond what any cap could use: a long success streak must not build a limit
        // that would take ages to come down.
        t.limit = t.limit.min(4096.0);
        // ---- breaker and failure clock
        let failed = match sig {
            Signal::Success => Some(false),
            Signal::Failure | Signal::Overload { failure: true } => Some(true),
            _ => None,
        };
        if let Some(failed) = failed {
            if failed {
                t.last_failure = Some(now);
                t.consecutive += 1;
                out.failing_since = Some(*t.failing_since.get_or_insert(now_ms));
            } else {
                t.last_failure = None;
                t.consecutive = 0;
                t.failing_since = None;
            }
            if self.breaker.enabled {
                match t.breaker {
                    Breaker::Closed => {
                        t.window
                            .push(now, failed, Duration::from_millis(self.breaker.window_ms));
                        let n = t.window.len() as u32;
                        let bad = t.window.failures as f64;
                        let by_ratio = n >= self.breaker.min_requests && bad / n as f64 >= self.breaker.failure_ratio;
                        let by_run =
                            self.breaker.consecutive_failures > 0 && t.consecutive >= self.breaker.consecutive_failures;
                        if failed && (by_ratio || by_run) {
                            t.breaker = Breaker::Open {
                                until: now + Duration::from_millis(self.breaker.cool_down_ms),
                            };
                            t.window.clear();
                            out.opened = true;
                            self.metrics.breaker_transitions.with_label_values(&["open"]).inc();
                        }
                    }
                    Breaker::HalfOpen if failed => {
                        t.breaker = Breaker::Open {
                            until: now + Duration::from_millis(self.breaker.cool_down_ms),
                        };
                        self.metrics.breaker_transitions.with_label_values(&["open"]).inc();
                    }
                    Breaker::HalfOpen => {
                        t.breaker = Breaker::Closed;
                        t.window.clear();
                        out.closed = true;
                        self.metrics.breaker_transitions.with_label_values(&["closed"]).inc();
                    }
                    // Answers to requests sent before it opened: the probe decides.
                    Breaker::Open { .. } => {}
                }
            }
        }
        self.export(key, t);
        out
    }

    /// The breaker state and current limit of a target (`GET /webhook/{id}`).
    pub fn state(&self, key: &str, cap: usize) -> (&'static str, usize, Option<i64>) {
        let map = self.map.lock().expect("lock");
        match map.get(key) {
            Some(t) if t.held => ("held", self.limit_of(t, cap), t.failing_since),
            Some(t) => (t.breaker.label(), self.limit_of(t, cap), t.failing_since),
            None => ("closed", self.initial(cap), None),
        }
    }

    /// Targets failing (no success) since before `before_ms` (wall clock).
    pub fn failing_since_before(&self, before_ms: i64) -> Vec<(String, i64)> {
        let map = self.map.lock().expect("lock");
        map.iter()
            .filter_map(|(k, t)| t.failing_since.filter(|s| *s <= before_ms).map(|s| (k.clone(), s)))
            .collect()
    }

    /// Forget a target (its webhook was deleted, disabled or enabled again).
    pub fn forget(&self, key: &str) {
        let mut map = self.map.lock().expect("lock");
        if let Some(t) = map.remove(key) {
            self.unexport(key, &t);
        }
    }

    /// Forget targets idle for a while with nothing worth remembering (bounds the map and the
    /// exported series).
    pub fn forget_idle(&self) {
        self.forget_idle_at(Instant::now())
    }

    /// A webhook keeps its breaker and failure clock while idle (webhooks are user-made and
    /// few, and the clock decides the prolonged-failure disable). A callback host is forgotten
    /// once idle whatever its state: callback URLs come with events, so their hosts are
    /// unbounded (issue 13: the map of failing callback hosts was never pruned); one that fails
    /// again starts afresh, as a probe would.
    fn forget_idle_at(&self, now: Instant) {
        let mut map = self.map.lock().expect("lock");
        let idle: Vec<String> = map
            .iter()
            .filter(|(k, t)| {
                now.saturating_duration_since(t.last_seen) > FORGET_IDLE
                    && !t.held
                    && t.paused_until.is_none_or(|p| p <= now)
                    && (!k.starts_with("w:") || (t.breaker == Breaker::Closed && t.failing_since.is_none()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in idle {
            if let Some(t) = map.remove(&k) {
                self.unexport(&k, &t);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().expect("lock").len()
    }

    /// Open breakers right now (a gauge for the alert).
    pub fn open_count(&self) -> usize {
        let map = self.map.lock().expect("lock");
        map.values().filter(|t| t.breaker != Breaker::Closed).count()
    }

    fn export(&self, key: &str, t: &mut Target) {
        if !t.series {
            let mut n = self.series.lock().expect("lock");
            if *n >= MAX_TARGET_SERIES {
                return;
            }
            *n += 1;
            t.series = true;
        }
        let label = series_label(key);
        self.metrics
            .target_breaker_state
            .with_label_values(&[&label])
            .set(t.breaker.gauge());
        self.metrics
            .target_concurrency_limit
            .with_label_values(&[&label])
            .set(t.limit.floor() as i64);
    }

    fn unexport(&self, key: &str, t: &Target) {
        if !t.series {
            return;
        }
        let label = series_label(key);
        let _ = self.metrics.target_breaker_state.remove_label_values(&[&label]);
        let _ = self.metrics.target_concurrency_limit.remove_label_values(&[&label]);
        let mut n = self.series.lock().expect("lock");
        *n = n.saturating_sub(1);
    }
}

/// The `target` label: a webhook's id, or `callback:host:port`.
fn series_label(key: &str) -> String {
    if let Some(id) = key.strip_prefix("w:") {
        id.to_string()
    } else if let Some(hp) = key.strip_prefix("c:") {
        format!("callback:{hp}")
    } else {
        key.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_counts_failures_as_they_come_and_go() {
        let mut w = Window::default();
        let t0 = Instant::now();
        let age = Duration::from_secs(10);
        w.push(t0, true, age);
        w.push(t0 + Duration::from_secs(1), false, age);
        w.push(t0 + Duration::from_secs(2), true, age);
        assert_eq!((w.len(), w.failures), (3, 2));
        // The first failure is older than the window now.
        w.push(t0 + Duration::from_secs(11), false, age);
        assert_eq!((w.len(), w.failures), (3, 1));
        // At most 10,000 kept: the oldest go, and their failures with them.
        for _ in 0..10_000 {
            w.push(t0 + Duration::from_secs(12), false, age);
        }
        assert_eq!((w.len(), w.failures), (10_000, 0));
        w.push(t0 + Duration::from_secs(12), true, age);
        w.clear();
        assert_eq!((w.len(), w.failures), (0, 0));
    }

    fn targets(min_requests: u32, consecutive: u32) -> Targets {
        Targets::new(
            AdaptiveSettings {
                enabled: true,
                min: 1,
                initial: 4,
                decrease_factor: 0.5,
                latency_factor: 10.0,
                latency_floor_ms: 100,
            },
            BreakerSettings {
                enabled: true,
                window_ms: 60_000,
                min_requests,
                failure_ratio: 0.7,
                consecutive_failures: consecutive,
                cool_down_ms: 50,
            },
            Metrics::new(),
        )
    }

    fn st(code: u16) -> AttemptResult {
        AttemptResult::Status {
            code,
            retry_after: None,
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn consecutive_failures_open_and_a_probe_closes() {
        let t = targets(1000, 3);
        let now = Instant::now();
        for _ in 0..2 {
            assert!(!t.observe("w:a", &st(500), now, MS, 0, 1).opened);
        }
        assert!(t.observe("w:a", &st(500), now, MS, 0, 1).opened);
        assert_eq!(t.allowance("w:a", 32, Instant::now()), 0, "open: nothing goes");
        assert_eq!(t.blocked(Instant::now()).0, vec!["w:a".to_string()]);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(t.allowance("w:a", 32, Instant::now()), 1, "half-open: one probe");
        // The probe fails: open again; the next probe succeeds: closed.
        t.observe("w:a", &AttemptResult::Connect, Instant::now(), MS, 0, 2);
        assert_eq!(t.allowance("w:a", 32, Instant::now()), 0);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(t.allowance("w:a", 32, Instant::now()), 1);
        let o = t.observe("w:a", &st(200), Instant::now(), MS, 0, 3);
        assert!(o.closed && !o.opened);
        assert!(t.allowance("w:a", 32, Instant::now()) >= 1);
        assert_eq!(t.state("w:a", 32).0, "closed");
    }

    #[test]
    fn the_ratio_needs_its_minimum_count_and_429_is_not_a_failure() {
        let t = targets(10, 0);
        let now = Instant::now();
        for _ in 0..50 {
            assert!(!t.observe("w:b", &st(429), now, MS, 0, 1).opened);
        }
        // 3 successes then 7 failures: 70 % of 10.
        for _ in 0..3 {
            t.observe("w:b", &st(200), now, MS, 0, 1);
        }
        for i in 0..7 {
            let o = t.observe("w:b", &st(502), now, MS, 0, 1);
            assert_eq!(o.opened, i == 6, "failure {i}");
        }
    }

    #[test]
    fn the_limit_grows_while_used_and_shrinks_once_per_round_trip() {
        let t = targets(1000, 0);
        assert_eq!(t.allowance("w:c", 32, Instant::now()), 4, "initial");
        // Slow start: +1 per success while the limit is in use.
        for _ in 0..10 {
            let l = t.allowance("w:c", 32, Instant::now());
            t.observe("w:c", &st(200), Instant::now(), MS, l - 1, 1);
        }
        assert_eq!(t.allowance("w:c", 32, Instant::now()), 14);
        // Unused, it does not grow.
        for _ in 0..10 {
            t.observe("w:c", &st(200), Instant::now(), MS, 0, 1);
        }
        assert_eq!(t.allowance("w:c", 32, Instant::now()), 14);
        // A burst of 429s to requests sent together halves it once.
        let sent = Instant::now();
        for _ in 0..5 {
            t.observe("w:c", &st(429), sent, MS, 13, 1);
        }
        assert_eq!(t.allowance("w:c", 32, Instant::now()), 7);
        // A later overload halves it again, never below min; the cap bounds it.
        t.observe("w:c", &AttemptResult::Timeout, Instant::now(), MS, 0, 1);
        assert_eq!(t.allowance("w:c", 32, Instant::now()), 3);
        assert_eq!(t.allowance("w:c", 2, Instant::now()), 2);
        // Past slow start it grows by about one per round trip (limit successes).
        for _ in 0..3 {
            t.observe("w:c", &st(200), Instant::now(), MS, 3, 1);
        }
        assert_eq!(t.allowance("w:c", 32, Instant::now()), 4);
    }

    #[test]
    fn a_2xx_far_above_the_baseline_is_an_overload() {
        let t = targets(1000, 0);
        for _ in 0..20 {
            t.observe("w:d", &st(200), Instant::now(), Duration::from_millis(20), 100, 1);
        }
        let before = t.allowance("w:d", 1000, Instant::now());
        t.observe("w:d", &st(200), Instant::now(), Duration::from_millis(900), 100, 1);
        assert!(t.allowance("w:d", 1000, Instant::now()) < before);
    }

    #[test]
    fn retry_after_pauses_the_whole_target() {
        let t = targets(1000, 0);
        t.pause("c:h:80", Instant::now() + Duration::from_millis(40));
        assert_eq!(t.allowance("c:h:80", 32, Instant::now()), 0);
        let (keys, next) = t.blocked(Instant::now());
        assert_eq!(keys, vec!["c:h:80".to_string()]);
        assert!(next.is_some());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(t.allowance("c:h:80", 32, Instant::now()), 4);
    }

    #[test]
    fn a_held_target_gets_nothing_until_released_afresh() {
        let t = targets(1000, 1);
        t.observe("w:f", &st(500), Instant::now(), MS, 0, 5);
        t.hold("w:f", true);
        assert_eq!(t.allowance("w:f", 32, Instant::now()), 0);
        assert!(t.sheds_memory("w:f", Instant::now(), MS) && t.unhealthy("w:f", MS));
        assert_eq!(t.blocked(Instant::now()).0, vec!["w:f".to_string()]);
        assert_eq!(t.state("w:f", 32).0, "held");
        t.hold("w:f", false);
        assert_eq!(t.state("w:f", 32), ("closed", 4, None));
        assert!(!t.unhealthy("w:f", MS));
    }

    #[test]
    fn a_pause_longer_than_a_memory_job_may_wait_sheds_memory_work() {
        // A Retry-After of an hour must not hold Kafka deliveries (and their offsets) in
        // memory for an hour; a short one may.
        let t = targets(1000, 0);
        let wait = Duration::from_secs(2);
        t.pause("w:short", Instant::now() + Duration::from_secs(1));
        t.pause("w:long", Instant::now() + Duration::from_secs(3600));
        assert!(!t.sheds_memory("w:short", Instant::now(), wait));
        assert!(t.sheds_memory("w:long", Instant::now(), wait));
        assert!(t.unhealthy("w:long", wait));
        // Once the pause is nearly over, its work may wait in memory again.
        assert!(!t.sheds_memory("w:long", Instant::now() + Duration::from_secs(3599), wait));
        assert!(!t.sheds_memory("w:unknown", Instant::now(), wait));
    }

    #[test]
    fn the_failure_clock_runs_until_a_success() {
        let t = targets(1000, 0);
        assert_eq!(
            t.observe("w:e", &st(500), Instant::now(), MS, 0, 100).failing_since,
            Some(100)
        );
        assert_eq!(
            t.observe("w:e", &st(500), Instant::now(), MS, 0, 200).failing_since,
            Some(100)
        );
        assert_eq!(t.failing_since_before(150), vec![("w:e".to_string(), 100)]);
        t.observe("w:e", &st(200), Instant::now(), MS, 0, 300);
        assert!(t.failing_since_before(i64::MAX).is_empty());
    }

    #[test]
    fn idle_callback_hosts_are_forgotten_failing_webhooks_are_not() {
        // Issue 13: targets keyed by every callback host events name must not pile up.
        let t = targets(1000, 0);
        for i in 0..5_000 {
            t.observe(&format!("c:host{i}:443"), &st(500), Instant::now(), MS, 0, 100);
        }
        t.observe("w:f", &st(500), Instant::now(), MS, 0, 100);
        t.observe("w:ok", &st(200), Instant::now(), MS, 0, 100);
        assert_eq!(t.len(), 5_002);
        // Not idle yet: everything is kept.
        t.forget_idle_at(Instant::now());
        assert_eq!(t.len(), 5_002);
        t.forget_idle_at(Instant::now() + FORGET_IDLE + Duration::from_secs(1));
        // The failing webhook keeps its failure clock (prolonged-failure disable); the rest go.
        assert_eq!(t.len(), 1);
        assert!(t.state("w:f", 32).2.is_some());
    }
}
