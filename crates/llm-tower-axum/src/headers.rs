//! The header names the HTTP surface reads and writes, and the mapping between headers and
//! request extensions / [`ResponseMeta`].
//!
//! Request headers read: [`X_LLM_TASK`] → [`TaskType`], [`IDEMPOTENCY_KEY`] →
//! [`IdempotencyKey`], `cache-control: no-cache` / `no-store` → [`CachePolicy`], and
//! [`X_REQUEST_ID`] (kept, or generated as a UUID v7).
//!
//! ```
//! use llm_tower_axum::headers::request_metadata;
//! use llm_tower_core::{CachePolicy, ChatRequest, Message};
//!
//! let mut headers = http::HeaderMap::new();
//! headers.insert("x-llm-task", "classify".parse().unwrap());
//! headers.insert("cache-control", "no-store".parse().unwrap());
//! let mut req = ChatRequest::new("m", vec![Message::user("hi")]);
//! request_metadata(&headers, &mut req).unwrap();
//! assert_eq!(req.task_type().unwrap().as_str(), "classify");
//! assert_eq!(req.cache_policy(), CachePolicy::NoStore);
//! ```

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, header};
use llm_tower_core::{CachePolicy, ChatRequest, IdempotencyKey, LlmError, ResponseMeta, TaskType};

/// `x-request-id`: taken from the request, or generated (UUID v7); echoed on every response.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `x-llm-task`: the task type of the request (routing, cache TTL, validators, limits).
pub const X_LLM_TASK: HeaderName = HeaderName::from_static("x-llm-task");
/// The task name (and `model` label) standing for every name the application does not
/// know, see [`OpenAiRouter::known_tasks`](crate::OpenAiRouter::known_tasks).
pub const OTHER: &str = "other";
/// `idempotency-key`: the client's idempotency key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// `x-llm-provider`: the provider (or target) that served.
pub const X_LLM_PROVIDER: HeaderName = HeaderName::from_static("x-llm-provider");
/// `x-llm-model`: the model that served.
pub const X_LLM_MODEL: HeaderName = HeaderName::from_static("x-llm-model");
/// `x-llm-cache`: `hit`, `miss`, `bypass` (or `none` when no cache layer looked).
pub const X_LLM_CACHE: HeaderName = HeaderName::from_static("x-llm-cache");
/// `x-llm-attempts`: how many upstream attempts were made.
pub const X_LLM_ATTEMPTS: HeaderName = HeaderName::from_static("x-llm-attempts");
/// `x-llm-cost-usd`: the cost of the response in dollars (exact decimal).
pub const X_LLM_COST_USD: HeaderName = HeaderName::from_static("x-llm-cost-usd");
/// `x-ratelimit-remaining-requests`: requests left in the caller's tightest local bucket.
pub const X_RATELIMIT_REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-requests");
/// `x-ratelimit-remaining-tokens`: tokens left in the caller's tightest local bucket.
pub const X_RATELIMIT_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-tokens");
/// `server-timing`: `gateway;dur=<ms>, upstream;dur=<ms>`.
pub const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// Longest accepted `x-llm-task` / `idempotency-key` value.
const MAX_META_LEN: usize = 256;

fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a str>, LlmError> {
    let Some(v) = headers.get(name) else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .map_err(|_| {
            LlmError::bad_request(format!("header `{name}` must be visible ASCII"))
                .with_param(name.as_str())
        })?
        .trim();
    if s.is_empty() || s.len() > MAX_META_LEN {
        return Err(LlmError::bad_request(format!(
            "header `{name}` must be 1 to {MAX_META_LEN} characters"
        ))
        .with_param(name.as_str()));
    }
    Ok(Some(s))
}

/// The cache policy asked for by `cache-control` (`no-store` wins over `no-cache`).
pub fn cache_policy(headers: &HeaderMap) -> CachePolicy {
    let mut policy = CachePolicy::Default;
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(s) = value.to_str() else { continue };
        for directive in s.split(',') {
            let d = directive.trim();
            if d.eq_ignore_ascii_case("no-store") {
                return CachePolicy::NoStore;
            }
            if d.eq_ignore_ascii_case("no-cache") {
                policy = CachePolicy::NoCache;
            }
        }
    }
    policy
}

/// Copies the request metadata headers into `req`'s extensions (task type, idempotency
/// key, cache policy). The tenant is **not** read from headers (see
/// [`AuthLayer`](crate::AuthLayer)).
///
/// # Errors
///
/// A bad request naming the header when a value is not ASCII, empty or too long.
pub fn request_metadata(headers: &HeaderMap, req: &mut ChatRequest) -> Result<(), LlmError> {
    if let Some(task) = header_str(headers, &X_LLM_TASK)? {
        req.extensions.insert(TaskType::from(task));
    }
    if let Some(key) = header_str(headers, &IDEMPOTENCY_KEY)? {
        req.extensions.insert(IdempotencyKey::from(key));
    }
    match cache_policy(headers) {
        CachePolicy::Default => {}
        p => req.set_cache_policy(p),
    }
    Ok(())
}

/// An exact decimal dollar string for nano-dollars (`1500` → `"0.0000015"`), no floats.
pub fn format_usd(nano_usd: u64) -> String {
    let (whole, mut frac) = (nano_usd / 1_000_000_000, nano_usd % 1_000_000_000);
    // One buffer and no `core::fmt`: this runs on every answer.
    let mut out = String::with_capacity(32);
    out.push_str(itoa::Buffer::new().format(whole));
    out.push('.');
    if frac == 0 {
        out.push('0');
        return out;
    }
    let mut digits = [b'0'; 9];
    for d in digits.iter_mut().rev() {
        *d = b'0' + (frac % 10) as u8;
        frac /= 10;
    }
    let end = digits.iter().rposition(|&d| d != b'0').map_or(0, |i| i + 1);
    out.extend(digits[..end].iter().map(|&d| char::from(d)));
    out
}

/// Appends `d` in milliseconds with 3 decimals (µs precision), in integers: float
/// formatting costs more than the rest of the headers together.
fn push_ms(out: &mut String, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    out.push_str(itoa::Buffer::new().format(us / 1000));
    let frac = us % 1000;
    out.extend(
        [
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]
        .map(char::from),
    );
}

/// The `server-timing` value: the gateway's own time (`total − upstream`) and the upstream
/// time, in milliseconds.
pub fn server_timing(total: Duration, upstream: Option<Duration>) -> String {
    let mut out = String::with_capacity(48);
    out.push_str("gateway;dur=");
    push_ms(&mut out, total.saturating_sub(upstream.unwrap_or_default()));
    if let Some(up) = upstream {
        out.push_str(", upstream;dur=");
        push_ms(&mut out, up);
    }
    out
}

// Values come from provider/model names; one that is not a valid header value is left out
// rather than failing the response.
fn put(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// As [`put`], for a value built for the header: kept as it is, not copied.
fn put_owned(headers: &mut HeaderMap, name: HeaderName, value: String) {
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(name, v);
    }
}

/// Writes the `x-llm-*`, `x-ratelimit-remaining-*` and `server-timing` headers for a
/// response described by `meta`, with `total` the gateway time to headers.
pub fn write_meta_headers(headers: &mut HeaderMap, meta: &ResponseMeta, total: Duration) {
    // Up to 8 more headers: one reservation instead of growing the map step by step.
    headers.reserve(8);
    if let Some(p) = &meta.provider {
        put(headers, X_LLM_PROVIDER, p);
    }
    if let Some(m) = &meta.model {
        put(headers, X_LLM_MODEL, m);
    }
    headers.insert(X_LLM_CACHE, HeaderValue::from_static(meta.cache.as_str()));
    headers.insert(X_LLM_ATTEMPTS, HeaderValue::from(meta.attempt_count()));
    if let Some(c) = &meta.cost {
        put_owned(headers, X_LLM_COST_USD, format_usd(c.nano_usd));
    }
    if let Some(l) = &meta.limits {
        if let Some(r) = l.remaining_requests {
            headers.insert(X_RATELIMIT_REMAINING_REQUESTS, HeaderValue::from(r));
        }
        if let Some(t) = l.remaining_tokens {
            headers.insert(X_RATELIMIT_REMAINING_TOKENS, HeaderValue::from(t));
        }
    }
    put_owned(
        headers,
        SERVER_TIMING,
        server_timing(total, meta.upstream_time),
    );
}

/// Writes what is known on an error: provider, attempts and the gateway time.
pub(crate) fn write_error_headers(headers: &mut HeaderMap, error: &LlmError, total: Duration) {
    if let Some(p) = error.provider() {
        put(headers, X_LLM_PROVIDER, p);
    }
    if !error.attempts().is_empty() {
        headers.insert(X_LLM_ATTEMPTS, HeaderValue::from(error.attempts().len()));
    }
    put_owned(headers, SERVER_TIMING, server_timing(total, None));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_is_exact() {
        assert_eq!(format_usd(0), "0.0");
        assert_eq!(format_usd(1_500), "0.0000015");
        assert_eq!(format_usd(2_000_000_000), "2.0");
        assert_eq!(format_usd(2_120_000_000), "2.12");
        assert_eq!(format_usd(7_650), "0.00000765");
        assert_eq!(format_usd(123_000_000_001), "123.000000001");
        assert_eq!(format_usd(u64::MAX), "18446744073.709551615");
    }

    #[test]
    fn timing_splits_gateway_and_upstream() {
        let s = server_timing(
            Duration::from_millis(1000),
            Some(Duration::from_millis(800)),
        );
        assert_eq!(s, "gateway;dur=200.000, upstream;dur=800.000");
        // An upstream time longer than the total (clock skew) never goes negative.
        let s = server_timing(Duration::from_millis(1), Some(Duration::from_millis(2)));
        assert!(s.starts_with("gateway;dur=0.000"));
        let s = server_timing(Duration::from_micros(1_234_567), None);
        assert_eq!(s, "gateway;dur=1234.567");
        let s = server_timing(
            Duration::from_micros(1_050),
            Some(Duration::from_micros(45)),
        );
        assert_eq!(s, "gateway;dur=1.005, upstream;dur=0.045");
    }

    #[test]
    fn cache_control_directives() {
        let mut h = HeaderMap::new();
        assert_eq!(cache_policy(&h), CachePolicy::Default);
        h.insert(
            header::CACHE_CONTROL,
            "max-age=0, No-Cache".parse().unwrap(),
        );
        assert_eq!(cache_policy(&h), CachePolicy::NoCache);
        h.append(header::CACHE_CONTROL, "no-store".parse().unwrap());
        assert_eq!(cache_policy(&h), CachePolicy::NoStore);
    }

    #[test]
    fn bad_metadata_is_a_bad_request() {
        let mut h = HeaderMap::new();
        h.insert(X_LLM_TASK, HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap());
        let mut req = ChatRequest::default();
        let err = request_metadata(&h, &mut req).unwrap_err();
        assert_eq!(err.param(), Some("x-llm-task"));
        h.insert(X_LLM_TASK, "x".repeat(300).parse().unwrap());
        assert!(request_metadata(&h, &mut req).is_err());
    }
}
