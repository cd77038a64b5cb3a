//! `ResponseLimits`: the bounds on what a provider reads from its upstream.

use std::time::Duration;

use serde::Deserialize;

/// Bounds on what a provider accepts from its upstream, so that a broken or hostile
/// server cannot make the gateway buffer without end or wait forever. Each breach is a
/// classified [`LlmError`](llm_tower_core::LlmError) whose
/// [`should_fall_back`](llm_tower_core::LlmError::should_fall_back) is true, so a fallback
/// chain moves on to its next step:
///
/// | limit | default | on breach |
/// |---|---|---|
/// | [`max_body_bytes`](Self::max_body_bytes) | 16 MiB | `Transport`, code `upstream_response_too_large` |
/// | [`max_sse_event_bytes`](Self::max_sse_event_bytes) | 1 MiB | `Transport`, code `upstream_event_too_large` |
/// | [`response_timeout_ms`](Self::response_timeout_ms) | 600 000 (10 min) | `Timeout`, code `upstream_timeout` |
///
/// The number and size of response headers are limits of the shared
/// [`HttpClient`](crate::HttpClient) (see [`HttpClientConfig`](crate::HttpClientConfig)).
/// A stream body that never ends is bounded by the fallback layer's stall and total
/// timeouts (or the request's deadline), not here: a live stream may last long.
///
/// ```
/// use llm_tower_providers::ResponseLimits;
/// let l: ResponseLimits = serde_json::from_str(r#"{"max_body_bytes": 1048576}"#).unwrap();
/// assert_eq!(l.max_body_bytes, 1 << 20);
/// assert_eq!(l.max_sse_event_bytes, ResponseLimits::default().max_sse_event_bytes);
/// let l = ResponseLimits::default().max_sse_event_bytes(64 * 1024);
/// assert_eq!(l.max_sse_event_bytes, 65536);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResponseLimits {
    /// Largest non-streamed response body read, in bytes (a `content-length` above it
    /// fails before reading). Default 16 MiB.
    pub max_body_bytes: usize,
    /// Largest single server-sent event (and line) of a stream, in bytes. Default 1 MiB.
    pub max_sse_event_bytes: usize,
    /// Longest wait, in milliseconds, from sending the request to the response headers
    /// and, for a non-streamed answer, to the end of its body; `0` = no limit (the
    /// request's deadline still applies). Default 600 000 (10 minutes, the OpenAI SDK's).
    pub response_timeout_ms: u64,
}

impl Default for ResponseLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 * 1024 * 1024,
            max_sse_event_bytes: 1024 * 1024,
            response_timeout_ms: 600_000,
        }
    }
}

impl ResponseLimits {
    /// Sets [`max_body_bytes`](Self::max_body_bytes).
    #[must_use]
    pub fn max_body_bytes(mut self, n: usize) -> Self {
        self.max_body_bytes = n;
        self
    }
    /// Sets [`max_sse_event_bytes`](Self::max_sse_event_bytes).
    #[must_use]
    pub fn max_sse_event_bytes(mut self, n: usize) -> Self {
        self.max_sse_event_bytes = n;
        self
    }
    /// Sets [`response_timeout_ms`](Self::response_timeout_ms) (`Duration::ZERO` = none).
    #[must_use]
    pub fn response_timeout(mut self, d: Duration) -> Self {
        self.response_timeout_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self
    }

    pub(crate) fn timeout(&self) -> Option<Duration> {
        (self.response_timeout_ms > 0).then(|| Duration::from_millis(self.response_timeout_ms))
    }
}
