//! An ordered fallback chain — primary, cheaper primary, free model — with per-attempt
//! timeouts, a cooldown (circuit breaker) per target and a commit point for streams.
//!
//! # Which errors move on
//!
//! The next target is tried only for errors whose
//! [`should_fall_back`](crate::LlmError::should_fall_back) is true: rate limited, timeouts,
//! unavailable, overloaded and transport failures. A bad request, an auth error or a
//! content-policy refusal would fail the same way everywhere, so it is returned at once.
//! A layer below (a local rate limit) can ask to move on by answering
//! [`ErrorKind::RateLimited`](crate::ErrorKind::RateLimited). When every target fails, the
//! error is [`LlmError::all_failed`](crate::LlmError::all_failed): it says so, lists every
//! attempt and keeps each attempt's error in [`attempts`](crate::LlmError::attempts).
//!
//! # Timeouts
//!
//! Each attempt has up to three limits, each failing the attempt with
//! [`ErrorKind::Timeout`](crate::ErrorKind::Timeout) (so the chain moves on):
//! - **total** ([`FallbackLayer::timeout`]): from the attempt's start (readiness included) to a
//!   complete response, or to the first chunk of a stream;
//! - **first chunk** ([`FallbackLayer::first_chunk_timeout`]): streaming requests only, from the
//!   attempt's start to the first chunk;
//! - **stall** ([`FallbackLayer::stall_timeout`]): between two chunks of a committed stream.
//!
//! A request's [`Deadline`](crate::Deadline) extension caps every attempt, and a target is
//! skipped once the deadline has passed.
//!
//! # Commit point for streams
//!
//! A stream may fall back only **before its first chunk reaches the caller**: the future polls
//! the first chunk itself, and only then returns the response. After that, an upstream
//! failure or a stall ends the stream with an explicit error item, and (by default,
//! [`FallbackLayer::require_finish_reason`]) a stream that simply stops before any finish
//! reason also ends with an error item — never a clean end that looks like success.
//!
//! # Cooldown
//!
//! When, within [`Cooldown`]'s sliding `window`, at least `min_calls` attempts were made and
//! at least its failure ratio of them failed in a way that moves on, a target is skipped for
//! its `duration` (so a provider failing 80 % of calls is skipped, not paid for on every
//! request); then one request probes it (the others still skip it) and the probe's outcome
//! closes or reopens it. A `retry-after` on an error also keeps the target skipped until
//! then. No target is skipped longer than [`FallbackLayer::max_cooldown`] (default
//! 5 minutes), whatever the upstream asks. The state lives in an `Arc` shared by every
//! clone of the service and the layer; [`FallbackHealth::snapshot`] reads it for metrics.
//!
//! # Readiness
//!
//! [`Fallback`] reports ready at once and drives each target's readiness inside the response
//! future, on a clone of that target: waiting for every target to be ready would stall the
//! chain on exactly the provider it exists to route around. Time spent waiting for
//! readiness counts towards the attempt's total timeout.
//!
//! # Response meta
//!
//! [`ResponseMeta::attempts`](crate::ResponseMeta) lists every target tried or skipped, with
//! the model asked for and why it failed; the last one served.
//! [`ResponseMeta::provider`](crate::ResponseMeta) is set to the serving target's name when
//! the target did not set it. A failed attempt that reported usage (its error's
//! [`usage`](crate::LlmError::usage), or a stream whose usage arrived before it failed
//! ahead of its commit point) was paid for: it is carried, with the model that target
//! served, in the `paid_attempts` of the response (or the error) the chain returns, so that
//! the cost and rate-limit layers above count it.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), llm_tower::LlmError> {
//! use llm_tower::fallback::{Cooldown, FallbackLayer, FallbackTarget};
//! use llm_tower::{ChatRequest, ChatResponse, LlmError, LlmResponse, LlmServiceBuilderExt, Message};
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! let primary = tower::service_fn(|_req: ChatRequest| async move {
//!     Err::<LlmResponse, _>(LlmError::unavailable("503 from upstream"))
//! });
//! let free = tower::service_fn(|req: ChatRequest| async move {
//!     Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(req.model, "free answer")))
//! });
//!
//! let mut svc = ServiceBuilder::new()
//!     .fallback(FallbackLayer::new(vec![FallbackTarget::new("free", free).with_model("llama-3-8b")]))
//!     .service(primary);
//!
//! let resp = svc.ready().await?.call(ChatRequest::new("gpt-4o", vec![Message::user("hi")])).await?;
//! assert_eq!(resp.meta.attempts.len(), 2);
//! assert_eq!(&*resp.meta.attempts[0].target, "primary");
//! assert!(resp.meta.attempts[0].error.is_some());
//! assert_eq!(resp.meta.provider.as_deref(), Some("free"));
//! assert_eq!(resp.into_complete().await?.model, "llama-3-8b");
//!
//! // Tuned: timeouts per attempt and the cooldown.
//! let _layer = FallbackLayer::new(vec![])
//!     .primary_name("openai")
//!     .timeout(Duration::from_secs(30))
//!     .first_chunk_timeout(Duration::from_secs(5))
//!     .stall_timeout(Duration::from_secs(10))
//!     .cooldown(Cooldown::new(10, Duration::from_secs(60), Duration::from_secs(30)).failure_ratio(0.5))
//!     .max_cooldown(Duration::from_secs(120));
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use llm_tower_core::{
    Attempt, AttemptError, BoxEventStream, BoxLlmService, ChatRequest, LlmError, LlmResponse,
    PaidAttempt, ResponseBody, StreamEvent, boxed,
};
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

// ===== targets and configuration =====

/// One link of the chain: a named LLM service and, optionally, the model to ask it for.
#[derive(Clone)]
pub struct FallbackTarget {
    name: Arc<str>,
    service: BoxLlmService,
    model: Option<String>,
}

impl fmt::Debug for FallbackTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackTarget")
            .field("name", &self.name)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl FallbackTarget {
    /// The target `name`, served by `service` (boxed, so targets may differ in type).
    pub fn new<S>(name: impl Into<Arc<str>>, service: S) -> Self
    where
        S: Service<ChatRequest, Response = LlmResponse, Error = LlmError>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        Self::from_boxed(name, boxed(service))
    }

    /// The target `name`, served by an already boxed service.
    pub fn from_boxed(name: impl Into<Arc<str>>, service: BoxLlmService) -> Self {
        Self {
            name: name.into(),
            service,
            model: None,
        }
    }

    /// Rewrites the request's model on this attempt.
    #[must_use]
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// The target's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The model this target asks for, if it rewrites it.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

/// The circuit breaker of each target.
///
/// Opens when, within a sliding `window`, at least `min_calls` attempts were made and the
/// share of them that failed (in a way that moves on) is at least the
/// [`failure_ratio`](Self::failure_ratio) (default 0.5). An open target is skipped for
/// `duration`, then one request probes it: a success closes the breaker, a failure reopens
/// it. A probe that ends without an answer (its caller dropped it, or its deadline ran out)
/// frees the probe slot at once; a probe still running after `duration` (or the attempt
/// timeout, if longer) no longer blocks a new one.
///
/// The window is counted in 10 buckets of `window / 10` each, so its memory is fixed
/// however many requests pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cooldown {
    min_calls: u32,
    /// The failure ratio in millionths (kept as an integer so that the type stays `Eq`).
    ratio_ppm: u32,
    window: Duration,
    duration: Duration,
}

/// Buckets of the sliding window.
const WINDOW_BUCKETS: u32 = 10;
/// The failure ratio of [`Cooldown::new`].
const DEFAULT_RATIO_PPM: u32 = 500_000;

impl Cooldown {
    /// Opens once at least `min_calls` (at least 1) attempts within `window` failed at a
    /// ratio of 0.5 or more, for `duration`.
    pub const fn new(min_calls: u32, window: Duration, duration: Duration) -> Self {
        Self {
            min_calls: if min_calls == 0 { 1 } else { min_calls },
            ratio_ppm: DEFAULT_RATIO_PPM,
            window,
            duration,
        }
    }

    /// The failure ratio (0.0–1.0, clamped; not a number: the default 0.5) at or above
    /// which the breaker opens. A ratio of 0 opens on any failure once `min_calls` were made.
    #[must_use]
    pub fn failure_ratio(mut self, ratio: f64) -> Self {
        self.ratio_ppm = if ratio.is_nan() {
            DEFAULT_RATIO_PPM
        } else {
            // In range after the clamp, so the cast is exact enough and cannot wrap.
            (ratio.clamp(0.0, 1.0) * 1e6).round() as u32
        };
        self
    }

    /// The failure ratio that opens the breaker.
    pub fn ratio(&self) -> f64 {
        f64::from(self.ratio_ppm) / 1e6
    }
    /// Attempts within the window needed before the ratio counts.
    pub const fn min_calls(&self) -> u32 {
        self.min_calls
    }
    /// The sliding window the attempts are counted in.
    pub const fn window(&self) -> Duration {
        self.window
    }
    /// How long an open target is skipped before a probe.
    pub const fn duration(&self) -> Duration {
        self.duration
    }
}

impl Default for Cooldown {
    /// At least 5 attempts within 60 s, half of them failed: open for 30 s.
    fn default() -> Self {
        Self::new(5, Duration::from_secs(60), Duration::from_secs(30))
    }
}

/// Default [`FallbackLayer::max_cooldown`]: 5 minutes.
pub const DEFAULT_MAX_COOLDOWN: Duration = Duration::from_secs(300);

// pub(crate): the balance layer's per-member breakers reuse it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    pub(crate) total: Option<Duration>,
    first_chunk: Option<Duration>,
    stall: Option<Duration>,
    pub(crate) cooldown: Option<Cooldown>,
    pub(crate) max_cooldown: Duration,
    pub(crate) honor_retry_after: bool,
    require_finish: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            total: None,
            first_chunk: None,
            stall: None,
            cooldown: Some(Cooldown::default()),
            max_cooldown: DEFAULT_MAX_COOLDOWN,
            honor_retry_after: true,
            require_finish: true,
        }
    }
}

// ===== health (the shared breaker state) =====

/// `at + d`, or far in the future when that would overflow (`Instant + Duration` panics).
pub(crate) fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(Duration::from_secs(86_400 * 365 * 30)))
        .unwrap_or(at)
}

/// One bucket of the sliding window: its index (time since the breaker's epoch divided by
/// the bucket length) and the outcomes counted in it.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    slot: u64,
    ok: u32,
    failed: u32,
}

#[derive(Debug, Default)]
struct Breaker {
    /// The sliding window's buckets, oldest first (at most `WINDOW_BUCKETS` + 1).
    window: VecDeque<Bucket>,
    open_until: Option<Instant>,
    /// The probe in flight: its id and when it started.
    probe: Option<(u64, Instant)>,
    next_probe: u64,
    failures: u64,
    successes: u64,
    skipped: u64,
    opened: u64,
}

impl Breaker {
    /// The window's (calls, failures), as of the last [`record`](Self::record).
    fn tally(&self) -> (u64, u64) {
        self.window.iter().fold((0, 0), |(n, f), b| {
            (
                n + u64::from(b.ok) + u64::from(b.failed),
                f + u64::from(b.failed),
            )
        })
    }

    /// Counts an outcome at `now`, first dropping the buckets that have left the window.
    fn record(&mut self, epoch: Instant, now: Instant, c: &Cooldown, failed: bool) {
        let (slot, span) = slot_of(epoch, now, c);
        while self
            .window
            .front()
            .is_some_and(|b| b.slot.saturating_add(span) <= slot)
        {
            self.window.pop_front();
        }
        let bucket = match self.window.back_mut() {
            Some(b) if b.slot >= slot => b,
            _ => {
                self.window.push_back(Bucket {
                    slot,
                    ok: 0,
                    failed: 0,
                });
                while self.window.len() > WINDOW_BUCKETS as usize + 1 {
                    self.window.pop_front();
                }
                self.window.back_mut().expect("just pushed")
            }
        };
        if failed {
            bucket.failed = bucket.failed.saturating_add(1);
        } else {
            bucket.ok = bucket.ok.saturating_add(1);
        }
    }

    /// Opens (or extends) the breaker until `until`, capped at `now + max`.
    fn open(&mut self, now: Instant, until: Instant, max: Duration) {
        let until = until.min(later(now, max));
        self.window.clear();
        self.opened += 1;
        // A longer opening still in force (e.g. a retry-after) is kept, within the cap.
        self.open_until = Some(self.open_until.map_or(until, |x| x.max(until)));
    }
}

/// The bucket index of `now` and the window's length in buckets.
fn slot_of(epoch: Instant, now: Instant, c: &Cooldown) -> (u64, u64) {
    // In whole microseconds and u64 (on every attempt; u128 division is slow): 584 000
    // years of uptime before it saturates.
    let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let bucket = micros(c.window / WINDOW_BUCKETS).max(1000);
    let slot = micros(now.saturating_duration_since(epoch)) / bucket;
    (slot, u64::from(WINDOW_BUCKETS))
}

pub(crate) enum Admit {
    Yes,
    /// This request probes the target (with this probe id).
    Probe(u64),
    Skip(Duration),
}

pub(crate) struct Breakers {
    names: Vec<Arc<str>>,
    cells: Vec<Mutex<Breaker>>,
    /// Where bucket indexes count from.
    epoch: Instant,
}

impl Breakers {
    pub(crate) fn new(names: Vec<Arc<str>>) -> Arc<Self> {
        let cells = names.iter().map(|_| Mutex::default()).collect();
        Arc::new(Self {
            names,
            cells,
            epoch: Instant::now(),
        })
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, Breaker> {
        // A panic elsewhere must not take the chain down; the counters stay usable.
        self.cells[i].lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn admit(&self, i: usize, now: Instant, cfg: &Config) -> Admit {
        let mut b = self.lock(i);
        let Some(until) = b.open_until else {
            return Admit::Yes;
        };
        // A probe that has run for a whole cooldown (and its attempt's time limit: hung on
        // readiness, say) no longer blocks the next one; its late answer then counts as a
        // plain attempt.
        let stale = cfg
            .cooldown
            .map_or(cfg.max_cooldown, |c| c.duration)
            .max(cfg.total.unwrap_or_default());
        if now < until {
            b.skipped += 1;
            Admit::Skip(until - now)
        } else if b.probe.is_some_and(|(_, at)| now < later(at, stale)) {
            // One probe at a time; the others keep skipping until it answers.
            b.skipped += 1;
            Admit::Skip(Duration::ZERO)
        } else {
            let id = b.next_probe;
            b.next_probe += 1;
            b.probe = Some((id, now));
            Admit::Probe(id)
        }
    }

    /// Clears the probe slot if `probe` is the probe in flight; true if it was.
    fn end_probe(b: &mut Breaker, probe: Option<u64>) -> bool {
        match (probe, b.probe) {
            (Some(id), Some((cur, _))) if id == cur => {
                b.probe = None;
                true
            }
            _ => false,
        }
    }

    /// The target answered (a response, or an error that is not its fault).
    pub(crate) fn success(&self, i: usize, probe: Option<u64>, cfg: &Config) {
        let now = Instant::now();
        let mut b = self.lock(i);
        b.successes += 1;
        let probe = Self::end_probe(&mut b, probe);
        if probe || b.open_until.is_some_and(|u| u <= now) {
            // Closed: a probe still out (now stale) reports as a plain attempt.
            b.open_until = None;
            b.probe = None;
        }
        if let Some(c) = &cfg.cooldown
            && b.open_until.is_none()
        {
            b.record(self.epoch, now, c, false);
        }
    }

    pub(crate) fn failure(
        &self,
        i: usize,
        probe: Option<u64>,
        retry_after: Option<Duration>,
        cfg: &Config,
    ) {
        let now = Instant::now();
        let mut b = self.lock(i);
        b.failures += 1;
        let probe = Self::end_probe(&mut b, probe);
        let mut open_until = None;
        if let Some(c) = cfg.cooldown {
            if probe {
                open_until = Some(later(now, c.duration));
            } else if b.open_until.is_none() {
                b.record(self.epoch, now, &c, true);
                let (calls, failed) = b.tally();
                // failed / calls >= ratio, in integers.
                if calls >= u64::from(c.min_calls)
                    && u128::from(failed) * 1_000_000 >= u128::from(calls) * u128::from(c.ratio_ppm)
                {
                    open_until = Some(later(now, c.duration));
                }
            }
        }
        if cfg.honor_retry_after
            && let Some(ra) = retry_after
        {
            open_until = open_until.max(Some(later(now, ra)));
        }
        match open_until {
            Some(u) => b.open(now, u, cfg.max_cooldown),
            // A failed probe with no breaker and no retry-after: back to plain trying.
            None if probe => b.open_until = None,
            None => {}
        }
    }

    /// The probe ended without an answer (the caller dropped the request or its deadline
    /// ran out): free the slot so that the next request probes.
    pub(crate) fn release_probe(&self, i: usize, probe: Option<u64>) {
        Self::end_probe(&mut self.lock(i), probe);
    }

    /// Time left while target `i` is open (`Some(ZERO)`: half-open with a probe in
    /// flight), without counting a skip or taking the probe slot; `None` if it may be tried.
    pub(crate) fn open_for(&self, i: usize, now: Instant, cfg: &Config) -> Option<Duration> {
        let b = self.lock(i);
        let until = b.open_until?;
        let stale = cfg
            .cooldown
            .map_or(cfg.max_cooldown, |c| c.duration)
            .max(cfg.total.unwrap_or_default());
        if now < until {
            Some(until - now)
        } else if b.probe.is_some_and(|(_, at)| now < later(at, stale)) {
            Some(Duration::ZERO)
        } else {
            None
        }
    }
}

/// A target's breaker state, as [`FallbackHealth::snapshot`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Requests go to the target.
    Closed,
    /// The target is skipped for `remaining` more.
    Open {
        /// Time left before the target is probed.
        remaining: Duration,
    },
    /// The cooldown is over: the next request probes the target (`probing`: one is now).
    HalfOpen {
        /// Whether a probe is in flight.
        probing: bool,
    },
}

/// One target's health, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetHealth {
    /// The target's name.
    pub name: Arc<str>,
    /// The breaker state.
    pub state: CircuitState,
    /// Failures in the sliding window (as of the target's last attempt).
    pub recent_failures: u64,
    /// Attempts in the sliding window (as of the target's last attempt).
    pub recent_calls: u64,
    /// Attempts that failed in a way that moves on, since start.
    pub failures: u64,
    /// Attempts the target answered, since start.
    pub successes: u64,
    /// Requests that skipped the target while it was cooling down, since start.
    pub skipped: u64,
    /// Times the breaker opened, since start.
    pub opened: u64,
}

/// A handle on a chain's shared breaker state (cheap to clone), for metrics.
#[derive(Clone)]
pub struct FallbackHealth(pub(crate) Arc<Breakers>);

impl fmt::Debug for FallbackHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.snapshot()).finish()
    }
}

impl FallbackHealth {
    /// Every target's health, in chain order.
    pub fn snapshot(&self) -> Vec<TargetHealth> {
        let now = Instant::now();
        (0..self.0.names.len())
            .map(|i| {
                let b = self.0.lock(i);
                let state = match b.open_until {
                    None => CircuitState::Closed,
                    Some(u) if u > now => CircuitState::Open { remaining: u - now },
                    Some(_) => CircuitState::HalfOpen {
                        probing: b.probe.is_some(),
                    },
                };
                TargetHealth {
                    name: self.0.names[i].clone(),
                    state,
                    recent_failures: b.tally().1,
                    recent_calls: b.tally().0,
                    failures: b.failures,
                    successes: b.successes,
                    skipped: b.skipped,
                    opened: b.opened,
                }
            })
            .collect()
    }
}

// ===== impl FallbackLayer =====

macro_rules! config_methods {
    () => {
        /// Total time limit per attempt (to a complete response or a stream's first chunk).
        #[must_use]
        pub fn timeout(mut self, limit: Duration) -> Self {
            self.config.total = Some(limit);
            self
        }
        /// Time limit per attempt to a stream's first chunk (streaming requests only).
        #[must_use]
        pub fn first_chunk_timeout(mut self, limit: Duration) -> Self {
            self.config.first_chunk = Some(limit);
            self
        }
        /// Time limit between two chunks of a committed stream.
        #[must_use]
        pub fn stall_timeout(mut self, limit: Duration) -> Self {
            self.config.stall = Some(limit);
            self
        }
        /// The breaker of each target (default: [`Cooldown::default`]).
        #[must_use]
        pub fn cooldown(mut self, cooldown: Cooldown) -> Self {
            self.config.cooldown = Some(cooldown);
            self
        }
        /// No breaker: every request tries every target in order.
        #[must_use]
        pub fn no_cooldown(mut self) -> Self {
            self.config.cooldown = None;
            self
        }
        /// The longest a target is skipped, however long the breaker's `duration` or an
        /// upstream's `retry-after` (default [`DEFAULT_MAX_COOLDOWN`], 5 minutes).
        #[must_use]
        pub fn max_cooldown(mut self, max: Duration) -> Self {
            self.config.max_cooldown = max;
            self
        }
        /// Whether an error's `retry-after` keeps its target skipped until then (default: yes,
        /// up to [`max_cooldown`](Self::max_cooldown)).
        #[must_use]
        pub fn honor_retry_after(mut self, yes: bool) -> Self {
            self.config.honor_retry_after = yes;
            self
        }
        /// Whether a committed stream that ends without any finish reason ends with an error
        /// item instead (default: yes), so a dropped upstream never looks like success.
        #[must_use]
        pub fn require_finish_reason(mut self, yes: bool) -> Self {
            self.config.require_finish = yes;
            self
        }
    };
}

/// Wraps a service as the primary of a [`Fallback`] chain, followed by `fallbacks`.
///
/// # Clone
///
/// The breaker state is created with the layer: every service built from it (and from its
/// clones) shares one state, readable through [`FallbackLayer::health`]. Call the
/// builder methods before taking that handle: [`primary_name`](Self::primary_name) starts a
/// fresh state.
///
/// See the [module docs](crate::fallback) for an example.
#[derive(Clone)]
pub struct FallbackLayer {
    fallbacks: Vec<FallbackTarget>,
    primary_name: Arc<str>,
    primary_model: Option<String>,
    config: Config,
    breakers: Arc<Breakers>,
}

impl fmt::Debug for FallbackLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackLayer")
            .field("primary", &self.primary_name)
            .field("fallbacks", &self.fallbacks)
            .field("config", &self.config)
            .finish()
    }
}

impl FallbackLayer {
    /// The inner service is the primary (named `"primary"`), then `fallbacks` in order.
    pub fn new(fallbacks: Vec<FallbackTarget>) -> Self {
        let primary_name: Arc<str> = Arc::from("primary");
        let breakers = Breakers::new(names(&primary_name, &fallbacks));
        Self {
            fallbacks,
            primary_name,
            primary_model: None,
            config: Config::default(),
            breakers,
        }
    }

    /// Names the primary (the wrapped service) in attempts, metrics and errors.
    #[must_use]
    pub fn primary_name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.primary_name = name.into();
        self.breakers = Breakers::new(names(&self.primary_name, &self.fallbacks));
        self
    }

    /// Rewrites the request's model when calling the primary.
    #[must_use]
    pub fn primary_model(mut self, model: impl Into<String>) -> Self {
        self.primary_model = Some(model.into());
        self
    }

    config_methods!();

    /// The shared breaker state of every service built from this layer.
    pub fn health(&self) -> FallbackHealth {
        FallbackHealth(self.breakers.clone())
    }
}

fn names(primary: &Arc<str>, rest: &[FallbackTarget]) -> Vec<Arc<str>> {
    std::iter::once(primary.clone())
        .chain(rest.iter().map(|t| t.name.clone()))
        .collect()
}

impl<S> Layer<S> for FallbackLayer
where
    S: Service<ChatRequest, Response = LlmResponse, Error = LlmError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    type Service = Fallback;

    fn layer(&self, inner: S) -> Fallback {
        let mut primary = FallbackTarget::new(self.primary_name.clone(), inner);
        primary.model.clone_from(&self.primary_model);
        let targets: Vec<FallbackTarget> = std::iter::once(primary)
            .chain(self.fallbacks.iter().cloned())
            .collect();
        Fallback {
            targets: targets.into(),
            config: self.config,
            breakers: self.breakers.clone(),
        }
    }
}

// ===== impl Fallback =====

/// The fallback chain service (see the [module docs](crate::fallback)).
///
/// # Clone
///
/// Clones share the targets and the breaker state (`Arc`s).
#[derive(Clone)]
pub struct Fallback {
    targets: Arc<[FallbackTarget]>,
    config: Config,
    breakers: Arc<Breakers>,
}

impl fmt::Debug for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field("targets", &self.targets)
            .field("config", &self.config)
            .finish()
    }
}

impl Fallback {
    /// A chain over `targets`, tried in order (an empty chain fails every request with
    /// [`ErrorKind::Unavailable`](crate::ErrorKind::Unavailable)).
    pub fn new(targets: Vec<FallbackTarget>) -> Self {
        let names = targets.iter().map(|t| t.name.clone()).collect();
        Self {
            targets: targets.into(),
            config: Config::default(),
            breakers: Breakers::new(names),
        }
    }

    /// A [`FallbackLayer`] (see [`FallbackLayer::new`]).
    pub fn layer(fallbacks: Vec<FallbackTarget>) -> FallbackLayer {
        FallbackLayer::new(fallbacks)
    }

    config_methods!();

    /// The targets, in order.
    pub fn targets(&self) -> &[FallbackTarget] {
        &self.targets
    }

    /// The shared breaker state, for metrics.
    pub fn health(&self) -> FallbackHealth {
        FallbackHealth(self.breakers.clone())
    }
}

impl Service<ChatRequest> for Fallback {
    type Response = LlmResponse;
    type Error = LlmError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        // Readiness is driven per target inside the future (see the module docs).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ChatRequest) -> ResponseFuture {
        let deadline = req.deadline().map(|d| d.0);
        let is_stream = req.is_stream();
        ResponseFuture {
            targets: self.targets.clone(),
            config: self.config,
            breakers: self.breakers.clone(),
            req: Some(req),
            deadline,
            is_stream,
            idx: 0,
            probe: None,
            cur_model: None,
            deadline_hit: false,
            attempts: Vec::new(),
            errors: Vec::new(),
            pending: None,
            timer: None,
            armed: None,
            state: State::Next,
        }
    }
}

// ===== impl ResponseFuture =====

enum State {
    /// Pick the next target (or give up).
    Next,
    /// Waiting for the target's readiness.
    Ready(BoxLlmService),
    /// Waiting for the target's response.
    Calling(<BoxLlmService as Service<ChatRequest>>::Future),
    /// A stream came back (in `pending`): waiting for its first chunk (the commit point).
    FirstChunk,
    Done,
}

#[derive(Clone, Copy)]
enum Limit {
    Total(Duration),
    FirstChunk(Duration),
    Deadline,
}

/// The response future of [`Fallback`]: a state machine over the targets (tower's retry
/// future shape): next → ready → calling → first chunk → done.
pub struct ResponseFuture {
    targets: Arc<[FallbackTarget]>,
    config: Config,
    breakers: Arc<Breakers>,
    req: Option<ChatRequest>,
    deadline: Option<Instant>,
    is_stream: bool,
    idx: usize,
    /// The probe id when this attempt probes its target.
    probe: Option<u64>,
    /// The model sent on the current attempt.
    cur_model: Option<String>,
    /// The current attempt ended because the request's deadline passed.
    deadline_hit: bool,
    attempts: Vec<Attempt>,
    errors: Vec<LlmError>,
    /// The streamed response waiting for its first chunk (boxed: inline, it would make
    /// every fallback future ~830 bytes bigger, copied on each move, streams or not).
    pending: Option<Box<LlmResponse>>,
    // Boxed once and reset for each attempt.
    timer: Option<Pin<Box<Sleep>>>,
    armed: Option<Limit>,
    state: State,
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Next => "next",
            State::Ready(_) => "ready",
            State::Calling(_) => "calling",
            State::FirstChunk => "first_chunk",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("target", &self.targets.get(self.idx).map(|t| &t.name))
            .field("state", &state)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl Drop for ResponseFuture {
    fn drop(&mut self) {
        // A probe dropped mid-flight must not leave its target "probing" for ever.
        if self.probe.is_some() {
            self.breakers.release_probe(self.idx, self.probe);
        }
    }
}

impl ResponseFuture {
    fn target(&self) -> &FallbackTarget {
        &self.targets[self.idx]
    }

    fn attempt_model(&mut self) -> Option<String> {
        if let Some(m) = self.cur_model.take() {
            return Some(m);
        }
        let t = self.target();
        t.model
            .clone()
            .or_else(|| self.req.as_ref().map(|r| r.model.clone()))
    }

    /// Records a target skipped without a call and moves on.
    fn skip(&mut self, error: LlmError) {
        let error = error.with_provider(self.target().name.to_string());
        let model = self.attempt_model();
        self.attempts.push(Attempt {
            target: self.target().name.clone(),
            model,
            error: Some(AttemptError {
                kind: error.kind(),
                message: error.message().to_owned(),
                skipped: true,
            }),
        });
        self.errors.push(error);
        self.idx += 1;
        self.state = State::Next;
    }

    /// Usage the failed attempts reported: they were paid for.
    fn paid(&self) -> Vec<PaidAttempt> {
        self.errors
            .iter()
            .flat_map(|e| e.paid_attempts().iter().cloned())
            .collect()
    }

    /// An attempt failed: move on (`None`) or give this error to the caller now.
    fn fail(&mut self, error: LlmError) -> Option<LlmError> {
        self.armed = None;
        let name = self.target().name.clone();
        let mut error = if error.provider().is_none() {
            error.with_provider(name.to_string())
        } else {
            error
        };
        // A streamed attempt that failed before its commit point may have reported its
        // usage: it was paid for.
        if let Some(pending) = self.pending.take()
            && let ResponseBody::Stream(s) = &pending.body
            && let Some(u) = s.usage()
            && error.usage().is_none()
        {
            error = error.with_usage(pending.meta.model.clone(), u.clone());
        }
        // Usage without a model is the attempt's: price it with the model this target served.
        if let Some(u) = error.usage()
            && error
                .paid_attempts()
                .last()
                .is_some_and(|a| a.model.is_none())
        {
            let (u, model) = (
                u.clone(),
                self.cur_model
                    .clone()
                    .or_else(|| self.target().model.clone()),
            );
            error = error.with_usage(model, u);
        }
        let probe = self.probe.take();
        if !error.should_fall_back() {
            // The target answered; the request itself is at fault.
            self.breakers.success(self.idx, probe, &self.config);
            self.state = State::Done;
            return Some(error.with_paid_attempts(self.paid()));
        }
        if std::mem::take(&mut self.deadline_hit) {
            // The caller's deadline, not the target, ran out: no mark against it.
            self.breakers.release_probe(self.idx, probe);
        } else {
            self.breakers
                .failure(self.idx, probe, error.retry_after(), &self.config);
        }
        tracing::debug!(target: "llm_tower::fallback", target_name = %name, error = %error, "attempt failed, falling back");
        let model = self.attempt_model();
        self.attempts.push(Attempt {
            target: name,
            model,
            error: Some(AttemptError {
                kind: error.kind(),
                message: error.message().to_owned(),
                skipped: false,
            }),
        });
        self.errors.push(error);
        self.idx += 1;
        self.state = State::Next;
        None
    }

    fn succeed(&mut self, mut resp: LlmResponse) -> LlmResponse {
        self.armed = None;
        let probe = self.probe.take();
        self.breakers.success(self.idx, probe, &self.config);
        let name = self.target().name.clone();
        let model = self.attempt_model();
        if resp.meta.model.is_none() {
            resp.meta.model.clone_from(&model);
        }
        self.attempts.push(Attempt {
            target: name.clone(),
            model,
            error: None,
        });
        let inner = std::mem::take(&mut resp.meta.attempts);
        resp.meta.attempts = std::mem::take(&mut self.attempts);
        resp.meta.attempts.extend(inner);
        if !self.errors.is_empty() {
            let mut paid = self.paid();
            if !paid.is_empty() {
                paid.append(&mut resp.meta.paid_attempts);
                resp.meta.paid_attempts = paid;
            }
        }
        resp.meta.provider.get_or_insert(name);
        self.state = State::Done;
        resp
    }

    fn arm(&mut self, now: Instant) {
        let mut best: Option<(Instant, Limit)> = None;
        let mut consider = |at: Instant, why: Limit| {
            if best.is_none_or(|(b, _)| at < b) {
                best = Some((at, why));
            }
        };
        if let Some(t) = self.config.total {
            consider(later(now, t), Limit::Total(t));
        }
        if self.is_stream
            && let Some(t) = self.config.first_chunk
        {
            consider(later(now, t), Limit::FirstChunk(t));
        }
        if let Some(d) = self.deadline {
            consider(d, Limit::Deadline);
        }
        self.armed = best.map(|(_, why)| why);
        if let Some((at, _)) = best {
            match &mut self.timer {
                Some(t) => t.as_mut().reset(at),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
    }

    /// A timeout error if the armed limit has passed.
    fn timed_out(&mut self, cx: &mut Context<'_>) -> Option<LlmError> {
        let why = self.armed?;
        let timer = self.timer.as_mut()?;
        if timer.as_mut().poll(cx).is_pending() {
            return None;
        }
        let name = &self.targets[self.idx].name;
        self.deadline_hit = matches!(why, Limit::Deadline);
        Some(LlmError::timeout(match why {
            Limit::Total(d) => format!("{name} did not answer within {d:?}"),
            Limit::FirstChunk(d) => format!("{name} sent no first chunk within {d:?}"),
            Limit::Deadline => format!("the request's deadline passed while waiting for {name}"),
        }))
    }
}

impl Future for ResponseFuture {
    type Output = Result<LlmResponse, LlmError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every field is Unpin (the timer and the inner futures are boxed).
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Next => {
                    if this.idx >= this.targets.len() {
                        this.state = State::Done;
                        let errors = std::mem::take(&mut this.errors);
                        return Poll::Ready(Err(LlmError::all_failed(errors)));
                    }
                    let now = Instant::now();
                    if this.deadline.is_some_and(|d| d <= now) {
                        this.skip(LlmError::timeout("the request's deadline has passed"));
                        continue;
                    }
                    match this.breakers.admit(this.idx, now, &this.config) {
                        Admit::Skip(remaining) if remaining.is_zero() => {
                            this.skip(LlmError::unavailable(
                                "skipped: another request is probing it after recent failures",
                            ));
                            continue;
                        }
                        Admit::Skip(remaining) => {
                            this.skip(
                                LlmError::unavailable(format!(
                                    "skipped: cooling down for {remaining:?} after recent failures"
                                ))
                                .with_retry_after(remaining),
                            );
                            continue;
                        }
                        Admit::Probe(id) => this.probe = Some(id),
                        Admit::Yes => this.probe = None,
                    }
                    this.arm(now);
                    this.state = State::Ready(this.targets[this.idx].service.clone());
                }
                State::Ready(svc) => match svc.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        let Some(req) = next_request(&mut this.req, &this.targets, this.idx) else {
                            this.state = State::Done;
                            return Poll::Ready(Err(LlmError::internal(
                                "fallback future polled after completion",
                            )));
                        };
                        this.cur_model = Some(req.model.clone());
                        let fut = svc.call(req);
                        this.state = State::Calling(fut);
                    }
                    Poll::Ready(Err(e)) => {
                        if let Some(e) = this.fail(e) {
                            return Poll::Ready(Err(e));
                        }
                    }
                    Poll::Pending => match this.timed_out(cx) {
                        Some(e) => {
                            if let Some(e) = this.fail(e) {
                                return Poll::Ready(Err(e));
                            }
                        }
                        None => return Poll::Pending,
                    },
                },
                State::Calling(fut) => match fut.as_mut().poll(cx) {
                    Poll::Ready(Ok(resp)) => {
                        if resp.is_stream() {
                            this.pending = Some(Box::new(resp));
                            this.state = State::FirstChunk;
                        } else {
                            return Poll::Ready(Ok(this.succeed(resp)));
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        if let Some(e) = this.fail(e) {
                            return Poll::Ready(Err(e));
                        }
                    }
                    Poll::Pending => match this.timed_out(cx) {
                        Some(e) => {
                            if let Some(e) = this.fail(e) {
                                return Poll::Ready(Err(e));
                            }
                        }
                        None => return Poll::Pending,
                    },
                },
                State::FirstChunk => {
                    let slot = &mut this.pending;
                    let Some(ResponseBody::Stream(stream)) = slot.as_mut().map(|r| &mut r.body)
                    else {
                        this.state = State::Done;
                        return Poll::Ready(Err(LlmError::internal(
                            "fallback future polled after completion",
                        )));
                    };
                    match stream.poll_next_event(cx) {
                        Poll::Ready(Some(Ok(chunk))) => {
                            let Some(mut resp) = slot.take() else {
                                continue;
                            };
                            if let ResponseBody::Stream(s) = &mut resp.body {
                                let committed = Committed::new(
                                    chunk,
                                    this.config,
                                    this.targets[this.idx].name.clone(),
                                );
                                s.wrap_events(move |inner| committed.with_inner(inner));
                            }
                            return Poll::Ready(Ok(this.succeed(*resp)));
                        }
                        Poll::Ready(Some(Err(e))) => {
                            if let Some(e) = this.fail(e) {
                                return Poll::Ready(Err(e));
                            }
                        }
                        Poll::Ready(None) => {
                            let e = LlmError::transport("the stream ended before its first chunk");
                            if let Some(e) = this.fail(e) {
                                return Poll::Ready(Err(e));
                            }
                        }
                        Poll::Pending => match this.timed_out(cx) {
                            Some(e) => {
                                if let Some(e) = this.fail(e) {
                                    return Poll::Ready(Err(e));
                                }
                            }
                            None => return Poll::Pending,
                        },
                    }
                }
                State::Done => {
                    return Poll::Ready(Err(LlmError::internal(
                        "fallback future polled after completion",
                    )));
                }
            }
        }
    }
}

/// The request for attempt `idx`: the original for the last target, else a copy.
fn next_request(
    req: &mut Option<ChatRequest>,
    targets: &[FallbackTarget],
    idx: usize,
) -> Option<ChatRequest> {
    let mut r = if idx + 1 >= targets.len() {
        req.take()?
    } else {
        req.clone()?
    };
    if let Some(m) = &targets[idx].model {
        r.model.clone_from(m);
    }
    Some(r)
}

// ===== the committed stream =====

/// The stall limit of a committed stream: the time of the last event, and a timer that
/// fires at the earliest moment the limit could be over.
struct Stall {
    limit: Duration,
    last: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Stall {
    /// Whether `limit` passed since the last event; if not, the timer is re-armed for
    /// the moment it would, and its waker registered.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let due = later(self.last, self.limit);
            if due <= self.timer.deadline() {
                return true;
            }
            self.timer.as_mut().reset(due);
        }
    }
}

/// A stream past its commit point: replays the first chunk, then the upstream's, with the
/// stall limit; any failure ends it with an explicit error item.
struct Committed {
    first: Option<StreamEvent>,
    inner: Option<BoxEventStream>,
    stall: Option<Stall>,
    require_finish: bool,
    saw_finish: bool,
    done: bool,
    name: Arc<str>,
}

impl Committed {
    fn new(first: StreamEvent, config: Config, name: Arc<str>) -> Self {
        Self {
            first: Some(first),
            inner: None,
            stall: config.stall.map(|limit| {
                let now = Instant::now();
                Stall {
                    limit,
                    last: now,
                    timer: Box::pin(tokio::time::sleep_until(later(now, limit))),
                }
            }),
            require_finish: config.require_finish,
            saw_finish: false,
            done: false,
            name,
        }
    }

    fn with_inner(mut self, inner: BoxEventStream) -> Self {
        self.inner = Some(inner);
        self
    }

    fn yielded(&mut self, chunk: &StreamEvent) {
        if chunk.has_finish() {
            self.saw_finish = true;
        }
        if let Some(stall) = &mut self.stall {
            // Only the arrival time: the timer is moved when it fires, not per event.
            stall.last = Instant::now();
        }
    }

    fn end_with(&mut self, error: LlmError) -> Poll<Option<Result<StreamEvent, LlmError>>> {
        self.done = true;
        let error = if error.provider().is_none() {
            error.with_provider(self.name.to_string())
        } else {
            error
        };
        Poll::Ready(Some(Err(error)))
    }
}

impl Stream for Committed {
    type Item = Result<StreamEvent, LlmError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(chunk) = this.first.take() {
            this.yielded(&chunk);
            return Poll::Ready(Some(Ok(chunk)));
        }
        let Some(inner) = this.inner.as_mut() else {
            this.done = true;
            return Poll::Ready(None);
        };
        match inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.yielded(&chunk);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => this.end_with(e),
            Poll::Ready(None) => {
                if this.require_finish && !this.saw_finish {
                    return this.end_with(LlmError::transport(
                        "the upstream stream ended before a finish reason (response incomplete)",
                    ));
                }
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                if let Some(stall) = &mut this.stall
                    && stall.expired(cx)
                {
                    let d = stall.limit;
                    return this.end_with(LlmError::timeout(format!(
                        "the stream stalled: no chunk for {d:?}"
                    )));
                }
                Poll::Pending
            }
        }
    }
}
