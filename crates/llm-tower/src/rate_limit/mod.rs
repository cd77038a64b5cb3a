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
//!   [`PaidAttempt`](crate::PaidAttempt)) are settled too: their tokens are added to the response's (or the
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
mod rule;
mod store;

pub mod future;

pub use crate::ledger::{DEFAULT_HOLD_TTL, Hold, HoldId, MIN_HOLD_TTL};
pub use headroom::{HeadroomTracker, WeakHeadroomTracker};
use llm_tower_core::LlmService;
pub(crate) use rule::rejected_before_generation;
pub use rule::{InvalidRule, KeyBy, LimitUnit, Rule, TokenEstimator};
use rule::{paid_tokens, used_tokens};
pub use store::{Acquire, AcquireFuture, BucketCheck, InMemoryRateLimitStore, RateLimitStore};

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use llm_tower_core::{ChatRequest, LlmError, LlmResponse, LocalLimits, Outcome};
use tower_layer::Layer;
use tower_service::Service;

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
    pub fn new(inner: S, layer: &RateLimitLayer) -> Self {
        layer.layer(inner)
    }
    /// A [`RateLimitLayer`] with no rules (add them with its builder methods).
    pub fn layer() -> RateLimitLayer {
        RateLimitLayer::new()
    }
    /// The counts so far.
    pub fn stats(&self) -> RateLimitStats {
        self.layer.stats()
    }
    inner_service_accessors!();
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
    S: LlmService + Clone,
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
