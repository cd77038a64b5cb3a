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
//! After [`Cooldown`]'s `failures` fall-back-worthy failures within its `window`, a target is
//! skipped for its `duration`; then one request probes it (the others still skip it) and the
//! probe's outcome closes or reopens it. A `retry-after` on an error also keeps the target
//! skipped until then. The state lives in an `Arc` shared by every clone of the service and
//! the layer; [`FallbackHealth::snapshot`] reads it for metrics.
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
//! the target did not set it.
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
//!     .cooldown(Cooldown::new(3, Duration::from_secs(60), Duration::from_secs(30)));
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
    Attempt, AttemptError, BoxChunkStream, BoxLlmService, ChatChunk, ChatRequest, LlmError,
    LlmResponse, ResponseBody, boxed,
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

/// The circuit breaker of each target: after `failures` failures within `window`, skip the
/// target for `duration`, then probe it with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cooldown {
    failures: u32,
    window: Duration,
    duration: Duration,
}

impl Cooldown {
    /// Opens after `failures` (at least 1) failures within `window`, for `duration`.
    pub const fn new(failures: u32, window: Duration, duration: Duration) -> Self {
        Self {
            failures: if failures == 0 { 1 } else { failures },
            window,
            duration,
        }
    }
    /// Failures that open the breaker.
    pub const fn failures(&self) -> u32 {
        self.failures
    }
    /// The window the failures are counted in.
    pub const fn window(&self) -> Duration {
        self.window
    }
    /// How long an open target is skipped before a probe.
    pub const fn duration(&self) -> Duration {
        self.duration
    }
}

impl Default for Cooldown {
    /// 5 failures within 60 s open the breaker for 30 s.
    fn default() -> Self {
        Self::new(5, Duration::from_secs(60), Duration::from_secs(30))
    }
}

#[derive(Debug, Clone, Copy)]
struct Config {
    total: Option<Duration>,
    first_chunk: Option<Duration>,
    stall: Option<Duration>,
    cooldown: Option<Cooldown>,
    honor_retry_after: bool,
    require_finish: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            total: None,
            first_chunk: None,
            stall: None,
            cooldown: Some(Cooldown::default()),
            honor_retry_after: true,
            require_finish: true,
        }
    }
}

// ===== health (the shared breaker state) =====

#[derive(Debug, Default)]
struct Breaker {
    /// Times of the latest failures (at most `Cooldown::failures` of them).
    recent: VecDeque<Instant>,
    open_until: Option<Instant>,
    probing: bool,
    failures: u64,
    successes: u64,
    skipped: u64,
    opened: u64,
}

enum Admit {
    Yes,
    Probe,
    Skip(Duration),
}

struct Breakers {
    names: Vec<Arc<str>>,
    cells: Vec<Mutex<Breaker>>,
}

impl Breakers {
    fn new(names: Vec<Arc<str>>) -> Arc<Self> {
        let cells = names.iter().map(|_| Mutex::default()).collect();
        Arc::new(Self { names, cells })
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, Breaker> {
        // A panic elsewhere must not take the chain down; the counters stay usable.
        self.cells[i].lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn admit(&self, i: usize, now: Instant) -> Admit {
        let mut b = self.lock(i);
        let Some(until) = b.open_until else {
            return Admit::Yes;
        };
        if now < until {
            b.skipped += 1;
            Admit::Skip(until - now)
        } else if b.probing {
            // One probe at a time; the others keep skipping until it answers.
            b.skipped += 1;
            Admit::Skip(Duration::ZERO)
        } else {
            b.probing = true;
            Admit::Probe
        }
    }

    /// The target answered (a response, or an error that is not its fault).
    fn success(&self, i: usize, probe: bool) {
        let mut b = self.lock(i);
        b.successes += 1;
        b.recent.clear();
        if probe || b.open_until.is_some_and(|u| u <= Instant::now()) {
            b.open_until = None;
        }
        if probe {
            b.probing = false;
        }
    }

    fn failure(&self, i: usize, probe: bool, retry_after: Option<Duration>, cfg: &Config) {
        let now = Instant::now();
        let mut b = self.lock(i);
        b.failures += 1;
        let mut open_until = None;
        if let Some(c) = cfg.cooldown {
            if probe {
                open_until = Some(now + c.duration);
            } else {
                b.recent.push_back(now);
                while b.recent.len() > c.failures as usize {
                    b.recent.pop_front();
                }
                let full = b.recent.len() >= c.failures as usize;
                if full && b.recent.front().is_some_and(|t| now - *t <= c.window) {
                    open_until = Some(now + c.duration);
                }
            }
        }
        if cfg.honor_retry_after
            && let Some(ra) = retry_after
        {
            open_until = open_until.max(Some(now + ra));
        }
        if probe {
            b.probing = false;
        }
        match open_until {
            Some(u) => {
                b.recent.clear();
                b.opened += 1;
                b.open_until = Some(b.open_until.map_or(u, |x| x.max(u)));
            }
            // A failed probe with no breaker and no retry-after: back to plain trying.
            None if probe => b.open_until = None,
            None => {}
        }
    }

    /// The probe ended without an answer (the caller dropped the request).
    fn release_probe(&self, i: usize) {
        self.lock(i).probing = false;
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
    /// Failures counted towards opening the breaker now.
    pub recent_failures: usize,
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
pub struct FallbackHealth(Arc<Breakers>);

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
                    Some(_) => CircuitState::HalfOpen { probing: b.probing },
                };
                TargetHealth {
                    name: self.0.names[i].clone(),
                    state,
                    recent_failures: b.recent.len(),
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
        /// Whether an error's `retry-after` keeps its target skipped until then (default: yes).
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
            probe: false,
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
    probe: bool,
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
        if self.probe {
            self.breakers.release_probe(self.idx);
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

    /// An attempt failed: move on (`None`) or give this error to the caller now.
    fn fail(&mut self, error: LlmError) -> Option<LlmError> {
        self.armed = None;
        let name = self.target().name.clone();
        let error = if error.provider().is_none() {
            error.with_provider(name.to_string())
        } else {
            error
        };
        let probe = std::mem::take(&mut self.probe);
        if !error.should_fall_back() {
            // The target answered; the request itself is at fault.
            self.breakers.success(self.idx, probe);
            self.state = State::Done;
            return Some(error);
        }
        if std::mem::take(&mut self.deadline_hit) {
            // The caller's deadline, not the target, ran out: no mark against it.
            if probe {
                self.breakers.release_probe(self.idx);
            }
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
        let probe = std::mem::take(&mut self.probe);
        self.breakers.success(self.idx, probe);
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
            consider(now + t, Limit::Total(t));
        }
        if self.is_stream
            && let Some(t) = self.config.first_chunk
        {
            consider(now + t, Limit::FirstChunk(t));
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
                    match this.breakers.admit(this.idx, now) {
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
                        Admit::Probe => this.probe = true,
                        Admit::Yes => this.probe = false,
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
                    match Pin::new(stream).poll_next(cx) {
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
                                s.wrap(move |inner| committed.with_inner(inner));
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

/// A stream past its commit point: replays the first chunk, then the upstream's, with the
/// stall limit; any failure ends it with an explicit error item.
struct Committed {
    first: Option<ChatChunk>,
    inner: Option<BoxChunkStream>,
    stall: Option<(Duration, Pin<Box<Sleep>>)>,
    require_finish: bool,
    saw_finish: bool,
    done: bool,
    name: Arc<str>,
}

impl Committed {
    fn new(first: ChatChunk, config: Config, name: Arc<str>) -> Self {
        Self {
            first: Some(first),
            inner: None,
            stall: config.stall.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
            require_finish: config.require_finish,
            saw_finish: false,
            done: false,
            name,
        }
    }

    fn with_inner(mut self, inner: BoxChunkStream) -> Self {
        self.inner = Some(inner);
        self
    }

    fn yielded(&mut self, chunk: &ChatChunk) {
        if chunk.choices.iter().any(|c| c.finish_reason().is_some()) {
            self.saw_finish = true;
        }
        if let Some((d, sleep)) = &mut self.stall {
            sleep.as_mut().reset(Instant::now() + *d);
        }
    }

    fn end_with(&mut self, error: LlmError) -> Poll<Option<Result<ChatChunk, LlmError>>> {
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
    type Item = Result<ChatChunk, LlmError>;

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
                if let Some((d, sleep)) = &mut this.stall
                    && sleep.as_mut().poll(cx).is_ready()
                {
                    let d = *d;
                    return this.end_with(LlmError::timeout(format!(
                        "the stream stalled: no chunk for {d:?}"
                    )));
                }
                Poll::Pending
            }
        }
    }
}
