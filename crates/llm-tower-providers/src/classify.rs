//! Error classification (status code, headers, body) and rate-limit headroom parsing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, StatusCode};
use llm_tower_core::{ErrorKind, LlmError, RateLimitHeadroom};
use serde_json::Value;

use crate::secret::{ApiKey, scrub};

/// Longest upstream message kept in an error.
const MAX_MESSAGE: usize = 1000;

/// What an upstream error body said, in either the OpenAI (`{"error": {"message", "type",
/// "code", "param"}}`) or the Anthropic (`{"type": "error", "error": {"type", "message"}}`)
/// shape.
#[derive(Debug, Default)]
pub(crate) struct UpstreamError {
    pub(crate) message: Option<String>,
    pub(crate) kind: Option<String>,
    pub(crate) code: Option<String>,
    pub(crate) param: Option<String>,
}

impl UpstreamError {
    pub(crate) fn from_value(v: &Value) -> Option<Self> {
        let err = v.get("error")?;
        let s = |v: Option<&Value>| match v {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        Some(match err {
            Value::String(m) => Self {
                message: Some(m.clone()),
                ..Self::default()
            },
            Value::Object(_) => Self {
                message: s(err.get("message")),
                kind: s(err.get("type")),
                code: s(err.get("code")),
                param: s(err.get("param")),
            },
            _ => return None,
        })
    }

    fn from_body(body: &[u8]) -> Self {
        serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| Self::from_value(&v))
            .unwrap_or_default()
    }

    fn mentions(&self, needles: &[&str]) -> bool {
        let hay = |s: &Option<String>| {
            s.as_deref()
                .is_some_and(|s| needles.iter().any(|n| s.to_ascii_lowercase().contains(n)))
        };
        hay(&self.message) || hay(&self.code) || hay(&self.kind)
    }

    /// The kind the body alone implies (used for every status, and for errors that arrive
    /// inside a 200 response or a stream).
    fn kind_from_body(&self) -> Option<ErrorKind> {
        if self.mentions(&[
            "context_length_exceeded",
            "maximum context length",
            "context window",
            "prompt is too long",
            "too many tokens",
        ]) {
            return Some(ErrorKind::ContextLengthExceeded);
        }
        if self.mentions(&[
            "content_filter",
            "content filtering",
            "content_policy",
            "content policy",
            "content management policy",
            "safety system",
            "responsibleaipolicyviolation",
        ]) {
            return Some(ErrorKind::ContentFiltered);
        }
        match self.kind.as_deref() {
            Some("overloaded_error") => Some(ErrorKind::Overloaded),
            Some("rate_limit_error" | "rate_limit_exceeded") => Some(ErrorKind::RateLimited),
            Some("authentication_error" | "permission_error") => Some(ErrorKind::Auth),
            Some("not_found_error") => Some(ErrorKind::NotFound),
            Some("api_error" | "server_error" | "service_unavailable_error") => {
                Some(ErrorKind::Unavailable)
            }
            Some("timeout_error") => Some(ErrorKind::Timeout),
            Some("invalid_request_error" | "request_too_large") => Some(ErrorKind::BadRequest),
            _ => None,
        }
    }
}

/// Classifies a non-success upstream response.
pub(crate) fn classify_status(
    provider: &str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    key: Option<&ApiKey>,
) -> LlmError {
    let up = UpstreamError::from_body(body);
    let by_body = up.kind_from_body();
    let kind = match status.as_u16() {
        429 => ErrorKind::RateLimited,
        529 => ErrorKind::Overloaded,
        401 | 403 => ErrorKind::Auth,
        408 => ErrorKind::Timeout,
        504 => by_body.unwrap_or(ErrorKind::Timeout),
        // Redirects are not followed: the base URL is wrong or a proxy is in the way.
        300..=399 => ErrorKind::Transport,
        500..=599 => match by_body {
            Some(k @ (ErrorKind::Overloaded | ErrorKind::RateLimited)) => k,
            _ => ErrorKind::Unavailable,
        },
        404 => by_body
            .filter(|k| *k != ErrorKind::BadRequest)
            .unwrap_or(ErrorKind::NotFound),
        _ => match by_body {
            // A 4xx that is not a rate limit is the request's fault, whatever the type says.
            Some(ErrorKind::Unavailable | ErrorKind::Timeout) | None => ErrorKind::BadRequest,
            Some(k) => k,
        },
    };
    let detail = match &up.message {
        Some(m) => m.clone(),
        None if body.is_empty() => status
            .canonical_reason()
            .unwrap_or("no error body")
            .to_owned(),
        None => String::from_utf8_lossy(body).into_owned(),
    };
    let message = format!(
        "{provider} answered HTTP {}: {}",
        status.as_u16(),
        truncate(&scrub(&detail, key))
    );
    let mut err = LlmError::new(kind, message)
        .with_provider(provider)
        .with_upstream_status(status.as_u16());
    if let Some(code) = up.code.or(up.kind) {
        err = err.with_code(scrub(&code, key));
    }
    if let Some(param) = up.param {
        err = err.with_param(param);
    }
    let retry_after = retry_after(headers).or_else(|| {
        // No retry-after: the reset of the exhausted provider window says when.
        let h = headroom(headers).0?;
        match (h.remaining_requests, h.remaining_tokens) {
            (Some(0), _) => h.reset_requests,
            (_, Some(0)) => h.reset_tokens,
            _ => None,
        }
    });
    if let Some(after) = retry_after
        && matches!(
            kind,
            ErrorKind::RateLimited | ErrorKind::Overloaded | ErrorKind::Unavailable
        )
    {
        err = err.with_retry_after(after);
    }
    err
}

/// Classifies an error object that arrived inside a 200 body or a stream event.
pub(crate) fn classify_inline(provider: &str, v: &Value, key: Option<&ApiKey>) -> Option<LlmError> {
    let up = UpstreamError::from_value(v)?;
    let kind = up.kind_from_body().unwrap_or(ErrorKind::Unavailable);
    let detail = up
        .message
        .clone()
        .unwrap_or_else(|| "unspecified error".to_owned());
    let mut err = LlmError::new(
        kind,
        format!(
            "{provider} sent an error: {}",
            truncate(&scrub(&detail, key))
        ),
    )
    .with_provider(provider);
    if let Some(code) = up.code.or(up.kind) {
        err = err.with_code(scrub(&code, key));
    }
    Some(err)
}

/// A clear error for garbage from upstream: names the provider, never panics.
pub(crate) fn malformed(provider: &str, what: &str, detail: impl std::fmt::Display) -> LlmError {
    LlmError::transport(format!("{provider} sent malformed {what}: {detail}"))
        .with_provider(provider)
}

/// A transport failure (connect, reset, TLS…) with its cause chain.
pub(crate) fn transport(
    provider: &str,
    what: &str,
    err: &(dyn std::error::Error + 'static),
) -> LlmError {
    let mut msg = format!("{provider}: {what}: {err}");
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    LlmError::transport(msg).with_provider(provider)
}

fn truncate(s: &str) -> String {
    let s = s.trim();
    if s.len() <= MAX_MESSAGE {
        return s.to_owned();
    }
    let mut end = MAX_MESSAGE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The longest delay read from an upstream answer (retry-after, rate-limit resets): one
/// day. Larger values (`retry-after: 1e20`, a reset in the year 9999) are cut to it at
/// parse time, so that `Instant::now() + delay` can never overflow anywhere downstream.
pub const MAX_UPSTREAM_DELAY: Duration = Duration::from_secs(86_400);

/// Seconds as a [`Duration`], saturating at [`MAX_UPSTREAM_DELAY`]; `None` for NaN,
/// infinities and negative values.
pub(crate) fn secs(v: f64) -> Option<Duration> {
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    // Clamped first: `from_secs_f64` panics on values past `Duration::MAX`.
    Some(Duration::from_secs_f64(
        v.min(MAX_UPSTREAM_DELAY.as_secs_f64()),
    ))
}

/// A count (`remaining`, `limit`): a non-negative integer, saturating at `u64::MAX`;
/// a finite non-negative decimal (`"1000.0"`, `"1e3"`) is accepted and truncated.
pub(crate) fn count(v: &str) -> Option<u64> {
    if let Ok(n) = v.parse::<u64>() {
        return Some(n);
    }
    if v.bytes().all(|b| b.is_ascii_digit()) && !v.is_empty() {
        return Some(u64::MAX); // more digits than a u64 holds
    }
    let f = v.parse::<f64>().ok()?;
    // `as` saturates (and the checks keep NaN and negatives out).
    (f.is_finite() && f >= 0.0).then_some(f as u64)
}

fn until(at: SystemTime) -> Duration {
    at.duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
        .min(MAX_UPSTREAM_DELAY)
}

/// `retry-after-ms`, then `retry-after` (delay seconds or an HTTP date), capped at
/// [`MAX_UPSTREAM_DELAY`]. An unparsable `retry-after-ms` falls through to `retry-after`.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(d) = get("retry-after-ms")
        .and_then(|v| v.parse::<f64>().ok())
        .and_then(|ms| secs(ms / 1000.0))
    {
        return Some(d);
    }
    let v = get("retry-after")?;
    if let Ok(s) = v.parse::<f64>() {
        return secs(s);
    }
    httpdate::parse_http_date(v).ok().map(until)
}

/// The provider's rate-limit headroom from OpenAI-style `x-ratelimit-*` or Anthropic
/// `anthropic-ratelimit-*` headers (`None` when neither is present), and how many of those
/// headers had a value that could not be read (ignored, for the caller to count).
pub(crate) fn headroom(headers: &HeaderMap) -> (Option<RateLimitHeadroom>, u32) {
    // One pass over the headers, matching names by prefix: cheaper than looking each of
    // the 18 names up (a hash of the name and a probe each), on every response.
    let mut openai = RateLimitHeadroom::default();
    let mut anthropic = RateLimitHeadroom::default();
    let mut bad = 0u32;
    let mut last_reset: Option<(&str, Option<Duration>)> = None;
    // Anthropic reports combined tokens, and input / output tokens separately; the
    // tightest of them is the headroom.
    let min = |slot: &mut Option<u64>, v: Option<u64>| {
        if let Some(v) = v {
            *slot = Some(slot.map_or(v, |s| s.min(v)));
        }
    };
    for (name, value) in headers {
        let name = name.as_str();
        // Names first: most headers are not about rate limits.
        if !name.starts_with("x-ratelimit-") && !name.starts_with("anthropic-ratelimit-") {
            continue;
        }
        let value = value.to_str().ok().map(str::trim);
        // A value that does not parse is ignored, and counted.
        let mut num = || {
            let v = value.and_then(count);
            bad += u32::from(v.is_none());
            v
        };
        if let Some(rest) = name.strip_prefix("x-ratelimit-") {
            match rest {
                "remaining-requests" => openai.remaining_requests = num(),
                "remaining-tokens" => openai.remaining_tokens = num(),
                "limit-requests" => openai.limit_requests = num(),
                "limit-tokens" => openai.limit_tokens = num(),
                "reset-requests" | "reset-tokens" => {
                    let r = value.and_then(parse_reset);
                    bad += u32::from(r.is_none());
                    if rest == "reset-requests" {
                        openai.reset_requests = r;
                    } else {
                        openai.reset_tokens = r;
                    }
                }
                _ => {}
            }
        } else if let Some(rest) = name.strip_prefix("anthropic-ratelimit-") {
            match rest {
                "requests-remaining" => anthropic.remaining_requests = num(),
                "requests-limit" => anthropic.limit_requests = num(),
                "tokens-remaining" | "input-tokens-remaining" | "output-tokens-remaining" => {
                    min(&mut anthropic.remaining_tokens, num());
                }
                "tokens-limit" | "input-tokens-limit" | "output-tokens-limit" => {
                    min(&mut anthropic.limit_tokens, num());
                }
                "requests-reset"
                | "tokens-reset"
                | "input-tokens-reset"
                | "output-tokens-reset" => {
                    // The four are usually one timestamp: parsed once.
                    let r = match (value, last_reset) {
                        (Some(v), Some((last, r))) if v == last => r,
                        _ => {
                            let r = value.and_then(parse_reset);
                            last_reset = value.map(|v| (v, r));
                            r
                        }
                    };
                    bad += u32::from(r.is_none());
                    match r {
                        Some(r) if rest == "requests-reset" => anthropic.reset_requests = Some(r),
                        Some(r) => {
                            anthropic.reset_tokens =
                                Some(anthropic.reset_tokens.map_or(r, |s| s.max(r)));
                        }
                        None => {}
                    }
                }
                _ => {}
            }
        }
    }
    let none = RateLimitHeadroom::default();
    let h = if openai != none { openai } else { anthropic };
    ((h != none).then_some(h), bad)
}

/// A reset value: OpenAI's Go-style durations (`1s`, `6m0s`, `20ms`, `1h2m3.5s`), plain
/// seconds, or an RFC 3339 timestamp (Anthropic), as the time left from now, capped at
/// [`MAX_UPSTREAM_DELAY`]. `None` for anything else (NaN, `inf`, negatives, garbage).
pub(crate) fn parse_reset(v: &str) -> Option<Duration> {
    // A timestamp first: neither a number nor a Go duration has a `-` after four
    // characters, and trying those two first costs two float parses on every
    // Anthropic answer.
    if let Some(at) = parse_rfc3339(v) {
        return Some(until(at));
    }
    if let Ok(s) = v.parse::<f64>() {
        return secs(s);
    }
    parse_go_duration(v)
}

fn parse_go_duration(v: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = v;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        // f64 arithmetic cannot panic; a sum that overflows to infinity is refused by
        // `secs`, anything finite is capped there.
        total += n * scale;
        rest = &rest[unit_end..];
    }
    secs(total)
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
fn parse_rfc3339(v: &str) -> Option<SystemTime> {
    // Visible ASCII only (a header value always is): every byte index below is a char
    // boundary.
    if !v.is_ascii() {
        return None;
    }
    let b = v.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    // Digits only (no sign), at most four: no overflow.
    let n = |r: std::ops::Range<usize>| {
        b.get(r)?.iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let (year, month, day) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hour, min, sec) = (n(11..13)?, n(14..16)?, n(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac = 0f64;
    if b[i] == b'.' {
        let end = v[i + 1..]
            .find(|c: char| !c.is_ascii_digit())
            .map_or(v.len(), |e| e + i + 1);
        frac = v[i..end].parse::<f64>().ok()?;
        i = end;
    }
    let offset = match v.get(i..)? {
        "Z" | "z" => 0,
        tz if tz.len() == 6
            && matches!(tz.as_bytes()[0], b'+' | b'-')
            && tz.as_bytes()[3] == b':' =>
        {
            let h = n(i + 1..i + 3)?;
            let m = n(i + 4..i + 6)?;
            (h * 3600 + m * 60) * if tz.starts_with('-') { -1 } else { 1 }
        }
        _ => return None,
    };
    // Four-digit years and two-digit fields: no overflow is possible here.
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset;
    let secs = u64::try_from(secs).ok()?;
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))?
        .checked_add(Duration::from_secs_f64(frac.clamp(0.0, 1.0)))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_reset("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_reset("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(
            parse_reset("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(parse_reset("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_reset("soon"), None);
    }

    #[test]
    fn rfc3339() {
        assert_eq!(
            parse_rfc3339("1970-01-02T00:00:00Z"),
            Some(UNIX_EPOCH + Duration::from_secs(86_400))
        );
        assert_eq!(
            parse_rfc3339("2024-03-01T12:00:00+01:00"),
            Some(UNIX_EPOCH + Duration::from_secs(1_709_290_800))
        );
        assert!(parse_rfc3339("2024-13-01T00:00:00Z").is_none());
        // A reset in the past is "now".
        assert_eq!(parse_reset("2001-01-01T00:00:00.5Z"), Some(Duration::ZERO));
        let soon = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
        let _ = soon;
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2")])),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "1500")])),
            Some(Duration::from_millis(1500))
        );
        let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let got = retry_after(&headers(&[("retry-after", &date)])).unwrap();
        assert!(got > Duration::from_secs(100) && got <= Duration::from_secs(120));
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(120));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &past)])),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "later")])), None);
    }

    #[test]
    fn headroom_both_styles() {
        let h = headroom(&headers(&[
            ("x-ratelimit-remaining-requests", "9"),
            ("x-ratelimit-remaining-tokens", "1000"),
            ("x-ratelimit-limit-requests", "10"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]))
        .0
        .unwrap();
        assert_eq!(h.remaining_requests, Some(9));
        assert_eq!(h.remaining_tokens, Some(1000));
        assert_eq!(h.limit_requests, Some(10));
        assert_eq!(h.reset_tokens, Some(Duration::from_secs(360)));
        let h = headroom(&headers(&[
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-input-tokens-remaining", "3000"),
            ("anthropic-ratelimit-output-tokens-remaining", "800"),
            ("anthropic-ratelimit-requests-reset", "2001-01-01T00:00:00Z"),
        ]))
        .0
        .unwrap();
        assert_eq!(h.remaining_requests, Some(49));
        assert_eq!(h.remaining_tokens, Some(800));
        assert_eq!(h.reset_requests, Some(Duration::ZERO));
        assert!(headroom(&HeaderMap::new()).0.is_none());
        // Both styles: OpenAI's wins; unparsable values and other headers are skipped.
        let h = headroom(&headers(&[
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("x-ratelimit-remaining-tokens", "12"),
            ("x-ratelimit-remaining-requests", "soon"),
            ("x-ratelimit-unknown", "1"),
            ("content-type", "application/json"),
        ]))
        .0
        .unwrap();
        assert_eq!(h.remaining_tokens, Some(12));
        assert_eq!(h.remaining_requests, None);
        assert_eq!(
            headroom(&headers(&[("x-ratelimit-remaining-tokens", "-1")])),
            (None, 1)
        );
    }

    #[test]
    fn absurd_delays_are_capped_or_refused_never_a_panic() {
        let day = MAX_UPSTREAM_DELAY;
        // (retry-after value, expected)
        let table: &[(&str, Option<Duration>)] = &[
            ("1e20", Some(day)),
            ("1e308", Some(day)),
            ("1e400", None), // parses to infinity
            ("inf", None),
            ("-inf", None),
            ("NaN", None),
            ("-1", None),
            ("-0", Some(Duration::ZERO)),
            ("86401", Some(day)),
            ("18446744073709551616", Some(day)),
            ("0.5", Some(Duration::from_millis(500))),
            ("Fri, 31 Dec 9999 23:59:59 GMT", Some(day)),
            ("", None),
            ("1 2", None),
        ];
        for (v, want) in table {
            assert_eq!(
                retry_after(&headers(&[("retry-after", v)])),
                *want,
                "retry-after: {v}"
            );
        }
        let table: &[(&str, Option<Duration>)] = &[
            ("1e30", Some(day)),
            ("NaN", None),
            ("-5", None),
            ("1500", Some(Duration::from_millis(1500))),
        ];
        for (v, want) in table {
            assert_eq!(
                retry_after(&headers(&[("retry-after-ms", v)])),
                *want,
                "retry-after-ms: {v}"
            );
        }
        // A bad retry-after-ms falls back to retry-after.
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "NaN"), ("retry-after", "3")])),
            Some(Duration::from_secs(3))
        );
        let resets: &[(&str, Option<Duration>)] = &[
            ("inf", None),
            ("NaN", None),
            ("-3s", None),
            ("1e20", Some(day)),
            ("99999999999999999999h", Some(day)),
            ("2562047788015216h", Some(day)), // past Duration::MAX in seconds
            ("1.5s", Some(Duration::from_millis(1500))),
            ("6m0s", Some(Duration::from_secs(360))),
            ("1h1h1h1h", Some(Duration::from_secs(4 * 3600))),
            ("s", None),
            ("5x", None),
            ("..s", None),
            ("9999-12-31T23:59:59Z", Some(day)),
            ("9999-12-31T23:59:59.999999999+23:59", Some(day)),
            ("0000-01-01T00:00:00Z", None), // before 1970: unreadable
            ("2024-01-01T00:00:00+99:99", Some(Duration::ZERO)),
            ("2024-01-01T00:00:00-1:000", None),
            ("+024-01-01T00:00:00Z", None),
            ("2024-01-01T00:00:00.Z", None),
            ("2024-01-01T00:00:00", None),
            ("2024-02-31T00:00:00Z", Some(Duration::ZERO)),
        ];
        for (v, want) in resets {
            assert_eq!(parse_reset(v), *want, "reset: {v}");
        }
        // Non-ASCII never reaches slicing at a non-boundary.
        assert_eq!(parse_reset("2024-01-01T00:00:00+é:0"), None);
        assert_eq!(parse_reset("1µs"), Some(Duration::from_micros(1)));
        assert_eq!(secs(f64::MAX), Some(day));
        assert_eq!(secs(f64::MIN_POSITIVE), Some(Duration::ZERO));
    }

    #[test]
    fn absurd_counts_saturate_or_are_ignored_and_counted() {
        let table: &[(&str, Option<u64>)] = &[
            ("NaN", None),
            ("inf", None),
            ("-1", None),
            ("", None),
            ("12abc", None),
            ("99999999999999999999999", Some(u64::MAX)),
            ("1e30", Some(u64::MAX)),
            ("1000.0", Some(1000)),
            ("1e3", Some(1000)),
            ("42", Some(42)),
        ];
        for (v, want) in table {
            assert_eq!(count(v), *want, "count: {v}");
        }
        let (h, bad) = headroom(&headers(&[
            ("x-ratelimit-remaining-requests", "NaN"),
            ("x-ratelimit-reset-requests", "inf"),
            ("x-ratelimit-remaining-tokens", "-7"),
            ("x-ratelimit-limit-tokens", "99999999999999999999999"),
            ("x-ratelimit-reset-tokens", "1e20"),
            ("x-ratelimit-limit-requests", "10"),
        ]));
        let h = h.unwrap();
        assert_eq!(bad, 3);
        assert_eq!(h.remaining_requests, None);
        assert_eq!(h.reset_requests, None);
        assert_eq!(h.remaining_tokens, None);
        assert_eq!(h.limit_tokens, Some(u64::MAX));
        assert_eq!(h.reset_tokens, Some(MAX_UPSTREAM_DELAY));
        assert_eq!(h.limit_requests, Some(10));
        let (h, bad) = headroom(&headers(&[
            ("anthropic-ratelimit-requests-remaining", "-1"),
            ("anthropic-ratelimit-requests-reset", "9999-12-31T23:59:59Z"),
            ("anthropic-ratelimit-tokens-reset", "tomorrow"),
            ("anthropic-ratelimit-input-tokens-remaining", "5"),
        ]));
        let h = h.unwrap();
        assert_eq!(bad, 2);
        assert_eq!(h.reset_requests, Some(MAX_UPSTREAM_DELAY));
        assert_eq!(h.remaining_tokens, Some(5));
        // A 429 whose only hint is an absurd reset: capped.
        let e = classify_status(
            "p",
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[
                ("retry-after", "1e20"),
                ("x-ratelimit-remaining-requests", "0"),
            ]),
            b"",
            None,
        );
        assert_eq!(e.retry_after(), Some(MAX_UPSTREAM_DELAY));
        assert!(e.should_fall_back());
    }

    #[test]
    fn status_kinds() {
        let k = |status: u16, body: &str| {
            classify_status(
                "p",
                StatusCode::from_u16(status).unwrap(),
                &HeaderMap::new(),
                body.as_bytes(),
                None,
            )
            .kind()
        };
        assert_eq!(k(429, ""), ErrorKind::RateLimited);
        assert_eq!(k(500, ""), ErrorKind::Unavailable);
        assert_eq!(k(502, "<html>bad gateway</html>"), ErrorKind::Unavailable);
        assert_eq!(k(503, ""), ErrorKind::Unavailable);
        assert_eq!(k(529, ""), ErrorKind::Overloaded);
        assert_eq!(
            k(
                500,
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
            ),
            ErrorKind::Overloaded
        );
        assert_eq!(
            k(
                400,
                r#"{"error":{"message":"too long","code":"context_length_exceeded"}}"#
            ),
            ErrorKind::ContextLengthExceeded
        );
        assert_eq!(
            k(
                400,
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210000 tokens > 200000 maximum"}}"#
            ),
            ErrorKind::ContextLengthExceeded
        );
        assert_eq!(
            k(
                400,
                r#"{"error":{"message":"flagged","code":"content_policy_violation"}}"#
            ),
            ErrorKind::ContentFiltered
        );
        assert_eq!(k(401, ""), ErrorKind::Auth);
        assert_eq!(k(403, ""), ErrorKind::Auth);
        assert_eq!(
            k(
                404,
                r#"{"error":{"message":"no such model","type":"invalid_request_error"}}"#
            ),
            ErrorKind::NotFound
        );
        assert_eq!(k(400, "{}"), ErrorKind::BadRequest);
        assert_eq!(k(422, "not json"), ErrorKind::BadRequest);
        assert_eq!(k(307, ""), ErrorKind::Transport);
        assert_eq!(k(504, ""), ErrorKind::Timeout);
    }

    #[test]
    fn rate_limit_retry_after_from_reset_headers() {
        let e = classify_status(
            "p",
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "3s"),
            ]),
            b"",
            None,
        );
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(e.provider(), Some("p"));
        assert_eq!(e.upstream_status(), Some(429));
    }

    #[test]
    fn key_is_scrubbed_from_messages() {
        let key = ApiKey::new("sk-very-secret");
        let e = classify_status(
            "p",
            StatusCode::UNAUTHORIZED,
            &HeaderMap::new(),
            br#"{"error":{"message":"Incorrect API key provided: sk-very-secret","code":"invalid_api_key"}}"#,
            Some(&key),
        );
        assert!(!e.message().contains("sk-very-secret"));
        assert!(!format!("{e:?} {e}").contains("sk-very-secret"));
    }
}
