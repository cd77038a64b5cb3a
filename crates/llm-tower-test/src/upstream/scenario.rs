//! [`Scenario`]: what the mock upstream does for one request.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the mock upstream does for one completion request.
///
/// Scenarios come, in order of precedence, from the `x-mock-scenario` request header (the
/// scenario as JSON), from the queue filled by [`MockUpstream::push`](crate::MockUpstream::push),
/// or from the default set by [`MockUpstream::set_default`](crate::MockUpstream::set_default)
/// (initially [`Scenario::ok`]).
///
/// # JSON form
///
/// Every field is optional; a missing field keeps the [`Scenario::ok`] value. Durations are
/// integer milliseconds.
///
/// ```json
/// {
///   "status": 200,                  // HTTP status; non-2xx answers with the provider's error body
///   "error": null,                  // "context_length_exceeded" | "content_filter" (refines a 400)
///   "retry_after_secs": null,       // adds `retry-after` (and remaining 0 headers on a 429)
///   "text": null,                   // the answer; default "mock answer to: <last user text>"
///   "headers": [["x-extra", "1"]],  // extra response headers
///   "latency_ms": 0,                // before the response headers
///   "first_chunk_delay_ms": 0,      // streams: after the headers, before the first event
///   "chunk_delay_ms": 0,            // streams: between events
///   "drop_after_chunks": null,      // streams: abort the connection after n text chunks
///   "error_event_after_chunks": null, // streams: an in-stream error event after n text chunks
///   "malformed_json": false,        // 200 whose body (or one stream chunk) is not JSON
///   "malformed_sse": false,         // a stream with broken SSE framing
///   "no_terminal_event": false,     // a stream without `[DONE]` / `message_stop`
///   "prompt_tokens": null,          // reported usage; default estimated at ~4 bytes a token
///   "completion_tokens": null,
///   "cached_tokens": null,          // prompt_tokens_details.cached_tokens / cache_read_input_tokens
///   "ratelimit_remaining_requests": null, // overrides the rate-limit headroom headers
///   "ratelimit_remaining_tokens": null,
///   // Hostile modes (see the builder methods of the same names):
///   "absurd_headers": false,        // retry-after 1e20, NaN / inf / negative / huge rate-limit values
///   "big_header_bytes": null,       // one `x-mock-big` header value of n bytes
///   "extra_header_count": null,     // n extra headers `x-mock-h<i>`
///   "huge_body_bytes": null,        // a body (or one stream event) of about n bytes
///   "endless_body": false,          // the body never ends
///   "deep_json": null,              // a body (or one event) of JSON nested n levels deep
///   "reset_before_head": false,     // close the connection without an answer
///   "reset_after_head": false,      // send the head, then abort the body
///   "header_drip_ms": null          // send the head one byte every n ms
/// }
/// ```
///
/// For example `x-mock-scenario: {"status":429,"retry_after_secs":2}` answers one request
/// with a rate-limit error, and `x-mock-scenario: {"text":"hi","chunk_delay_ms":20}` streams
/// slowly.
///
/// ```
/// use llm_tower_test::Scenario;
/// use std::time::Duration;
///
/// let slow = Scenario::ok()
///     .text("Hello there, world")
///     .first_chunk_delay(Duration::from_millis(200))
///     .chunk_delay(Duration::from_millis(10));
/// let json = serde_json::to_string(&slow).unwrap();
/// let back: Scenario = serde_json::from_str(&json).unwrap();
/// assert_eq!(back, slow);
///
/// let limited: Scenario = serde_json::from_str(r#"{"status":429,"retry_after_secs":2}"#).unwrap();
/// assert_eq!(limited, Scenario::rate_limited(2));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    pub(crate) status: u16,
    pub(crate) error: Option<ErrorFlavor>,
    pub(crate) retry_after_secs: Option<u64>,
    pub(crate) text: Option<String>,
    pub(crate) headers: Vec<(String, String)>,
    #[serde(rename = "latency_ms", with = "millis")]
    pub(crate) latency: Duration,
    #[serde(rename = "first_chunk_delay_ms", with = "millis")]
    pub(crate) first_chunk_delay: Duration,
    #[serde(rename = "chunk_delay_ms", with = "millis")]
    pub(crate) chunk_delay: Duration,
    pub(crate) drop_after_chunks: Option<usize>,
    pub(crate) error_event_after_chunks: Option<usize>,
    pub(crate) malformed_json: bool,
    pub(crate) malformed_sse: bool,
    pub(crate) no_terminal_event: bool,
    pub(crate) prompt_tokens: Option<u64>,
    pub(crate) completion_tokens: Option<u64>,
    pub(crate) cached_tokens: Option<u64>,
    pub(crate) ratelimit_remaining_requests: Option<u64>,
    pub(crate) ratelimit_remaining_tokens: Option<u64>,
    pub(crate) absurd_headers: bool,
    pub(crate) big_header_bytes: Option<usize>,
    pub(crate) extra_header_count: Option<usize>,
    pub(crate) huge_body_bytes: Option<usize>,
    pub(crate) endless_body: bool,
    pub(crate) deep_json: Option<usize>,
    pub(crate) reset_before_head: bool,
    pub(crate) reset_after_head: bool,
    pub(crate) header_drip_ms: Option<u64>,
}

/// Largest `big_header_bytes` / `huge_body_bytes` (as one allocation) / `deep_json` the mock
/// honours: a scenario comes from a request header, so even the mock bounds what it builds.
pub(crate) const MAX_HOSTILE_ALLOC: usize = 64 * 1024 * 1024;
/// Most `extra_header_count` headers the mock sends.
pub(crate) const MAX_EXTRA_HEADERS: usize = 10_000;

/// Refines a 400 into the specific provider error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ErrorFlavor {
    ContextLengthExceeded,
    ContentFilter,
}

impl Default for Scenario {
    fn default() -> Self {
        Self::ok()
    }
}

impl Scenario {
    /// 200 with the default text (`"mock answer to: <last user text>"`).
    pub fn ok() -> Self {
        Self {
            status: 200,
            error: None,
            retry_after_secs: None,
            text: None,
            headers: Vec::new(),
            latency: Duration::ZERO,
            first_chunk_delay: Duration::ZERO,
            chunk_delay: Duration::ZERO,
            drop_after_chunks: None,
            error_event_after_chunks: None,
            malformed_json: false,
            malformed_sse: false,
            no_terminal_event: false,
            prompt_tokens: None,
            completion_tokens: None,
            cached_tokens: None,
            ratelimit_remaining_requests: None,
            ratelimit_remaining_tokens: None,
            absurd_headers: false,
            big_header_bytes: None,
            extra_header_count: None,
            huge_body_bytes: None,
            endless_body: false,
            deep_json: None,
            reset_before_head: false,
            reset_after_head: false,
            header_drip_ms: None,
        }
    }

    /// Answer with this text (split into words when streamed).
    pub fn text(mut self, t: impl Into<String>) -> Self {
        self.text = Some(t.into());
        self
    }

    /// Answer with this HTTP status. A non-2xx status carries the body the real provider sends
    /// for it: the OpenAI error shape on OpenAI paths, the Anthropic shape on `/v1/messages`
    /// (400 `invalid_request_error`, 401 `authentication_error`, 403 `permission_error`, 404
    /// `not_found_error`, 413 `request_too_large`, 429 `rate_limit_error`, 5xx `api_error`,
    /// 529 `overloaded_error`).
    pub fn status(code: u16) -> Self {
        Self {
            status: code,
            ..Self::ok()
        }
    }

    /// 429 with `retry-after: retry_after_secs` and rate-limit headers showing 0 remaining.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self {
            retry_after_secs: Some(retry_after_secs),
            ..Self::status(429)
        }
    }

    /// 500 internal server error.
    pub fn server_error() -> Self {
        Self::status(500)
    }

    /// 503 service unavailable.
    pub fn unavailable() -> Self {
        Self::status(503)
    }

    /// 529 with Anthropic's `overloaded_error` body.
    pub fn overloaded() -> Self {
        Self::status(529)
    }

    /// 400 `context_length_exceeded` (OpenAI code) / `invalid_request_error` "prompt is too
    /// long: …" (Anthropic).
    pub fn context_length_exceeded() -> Self {
        Self {
            error: Some(ErrorFlavor::ContextLengthExceeded),
            ..Self::status(400)
        }
    }

    /// 400 content policy violation (OpenAI code `content_policy_violation`; Anthropic
    /// `invalid_request_error` "Output blocked by content filtering policy").
    pub fn content_filter() -> Self {
        Self {
            error: Some(ErrorFlavor::ContentFilter),
            ..Self::status(400)
        }
    }

    /// 401 invalid API key.
    pub fn unauthorized() -> Self {
        Self::status(401)
    }

    /// Add an extra response header (on success and error responses).
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_owned(), v.to_owned()));
        self
    }

    /// Wait this long before sending the response headers.
    pub fn latency(mut self, d: Duration) -> Self {
        self.latency = d;
        self
    }

    /// Streams: wait this long after the headers, before the first event.
    pub fn first_chunk_delay(mut self, d: Duration) -> Self {
        self.first_chunk_delay = d;
        self
    }

    /// Streams: wait this long between events.
    pub fn chunk_delay(mut self, d: Duration) -> Self {
        self.chunk_delay = d;
        self
    }

    /// Streams: abort the connection after `n` text chunks (content deltas), with no terminal
    /// event. The preamble (OpenAI's role chunk; Anthropic's `message_start`,
    /// `content_block_start` and `ping`) is always sent, so `n = 0` aborts right after it.
    /// The client sees an incomplete body (HTTP/1.1: the chunked body never terminates;
    /// HTTP/2: the stream is reset).
    pub fn drop_after_chunks(mut self, n: usize) -> Self {
        self.drop_after_chunks = Some(n);
        self
    }

    /// Streams: after `n` text chunks, send the provider's in-stream error event and end the
    /// stream cleanly. Anthropic: `event: error` with an `overloaded_error`; OpenAI:
    /// `data: {"error":{…}}` (type `server_error`), without `[DONE]`.
    pub fn error_event_after_chunks(mut self, n: usize) -> Self {
        self.error_event_after_chunks = Some(n);
        self
    }

    /// A 200 whose body is not valid JSON; in a stream, the first text chunk is not JSON
    /// (the rest of the stream is normal).
    pub fn malformed_json(mut self) -> Self {
        self.malformed_json = true;
        self
    }

    /// Streams: after the preamble, the body breaks SSE framing (a JSON line without `data:`,
    /// then events not separated by blank lines) and ends without a terminal event.
    pub fn malformed_sse(mut self) -> Self {
        self.malformed_sse = true;
        self
    }

    /// Streams: end cleanly (the body terminates normally) but without `data: [DONE]`
    /// (OpenAI) or `message_stop` (Anthropic).
    pub fn no_terminal_event(mut self) -> Self {
        self.no_terminal_event = true;
        self
    }

    /// Report this usage instead of the ~4-bytes-a-token estimate.
    pub fn usage(mut self, prompt: u64, completion: u64) -> Self {
        self.prompt_tokens = Some(prompt);
        self.completion_tokens = Some(completion);
        self
    }

    /// Report `n` cached prompt tokens (`prompt_tokens_details.cached_tokens` /
    /// `cache_read_input_tokens`).
    pub fn cached_tokens(mut self, n: u64) -> Self {
        self.cached_tokens = Some(n);
        self
    }

    /// Report this remaining headroom in the rate-limit headers of the response
    /// (`x-ratelimit-remaining-requests`/`-tokens`, `anthropic-ratelimit-*-remaining`).
    pub fn ratelimit_remaining(mut self, requests: u64, tokens: u64) -> Self {
        self.ratelimit_remaining_requests = Some(requests);
        self.ratelimit_remaining_tokens = Some(tokens);
        self
    }

    // ------------------------------------------------------------ hostile modes
    // For tests that a client parses upstream answers without trust.

    /// Absurd values in the headers a client reads: `retry-after: 1e20`,
    /// `retry-after-ms: NaN`, and in the rate-limit headers `NaN`, `inf`, negative and
    /// 23-digit counts, resets of `inf`, `1e19` seconds, `99999999999999h` and the year 9999
    /// (the OpenAI family's remaining tokens is a 23-digit count with the `1e19` reset). On
    /// any status: with a 2xx the answer itself is good.
    pub fn absurd_headers(mut self) -> Self {
        self.absurd_headers = true;
        self
    }

    /// One extra header, `x-mock-big`, whose value is `n` bytes (at most 64 MiB).
    pub fn big_header(mut self, n: usize) -> Self {
        self.big_header_bytes = Some(n);
        self
    }

    /// `n` extra headers `x-mock-h0: 0` … (at most 10 000).
    pub fn extra_headers(mut self, n: usize) -> Self {
        self.extra_header_count = Some(n);
        self
    }

    /// A 2xx answer of about `n` bytes. Complete answers: the normal JSON with a `"pad"`
    /// field of `a`s, `n` bytes in all, with `content-length` (still valid JSON). Streams: after
    /// the preamble, one SSE comment line of `n` bytes (`: aaa…`), then the normal events.
    /// Sent in 64 KiB frames, never built whole.
    pub fn huge_body(mut self, n: usize) -> Self {
        self.huge_body_bytes = Some(n);
        self
    }

    /// A 2xx answer whose body never ends. Complete answers: the start of the JSON, then
    /// `a`s forever in 64 KiB frames (every `chunk_delay`), chunked, no `content-length`.
    /// Streams: the preamble, then `: keep-alive` comments forever (every `chunk_delay`,
    /// at least 10 ms), never a chunk nor the terminal event.
    pub fn endless_body(mut self) -> Self {
        self.endless_body = true;
        self
    }

    /// A 2xx answer that is JSON nested `depth` levels deep (`[[[…]]]`, at most 32 M
    /// levels); in a stream, one `data:` event after the preamble.
    pub fn deep_json(mut self, depth: usize) -> Self {
        self.deep_json = Some(depth);
        self
    }

    /// Close the connection after reading the request, with no response at all (the
    /// client sees the connection end before a response head).
    pub fn reset_before_head(mut self) -> Self {
        self.reset_before_head = true;
        self
    }

    /// Send a 2xx head (with the usual headers), then abort the body at once (HTTP/1.1:
    /// the connection closes mid-body; HTTP/2: the stream is reset).
    pub fn reset_after_head(mut self) -> Self {
        self.reset_after_head = true;
        self
    }

    /// Send the response head one byte every `interval` (HTTP/1.1), then the body normally:
    /// a head that arrives, but ever so slowly.
    pub fn header_drip(mut self, interval: Duration) -> Self {
        self.header_drip_ms = Some(u64::try_from(interval.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Parse the JSON form (as sent in the `x-mock-scenario` header).
    pub fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }

    /// The JSON form, for the `x-mock-scenario` header.
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}
