//! [`HedgeLayer`], [`Hedge`], the latency histogram and the budget.

use llm_tower_core::LlmService;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hdrhistogram::Histogram;
use llm_tower_core::{ChatRequest, LlmError, LlmResponse, TakenTargets};
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};
use tower_layer::Layer;
use tower_service::Service;

use super::future::{Race, ResponseFuture};

/// When the second attempt is sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HedgeDelay {
    /// After this percentile (0–100) of the latencies observed (time to answer, or to a
    /// stream's first chunk), once `min_samples` were observed; no hedging before.
    Observed {
        /// The percentile (default 95).
        percentile: f64,
        /// Samples needed before hedging starts (default 20).
        min_samples: u64,
    },
    /// After a fixed delay.
    Fixed(Duration),
}

impl Default for HedgeDelay {
    fn default() -> Self {
        Self::Observed {
            percentile: 95.0,
            min_samples: 20,
        }
    }
}

/// The default share of extra calls the budget allows (5 %).
pub const DEFAULT_BUDGET: f64 = 0.05;
/// The default window of the latency histogram (60 s; the percentile is read from the
/// previous full window, or from the current one until a window has passed).
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(60);
/// Longest latency the histogram records (1 h, in microseconds); longer samples count as 1 h.
const MAX_US: u64 = 3_600_000_000;

#[derive(Debug, Clone, Copy)]
pub(super) struct Config {
    delay: HedgeDelay,
    budget: f64,
    budget_window: Duration,
    min_per_sec: u32,
    period: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            delay: HedgeDelay::default(),
            budget: DEFAULT_BUDGET,
            budget_window: Duration::from_secs(10),
            min_per_sec: 0,
            period: DEFAULT_PERIOD,
        }
    }
}

/// Two histograms: the one being written and the last full one (as in `tower::hedge`).
struct Rotating {
    read: Histogram<u64>,
    write: Histogram<u64>,
    rotated_at: Instant,
    period: Duration,
}

impl Rotating {
    fn new(period: Duration) -> Self {
        // Microseconds, two significant digits (buckets under 1 % wide): whole milliseconds
        // would put a tight 50 ms latency in one or two buckets, and the percentile, read
        // as a bucket's value, below most of the latencies in that bucket, so that far
        // more than 5 % of first attempts ran past a p95 delay and were hedged.
        let h = || Histogram::new_with_bounds(1, MAX_US, 2).expect("valid histogram bounds");
        Self {
            read: h(),
            write: h(),
            rotated_at: Instant::now(),
            period: period.max(Duration::from_millis(1)),
        }
    }

    fn rotate(&mut self, now: Instant) {
        let since = now.saturating_duration_since(self.rotated_at);
        if since < self.period {
            return;
        }
        if since >= self.period.saturating_mul(2) {
            // Idle for more than a window: nothing recent to read.
            self.read.reset();
        } else {
            std::mem::swap(&mut self.read, &mut self.write);
        }
        self.write.reset();
        self.rotated_at = now;
    }

    fn record(&mut self, latency: Duration) {
        self.rotate(Instant::now());
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(MAX_US)
            .clamp(1, MAX_US);
        // In bounds after the clamp.
        let _ = self.write.record(us);
    }

    fn quantile(&mut self, q: f64, min_samples: u64) -> Option<Duration> {
        self.rotate(Instant::now());
        let h = if self.read.len() >= min_samples.max(1) {
            &self.read
        } else if self.write.len() >= min_samples.max(1) {
            &self.write
        } else {
            return None;
        };
        // The highest value of the percentile's bucket: no more than the share of samples
        // above the percentile lies above the delay.
        Some(Duration::from_micros(h.value_at_quantile(q).max(1)))
    }
}

/// Counters of a hedge layer (see [`HedgeStats`]).
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    hedged: AtomicU64,
    second_won: AtomicU64,
    denied: AtomicU64,
}

pub(super) struct Shared {
    config: Config,
    histogram: Mutex<Rotating>,
    budget: TpsBudget,
    counters: Counters,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn new(config: Config) -> Arc<Self> {
        // TpsBudget asserts its arguments: keep them in its ranges. Slightly under the
        // ratio so that 1 / ratio (the requests per hedge) is not rounded down.
        let ratio = if config.budget.is_finite() {
            config.budget.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let ttl = config
            .budget_window
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        let budget = TpsBudget::new(
            ttl,
            config.min_per_sec.min(1_000_000),
            (ratio * 0.9999) as f32,
        );
        Arc::new(Self {
            config,
            histogram: Mutex::new(Rotating::new(config.period)),
            budget,
            counters: Counters::default(),
        })
    }

    fn histogram(&self) -> MutexGuard<'_, Rotating> {
        self.histogram
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The delay before a second attempt, if requests may be hedged now.
    fn delay(&self) -> Option<Duration> {
        match self.config.delay {
            HedgeDelay::Fixed(d) => Some(d),
            HedgeDelay::Observed {
                percentile,
                min_samples,
            } => {
                let q = if percentile.is_finite() {
                    (percentile / 100.0).clamp(0.0, 1.0)
                } else {
                    0.95
                };
                self.histogram().quantile(q, min_samples)
            }
        }
    }

    pub(super) fn record(&self, latency: Duration) {
        self.histogram().record(latency);
    }

    /// Whether the budget allows one more hedge (and takes it).
    pub(super) fn withdraw(&self) -> bool {
        if self.budget.withdraw() {
            self.counters.hedged.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    pub(super) fn second_won(&self) {
        self.counters.second_won.fetch_add(1, Ordering::Relaxed);
    }
}

/// A handle on a hedge layer's counters (cheap to clone), for metrics and tests.
#[derive(Clone)]
pub struct HedgeStats(Arc<Shared>);

impl fmt::Debug for HedgeStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeStats")
            .field("requests", &self.requests())
            .field("hedged", &self.hedged())
            .field("second_won", &self.second_won())
            .field("denied", &self.denied())
            .finish()
    }
}

impl HedgeStats {
    /// Requests seen.
    pub fn requests(&self) -> u64 {
        self.0.counters.requests.load(Ordering::Relaxed)
    }
    /// Second attempts sent (the extra upstream calls).
    pub fn hedged(&self) -> u64 {
        self.0.counters.hedged.load(Ordering::Relaxed)
    }
    /// Second attempts that answered first.
    pub fn second_won(&self) -> u64 {
        self.0.counters.second_won.load(Ordering::Relaxed)
    }
    /// Second attempts the budget refused.
    pub fn denied(&self) -> u64 {
        self.0.counters.denied.load(Ordering::Relaxed)
    }
    /// The delay a request arriving now would be hedged after (`None`: not hedged yet,
    /// too few samples).
    pub fn current_delay(&self) -> Option<Duration> {
        self.0.delay()
    }
}

// ===== impl HedgeLayer =====

/// Races a second attempt against a slow first one (see the [module docs](crate::hedge)).
///
/// # Clone
///
/// The histogram, budget and counters are created with the layer: every service built
/// from it (and its clones) shares them. Call the builder methods before taking
/// [`stats`](Self::stats): each starts a fresh state.
#[derive(Clone, Debug)]
pub struct HedgeLayer {
    config: Config,
    shared: Arc<Shared>,
}

impl Default for HedgeLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl HedgeLayer {
    /// Hedges after the observed p95, at most 5 % extra calls.
    pub fn new() -> Self {
        let config = Config::default();
        Self {
            config,
            shared: Shared::new(config),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.config);
        self.shared = Shared::new(self.config);
        self
    }

    /// When the second attempt is sent (default: the observed p95, after 20 samples).
    #[must_use]
    pub fn delay(self, delay: HedgeDelay) -> Self {
        self.with(|c| c.delay = delay)
    }

    /// The share of extra calls allowed (0–1, default 0.05), over a sliding window of
    /// 10 s: at most one hedge per `1 / ratio` requests in that window.
    #[must_use]
    pub fn budget(self, ratio: f64) -> Self {
        self.with(|c| c.budget = ratio)
    }

    /// Hedges allowed per second on top of the ratio (default 0), so that a route with
    /// little traffic can hedge at all.
    #[must_use]
    pub fn min_per_sec(self, n: u32) -> Self {
        self.with(|c| c.min_per_sec = n)
    }

    /// The window of the latency histogram (default [`DEFAULT_PERIOD`]).
    #[must_use]
    pub fn period(self, period: Duration) -> Self {
        self.with(|c| c.period = period)
    }

    /// The shared counters.
    pub fn stats(&self) -> HedgeStats {
        HedgeStats(self.shared.clone())
    }
}

impl<S> Layer<S> for HedgeLayer {
    type Service = Hedge<S>;

    fn layer(&self, inner: S) -> Hedge<S> {
        Hedge {
            inner,
            shared: self.shared.clone(),
        }
    }
}

// ===== impl Hedge =====

/// The hedging service (see the [module docs](crate::hedge)).
pub struct Hedge<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: Clone> Clone for Hedge<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S> fmt::Debug for Hedge<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hedge")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl<S> Hedge<S> {
    /// The shared counters.
    pub fn stats(&self) -> HedgeStats {
        HedgeStats(self.shared.clone())
    }
}

impl<S> Service<ChatRequest> for Hedge<S>
where
    S: LlmService + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = LlmResponse;
    type Error = LlmError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: ChatRequest) -> Self::Future {
        let shared = &self.shared;
        shared.counters.requests.fetch_add(1, Ordering::Relaxed);
        shared.budget.deposit();
        let Some(delay) = shared.delay() else {
            return ResponseFuture::measured(self.inner.call(req), shared.clone());
        };
        // Both copies share one record of the targets they took, so that a balancer sends
        // the second elsewhere.
        if req.extensions.get::<TakenTargets>().is_none() {
            req.extensions.insert(TakenTargets::default());
        }
        let copy = req.clone();
        let fresh = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, fresh);
        let spare = self.inner.clone();
        ResponseFuture::race(Race::new(shared.clone(), ready, spare, req, copy, delay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` latencies spread evenly over [50 ms, 51 ms): a tight distribution, as a fast
    /// upstream's is.
    fn tight(n: u64) -> impl Iterator<Item = Duration> {
        (0..n).map(move |i| Duration::from_micros(50_000 + i * 1_000 / n))
    }

    #[tokio::test(start_paused = true)]
    async fn the_p95_delay_leaves_at_most_5_percent_of_samples_above_it() {
        // In whole milliseconds every one of these read as 50 ms, the p95 too, and a
        // request taking 50.5 ms was hedged: nearly every request ran past the delay.
        let shared = Shared::new(Config::default());
        for d in tight(1_000) {
            shared.record(d);
        }
        let delay = shared.delay().expect("enough samples");
        let above = tight(1_000).filter(|d| *d > delay).count();
        assert!(
            above <= 50,
            "{above} of 1000 samples above the p95 delay {delay:?}"
        );
        // Still the p95, to the histogram's precision (under 1 %).
        assert!(
            delay >= Duration::from_micros(50_950) && delay <= Duration::from_micros(51_400),
            "{delay:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn long_and_short_latencies_are_kept_in_range() {
        let shared = Shared::new(Config::default());
        for _ in 0..20 {
            shared.record(Duration::ZERO);
        }
        assert_eq!(shared.delay(), Some(Duration::from_micros(1)));
        let shared = Shared::new(Config::default());
        for _ in 0..20 {
            shared.record(Duration::MAX);
        }
        let delay = shared.delay().expect("enough samples");
        assert!(
            delay >= Duration::from_secs(3_600) && delay <= Duration::from_secs(3_640),
            "{delay:?}"
        );
    }
}
