//! [`Activity`]: what the HTTP surface answered over the last hour, minute by minute, for
//! `/status` and the status page.
//!
//! Prometheus keeps counters since start and leaves windows to the scraper; a person
//! looking at one gateway wants "the last 5 minutes" and "the last hour" without a
//! Prometheus server. So the router also records every finished request into one-minute
//! buckets (the last [`MINUTES`]), keyed by the same labels as the metrics (task, model,
//! provider, tenant: names the configuration knows, or `other`), and
//! [`Activity::snapshot`] sums any window of up to an hour.
//!
//! Memory is bounded: at most [`MAX_SETS_PER_MINUTE`] label sets per minute (past it a
//! request counts under task and model `other`, as the metrics do), 60 minutes kept.
//!
//! ```
//! use llm_tower_axum::Activity;
//!
//! let activity = Activity::new();
//! let snap = activity.snapshot(60);
//! assert_eq!(snap.totals.requests, 0);
//! assert_eq!(snap.window_minutes, 60);
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use llm_tower_core::CacheStatus;
use serde::Serialize;

use crate::metrics::{Labels, Observation};

/// Minutes kept (the longest window a snapshot can sum).
pub const MINUTES: u32 = 60;

/// Most label sets kept per minute; past it requests count under task and model `other`.
pub const MAX_SETS_PER_MINUTE: usize = 1024;

/// Latency bucket upper bounds, in milliseconds (the last bucket is open-ended).
const BOUNDS_MS: [f64; 16] = [
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0, 10_000.0, 20_000.0,
    30_000.0, 60_000.0, 120_000.0, 300_000.0,
];
const BUCKETS: usize = BOUNDS_MS.len() + 1;

/// Counts of one label set in one minute.
#[derive(Debug, Clone, Default)]
struct Cell {
    requests: u64,
    errors: u64,
    input_tokens: u64,
    output_tokens: u64,
    cached_input_tokens: u64,
    cost_nano_usd: u64,
    cache_hits: u64,
    cache_misses: u64,
    cache_bypasses: u64,
    rate_limited: u64,
    latency: Hist,
    upstream: Hist,
}

#[derive(Debug, Clone, Copy)]
struct Hist([u32; BUCKETS]);

impl Default for Hist {
    fn default() -> Self {
        Self([0; BUCKETS])
    }
}

impl Hist {
    fn record(&mut self, ms: f64) {
        let i = BOUNDS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(BUCKETS - 1);
        self.0[i] = self.0[i].saturating_add(1);
    }

    fn add(&mut self, other: &Hist) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a = a.saturating_add(*b);
        }
    }

    fn count(&self) -> u64 {
        self.0.iter().map(|n| u64::from(*n)).sum()
    }

    /// The `q` quantile in ms, interpolated inside its bucket; `None` when empty.
    fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = (q * n as f64).ceil().max(1.0);
        let mut seen = 0.0;
        for (i, c) in self.0.iter().enumerate() {
            let c = f64::from(*c);
            if c > 0.0 && seen + c >= rank {
                let lo = if i == 0 { 0.0 } else { BOUNDS_MS[i - 1] };
                let hi = BOUNDS_MS.get(i).copied().unwrap_or(lo);
                let frac = (rank - seen) / c;
                return Some(((lo + (hi - lo) * frac) * 10.0).round() / 10.0);
            }
            seen += c;
        }
        None
    }

    fn summary(&self) -> Option<Latency> {
        Some(Latency {
            p50: self.quantile(0.50)?,
            p90: self.quantile(0.90)?,
            p99: self.quantile(0.99)?,
        })
    }
}

impl Cell {
    fn add(&mut self, o: &Cell) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.input_tokens += o.input_tokens;
        self.output_tokens += o.output_tokens;
        self.cached_input_tokens += o.cached_input_tokens;
        self.cost_nano_usd = self.cost_nano_usd.saturating_add(o.cost_nano_usd);
        self.cache_hits += o.cache_hits;
        self.cache_misses += o.cache_misses;
        self.cache_bypasses += o.cache_bypasses;
        self.rate_limited += o.rate_limited;
        self.latency.add(&o.latency);
        self.upstream.add(&o.upstream);
    }
}

/// A fallback attempt that did not serve: the target, the reason (error kind), skipped.
type FallbackKey = (Arc<str>, &'static str, bool);

#[derive(Debug, Default)]
struct Minute {
    /// Minutes since the Unix epoch.
    index: u64,
    cells: HashMap<Labels, Cell, foldhash::fast::RandomState>,
    fallbacks: HashMap<FallbackKey, u64, foldhash::fast::RandomState>,
}

#[derive(Default)]
struct Inner {
    minutes: Mutex<VecDeque<Minute>>,
    requests: AtomicU64,
    errors: AtomicU64,
    cost_nano_usd: AtomicU64,
    overflowed: AtomicU64,
}

/// The per-minute record of finished requests. Cheap to
/// clone; clones share the record. Give it to [`OpenAiRouter::activity`](crate::OpenAiRouter::activity).
#[derive(Clone, Default)]
pub struct Activity(Arc<Inner>);

impl fmt::Debug for Activity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Activity")
            .field("requests", &self.0.requests.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn now_minute() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60)
}

impl Activity {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn observe(&self, o: &Observation<'_>) {
        self.observe_at(now_minute(), o);
    }

    fn observe_at(&self, minute: u64, o: &Observation<'_>) {
        let ok = o.status == "ok";
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.0.errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(c) = o.cost_nano_usd {
            self.0.cost_nano_usd.fetch_add(c, Ordering::Relaxed);
        }
        let mut minutes = self
            .0
            .minutes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if minutes.back().is_none_or(|m| m.index < minute) {
            minutes.push_back(Minute {
                index: minute,
                ..Minute::default()
            });
            while minutes.len() > MINUTES as usize {
                minutes.pop_front();
            }
        }
        // A clock that stepped back: count into the newest minute.
        let Some(m) = minutes.back_mut() else {
            return;
        };
        let cell = if let Some(c) = m.cells.get_mut(o.labels) {
            c
        } else if m.cells.len() < MAX_SETS_PER_MINUTE {
            m.cells.entry(o.labels.clone()).or_default()
        } else {
            self.0.overflowed.fetch_add(1, Ordering::Relaxed);
            m.cells.entry(o.labels.overflow()).or_default()
        };
        cell.requests += 1;
        if !ok {
            cell.errors += 1;
        }
        if matches!(o.status, "rate_limited" | "budget_exceeded") {
            cell.rate_limited += 1;
        }
        if let Some(u) = o.usage {
            cell.input_tokens += u.prompt_tokens;
            cell.output_tokens += u.completion_tokens;
            cell.cached_input_tokens += u.cached_tokens();
        }
        if let Some(c) = o.cost_nano_usd {
            cell.cost_nano_usd = cell.cost_nano_usd.saturating_add(c);
        }
        match o.cache {
            CacheStatus::Hit => cell.cache_hits += 1,
            CacheStatus::Miss => cell.cache_misses += 1,
            CacheStatus::Bypass => cell.cache_bypasses += 1,
            CacheStatus::None => {}
        }
        cell.latency.record(o.total.as_secs_f64() * 1000.0);
        if let Some(up) = o.upstream {
            cell.upstream.record(up.as_secs_f64() * 1000.0);
        }
        for f in o.fallbacks {
            // Targets are the configured chain steps (a bounded set); a made-up name
            // cannot reach here, but cap anyway.
            if m.fallbacks.len() < MAX_SETS_PER_MINUTE
                || m.fallbacks
                    .contains_key(&(Arc::from(f.target.as_str()), f.reason, f.skipped))
            {
                *m.fallbacks
                    .entry((Arc::from(f.target.as_str()), f.reason, f.skipped))
                    .or_default() += 1;
            }
        }
    }

    /// Sums the last `window_minutes` minutes (1 to [`MINUTES`]; the current, partial
    /// minute included).
    pub fn snapshot(&self, window_minutes: u32) -> ActivitySnapshot {
        self.snapshot_at(now_minute(), window_minutes)
    }

    fn snapshot_at(&self, now: u64, window_minutes: u32) -> ActivitySnapshot {
        let window = window_minutes.clamp(1, MINUTES);
        let first = now.saturating_sub(u64::from(window) - 1);
        let timeline_first = now.saturating_sub(u64::from(MINUTES) - 1);
        let mut total = Cell::default();
        let mut by_task: BTreeMap<String, Cell> = BTreeMap::new();
        let mut by_tenant: BTreeMap<String, Cell> = BTreeMap::new();
        let mut by_model: BTreeMap<String, Cell> = BTreeMap::new();
        let mut by_provider: BTreeMap<String, Cell> = BTreeMap::new();
        let mut fallbacks: BTreeMap<(String, &'static str, bool), u64> = BTreeMap::new();
        let mut failed_attempts: BTreeMap<String, u64> = BTreeMap::new();
        let mut timeline = Vec::new();
        {
            let minutes = self
                .0
                .minutes
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for m in minutes.iter().filter(|m| m.index >= timeline_first) {
                let mut sum = Cell::default();
                let mut fb = 0;
                for c in m.cells.values() {
                    sum.add(c);
                }
                for n in m.fallbacks.values() {
                    fb += n;
                }
                timeline.push(TimelinePoint::new(m.index, &sum, fb));
                if m.index < first {
                    continue;
                }
                total.add(&sum);
                for (l, c) in &m.cells {
                    by_task.entry(l.task.to_string()).or_default().add(c);
                    by_tenant.entry(l.tenant.to_string()).or_default().add(c);
                    if !l.model.is_empty() {
                        by_model.entry(l.model.to_string()).or_default().add(c);
                    }
                    if !l.provider.is_empty() {
                        by_provider
                            .entry(l.provider.to_string())
                            .or_default()
                            .add(c);
                    }
                }
                for ((target, reason, skipped), n) in &m.fallbacks {
                    *fallbacks
                        .entry((target.to_string(), reason, *skipped))
                        .or_default() += n;
                    if !skipped {
                        *failed_attempts.entry(target.to_string()).or_default() += n;
                    }
                }
            }
        }
        let conv = |m: BTreeMap<String, Cell>| -> BTreeMap<String, Totals> {
            m.into_iter().map(|(k, c)| (k, Totals::from(&c))).collect()
        };
        let mut providers: BTreeMap<String, ProviderActivity> = by_provider
            .into_iter()
            .map(|(k, c)| {
                let served = c.requests;
                (
                    k,
                    ProviderActivity {
                        served,
                        failed_attempts: 0,
                        error_ratio: 0.0,
                        upstream_latency_ms: c.upstream.summary(),
                    },
                )
            })
            .collect();
        for (name, n) in failed_attempts {
            let p = providers.entry(name).or_insert(ProviderActivity {
                served: 0,
                failed_attempts: 0,
                error_ratio: 0.0,
                upstream_latency_ms: None,
            });
            p.failed_attempts = n;
        }
        for p in providers.values_mut() {
            let all = p.served + p.failed_attempts;
            p.error_ratio = if all == 0 {
                0.0
            } else {
                p.failed_attempts as f64 / all as f64
            };
        }
        ActivitySnapshot {
            window_minutes: window,
            since_start: SinceStart {
                requests: self.0.requests.load(Ordering::Relaxed),
                errors: self.0.errors.load(Ordering::Relaxed),
                cost_nano_usd: self.0.cost_nano_usd.load(Ordering::Relaxed),
                overflowed: self.0.overflowed.load(Ordering::Relaxed),
            },
            totals: Totals::from(&total),
            by_task: conv(by_task),
            by_tenant: conv(by_tenant),
            by_model: conv(by_model),
            by_provider: providers,
            fallbacks: fallbacks
                .into_iter()
                .map(|((provider, reason, skipped), count)| FallbackCount {
                    provider,
                    reason,
                    skipped,
                    count,
                })
                .collect(),
            timeline,
        }
    }
}

/// Latency percentiles in milliseconds (estimated from buckets: 5, 10, 25, 50, 100, 250,
/// 500 ms, 1, 2, 5, 10, 20, 30, 60, 120, 300 s; interpolated inside a bucket).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// Sums over a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Totals {
    /// Requests answered (ok or not).
    pub requests: u64,
    /// Requests that ended in an error (any status but `ok`).
    pub errors: u64,
    /// Requests refused by a rate limit or a budget.
    pub rate_limited: u64,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
    /// Prompt tokens served from the provider's prompt cache.
    pub cached_input_tokens: u64,
    /// Cost in nano-dollars (integer).
    pub cost_nano_usd: u64,
    /// Cost in dollars (for display).
    pub cost_usd: f64,
    /// Response cache hits.
    pub cache_hits: u64,
    /// Response cache misses.
    pub cache_misses: u64,
    /// Hits over hits + misses (0 when nothing was looked up).
    pub cache_hit_ratio: f64,
    /// Whole-request latency at the gateway (streams: to their end).
    pub latency_ms: Option<Latency>,
}

impl From<&Cell> for Totals {
    fn from(c: &Cell) -> Self {
        let looked = c.cache_hits + c.cache_misses;
        Self {
            requests: c.requests,
            errors: c.errors,
            rate_limited: c.rate_limited,
            input_tokens: c.input_tokens,
            output_tokens: c.output_tokens,
            cached_input_tokens: c.cached_input_tokens,
            cost_nano_usd: c.cost_nano_usd,
            cost_usd: c.cost_nano_usd as f64 / 1e9,
            cache_hits: c.cache_hits,
            cache_misses: c.cache_misses,
            cache_hit_ratio: if looked == 0 {
                0.0
            } else {
                c.cache_hits as f64 / looked as f64
            },
            latency_ms: c.latency.summary(),
        }
    }
}

/// What one provider did over the window, as seen by the requests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProviderActivity {
    /// Requests it served.
    pub served: u64,
    /// Attempts on it that failed and moved on (or ended the request).
    pub failed_attempts: u64,
    /// `failed_attempts / (served + failed_attempts)`.
    pub error_ratio: f64,
    /// Time to its answer (streams: to the first chunk).
    pub upstream_latency_ms: Option<Latency>,
}

/// Fallback attempts of one provider for one reason.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FallbackCount {
    /// The provider (chain step) that did not serve.
    pub provider: String,
    /// The error kind (`rate_limited`, `timeout`, `unavailable`…).
    pub reason: &'static str,
    /// Whether it was skipped (cooling down) rather than tried.
    pub skipped: bool,
    /// How many.
    pub count: u64,
}

/// One minute of the last hour.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelinePoint {
    /// The minute's start, Unix seconds.
    pub minute_unix: u64,
    /// Requests answered in it.
    pub requests: u64,
    /// Of which errors.
    pub errors: u64,
    /// Cost, nano-dollars.
    pub cost_nano_usd: u64,
    /// Cache hits.
    pub cache_hits: u64,
    /// Cache misses.
    pub cache_misses: u64,
    /// Fallback attempts (failed or skipped).
    pub fallbacks: u64,
    /// Latency percentiles.
    pub latency_ms: Option<Latency>,
}

impl TimelinePoint {
    fn new(index: u64, c: &Cell, fallbacks: u64) -> Self {
        Self {
            minute_unix: index * 60,
            requests: c.requests,
            errors: c.errors,
            cost_nano_usd: c.cost_nano_usd,
            cache_hits: c.cache_hits,
            cache_misses: c.cache_misses,
            fallbacks,
            latency_ms: c.latency.summary(),
        }
    }
}

/// Counters since the process started (monotonic: a page computes rates from two reads).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SinceStart {
    /// Requests answered.
    pub requests: u64,
    /// Of which errors.
    pub errors: u64,
    /// Cost, nano-dollars.
    pub cost_nano_usd: u64,
    /// Requests counted under `other` because a minute had too many label sets.
    pub overflowed: u64,
}

/// [`Activity::snapshot`]: one window, by task, tenant, model and provider, plus the
/// minute-by-minute timeline of the last hour.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActivitySnapshot {
    /// The window summed, in minutes.
    pub window_minutes: u32,
    /// Monotonic counters since start.
    pub since_start: SinceStart,
    /// Everything in the window.
    pub totals: Totals,
    /// By task type (`none`: no task; `other`: a task the config does not know).
    pub by_task: BTreeMap<String, Totals>,
    /// By tenant.
    pub by_tenant: BTreeMap<String, Totals>,
    /// By model (the served model when known, else the requested one).
    pub by_model: BTreeMap<String, Totals>,
    /// By provider.
    pub by_provider: BTreeMap<String, ProviderActivity>,
    /// Fallback attempts by provider and reason.
    pub fallbacks: Vec<FallbackCount>,
    /// The last hour, one point per minute that saw requests, oldest first.
    pub timeline: Vec<TimelinePoint>,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use llm_tower_core::Usage;

    use super::*;
    use crate::metrics::FailedAttempt;

    fn labels(task: &str, tenant: &str, model: &str, provider: &str) -> Labels {
        Labels {
            task: task.into(),
            model: model.into(),
            provider: provider.into(),
            tenant: tenant.into(),
        }
    }

    fn obs<'a>(
        l: &'a Labels,
        status: &'a str,
        ms: u64,
        usage: Option<&'a Usage>,
        fallbacks: &'a [FailedAttempt],
    ) -> Observation<'a> {
        Observation {
            labels: l,
            status,
            total: Duration::from_millis(ms),
            upstream: Some(Duration::from_millis(ms / 2)),
            usage,
            cost_nano_usd: Some(1_500),
            cache: CacheStatus::Miss,
            fallbacks,
        }
    }

    #[test]
    fn windows_sum_the_minutes_inside_them_only() {
        let a = Activity::new();
        let l = labels("summarize", "acme", "gpt", "openai");
        let usage = Usage::new(10, 5);
        // 100 minutes ago (dropped from the record), 30 minutes ago, now.
        a.observe_at(1000, &obs(&l, "ok", 40, Some(&usage), &[]));
        a.observe_at(1070, &obs(&l, "ok", 40, Some(&usage), &[]));
        a.observe_at(1100, &obs(&l, "ok", 40, Some(&usage), &[]));
        a.observe_at(1100, &obs(&l, "timeout", 400, None, &[]));

        let five = a.snapshot_at(1100, 5);
        assert_eq!(five.totals.requests, 2);
        assert_eq!(five.totals.errors, 1);
        assert_eq!(five.totals.input_tokens, 10);
        assert_eq!(five.by_task["summarize"].cost_nano_usd, 3_000);
        let hour = a.snapshot_at(1100, 60);
        assert_eq!(hour.totals.requests, 3);
        assert_eq!(hour.by_tenant["acme"].output_tokens, 10);
        assert_eq!(hour.timeline.len(), 2, "{:?}", hour.timeline);
        assert_eq!(hour.timeline[0].minute_unix, 1070 * 60);
        // Since start counts all four, the dropped minute included.
        assert_eq!(hour.since_start.requests, 4);
        let lat = hour.totals.latency_ms.unwrap();
        assert!(lat.p50 > 25.0 && lat.p50 <= 50.0, "{lat:?}");
        assert!(lat.p99 > 250.0 && lat.p99 <= 500.0, "{lat:?}");
        // Out of range windows are clamped.
        assert_eq!(a.snapshot_at(1100, 0).window_minutes, 1);
        assert_eq!(a.snapshot_at(1100, 10_000).window_minutes, MINUTES);
    }

    #[test]
    fn provider_error_ratio_counts_failed_attempts() {
        let a = Activity::new();
        let served = labels("none", "t", "m", "backup");
        let fb = [FailedAttempt {
            target: "primary".into(),
            reason: "rate_limited",
            skipped: false,
        }];
        for _ in 0..3 {
            a.observe_at(5, &obs(&served, "ok", 10, None, &fb));
        }
        a.observe_at(
            5,
            &obs(&labels("none", "t", "m", "primary"), "ok", 10, None, &[]),
        );
        let s = a.snapshot_at(5, 1);
        let p = &s.by_provider["primary"];
        assert_eq!((p.served, p.failed_attempts), (1, 3));
        assert!((p.error_ratio - 0.75).abs() < 1e-9);
        assert_eq!(s.by_provider["backup"].error_ratio, 0.0);
        assert_eq!(s.fallbacks.len(), 1);
        assert_eq!(s.fallbacks[0].count, 3);
        assert_eq!(s.fallbacks[0].reason, "rate_limited");
    }

    #[test]
    fn label_sets_per_minute_are_capped() {
        let a = Activity::new();
        for i in 0..MAX_SETS_PER_MINUTE + 50 {
            let l = labels(&format!("t{i}"), "acme", "m", "p");
            a.observe_at(7, &obs(&l, "ok", 1, None, &[]));
        }
        let s = a.snapshot_at(7, 1);
        assert_eq!(s.totals.requests, (MAX_SETS_PER_MINUTE + 50) as u64);
        assert_eq!(s.by_task.len(), MAX_SETS_PER_MINUTE + 1);
        assert_eq!(s.by_task["other"].requests, 50);
        assert_eq!(s.since_start.overflowed, 50);
        // Only the last hour is kept.
        for m in 0..200 {
            a.observe_at(
                100 + m,
                &obs(&labels("x", "y", "m", "p"), "ok", 1, None, &[]),
            );
        }
        assert_eq!(a.0.minutes.lock().unwrap().len(), MINUTES as usize);
    }
}
