//! `ResponseMeta`: what layers learned while serving a response.

use std::sync::Arc;
use std::time::Duration;

use crate::{ErrorKind, Usage};

/// Whether a response came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum CacheStatus {
    /// No cache layer looked at it.
    #[default]
    None,
    /// Served from the cache.
    Hit,
    /// Looked up, not found; the upstream answer may be stored.
    Miss,
    /// The cache was skipped (policy, non-deterministic request, `no-cache`/`no-store`).
    Bypass,
}

impl CacheStatus {
    /// `hit`, `miss`, `bypass` or `none` (the `x-llm-cache` header value).
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::None => "none",
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Bypass => "bypass",
        }
    }
}

/// One attempt of a fallback chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The target tried (its name in the chain).
    pub target: Arc<str>,
    /// The model asked for on that attempt.
    pub model: Option<String>,
    /// `None` if it served the response, else why it failed (or was skipped).
    pub error: Option<AttemptError>,
}

/// An upstream attempt that was paid for (it reported usage) but whose answer did not
/// become the response: an answer validation rejected before its retry, a fallback attempt
/// that failed after its usage arrived, any answer received and then discarded.
///
/// The layer that discards the answer records it ([`ResponseMeta::paid_attempts`] on the
/// response that follows, [`LlmError::paid_attempts`](crate::LlmError::paid_attempts) on
/// an error), so that accounting layers above (cost, budgets, token limits) settle every
/// attempt, priced with the model that served it.
///
/// ```
/// use llm_tower_core::{PaidAttempt, Usage};
/// let a = PaidAttempt::new(Some("gpt-4o-mini".into()), Usage::new(100, 20));
/// assert_eq!(a.usage.total_tokens, 120);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaidAttempt {
    /// The model that served the attempt (`None`: the one the request asked for).
    pub model: Option<String>,
    /// What the attempt reported.
    pub usage: Usage,
}

impl PaidAttempt {
    /// An attempt of `model` that used `usage`.
    pub fn new(model: Option<String>, usage: Usage) -> Self {
        Self { model, usage }
    }
}

/// Why an attempt did not serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptError {
    /// The error kind.
    pub kind: ErrorKind,
    /// The error message.
    pub message: String,
    /// Whether the target was skipped without a call (cooling down, over its headroom).
    pub skipped: bool,
}

/// The provider's rate-limit headroom, from `x-ratelimit-*` / `anthropic-ratelimit-*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimitHeadroom {
    /// Requests left in the provider's window.
    pub remaining_requests: Option<u64>,
    /// Tokens left in the provider's window.
    pub remaining_tokens: Option<u64>,
    /// Request limit of the window.
    pub limit_requests: Option<u64>,
    /// Token limit of the window.
    pub limit_tokens: Option<u64>,
    /// When the request count resets.
    pub reset_requests: Option<Duration>,
    /// When the token count resets.
    pub reset_tokens: Option<Duration>,
}

/// What the local rate-limit layer has left for the caller (for `x-ratelimit-*` headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LocalLimits {
    /// Requests left in the tightest request bucket.
    pub remaining_requests: Option<u64>,
    /// Tokens left in the tightest token bucket.
    pub remaining_tokens: Option<u64>,
}

/// Money in nano-dollars (1e-9 USD): integers, so totals never drift.
pub type NanoUsd = u64;

/// The cost of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cost {
    /// What the response cost, in nano-dollars (zero for a cache hit).
    pub nano_usd: NanoUsd,
    /// What a cache hit saved, in nano-dollars.
    pub saved_nano_usd: NanoUsd,
}

impl Cost {
    /// The cost in dollars, for display only (the `x-llm-cost-usd` header).
    pub fn usd(&self) -> f64 {
        self.nano_usd as f64 / 1e9
    }
}

/// What layers learned while serving a response. Every field is optional: each layer
/// fills what it knows, and the HTTP surface turns it into headers and metrics.
#[derive(Debug, Clone, Default)]
pub struct ResponseMeta {
    /// Provider that served (`openai`, `anthropic`, a target name…).
    pub provider: Option<Arc<str>>,
    /// The model that actually served.
    pub model: Option<String>,
    /// The route chosen by the route layer.
    pub route: Option<Arc<str>>,
    /// Fallback attempts, in order (empty when no fallback layer ran).
    pub attempts: Vec<Attempt>,
    /// Cache status.
    pub cache: CacheStatus,
    /// Token usage; for a stream, known only when it finished (see [`LlmResponse::on_finish`](crate::LlmResponse::on_finish)).
    pub usage: Option<Usage>,
    /// Earlier attempts of this request that were paid for but whose answers were
    /// discarded (see [`PaidAttempt`]); this response's own usage is not among them. Empty
    /// (no allocation) when the first answer served.
    pub paid_attempts: Vec<PaidAttempt>,
    /// Cost, when a cost layer ran: this response's and its
    /// [`paid_attempts`](Self::paid_attempts)' together.
    pub cost: Option<Cost>,
    /// The provider's rate-limit headroom.
    pub headroom: Option<RateLimitHeadroom>,
    /// Local limits left.
    pub limits: Option<LocalLimits>,
    /// Time spent waiting for the upstream (to the first byte for streams).
    pub upstream_time: Option<Duration>,
    /// Size in bytes of the upstream's complete response body, when a provider read one:
    /// a size hint (a cache weighs its entries by it instead of serializing them again).
    pub body_bytes: Option<usize>,
    /// Extra typed data layers want to pass outwards.
    pub extensions: http::Extensions,
}

impl ResponseMeta {
    /// How many attempts were made (1 when no fallback layer ran).
    pub fn attempt_count(&self) -> usize {
        self.attempts
            .iter()
            .filter(|a| !is_skipped(a))
            .count()
            .max(1)
    }
}

fn is_skipped(a: &Attempt) -> bool {
    a.error.as_ref().is_some_and(|e| e.skipped)
}
