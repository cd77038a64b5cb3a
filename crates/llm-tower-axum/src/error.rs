//! Turning an [`LlmError`] into an OpenAI-style HTTP error response.

use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use llm_tower_core::{ErrorKind, LlmError};

/// The response for `error`: its status ([`LlmError::status`]), the OpenAI error JSON
/// ([`LlmError::to_openai_json`]) and, when known, `retry-after` in whole seconds
/// (rounded up, so a client never retries early).
///
/// ```
/// use llm_tower_axum::error_response;
/// use llm_tower_core::LlmError;
/// use std::time::Duration;
///
/// let resp = error_response(&LlmError::rate_limited("slow down").with_retry_after(Duration::from_millis(1500)));
/// assert_eq!(resp.status(), 429);
/// assert_eq!(resp.headers()["retry-after"], "2");
/// assert_eq!(resp.headers()["content-type"], "application/json");
/// ```
pub fn error_response(error: &LlmError) -> Response {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(&error.to_openai_json()).unwrap_or_else(|_| {
        br#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#
            .to_vec()
    });
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(after) = error.retry_after() {
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(retry_after_secs(after)),
        );
    }
    resp
}

/// `retry-after` seconds: rounded up, so the client never comes back too early.
pub(crate) fn retry_after_secs(after: Duration) -> u64 {
    let secs = after.as_secs();
    if after.subsec_nanos() > 0 {
        secs.saturating_add(1)
    } else {
        secs
    }
}

/// The error kind used for a bare HTTP status produced outside the LLM path (routing,
/// body limits, other routers merged in).
pub(crate) fn kind_for_status(status: StatusCode) -> ErrorKind {
    match status.as_u16() {
        401 | 403 => ErrorKind::Auth,
        404 | 405 => ErrorKind::NotFound,
        429 => ErrorKind::RateLimited,
        502 => ErrorKind::Transport,
        503 => ErrorKind::Unavailable,
        504 | 408 => ErrorKind::Timeout,
        s if s >= 500 => ErrorKind::Internal,
        _ => ErrorKind::BadRequest,
    }
}

/// An OpenAI-format error response for a bare `status` (used for 404, 405, 413, panics…).
pub(crate) fn status_response(status: StatusCode, message: impl Into<String>) -> Response {
    let mut resp = error_response(&LlmError::new(kind_for_status(status), message));
    *resp.status_mut() = status;
    resp
}

/// An [`LlmError`] as an axum response (see [`error_response`]), so handlers of other
/// routers (jobs) can return `Result<_, OpenAiError>`.
///
/// ```
/// use axum::response::IntoResponse;
/// use llm_tower_axum::OpenAiError;
/// use llm_tower_core::LlmError;
///
/// let resp = OpenAiError::from(LlmError::not_found("no such job")).into_response();
/// assert_eq!(resp.status(), 404);
/// ```
#[derive(Debug, Clone)]
pub struct OpenAiError(pub LlmError);

impl From<LlmError> for OpenAiError {
    fn from(e: LlmError) -> Self {
        Self(e)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        error_response(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 0);
    }

    #[test]
    fn status_maps_to_kind() {
        assert_eq!(kind_for_status(StatusCode::NOT_FOUND), ErrorKind::NotFound);
        assert_eq!(
            kind_for_status(StatusCode::PAYLOAD_TOO_LARGE),
            ErrorKind::BadRequest
        );
        assert_eq!(
            kind_for_status(StatusCode::INTERNAL_SERVER_ERROR),
            ErrorKind::Internal
        );
        let r = status_response(StatusCode::METHOD_NOT_ALLOWED, "nope");
        assert_eq!(r.status(), 405);
    }
}
