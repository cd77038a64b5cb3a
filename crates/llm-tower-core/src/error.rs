//! `LlmError`: one classified error type for every layer and provider.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::{PaidAttempt, Usage};

/// The longest [`LlmError::retry_after`]: one day. Larger values are cut to it.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

/// What kind of failure an [`LlmError`] is. Layers decide on the kind, never on the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The provider or a local limit said "too many requests" (HTTP 429).
    RateLimited,
    /// No answer in time (total, time-to-first-chunk or stall).
    Timeout,
    /// The provider is down or answered 500/502/503.
    Unavailable,
    /// The provider is overloaded (Anthropic 529, `overloaded_error`).
    Overloaded,
    /// The request is invalid; retrying it elsewhere will not help.
    BadRequest,
    /// The prompt does not fit the model's context window.
    ContextLengthExceeded,
    /// The provider refused the content (content policy).
    ContentFiltered,
    /// Missing or invalid credentials.
    Auth,
    /// The requested model, route or object does not exist.
    NotFound,
    /// The model's output failed validation.
    InvalidOutput,
    /// A budget is exhausted.
    BudgetExceeded,
    /// Connection failures, resets, malformed upstream data.
    Transport,
    /// The caller went away or cancelled.
    Cancelled,
    /// A bug or an unexpected state inside the gateway.
    Internal,
}

impl ErrorKind {
    /// The HTTP status this kind maps to at the edge.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::RateLimited | ErrorKind::BudgetExceeded => 429,
            ErrorKind::Timeout => 504,
            ErrorKind::Unavailable | ErrorKind::Overloaded => 503,
            ErrorKind::BadRequest
            | ErrorKind::ContextLengthExceeded
            | ErrorKind::ContentFiltered => 400,
            ErrorKind::Auth => 401,
            ErrorKind::NotFound => 404,
            ErrorKind::InvalidOutput | ErrorKind::Transport => 502,
            // nginx's "client closed request": nobody is left to read it, but logs are clear.
            ErrorKind::Cancelled => 499,
            ErrorKind::Internal => 500,
        }
    }

    /// The OpenAI error `type` string.
    pub fn openai_type(self) -> &'static str {
        match self {
            ErrorKind::RateLimited => "rate_limit_error",
            ErrorKind::BudgetExceeded => "insufficient_quota",
            ErrorKind::Timeout => "timeout_error",
            ErrorKind::Unavailable => "service_unavailable_error",
            ErrorKind::Overloaded => "overloaded_error",
            ErrorKind::BadRequest
            | ErrorKind::ContextLengthExceeded
            | ErrorKind::ContentFiltered => "invalid_request_error",
            ErrorKind::Auth => "authentication_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::InvalidOutput => "invalid_output_error",
            ErrorKind::Transport => "upstream_error",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "server_error",
        }
    }

    /// The default OpenAI error `code` for this kind, if it has one.
    pub fn default_code(self) -> Option<&'static str> {
        match self {
            ErrorKind::ContextLengthExceeded => Some("context_length_exceeded"),
            ErrorKind::ContentFiltered => Some("content_filter"),
            ErrorKind::RateLimited => Some("rate_limit_exceeded"),
            ErrorKind::BudgetExceeded => Some("budget_exceeded"),
            ErrorKind::Auth => Some("invalid_api_key"),
            ErrorKind::InvalidOutput => Some("invalid_output"),
            _ => None,
        }
    }

    /// Whether the same request may succeed if tried again later.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::RateLimited
                | ErrorKind::Timeout
                | ErrorKind::Unavailable
                | ErrorKind::Overloaded
                | ErrorKind::Transport
        )
    }

    /// Snake-case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::ContextLengthExceeded => "context_length_exceeded",
            ErrorKind::ContentFiltered => "content_filtered",
            ErrorKind::Auth => "auth",
            ErrorKind::NotFound => "not_found",
            ErrorKind::InvalidOutput => "invalid_output",
            ErrorKind::BudgetExceeded => "budget_exceeded",
            ErrorKind::Transport => "transport",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of every LLM service: a classified [`ErrorKind`] plus what the edge needs
/// (message, `param`, `code`, retry-after) and what layers need (provider, the attempts of
/// a fallback chain, the rejected output of a validator).
///
/// Cheap to clone (one `Arc`-free box of plain data plus an optional shared source).
///
/// ```
/// use llm_tower_core::{ErrorKind, LlmError};
/// use std::time::Duration;
///
/// let err = LlmError::rate_limited("slow down").with_retry_after(Duration::from_secs(2));
/// assert!(err.is_retryable());
/// assert!(err.should_fall_back());
/// assert_eq!(err.status(), 429);
/// assert_eq!(err.to_openai_json()["error"]["type"], "rate_limit_error");
///
/// let bad = LlmError::bad_request("messages is empty");
/// assert!(!bad.should_fall_back());
/// ```
#[derive(Clone)]
pub struct LlmError(Box<Inner>);

#[derive(Clone)]
struct Inner {
    kind: ErrorKind,
    message: String,
    param: Option<String>,
    code: Option<String>,
    retry_after: Option<Duration>,
    provider: Option<String>,
    upstream_status: Option<u16>,
    attempts: Vec<LlmError>,
    output: Option<String>,
    // Attempts behind this error that reported usage, in order; the failing attempt's own
    // (if known) is the last one and `own_paid` is set.
    paid: Vec<PaidAttempt>,
    own_paid: bool,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl LlmError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self(Box::new(Inner {
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
            provider: None,
            upstream_status: None,
            attempts: Vec::new(),
            output: None,
            paid: Vec::new(),
            own_paid: false,
            source: None,
        }))
    }

    /// [`ErrorKind::RateLimited`].
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::RateLimited, message)
    }
    /// [`ErrorKind::Timeout`].
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Timeout, message)
    }
    /// [`ErrorKind::Unavailable`].
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    /// [`ErrorKind::Overloaded`].
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Overloaded, message)
    }
    /// [`ErrorKind::BadRequest`].
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }
    /// [`ErrorKind::ContextLengthExceeded`].
    pub fn context_length_exceeded(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::ContextLengthExceeded, message)
    }
    /// [`ErrorKind::ContentFiltered`].
    pub fn content_filtered(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::ContentFiltered, message)
    }
    /// [`ErrorKind::Auth`].
    pub fn auth(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Auth, message)
    }
    /// [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    /// [`ErrorKind::InvalidOutput`], keeping the rejected output for the caller.
    pub fn invalid_output(reason: impl Into<String>, output: impl Into<String>) -> Self {
        let mut e = Self::new(ErrorKind::InvalidOutput, reason);
        e.0.output = Some(output.into());
        e
    }
    /// [`ErrorKind::BudgetExceeded`].
    pub fn budget_exceeded(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BudgetExceeded, message)
    }
    /// [`ErrorKind::Transport`].
    pub fn transport(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Transport, message)
    }
    /// [`ErrorKind::Cancelled`].
    pub fn cancelled(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Cancelled, message)
    }
    /// [`ErrorKind::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// "Every target failed": kind and retry-after come from the last attempt, the message
    /// lists each attempt, and [`attempts`](Self::attempts) keeps them all.
    pub fn all_failed(attempts: Vec<LlmError>) -> Self {
        let Some(last) = attempts.last() else {
            return Self::unavailable("no LLM target was available");
        };
        let mut msg = format!("All LLM providers failed ({} attempts).", attempts.len());
        for (i, a) in attempts.iter().enumerate() {
            let who = a.provider().unwrap_or("target");
            msg.push_str(&format!(
                " [{}] {who}: {} ({});",
                i + 1,
                a.message(),
                a.kind()
            ));
        }
        let mut e = Self::new(last.kind(), msg);
        // The soonest retry-after any attempt gave is when trying again makes sense.
        e.0.retry_after = attempts.iter().filter_map(LlmError::retry_after).min();
        e.0.code = last.0.code.clone();
        // Whatever the attempts paid for stays with the error that reports them.
        e.0.paid = attempts
            .iter()
            .flat_map(|a| a.0.paid.iter().cloned())
            .collect();
        e.0.own_paid = last.0.own_paid;
        e.0.attempts = attempts;
        e
    }

    /// Sets the OpenAI `param` (the request field at fault).
    #[must_use]
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.0.param = Some(param.into());
        self
    }
    /// Sets the OpenAI `code`.
    #[must_use]
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.0.code = Some(code.into());
        self
    }
    /// Sets when to retry, capped at [`MAX_RETRY_AFTER`] (so that `Instant::now() + after`
    /// never overflows in a layer that waits for it).
    ///
    /// ```
    /// use llm_tower_core::{LlmError, MAX_RETRY_AFTER};
    /// use std::time::Duration;
    /// let e = LlmError::rate_limited("x").with_retry_after(Duration::MAX);
    /// assert_eq!(e.retry_after(), Some(MAX_RETRY_AFTER));
    /// ```
    #[must_use]
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.0.retry_after = Some(after.min(MAX_RETRY_AFTER));
        self
    }
    /// Names the provider (or target) that failed.
    #[must_use]
    pub fn with_provider(mut self, provider: impl Into<String>) -> Self {
        self.0.provider = Some(provider.into());
        self
    }
    /// Records the upstream HTTP status.
    #[must_use]
    pub fn with_upstream_status(mut self, status: u16) -> Self {
        self.0.upstream_status = Some(status);
        self
    }
    /// Records the usage the failing attempt itself reported (a stream that failed after
    /// its usage arrived, an answer that was then rejected), with the model that served it
    /// (`None`: the requested one). Accounting layers settle with it instead of an estimate.
    ///
    /// ```
    /// use llm_tower_core::{LlmError, Usage};
    /// let e = LlmError::overloaded("mid-stream").with_usage(None, Usage::new(50, 0));
    /// assert_eq!(e.usage().unwrap().prompt_tokens, 50);
    /// assert_eq!(e.paid_attempts().len(), 1);
    /// ```
    #[must_use]
    pub fn with_usage(mut self, model: Option<String>, usage: Usage) -> Self {
        if self.0.own_paid {
            self.0.paid.pop();
        }
        self.0.paid.push(PaidAttempt::new(model, usage));
        self.0.own_paid = true;
        self
    }
    /// Records earlier attempts of the request that were paid for (see [`PaidAttempt`]);
    /// they go before the ones already recorded.
    #[must_use]
    pub fn with_paid_attempts(mut self, mut earlier: Vec<PaidAttempt>) -> Self {
        if !earlier.is_empty() {
            earlier.append(&mut self.0.paid);
            self.0.paid = earlier;
        }
        self
    }
    /// Takes the paid attempts out of the error (a fallback moving on carries them to the
    /// next attempt's result).
    pub fn take_paid_attempts(&mut self) -> Vec<PaidAttempt> {
        self.0.own_paid = false;
        std::mem::take(&mut self.0.paid)
    }
    /// Attaches the underlying error.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.0.source = Some(Arc::new(source));
        self
    }

    /// The classification.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }
    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.0.message
    }
    /// The request field at fault.
    pub fn param(&self) -> Option<&str> {
        self.0.param.as_deref()
    }
    /// The OpenAI error code (explicit, or the kind's default).
    pub fn code(&self) -> Option<&str> {
        self.0.code.as_deref().or(self.0.kind.default_code())
    }
    /// When to try again, if known.
    pub fn retry_after(&self) -> Option<Duration> {
        self.0.retry_after
    }
    /// The provider or target that failed.
    pub fn provider(&self) -> Option<&str> {
        self.0.provider.as_deref()
    }
    /// The upstream HTTP status, if the error came from one.
    pub fn upstream_status(&self) -> Option<u16> {
        self.0.upstream_status
    }
    /// For [`all_failed`](Self::all_failed): every attempt's error, in order.
    pub fn attempts(&self) -> &[LlmError] {
        &self.0.attempts
    }
    /// Every attempt behind this error that was paid for (reported usage), in order, the
    /// failing attempt's own last if it reported usage (see [`usage`](Self::usage)).
    pub fn paid_attempts(&self) -> &[PaidAttempt] {
        &self.0.paid
    }
    /// The usage the failing attempt itself reported, if any (see
    /// [`with_usage`](Self::with_usage)).
    pub fn usage(&self) -> Option<&Usage> {
        if self.0.own_paid {
            self.0.paid.last().map(|a| &a.usage)
        } else {
            None
        }
    }
    /// For [`ErrorKind::InvalidOutput`]: the output that failed validation.
    pub fn output(&self) -> Option<&str> {
        self.0.output.as_deref()
    }

    /// See [`ErrorKind::is_retryable`].
    pub fn is_retryable(&self) -> bool {
        self.0.kind.is_retryable()
    }

    /// Whether a fallback chain should try its next target: rate limits, timeouts,
    /// unavailability, overload and transport failures. A bad request, an auth failure or a
    /// content-policy refusal would fail the same way elsewhere, so they are returned at once.
    pub fn should_fall_back(&self) -> bool {
        self.0.kind.is_retryable()
    }

    /// The HTTP status at the edge.
    pub fn status(&self) -> u16 {
        self.0.kind.status()
    }

    /// The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn to_openai_json(&self) -> Value {
        json!({
            "error": {
                "message": self.0.message,
                "type": self.0.kind.openai_type(),
                "param": self.0.param,
                "code": self.code(),
            }
        })
    }
}

impl fmt::Debug for LlmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("LlmError");
        d.field("kind", &self.0.kind)
            .field("message", &self.0.message);
        if let Some(p) = &self.0.provider {
            d.field("provider", p);
        }
        if let Some(s) = self.0.upstream_status {
            d.field("upstream_status", &s);
        }
        if let Some(r) = self.0.retry_after {
            d.field("retry_after", &r);
        }
        if !self.0.attempts.is_empty() {
            d.field("attempts", &self.0.attempts);
        }
        if !self.0.paid.is_empty() {
            d.field("paid_attempts", &self.0.paid.len());
        }
        d.finish_non_exhaustive()
    }
}

impl fmt::Display for LlmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0.provider {
            Some(p) => write!(f, "{} ({p}): {}", self.0.kind, self.0.message),
            None => write!(f, "{}: {}", self.0.kind, self.0.message),
        }
    }
}

impl std::error::Error for LlmError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paid(model: &str, prompt: u64) -> PaidAttempt {
        PaidAttempt::new(Some(model.into()), Usage::new(prompt, 0))
    }

    #[test]
    fn paid_attempts_keep_their_order_and_the_own_attempt_last() {
        let e = LlmError::timeout("slow")
            .with_usage(Some("b".into()), Usage::new(2, 0))
            .with_paid_attempts(vec![paid("a", 1)]);
        assert_eq!(e.paid_attempts(), [paid("a", 1), paid("b", 2)]);
        assert_eq!(e.usage(), Some(&Usage::new(2, 0)));
        // A second own usage replaces the first, never adds to it.
        let e = e.with_usage(Some("b".into()), Usage::new(3, 0));
        assert_eq!(e.paid_attempts(), [paid("a", 1), paid("b", 3)]);
        // Earlier attempts alone: the error's own usage stays unknown.
        let mut e = LlmError::timeout("slow").with_paid_attempts(vec![paid("a", 1)]);
        assert!(e.usage().is_none());
        assert_eq!(e.take_paid_attempts(), [paid("a", 1)]);
        assert!(e.paid_attempts().is_empty());
    }

    #[test]
    fn all_failed_keeps_every_attempts_paid_usage() {
        let a = LlmError::overloaded("a").with_usage(Some("a".into()), Usage::new(1, 0));
        let b = LlmError::unavailable("b");
        let e = LlmError::all_failed(vec![a.clone(), b]);
        assert_eq!(e.paid_attempts(), [paid("a", 1)]);
        assert!(e.usage().is_none(), "the last attempt reported nothing");
        let e = LlmError::all_failed(vec![LlmError::unavailable("b"), a]);
        assert_eq!(e.usage(), Some(&Usage::new(1, 0)));
    }
}
