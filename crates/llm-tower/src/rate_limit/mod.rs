//! The `RateLimit` layer: requests and tokens per window, keyed by tenant, model and task
//! type, with tokens reserved before the call and settled with the actual usage after.
//!
//! # Overview
//!
//! A [`RateLimitLayer`] holds [`Rule`]s. Each rule is a bucket of `limit` requests or
//! tokens per `window`, keyed by any combination of the request's [`Tenant`],
//! model and [`TaskType`] (or one global bucket), optionally restricted to one tenant,
//! model or task. A request takes from **every** bucket that applies to it, **all or
//! nothing**: if one refuses, nothing is taken from the others.
//!
//! Buckets are token buckets (equivalent to GCRA): a bucket holds up to `limit` units and
//! refills continuously, `limit` per `window`, so a burst of `limit` is allowed after a
//! quiet period.
//!
//! # Tokens: reserve, then settle
//!
//! Token buckets are charged **before** the call with an estimate
//! ([`TokenEstimator`]: about 4 bytes of prompt text per token, plus a per-message
//! overhead, plus `max_completion_tokens`/`max_tokens` — or a default output estimate —
//! times `n`), so concurrent requests cannot all pass on a stale count. When the response
//! finishes ([`LlmResponse::on_finish`]: completed, failed or dropped, streams included)
//! the reservation is settled **exactly once** with the actual usage: the difference is
//! taken (the bucket may go into debt) or given back. The reservation is a [`Hold`] with a
//! per-request [`HoldId`], and the settlement is by id and idempotent (see
//! [`RateLimitStore`] and [`ledger`](crate::ledger)), so a store that answers late, twice
//! or not at all never counts a request twice.
//!
//! - Attempts paid for and discarded below this layer (an answer validation rejected
//!   before its retry, a fallback attempt that failed after reporting usage; see
//!   [`PaidAttempt`]) are settled too: their tokens are added to the response's (or the
//!   error's) own.
//! - Usage unknown (a stream dropped before its usage chunk, a provider that sends none,
//!   an upstream timeout): **no refund**, the estimate stands (settled as the actual).
//! - The future dropped after the call started (the caller went away): no refund. Dropped
//!   while the store was still answering, or the store failed closed: the token holds are
//!   settled at zero, so a reservation that lands late is a no-op.
//! - The inner service failed with an error that means the provider rejected the request
//!   before generating (rate limited, bad request, context length, auth, not found,
//!   unavailable, overloaded, budget exceeded): the tokens are given back; other errors
//!   (timeout, transport, …) keep the reservation.
//! - A request whose estimate alone exceeds a token bucket's limit can never pass: it is
//!   refused at once, without a retry-after.
//!
//! # On limit
//!
//! [`OnLimit`] chooses:
//!
//! - [`OnLimit::Reject`] (default): an [`ErrorKind::RateLimited`](crate::ErrorKind)
//!   error with `retry_after` set to when the bucket has room.
//! - [`OnLimit::Wait`]: wait (on tokio's clock) until the bucket has room, at most
//!   `max_wait` and never past the request's [`Deadline`](crate::Deadline); if the wait
//!   would be longer, reject as above.
//! - [`OnLimit::FallBack`]: return the `RateLimited` error at once, never waiting even if
//!   the request has a deadline, so that a fallback layer **above** moves to the next
//!   target. Compose it **per target, under the fallback**:
//!   `Fallback[ RateLimit(openai) → openai, RateLimit(anthropic) → anthropic ]`.
//!   `RateLimited` is a kind that [`LlmError::should_fall_back`] accepts, and the error
//!   carries the retry-after so the fallback can skip this target until then.
//!
//! # Provider headroom
//!
//! With [`RateLimitLayer::headroom`] the layer feeds every response's
//! [`ResponseMeta::headroom`](crate::ResponseMeta) to a [`HeadroomTracker`] and refuses
//! (as a `RateLimited` error with `retry_after` = the provider's reset) while the provider's
//! remaining requests or tokens are below a threshold, before the provider answers 429.
//! Put this layer directly over the provider so it sees the headroom.
//!
//! # Stores
//!
//! [`InMemoryRateLimitStore`] (default; bounded, see its docs) or any [`RateLimitStore`]:
//! `llm-tower-redis` has a Redis store (one atomic script per request over all its buckets)
//! so that replicas share the limits.
//!
//! # What the response says
//!
//! [`ResponseMeta::limits`](crate::ResponseMeta) gets the requests and tokens left in the
//! tightest request and token buckets (for `x-ratelimit-remaining-*` headers). Counts of
//! allowed, limited and waited requests: [`RateLimitLayer::stats`].
//!
//! # Readiness
//!
//! The decision needs the request, so `poll_ready` only delegates to the inner service;
//! the limit is applied inside the response future (axum's approach). The inner service
//! must be `Clone`: the instance that was polled ready is moved into the future.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use llm_tower::rate_limit::{OnLimit, RateLimitLayer, Rule};
//! use llm_tower::{ChatRequest, ChatResponse, ErrorKind, LlmError, LlmResponse, Message};
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! let layer = RateLimitLayer::new()
//!     .rule(Rule::requests(2, Duration::from_secs(60)).per_tenant())
//!     .rule(Rule::tokens(10_000, Duration::from_secs(60)).per_tenant().per_model())
//!     .on_limit(OnLimit::Reject);
//! let mut svc = ServiceBuilder::new().layer(layer.clone()).service_fn(|req: ChatRequest| async move {
//!     Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(req.model, "hi")))
//! });
//! let req = || ChatRequest::new("gpt-4o-mini", vec![Message::user("Hi")]).with_tenant("acme");
//!
//! let resp = svc.ready().await.unwrap().call(req()).await.unwrap();
//! assert_eq!(resp.meta.limits.unwrap().remaining_requests, Some(1));
//! svc.ready().await.unwrap().call(req()).await.unwrap();
//! let err = svc.ready().await.unwrap().call(req()).await.unwrap_err();
//! assert_eq!(err.kind(), ErrorKind::RateLimited);
//! assert!(err.retry_after().is_some());
//! assert_eq!(layer.stats().limited, 1);
//! # }
//! ```
//!
//! [`Tenant`]: crate::Tenant
//! [`TaskType`]: crate::TaskType

mod headroom;
mod store;

pub use crate::ledger::{DEFAULT_HOLD_TTL, Hold, HoldId, MIN_HOLD_TTL};
pub use headroom::{HeadroomTracker, WeakHeadroomTracker};
pub use store::{Acquire, AcquireFuture, BucketCheck, InMemoryRateLimitStore, RateLimitStore};

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use llm_tower_core::{
    ChatRequest, ErrorKind, LlmError, LlmResponse, LocalLimits, Outcome, PaidAttempt, Usage,
};
use tower_layer::Layer;
use tower_service::Service;

// ===== rules =====

/// What a rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitUnit {
    /// One unit per request.
    Requests,
    /// Prompt plus completion tokens (reserved from an estimate, settled with the usage).
    Tokens,
}

/// Which request attributes key a rule's buckets (none: one global bucket).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct KeyBy {
    /// One bucket per [`Tenant`](crate::Tenant) (requests without one share the `""` tenant).
    pub tenant: bool,
    /// One bucket per requested model.
    pub model: bool,
    /// One bucket per [`TaskType`](crate::TaskType) (untyped requests share `""`).
    pub task: bool,
}

/// One limit: `limit` requests or tokens per `window`, keyed as [`KeyBy`] says.
///
/// ```
/// use llm_tower::rate_limit::Rule;
/// use std::time::Duration;
///
/// // 100 requests a minute per tenant and model; 1M tokens an hour for tenant "free" only.
/// let a = Rule::requests(100, Duration::from_secs(60)).per_tenant().per_model();
/// let b = Rule::tokens(1_000_000, Duration::from_secs(3600)).for_tenant("free");
/// # let _ = (a, b);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    name: Option<Arc<str>>,
    unit: LimitUnit,
    limit: u64,
    window: Duration,
    key_by: KeyBy,
    only_tenant: Option<Arc<str>>,
    only_model: Option<Arc<str>>,
    only_task: Option<Arc<str>>,
    known_models: Option<Arc<BTreeSet<Box<str>>>>,
}

/// A rule that cannot work (zero limit or zero window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRule(String);

impl fmt::Display for InvalidRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidRule {}

impl Rule {
    /// A rule of `limit` units of `unit` per `window`, or an error if either is zero.
    pub fn try_new(unit: LimitUnit, limit: u64, window: Duration) -> Result<Self, InvalidRule> {
        if limit == 0 {
            return Err(InvalidRule(
                "rate limit rule: limit must be at least 1".into(),
            ));
        }
        if window.is_zero() {
            return Err(InvalidRule(
                "rate limit rule: window must be non-zero".into(),
            ));
        }
        Ok(Self {
            name: None,
            unit,
            limit,
            window,
            key_by: KeyBy::default(),
            only_tenant: None,
            only_model: None,
            only_task: None,
            known_models: None,
        })
    }

    /// `limit` requests per `window`.
    ///
    /// # Panics
    ///
    /// If `limit` or `window` is zero (use [`try_new`](Self::try_new) for config input).
    pub fn requests(limit: u64, window: Duration) -> Self {
        Self::try_new(LimitUnit::Requests, limit, window).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `limit` tokens (prompt + completion) per `window`.
    ///
    /// # Panics
    ///
    /// If `limit` or `window` is zero (use [`try_new`](Self::try_new) for config input).
    pub fn tokens(limit: u64, window: Duration) -> Self {
        Self::try_new(LimitUnit::Tokens, limit, window).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Names the rule (it prefixes its bucket keys and appears in errors). The default
    /// name is derived from the unit, window, keys and filters, so that replicas with the
    /// same configuration share buckets.
    #[must_use]
    pub fn named(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// One bucket per tenant.
    #[must_use]
    pub fn per_tenant(mut self) -> Self {
        self.key_by.tenant = true;
        self
    }
    /// One bucket per model.
    #[must_use]
    pub fn per_model(mut self) -> Self {
        self.key_by.model = true;
        self
    }
    /// One bucket per task type.
    #[must_use]
    pub fn per_task(mut self) -> Self {
        self.key_by.task = true;
        self
    }
    /// With [`per_model`](Self::per_model): the models that get a bucket of their own;
    /// every other requested model shares one bucket, `other`. The model is the client's
    /// choice, so without this a client could take a fresh bucket per made-up name.
    ///
    /// ```
    /// use llm_tower::rate_limit::Rule;
    /// use std::time::Duration;
    /// let r = Rule::requests(100, Duration::from_secs(60))
    ///     .per_model()
    ///     .known_models(["gpt-4o", "gpt-4o-mini"]);
    /// # let _ = r;
    /// ```
    #[must_use]
    pub fn known_models<I, M>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<Box<str>>,
    {
        self.known_models = Some(Arc::new(models.into_iter().map(Into::into).collect()));
        self
    }
    /// Sets all keys at once.
    #[must_use]
    pub fn key_by(mut self, key_by: KeyBy) -> Self {
        self.key_by = key_by;
        self
    }
    /// Applies only to requests of this tenant.
    #[must_use]
    pub fn for_tenant(mut self, tenant: impl Into<Arc<str>>) -> Self {
        self.only_tenant = Some(tenant.into());
        self
    }
    /// Applies only to requests for this model.
    #[must_use]
    pub fn for_model(mut self, model: impl Into<Arc<str>>) -> Self {
        self.only_model = Some(model.into());
        self
    }
    /// Applies only to requests of this task type.
    #[must_use]
    pub fn for_task(mut self, task: impl Into<Arc<str>>) -> Self {
        self.only_task = Some(task.into());
        self
    }

    /// What the rule counts.
    pub fn unit(&self) -> LimitUnit {
        self.unit
    }
    /// Units per window.
    pub fn limit(&self) -> u64 {
        self.limit
    }
    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    fn default_name(&self) -> String {
        let mut s = String::from(match self.unit {
            LimitUnit::Requests => "req",
            LimitUnit::Tokens => "tok",
        });
        s.push_str(&format!("/{}ms", self.window.as_millis()));
        if self.key_by.tenant {
            s.push_str("/tenant");
        }
        if self.key_by.model {
            s.push_str("/model");
        }
        if self.key_by.task {
            s.push_str("/task");
        }
        for (tag, v) in [
            ("t=", &self.only_tenant),
            ("m=", &self.only_model),
            ("k=", &self.only_task),
        ] {
            if let Some(v) = v {
                s.push('/');
                s.push_str(tag);
                push_escaped(&mut s, v);
            }
        }
        s
    }

    /// The bucket key for `req`, or `None` if the rule does not apply to it.
    fn key_for(&self, name: &str, req: &ChatRequest) -> Option<String> {
        let tenant = req.tenant().map_or("", |t| t.as_str());
        let task = req.task_type().map_or("", |t| t.as_str());
        let model = req.model.as_str();
        if self.only_tenant.as_deref().is_some_and(|t| t != tenant)
            || self.only_model.as_deref().is_some_and(|m| m != model)
            || self.only_task.as_deref().is_some_and(|k| k != task)
        {
            return None;
        }
        let mut key = String::with_capacity(name.len() + 48);
        key.push_str(name);
        if self.key_by.tenant {
            key.push_str("|t=");
            push_escaped(&mut key, tenant);
        }
        if self.key_by.model {
            key.push_str("|m=");
            match &self.known_models {
                Some(known) if !known.contains(model) => key.push_str("other"),
                _ => push_escaped(&mut key, model),
            }
        }
        if self.key_by.task {
            key.push_str("|k=");
            push_escaped(&mut key, task);
        }
        Some(key)
    }
}

/// Keeps keys unambiguous: `|` separates the parts, so it is escaped inside values.
fn push_escaped(out: &mut String, v: &str) {
    if v.contains(['|', '%']) {
        out.push_str(&v.replace('%', "%25").replace('|', "%7C"));
    } else {
        out.push_str(v);
    }
}

// ===== estimator =====

/// The token estimate a reservation is made from (a documented approximation, not a
/// tokenizer): `ceil(prompt text bytes / bytes_per_token) + messages × per_message_tokens
/// + 3`, plus the output limit (`max_completion_tokens`, else `max_tokens`, else
/// `default_output_tokens`) times `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenEstimator {
    /// Bytes of text per token. Default 4 (English text with OpenAI/Anthropic tokenizers).
    pub bytes_per_token: u32,
    /// Overhead tokens per message (role, separators). Default 4.
    pub per_message_tokens: u32,
    /// Output estimate when the request sets no limit. Default 512.
    pub default_output_tokens: u64,
}

impl Default for TokenEstimator {
    fn default() -> Self {
        Self {
            bytes_per_token: 4,
            per_message_tokens: 4,
            default_output_tokens: 512,
        }
    }
}

impl TokenEstimator {
    /// Estimated prompt tokens of `req`.
    pub fn prompt_tokens(&self, req: &ChatRequest) -> u64 {
        let bytes = req.prompt_text_len() as u64;
        let bpt = u64::from(self.bytes_per_token.max(1));
        bytes.div_ceil(bpt) + req.messages.len() as u64 * u64::from(self.per_message_tokens) + 3
    }
    /// Estimated output tokens of `req`.
    pub fn output_tokens(&self, req: &ChatRequest) -> u64 {
        let per_choice = req.output_limit().unwrap_or(self.default_output_tokens);
        per_choice.saturating_mul(req.n.unwrap_or(1).max(1))
    }
    /// Estimated total tokens of `req`.
    pub fn estimate(&self, req: &ChatRequest) -> u64 {
        self.prompt_tokens(req)
            .saturating_add(self.output_tokens(req))
    }
}

/// Tokens actually used, from a usage report.
fn used_tokens(u: &Usage) -> u64 {
    u.total_tokens
        .max(u.prompt_tokens.saturating_add(u.completion_tokens))
}

/// Tokens of the attempts paid for and discarded (see [`PaidAttempt`]).
fn paid_tokens(paid: &[PaidAttempt]) -> u64 {
    paid.iter()
        .fold(0u64, |sum, a| sum.saturating_add(used_tokens(&a.usage)))
}

/// Errors that mean the provider refused the request before generating anything, so the
/// usage is known to be zero.
pub(crate) fn rejected_before_generation(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::RateLimited
            | ErrorKind::BadRequest
            | ErrorKind::ContextLengthExceeded
            | ErrorKind::Auth
            | ErrorKind::NotFound
            | ErrorKind::Unavailable
            | ErrorKind::Overloaded
            | ErrorKind::BudgetExceeded
    )
}

// ===== policy and stats =====

/// What to do when a bucket (or the provider's headroom) has no room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnLimit {
    /// Fail with `RateLimited` and a retry-after.
    #[default]
    Reject,
    /// Wait until there is room, at most `max_wait` and never past the request's
    /// [`Deadline`](crate::Deadline); reject if that is not enough.
    Wait {
        /// Longest wait.
        max_wait: Duration,
    },
    /// Fail with `RateLimited` at once, never waiting, so that a fallback layer above
    /// moves on to its next target (see the module docs).
    FallBack,
}

/// Counts kept by a [`RateLimitLayer`] (shared by all its clones and services).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitStats {
    /// Requests let through.
    pub allowed: u64,
    /// Requests refused (by a bucket or by the provider headroom).
    pub limited: u64,
    /// Requests that waited at least once (and were then allowed or refused).
    pub waited: u64,
    /// Of `limited`, those refused by the provider headroom tracker.
    pub headroom_limited: u64,
}

#[derive(Debug, Default)]
struct Counters {
    allowed: AtomicU64,
    limited: AtomicU64,
    waited: AtomicU64,
    headroom_limited: AtomicU64,
}

// ===== layer =====

#[derive(Debug, Clone)]
struct Config {
    rules: Vec<(Rule, Arc<str>)>,
    on_limit: OnLimit,
    estimator: TokenEstimator,
    headroom: Option<HeadroomTracker>,
    target: Option<Arc<str>>,
    hold_ttl: Duration,
}

/// Applies [`RateLimit`] to a service. See the [module docs](self) for an example.
///
/// # Clone
///
/// Clones share the store, the headroom tracker and the counters, so every service built
/// from one layer enforces one set of limits.
#[derive(Clone)]
pub struct RateLimitLayer {
    config: Arc<Config>,
    store: Arc<dyn RateLimitStore>,
    counters: Arc<Counters>,
}

impl fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("config", &self.config)
            .field("store", &self.store)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Default for RateLimitLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimitLayer {
    /// A layer with no rules, the in-memory store and [`OnLimit::Reject`].
    pub fn new() -> Self {
        Self {
            config: Arc::new(Config {
                rules: Vec::new(),
                on_limit: OnLimit::Reject,
                estimator: TokenEstimator::default(),
                headroom: None,
                target: None,
                hold_ttl: DEFAULT_HOLD_TTL,
            }),
            store: Arc::new(InMemoryRateLimitStore::new()),
            counters: Arc::default(),
        }
    }

    /// Adds a rule.
    #[must_use]
    pub fn rule(mut self, rule: Rule) -> Self {
        let name: Arc<str> = match &rule.name {
            Some(n) => n.clone(),
            None => rule.default_name().into(),
        };
        Arc::make_mut(&mut self.config).rules.push((rule, name));
        self
    }

    /// Adds several rules.
    #[must_use]
    pub fn rules(self, rules: impl IntoIterator<Item = Rule>) -> Self {
        rules.into_iter().fold(self, Self::rule)
    }

    /// Uses `store` for the buckets (e.g. the Redis store of `llm-tower-redis`).
    #[must_use]
    pub fn store(mut self, store: Arc<dyn RateLimitStore>) -> Self {
        self.store = store;
        self
    }

    /// What to do on limit.
    #[must_use]
    pub fn on_limit(mut self, on_limit: OnLimit) -> Self {
        Arc::make_mut(&mut self.config).on_limit = on_limit;
        self
    }

    /// The token estimator for reservations.
    #[must_use]
    pub fn estimator(mut self, estimator: TokenEstimator) -> Self {
        Arc::make_mut(&mut self.config).estimator = estimator;
        self
    }

    /// How long a token reservation is held if it is never settled (default
    /// [`DEFAULT_HOLD_TTL`], 10 minutes). Make it longer than your longest request. At
    /// least [`MIN_HOLD_TTL`] (1 s).
    #[must_use]
    pub fn hold_ttl(mut self, ttl: Duration) -> Self {
        // A hold that expires before it is made would let the request through unreserved.
        Arc::make_mut(&mut self.config).hold_ttl = ttl.max(MIN_HOLD_TTL);
        self
    }

    /// Tracks the provider's headroom with `tracker` (see [`HeadroomTracker`]).
    #[must_use]
    pub fn headroom(mut self, tracker: HeadroomTracker) -> Self {
        Arc::make_mut(&mut self.config).headroom = Some(tracker);
        self
    }

    /// Names the target this layer guards (put into its errors as the provider).
    #[must_use]
    pub fn target(mut self, name: impl Into<Arc<str>>) -> Self {
        Arc::make_mut(&mut self.config).target = Some(name.into());
        self
    }

    /// The counts so far.
    pub fn stats(&self) -> RateLimitStats {
        self.counters.snapshot()
    }

    /// The headroom tracker, if any.
    pub fn headroom_tracker(&self) -> Option<&HeadroomTracker> {
        self.config.headroom.as_ref()
    }
}

impl Counters {
    fn snapshot(&self) -> RateLimitStats {
        RateLimitStats {
            allowed: self.allowed.load(Ordering::Relaxed),
            limited: self.limited.load(Ordering::Relaxed),
            waited: self.waited.load(Ordering::Relaxed),
            headroom_limited: self.headroom_limited.load(Ordering::Relaxed),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            layer: self.clone(),
        }
    }
}

// ===== service =====

/// The rate-limit service. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    layer: RateLimitLayer,
}

impl<S> RateLimit<S> {
    /// Wraps `inner` with `layer`'s rules.
    pub fn new(inner: S, layer: RateLimitLayer) -> Self {
        Self { inner, layer }
    }
    /// A [`RateLimitLayer`] with no rules (add them with its builder methods).
    pub fn layer() -> RateLimitLayer {
        RateLimitLayer::new()
    }
    /// The counts so far.
    pub fn stats(&self) -> RateLimitStats {
        self.layer.stats()
    }
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// What one request takes: its bucket checks, and which of them are token buckets.
#[derive(Debug)]
struct Plan {
    checks: Vec<BucketCheck>,
    is_tokens: Vec<bool>,
    estimate: u64,
    /// After admission: (is a token bucket, units left) per bucket.
    remaining: Vec<(bool, Option<u64>)>,
}

impl RateLimitLayer {
    fn plan(&self, req: &ChatRequest) -> Result<Plan, LlmError> {
        let cfg = &self.config;
        let mut checks = Vec::with_capacity(cfg.rules.len());
        let mut is_tokens = Vec::with_capacity(cfg.rules.len());
        let mut estimate = None;
        for (rule, name) in &cfg.rules {
            let Some(key) = rule.key_for(name, req) else {
                continue;
            };
            let amount = match rule.unit {
                LimitUnit::Requests => 1,
                LimitUnit::Tokens => {
                    let e = *estimate.get_or_insert_with(|| cfg.estimator.estimate(req));
                    if e > rule.limit {
                        return Err(self.error(
                            format!(
                                "request needs about {e} tokens, more than rate limit `{name}` allows ({} per {:?})",
                                rule.limit, rule.window
                            ),
                            None,
                        ));
                    }
                    e
                }
            };
            is_tokens.push(rule.unit == LimitUnit::Tokens);
            checks.push(BucketCheck {
                key,
                limit: rule.limit,
                window: rule.window,
                amount,
                held: rule.unit == LimitUnit::Tokens,
            });
        }
        let estimate = match (estimate, &cfg.headroom) {
            (Some(e), _) => e,
            (None, Some(_)) => cfg.estimator.estimate(req),
            (None, None) => 0,
        };
        Ok(Plan {
            checks,
            is_tokens,
            estimate,
            remaining: Vec::new(),
        })
    }

    fn error(&self, msg: String, retry_after: Option<Duration>) -> LlmError {
        let mut e = LlmError::rate_limited(msg);
        if let Some(r) = retry_after {
            e = e.with_retry_after(r);
        }
        if let Some(t) = &self.config.target {
            e = e.with_provider(t.to_string());
        }
        e
    }

    fn limited_error(&self, plan: &Plan, index: usize, retry_after: Duration) -> LlmError {
        let key = plan.checks.get(index).map_or("?", |c| c.key.as_str());
        self.error(
            format!("local rate limit exceeded ({key}); retry in {retry_after:?}"),
            Some(retry_after),
        )
    }
}

impl<S> Service<ChatRequest> for RateLimit<S>
where
    S: Service<ChatRequest, Response = LlmResponse, Error = LlmError> + Clone,
{
    type Response = LlmResponse;
    type Error = LlmError;
    type Future = future::ResponseFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ChatRequest) -> Self::Future {
        let plan = match self.layer.plan(&req) {
            Ok(p) => p,
            Err(e) => {
                self.layer.counters.limited.fetch_add(1, Ordering::Relaxed);
                return future::ResponseFuture::failed(e);
            }
        };
        // The instance that poll_ready approved goes into the future; a clone stays.
        let fresh = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, fresh);
        let wait_until = match self.layer.config.on_limit {
            OnLimit::Wait { max_wait } => {
                let mut until = tokio::time::Instant::now() + max_wait;
                if let Some(d) = req.deadline() {
                    until = until.min(d.0);
                }
                Some(until)
            }
            OnLimit::Reject | OnLimit::FallBack => None,
        };
        future::ResponseFuture::new(self.layer.clone(), inner, req, plan, wait_until)
    }
}

// ===== reservation =====

/// The hold of one admitted request's token buckets: settled once with the actual usage,
/// or (usage unknown, or dropped unsettled) with the estimate, which keeps the take.
struct Reservation {
    store: Arc<dyn RateLimitStore>,
    hold: Hold,
    buckets: Vec<BucketCheck>,
}

impl Reservation {
    /// Settles with `actual` tokens (`None`, usage unknown: the estimate) plus `paid`, the
    /// tokens of earlier attempts paid for and discarded.
    fn settle(mut self, actual: Option<u64>, paid: u64) {
        self.settle_once(actual, paid);
    }

    fn settle_once(&mut self, actual: Option<u64>, paid: u64) {
        let buckets = std::mem::take(&mut self.buckets);
        let Some(first) = buckets.first() else { return };
        let actual = actual.unwrap_or(first.amount).saturating_add(paid);
        self.store.settle(self.hold, &buckets, actual);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.settle_once(None, 0);
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("buckets", &self.buckets)
            .finish_non_exhaustive()
    }
}

// ===== future =====

/// The response future of [`RateLimit`].
pub mod future {
    use super::*;
    use std::future::Future;
    use std::pin::Pin;

    use pin_project_lite::pin_project;
    use tokio::time::{Instant, Sleep};

    pin_project! {
        #[project = StateProj]
        enum State<F> {
            Check,
            Acquiring { fut: AcquireFuture },
            Waiting { #[pin] sleep: Sleep },
            Calling { #[pin] fut: F },
            Done,
        }
    }

    pin_project! {
        /// The response future of [`RateLimit`](super::RateLimit): takes from the buckets
        /// (waiting if the policy says so), then calls the inner service and arranges the
        /// settlement of the token reservation.
        pub struct ResponseFuture<S>
        where
            S: Service<ChatRequest>,
        {
            #[pin]
            state: State<S::Future>,
            ctx: Option<Ctx<S>>,
            // Only an error: a response held here would make every future of this layer
            // ~830 bytes bigger, copied on each move and boxing.
            failed: Option<LlmError>,
        }
    }

    struct Ctx<S> {
        layer: RateLimitLayer,
        inner: S,
        req: Option<ChatRequest>,
        plan: Plan,
        wait_until: Option<Instant>,
        waited: bool,
        // The headroom tracker counted this request (given back if a bucket refuses).
        headroom_admitted: bool,
        reservation: Option<Reservation>,
        hold: Hold,
        // An acquisition was sent and its answer is not known: if dropped so, the token
        // holds are settled at zero, so that the acquisition is a no-op if it lands late.
        in_flight: bool,
    }

    impl<S> Drop for Ctx<S> {
        fn drop(&mut self) {
            if !self.in_flight {
                return;
            }
            let held: Vec<BucketCheck> = self
                .plan
                .checks
                .iter()
                .filter(|c| c.held)
                .cloned()
                .collect();
            if !held.is_empty() {
                self.layer.store.settle(self.hold, &held, 0);
            }
        }
    }

    impl<S> fmt::Debug for ResponseFuture<S>
    where
        S: Service<ChatRequest>,
    {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("ResponseFuture").finish_non_exhaustive()
        }
    }

    impl<S> ResponseFuture<S>
    where
        S: Service<ChatRequest, Response = LlmResponse, Error = LlmError>,
    {
        pub(super) fn failed(e: LlmError) -> Self {
            Self {
                state: State::Done,
                ctx: None,
                failed: Some(e),
            }
        }

        pub(super) fn new(
            layer: RateLimitLayer,
            inner: S,
            req: ChatRequest,
            plan: Plan,
            wait_until: Option<Instant>,
        ) -> Self {
            let hold = if plan.checks.is_empty() {
                Hold {
                    id: HoldId::from_u128(0),
                    expires_at: Instant::now(),
                }
            } else {
                Hold::new(layer.config.hold_ttl)
            };
            Self {
                state: State::Check,
                ctx: Some(Ctx {
                    layer,
                    inner,
                    req: Some(req),
                    plan,
                    wait_until,
                    waited: false,
                    headroom_admitted: false,
                    reservation: None,
                    hold,
                    in_flight: false,
                }),
                failed: None,
            }
        }
    }

    /// What to do after a refusal: wait `d`, or fail.
    fn on_refusal<S>(ctx: &mut Ctx<S>, retry_after: Duration) -> Option<Duration> {
        let until = ctx.wait_until?;
        let now = Instant::now();
        // Waking exactly at retry-after must find room; never wait past the deadline.
        let wake = now + retry_after.max(Duration::from_millis(1));
        (wake <= until).then(|| {
            if !ctx.waited {
                ctx.waited = true;
                ctx.layer.counters.waited.fetch_add(1, Ordering::Relaxed);
            }
            let wait = wake - now;
            if let Some(req) = &ctx.req {
                crate::emit(req, crate::ObserveEvent::RateLimitWait { wait });
            }
            wait
        })
    }

    impl<S> Future for ResponseFuture<S>
    where
        S: Service<ChatRequest, Response = LlmResponse, Error = LlmError>,
    {
        type Output = Result<LlmResponse, LlmError>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let mut this = self.project();
            loop {
                let Some(ctx) = this.ctx.as_mut() else {
                    return Poll::Ready(Err(this.failed.take().unwrap_or_else(|| {
                        LlmError::internal("rate limit future polled after completion")
                    })));
                };
                let acquired = match this.state.as_mut().project() {
                    StateProj::Check => {
                        // Provider headroom first: it costs nothing to ask.
                        if let Some(tracker) = &ctx.layer.config.headroom
                            && let Err(retry_after) = tracker.admit(ctx.plan.estimate)
                        {
                            if let Some(d) = on_refusal(ctx, retry_after) {
                                this.state.set(State::Waiting {
                                    sleep: tokio::time::sleep(d),
                                });
                                continue;
                            }
                            let c = &ctx.layer.counters;
                            c.limited.fetch_add(1, Ordering::Relaxed);
                            c.headroom_limited.fetch_add(1, Ordering::Relaxed);
                            let e = ctx.layer.error(
                                    format!("provider rate-limit headroom exhausted; retry in {retry_after:?}"),
                                    Some(retry_after),
                                );
                            *this.ctx = None;
                            this.state.set(State::Done);
                            return Poll::Ready(Err(e));
                        }
                        ctx.headroom_admitted = ctx.layer.config.headroom.is_some();
                        if ctx.plan.checks.is_empty() {
                            Ok(Acquire::Allowed {
                                remaining: Vec::new(),
                            })
                        } else if let Some(r) =
                            ctx.layer.store.acquire_now(ctx.hold, &ctx.plan.checks)
                        {
                            r
                        } else {
                            let fut = ctx.layer.store.acquire(ctx.hold, &ctx.plan.checks);
                            ctx.in_flight = true;
                            this.state.set(State::Acquiring { fut });
                            continue;
                        }
                    }
                    StateProj::Acquiring { fut } => match fut.as_mut().poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(r) => {
                            // Failed (closed): it may still land; otherwise it is answered.
                            ctx.in_flight = r.is_err();
                            r
                        }
                    },
                    StateProj::Waiting { sleep } => match sleep.poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(()) => {
                            this.state.set(State::Check);
                            continue;
                        }
                    },
                    StateProj::Calling { fut } => {
                        let result = match fut.poll(cx) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(r) => r,
                        };
                        let Some(ctx) = this.ctx.take() else {
                            return Poll::Ready(result);
                        };
                        this.state.set(State::Done);
                        return Poll::Ready(finish(ctx, result));
                    }
                    StateProj::Done => {
                        return Poll::Ready(Err(LlmError::internal(
                            "rate limit future polled after completion",
                        )));
                    }
                };
                if !matches!(acquired, Ok(Acquire::Allowed { .. }))
                    && std::mem::take(&mut ctx.headroom_admitted)
                    && let Some(tracker) = &ctx.layer.config.headroom
                {
                    tracker.release(ctx.plan.estimate);
                }
                match acquired {
                    Err(e) => {
                        // A store failing closed.
                        *this.ctx = None;
                        this.state.set(State::Done);
                        return Poll::Ready(Err(e));
                    }
                    Ok(Acquire::Limited { index, retry_after }) => {
                        if let Some(d) = on_refusal(ctx, retry_after) {
                            this.state.set(State::Waiting {
                                sleep: tokio::time::sleep(d),
                            });
                            continue;
                        }
                        ctx.layer.counters.limited.fetch_add(1, Ordering::Relaxed);
                        let e = ctx.layer.limited_error(&ctx.plan, index, retry_after);
                        *this.ctx = None;
                        this.state.set(State::Done);
                        return Poll::Ready(Err(e));
                    }
                    Ok(Acquire::Allowed { remaining }) => {
                        ctx.layer.counters.allowed.fetch_add(1, Ordering::Relaxed);
                        let plan = &mut ctx.plan;
                        let buckets: Vec<BucketCheck> = plan
                            .checks
                            .drain(..)
                            .zip(plan.is_tokens.iter().copied())
                            .zip(remaining.iter().copied().chain(std::iter::repeat(None)))
                            .filter_map(|((c, tok), rem)| {
                                plan.remaining.push((tok, rem));
                                tok.then_some(c)
                            })
                            .collect();
                        if !buckets.is_empty() {
                            ctx.reservation = Some(Reservation {
                                store: ctx.layer.store.clone(),
                                hold: ctx.hold,
                                buckets,
                            });
                        }
                        let Some(req) = ctx.req.take() else {
                            return Poll::Ready(Err(LlmError::internal(
                                "rate limit: request taken twice",
                            )));
                        };
                        let fut = ctx.inner.call(req);
                        this.state.set(State::Calling { fut });
                    }
                }
            }
        }
    }

    /// After the inner call: limits into the meta, headroom observed, settlement arranged.
    fn finish<S>(
        mut ctx: Ctx<S>,
        result: Result<LlmResponse, LlmError>,
    ) -> Result<LlmResponse, LlmError> {
        match result {
            Ok(mut resp) => {
                if let (Some(tracker), Some(h)) = (&ctx.layer.config.headroom, &resp.meta.headroom)
                {
                    tracker.observe(h);
                }
                let mut limits = LocalLimits::default();
                for (tok, rem) in &ctx.plan.remaining {
                    let slot = if *tok {
                        &mut limits.remaining_tokens
                    } else {
                        &mut limits.remaining_requests
                    };
                    if let Some(r) = rem {
                        *slot = Some(slot.map_or(*r, |s: u64| s.min(*r)));
                    }
                }
                if !ctx.plan.remaining.is_empty() {
                    resp.meta.limits = Some(limits);
                }
                if let Some(res) = ctx.reservation.take() {
                    let paid = paid_tokens(&resp.meta.paid_attempts);
                    resp.on_finish(move |o: &Outcome| {
                        res.settle(o.usage().map(used_tokens), paid);
                    });
                }
                Ok(resp)
            }
            Err(e) => {
                if let Some(res) = ctx.reservation.take() {
                    // The failing attempt's own usage, if it reported one, is among the
                    // paid attempts.
                    let own = e.usage().is_some() || rejected_before_generation(e.kind());
                    res.settle(own.then_some(0), paid_tokens(e.paid_attempts()));
                }
                Err(e)
            }
        }
    }
}
