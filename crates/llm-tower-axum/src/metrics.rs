//! Prometheus metrics of the HTTP surface, recorded with the `metrics` crate.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `llm_requests_total` | counter | `task`, `model`, `provider`, `tenant`, `status` (`ok`, the error kind, `dropped`: a stream the client left, `client_closed`: the client left before the headers) |
//! | `llm_request_duration_seconds` | histogram | `task`, `model`, `provider`, `tenant` (streams: until the end of the stream) |
//! | `llm_upstream_duration_seconds` | histogram | same (streams: to the first chunk) |
//! | `llm_input_tokens_total`, `llm_output_tokens_total`, `llm_cached_input_tokens_total` | counter | same |
//! | `llm_cost_nano_usd_total` | counter | same (integer nano-dollars) |
//! | `llm_cache_total` | counter | same + `cache` (`hit`, `miss`, `bypass`) |
//! | `llm_fallbacks_total` | counter | `task`, `model`, `tenant`, `provider` (the target that failed), `reason` (error kind), `skipped` |
//! | `llm_validation_failures_total` | counter | same as requests (an `invalid_output` error reached the client) |
//! | `llm_rate_limited_total` | counter | same as requests (a `rate_limited` or `budget_exceeded` error reached the client) |
//!
//! Requests refused before an LLM call (bad body, auth) count in `llm_requests_total` with
//! their error kind as `status` and an empty `model`/`provider`.
//!
//! Clients choose `task` (and `model`, which some upstreams echo): with
//! [`OpenAiRouter::known_tasks`](crate::OpenAiRouter::known_tasks) and
//! [`known_models`](crate::OpenAiRouter::known_models), names outside the known sets are
//! recorded as `other`. Without them, past 4 096 distinct label sets, new ones are recorded
//! with task and model `other`.
//!
//! A [`Server`](crate::Server) given these metrics adds `llm_connections_open` (gauge),
//! `llm_connections_refused_total` and `llm_connections_idle_closed_total`.
//!
//! Metrics with a recorder install the process-wide panic hook
//! ([`install_panic_counter`](crate::install_panic_counter)) and export
//! `llm_panics_total`: every panic of the process (handlers, stream bodies, spawned tasks),
//! caught or not. Counters kept elsewhere (such as a provider's malformed rate-limit
//! headers) are exported with [`Metrics::counter_at_scrape`].
//!
//! [`Metrics::prometheus`] (the default of [`OpenAiRouter`](crate::OpenAiRouter)) builds
//! a private recorder that is **not** installed globally: only this crate's metrics reach
//! `/metrics`. [`Metrics::install_prometheus`] installs it as the global recorder instead,
//! so the metrics of other layers show up on the same page.
//!
//! ```
//! use llm_tower_axum::Metrics;
//!
//! let metrics = Metrics::prometheus();
//! assert!(metrics.render().is_some());
//! let off = Metrics::disabled();
//! assert!(off.render().is_none());
//! ```

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use llm_tower_core::{Attempt, CacheStatus, LlmError, Usage};
use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use metrics_exporter_prometheus::{
    BuildError, Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Buckets for the latency histograms, in seconds (LLM calls: 50 ms … 2 min).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];

enum Target {
    Local(PrometheusRecorder),
    Global,
    Disabled,
}

struct Inner {
    target: Target,
    handle: Option<PrometheusHandle>,
    // Registered handles per label set: registering through the recorder on every
    // request (building and hashing the key) costs more than the rest of the router.
    // foldhash: SipHash over four label strings cost more than the lookup saves.
    handles: RwLock<HashMap<Labels, Arc<Handles>, foldhash::fast::RandomState>>,
    /// Requests observed, to run the upkeep every [`UPKEEP_EVERY`].
    observed: AtomicU64,
    /// Upkeeps run from [`Metrics::observe`].
    upkeeps: AtomicU64,
    /// Counters read when `/metrics` is rendered.
    scraped: RwLock<Vec<Scraped>>,
}

/// A counter kept outside the recorder, copied into it at every render.
struct Scraped {
    /// The name and labels: registering them again replaces this entry.
    key: (&'static str, Vec<(&'static str, String)>),
    counter: Counter,
    read: Box<dyn Fn() -> u64 + Send + Sync>,
}

/// The Prometheus recorder queues every histogram sample until an upkeep drains the queue
/// into the buckets, and without the exporter's HTTP listener nothing runs one but a
/// render of `/metrics`. Unscraped, the queue grew by ~40 bytes per request (1 MB/s at
/// 25 000 req/s). So every this many requests the observing request runs the upkeep
/// itself: ~2 000 samples, tens of µs, once per 1 024 requests.
const UPKEEP_EVERY: u64 = 1024;

/// Most label sets recorded as they are. Task names (and, on errors, model names) come from
/// clients: past this many distinct sets, a new one is recorded with task and model
/// `other`, so that no client can grow the registry and `/metrics` without bound.
const MAX_LABEL_SETS: usize = 4096;

/// The handles every answered request touches.
struct Handles {
    ok: Counter,
    // `llm_cache_total` by result: every request behind a cache layer touches one.
    cache_hit: Counter,
    cache_miss: Counter,
    cache_bypass: Counter,
    duration: Histogram,
    upstream: Histogram,
    input: Counter,
    output: Counter,
    cached: Counter,
    cost: Counter,
}

impl Handles {
    fn noop() -> Self {
        Self {
            ok: Counter::noop(),
            cache_hit: Counter::noop(),
            cache_miss: Counter::noop(),
            cache_bypass: Counter::noop(),
            duration: Histogram::noop(),
            upstream: Histogram::noop(),
            input: Counter::noop(),
            output: Counter::noop(),
            cached: Counter::noop(),
            cost: Counter::noop(),
        }
    }

    fn register(labels: &Labels) -> Self {
        let base = labels.base();
        let with = |name: &'static str, value: &str| {
            let mut l = base.to_vec();
            l.push((name, value.to_owned()));
            l
        };
        let cache =
            |status: CacheStatus| counter!("llm_cache_total", &with("cache", status.as_str()));
        Self {
            ok: counter!("llm_requests_total", &with("status", "ok")),
            cache_hit: cache(CacheStatus::Hit),
            cache_miss: cache(CacheStatus::Miss),
            cache_bypass: cache(CacheStatus::Bypass),
            duration: histogram!("llm_request_duration_seconds", &base),
            upstream: histogram!("llm_upstream_duration_seconds", &base),
            input: counter!("llm_input_tokens_total", &base),
            output: counter!("llm_output_tokens_total", &base),
            cached: counter!("llm_cached_input_tokens_total", &base),
            cost: counter!("llm_cost_nano_usd_total", &base),
        }
    }
}

/// Where the HTTP surface records its metrics and what `/metrics` renders.
/// Cheap to clone (an `Arc`).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = match self.inner.target {
            Target::Local(_) => "local",
            Target::Global => "global",
            Target::Disabled => "disabled",
        };
        f.debug_struct("Metrics")
            .field("target", &target)
            .field("renders", &self.inner.handle.is_some())
            .finish()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::prometheus()
    }
}

impl Metrics {
    /// A [`PrometheusBuilder`] with this crate's histogram buckets, to customise and pass
    /// to [`from_recorder`](Self::from_recorder) (or install yourself and use
    /// [`global`](Self::global)).
    pub fn prometheus_builder() -> PrometheusBuilder {
        PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            // Only an empty bucket list is refused; ours is not, but never panic for it.
            .unwrap_or_else(|_| PrometheusBuilder::new())
    }

    /// A private Prometheus recorder (not installed globally); `/metrics` renders it.
    pub fn prometheus() -> Self {
        Self::from_recorder(Self::prometheus_builder().build_recorder())
    }

    /// Records into `recorder` without installing it globally; `/metrics` renders it.
    pub fn from_recorder(recorder: PrometheusRecorder) -> Self {
        let handle = recorder.handle();
        let metrics = Self::new(Target::Local(recorder), Some(handle));
        metrics.record(describe);
        metrics.count_panics();
        metrics
    }

    /// Builds the Prometheus recorder and installs it as the process-wide `metrics`
    /// recorder, so metrics recorded by other layers appear on `/metrics` too.
    ///
    /// # Errors
    ///
    /// If a global recorder is already installed.
    pub fn install_prometheus() -> Result<Self, BuildError> {
        let handle = Self::prometheus_builder().install_recorder()?;
        Ok(Self::global(Some(handle)))
    }

    /// Records through whatever global `metrics` recorder the application installed;
    /// `/metrics` renders `handle` if given (else `/metrics` answers 404).
    pub fn global(handle: Option<PrometheusHandle>) -> Self {
        let metrics = Self::new(Target::Global, handle);
        metrics.record(describe);
        metrics.count_panics();
        metrics
    }

    /// Records nothing; `/metrics` answers 404.
    pub fn disabled() -> Self {
        Self::new(Target::Disabled, None)
    }

    fn new(target: Target, handle: Option<PrometheusHandle>) -> Self {
        Self {
            inner: Arc::new(Inner {
                target,
                handle,
                handles: RwLock::default(),
                observed: AtomicU64::new(0),
                upkeeps: AtomicU64::new(0),
                scraped: RwLock::default(),
            }),
        }
    }

    /// The handle `/metrics` renders, if any.
    pub fn handle(&self) -> Option<&PrometheusHandle> {
        self.inner.handle.as_ref()
    }

    /// Exports a counter kept elsewhere: at every render of `/metrics`, `name{labels}` is
    /// set to what `read` returns (a monotonic count). Registering the same name and
    /// labels again replaces the earlier `read` (a rebuilt component, after a config
    /// reload). Does nothing when disabled.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use llm_tower_axum::Metrics;
    ///
    /// let errors = Arc::new(AtomicU64::new(0));
    /// let metrics = Metrics::prometheus();
    /// let read = errors.clone();
    /// metrics.counter_at_scrape(
    ///     "my_errors_total",
    ///     "Errors seen by my component",
    ///     &[("component", "parser".to_owned())],
    ///     move || read.load(Ordering::Relaxed),
    /// );
    /// errors.store(3, Ordering::Relaxed);
    /// assert!(metrics.render().unwrap().contains(r#"my_errors_total{component="parser"} 3"#));
    /// // Registered again (a rebuilt parser): the new count replaces the old one.
    /// metrics.counter_at_scrape("my_errors_total", "Errors", &[("component", "parser".to_owned())], || 7);
    /// assert!(metrics.render().unwrap().contains(r#"my_errors_total{component="parser"} 7"#));
    /// ```
    pub fn counter_at_scrape(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, String)],
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        let mut counter = None;
        self.record(|| {
            describe_counter!(name, help);
            counter = Some(counter!(name, labels));
        });
        if let Some(counter) = counter {
            let key = (name, labels.to_vec());
            let mut scraped = self
                .inner
                .scraped
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            scraped.retain(|s| s.key != key);
            scraped.push(Scraped {
                key,
                counter,
                read: Box::new(read),
            });
        }
    }

    fn count_panics(&self) {
        crate::panics::install_panic_counter();
        self.counter_at_scrape(
            "llm_panics_total",
            "Panics in the process (handlers, stream bodies, spawned tasks), caught or not",
            &[],
            crate::panics::panic_count,
        );
    }

    /// The Prometheus text page, if this has a handle.
    pub fn render(&self) -> Option<String> {
        for s in self
            .inner
            .scraped
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            s.counter.absolute((s.read)());
        }
        self.inner.handle.as_ref().map(|h| {
            // Drain the queued samples first (between renders `observe` drains them every
            // `UPKEEP_EVERY` requests).
            h.run_upkeep();
            h.render()
        })
    }

    fn record(&self, f: impl FnOnce()) {
        match &self.inner.target {
            Target::Local(r) => metrics::with_local_recorder(r, f),
            Target::Global => f(),
            Target::Disabled => {}
        }
    }

    pub(crate) fn observe(&self, o: &Observation<'_>) {
        if matches!(self.inner.target, Target::Disabled) {
            return;
        }
        let (handles, labels) = self.handles(o.labels);
        o.emit_common(&handles);
        if o.has_rare() {
            self.record(|| o.emit_rare(&labels));
        }
        if let Some(h) = &self.inner.handle
            && self.inner.observed.fetch_add(1, Ordering::Relaxed) % UPKEEP_EVERY
                == UPKEEP_EVERY - 1
        {
            h.run_upkeep();
            self.inner.upkeeps.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The handles of `labels`, and the labels recorded: `labels` itself, or once
    /// [`MAX_LABEL_SETS`] sets exist, its [`overflow`](Labels::overflow) set.
    fn handles<'a>(&self, labels: &'a Labels) -> (Arc<Handles>, Cow<'a, Labels>) {
        let labels = {
            let map = self
                .inner
                .handles
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(h) = map.get(labels) {
                return (h.clone(), Cow::Borrowed(labels));
            }
            if map.len() < MAX_LABEL_SETS {
                Cow::Borrowed(labels)
            } else {
                let overflow = labels.overflow();
                if let Some(h) = map.get(&overflow) {
                    return (h.clone(), Cow::Owned(overflow));
                }
                Cow::Owned(overflow)
            }
        };
        let mut fresh = None;
        self.record(|| fresh = Some(Arc::new(Handles::register(&labels))));
        let Some(h) = fresh else {
            // Unreachable: `record` runs the closure for every enabled target.
            return (Arc::new(Handles::noop()), labels);
        };
        // Overflow sets are kept past the limit: there is one per provider and tenant.
        self.inner
            .handles
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(labels.clone().into_owned(), h.clone());
        (h, labels)
    }
}

/// The connection counters of a [`Server`](crate::Server).
#[derive(Clone)]
pub(crate) struct ConnectionHandles {
    pub(crate) open: Gauge,
    pub(crate) refused: Counter,
    pub(crate) idle_closed: Counter,
}

impl fmt::Debug for ConnectionHandles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConnectionHandles")
    }
}

impl Metrics {
    /// Registers the connection counters (no-ops when disabled).
    pub(crate) fn connection_handles(&self) -> ConnectionHandles {
        let mut out = ConnectionHandles {
            open: Gauge::noop(),
            refused: Counter::noop(),
            idle_closed: Counter::noop(),
        };
        self.record(|| {
            describe_gauge!("llm_connections_open", "Client connections open");
            describe_counter!(
                "llm_connections_refused_total",
                "Client connections closed on accept: the connection limit was reached"
            );
            describe_counter!(
                "llm_connections_idle_closed_total",
                "Client connections closed by the idle timeout"
            );
            out = ConnectionHandles {
                open: gauge!("llm_connections_open"),
                refused: counter!("llm_connections_refused_total"),
                idle_closed: counter!("llm_connections_idle_closed_total"),
            };
        });
        out
    }
}

fn describe() {
    describe_counter!("llm_requests_total", "LLM requests answered, by status");
    describe_histogram!(
        "llm_request_duration_seconds",
        Unit::Seconds,
        "Total request time at the gateway (streams: until the end)"
    );
    describe_histogram!(
        "llm_upstream_duration_seconds",
        Unit::Seconds,
        "Time spent waiting for the upstream (streams: to the first chunk)"
    );
    describe_counter!("llm_input_tokens_total", "Prompt tokens");
    describe_counter!("llm_output_tokens_total", "Completion tokens");
    describe_counter!(
        "llm_cached_input_tokens_total",
        "Prompt tokens served from the provider's prompt cache"
    );
    describe_counter!("llm_cost_nano_usd_total", "Cost in nano-dollars");
    describe_counter!("llm_cache_total", "Response cache lookups by result");
    describe_counter!(
        "llm_fallbacks_total",
        "Fallback attempts that failed or were skipped, by reason"
    );
    describe_counter!(
        "llm_validation_failures_total",
        "Requests that ended with invalid model output"
    );
    describe_counter!(
        "llm_rate_limited_total",
        "Requests refused by a rate limit or budget"
    );
}

/// The labels of one request (shared strings: a request takes them from its tenant,
/// task and meta without copying).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Labels {
    pub(crate) task: Arc<str>,
    pub(crate) model: Arc<str>,
    pub(crate) provider: Arc<str>,
    pub(crate) tenant: Arc<str>,
}

impl Default for Labels {
    /// Task `none`, the rest empty.
    fn default() -> Self {
        static NONE: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "none".into());
        Self {
            task: NONE.clone(),
            model: Arc::default(),
            provider: Arc::default(),
            tenant: Arc::default(),
        }
    }
}

impl Labels {
    /// The same with task and model `other`: where requests go once the label sets are
    /// [`MAX_LABEL_SETS`].
    pub(crate) fn overflow(&self) -> Self {
        static OTHER: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "other".into());
        Self {
            task: OTHER.clone(),
            model: OTHER.clone(),
            provider: self.provider.clone(),
            tenant: self.tenant.clone(),
        }
    }

    fn base(&self) -> [(&'static str, String); 4] {
        [
            ("task", self.task.to_string()),
            ("model", self.model.to_string()),
            ("provider", self.provider.to_string()),
            ("tenant", self.tenant.to_string()),
        ]
    }
}

/// One fallback attempt that did not serve.
#[derive(Debug, Clone)]
pub(crate) struct FailedAttempt {
    pub(crate) target: String,
    pub(crate) reason: &'static str,
    pub(crate) skipped: bool,
}

impl FailedAttempt {
    pub(crate) fn from_meta(attempts: &[Attempt]) -> Vec<Self> {
        attempts
            .iter()
            .filter_map(|a| {
                a.error.as_ref().map(|e| Self {
                    target: a.target.to_string(),
                    reason: e.kind.as_str(),
                    skipped: e.skipped,
                })
            })
            .collect()
    }

    pub(crate) fn from_error(error: &LlmError) -> Vec<Self> {
        error
            .attempts()
            .iter()
            .map(|e| Self {
                target: e.provider().unwrap_or("unknown").to_owned(),
                reason: e.kind().as_str(),
                skipped: false,
            })
            .collect()
    }
}

/// Everything recorded about one finished request.
#[derive(Debug)]
pub(crate) struct Observation<'a> {
    pub(crate) labels: &'a Labels,
    pub(crate) status: &'a str,
    pub(crate) total: Duration,
    pub(crate) upstream: Option<Duration>,
    pub(crate) usage: Option<&'a Usage>,
    pub(crate) cost_nano_usd: Option<u64>,
    pub(crate) cache: CacheStatus,
    pub(crate) fallbacks: &'a [FailedAttempt],
}

impl Observation<'_> {
    fn emit_common(&self, h: &Handles) {
        if self.status == "ok" {
            h.ok.increment(1);
        }
        h.duration.record(self.total.as_secs_f64());
        if let Some(up) = self.upstream {
            h.upstream.record(up.as_secs_f64());
        }
        if let Some(u) = self.usage {
            h.input.increment(u.prompt_tokens);
            h.output.increment(u.completion_tokens);
            let cached = u.cached_tokens();
            if cached > 0 {
                h.cached.increment(cached);
            }
        }
        if let Some(nano) = self.cost_nano_usd {
            h.cost.increment(nano);
        }
        match self.cache {
            CacheStatus::Hit => h.cache_hit.increment(1),
            CacheStatus::Miss => h.cache_miss.increment(1),
            CacheStatus::Bypass => h.cache_bypass.increment(1),
            CacheStatus::None => {}
        }
    }

    /// Whether anything beyond the common handles must be recorded.
    fn has_rare(&self) -> bool {
        self.status != "ok" || !self.fallbacks.is_empty()
    }

    fn emit_rare(&self, labels: &Labels) {
        let base = labels.base();
        if self.status != "ok" {
            let mut with_status = base.to_vec();
            with_status.push(("status", self.status.to_owned()));
            counter!("llm_requests_total", &with_status).increment(1);
        }
        for f in self.fallbacks {
            let l = [
                ("task", labels.task.to_string()),
                ("model", labels.model.to_string()),
                ("tenant", labels.tenant.to_string()),
                ("provider", f.target.clone()),
                ("reason", f.reason.to_owned()),
                ("skipped", f.skipped.to_string()),
            ];
            counter!("llm_fallbacks_total", &l).increment(1);
        }
        match self.status {
            "invalid_output" => counter!("llm_validation_failures_total", &base).increment(1),
            "rate_limited" | "budget_exceeded" => {
                counter!("llm_rate_limited_total", &base).increment(1);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observe(m: &Metrics, labels: &Labels, times: u64) {
        for _ in 0..times {
            m.observe(&Observation {
                labels,
                status: "ok",
                total: Duration::from_millis(3),
                upstream: Some(Duration::from_millis(2)),
                usage: None,
                cost_nano_usd: None,
                cache: CacheStatus::Miss,
                fallbacks: &[],
            });
        }
    }

    #[test]
    fn unscraped_histograms_are_drained_every_upkeep_interval() {
        let m = Metrics::prometheus();
        let labels = Labels::default();
        observe(&m, &labels, UPKEEP_EVERY - 1);
        assert_eq!(m.inner.upkeeps.load(Ordering::Relaxed), 0);
        observe(&m, &labels, 1);
        assert_eq!(m.inner.upkeeps.load(Ordering::Relaxed), 1);
        observe(&m, &labels, 2 * UPKEEP_EVERY);
        assert_eq!(m.inner.upkeeps.load(Ordering::Relaxed), 3);
        // Drained samples are counted, not lost.
        let page = m.render().unwrap();
        let count = format!(
            "llm_request_duration_seconds_count{{task=\"none\",model=\"\",provider=\"\",tenant=\"\"}} {}",
            3 * UPKEEP_EVERY
        );
        assert!(page.contains(&count), "{page}");
    }

    #[test]
    fn client_chosen_labels_cannot_grow_the_registry_without_bound() {
        let m = Metrics::prometheus();
        let mut labels = Labels {
            tenant: "acme".into(),
            ..Labels::default()
        };
        for i in 0..MAX_LABEL_SETS + 10 {
            labels.task = format!("task-{i}").into();
            observe(&m, &labels, 1);
        }
        // A failed request past the limit: its rare counters go to `other` as well.
        m.observe(&Observation {
            labels: &Labels {
                task: "one-more".into(),
                ..labels
            },
            status: "rate_limited",
            total: Duration::from_millis(1),
            upstream: None,
            usage: None,
            cost_nano_usd: None,
            cache: CacheStatus::None,
            fallbacks: &[],
        });
        let page = m.render().unwrap();
        let series = page
            .lines()
            .filter(|l| l.starts_with("llm_request_duration_seconds_count{"))
            .count();
        assert_eq!(
            series,
            MAX_LABEL_SETS + 1,
            "the sets up to the limit, then `other`"
        );
        let other = r#"{task="other",model="other",provider="",tenant="acme"}"#;
        assert!(
            page.contains(&format!("llm_request_duration_seconds_count{other} 11")),
            "{page}"
        );
        assert!(page.contains(&format!("llm_rate_limited_total{other} 1")));
        assert!(!page.contains("one-more"));
    }

    #[test]
    fn panics_anywhere_in_the_process_are_on_the_page() {
        let m = Metrics::prometheus();
        let before = crate::panic_count();
        // A panic in a spawned thread: no handler, nobody catches it but the join.
        let _ = std::thread::spawn(|| panic!("a panic the hook counts")).join();
        let after = crate::panic_count();
        assert!(after > before);
        let page = m.render().unwrap();
        let line = page
            .lines()
            .find(|l| l.starts_with("llm_panics_total "))
            .unwrap_or_else(|| panic!("{page}"));
        // Other tests of this binary may panic too: at least ours is counted.
        let n: u64 = line["llm_panics_total ".len()..].parse().unwrap();
        assert!(n >= after, "{line}");
        assert!(Metrics::disabled().render().is_none());
    }

    #[test]
    fn without_a_handle_nothing_is_drained() {
        let m = Metrics::disabled();
        observe(&m, &Labels::default(), UPKEEP_EVERY);
        assert_eq!(m.inner.upkeeps.load(Ordering::Relaxed), 0);
        let m = Metrics::global(None);
        observe(&m, &Labels::default(), UPKEEP_EVERY);
        assert_eq!(m.inner.upkeeps.load(Ordering::Relaxed), 0);
    }
}
