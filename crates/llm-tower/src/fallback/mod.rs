//! An ordered fallback chain — primary, cheaper primary, free model — with per-attempt
//! timeouts, a cooldown (circuit breaker) per target and a commit point for streams.
//!
//! # Rules
//!
//! ## Which errors move on
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
//! ## Timeouts
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
//! ## Commit point for streams
//!
//! A stream may fall back only **before its first chunk reaches the caller**: the future polls
//! the first chunk itself, and only then returns the response. After that, an upstream
//! failure or a stall ends the stream with an explicit error item, and (by default,
//! [`FallbackLayer::require_finish_reason`]) a stream that simply stops before any finish
//! reason also ends with an error item — never a clean end that looks like success.
//!
//! ## Cooldown
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
//! ## Response meta
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
//! # Readiness
//!
//! [`Fallback`] reports ready at once and drives each target's readiness inside the response
//! future, on a clone of that target: waiting for every target to be ready would stall the
//! chain on exactly the provider it exists to route around. Time spent waiting for
//! readiness counts towards the attempt's total timeout.
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

mod breaker;
mod committed;
mod future;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use llm_tower_core::{BoxLlmService, BoxableLlmService, ChatRequest, LlmError, LlmResponse, boxed};
use tower_layer::Layer;
use tower_service::Service;

#[cfg(feature = "balance")]
pub(crate) use breaker::Admit;
pub(crate) use breaker::Breakers;
pub use breaker::{CircuitState, FallbackHealth, TargetHealth};
pub use future::ResponseFuture;

// ===== targets and configuration =====

/// One link of the chain: a named LLM service and, optionally, the model to ask it for.
#[derive(Clone)]
pub struct FallbackTarget {
    pub(crate) name: Arc<str>,
    pub(crate) service: BoxLlmService,
    pub(crate) model: Option<String>,
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
        S: BoxableLlmService,
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
    S: BoxableLlmService,
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
        ResponseFuture::new(
            self.targets.clone(),
            self.config,
            self.breakers.clone(),
            req,
        )
    }
}
