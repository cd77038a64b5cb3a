//! `LlmError` classification and its OpenAI wire form.

use std::time::Duration;

use llm_tower_core::{ErrorKind, LlmError};

#[test]
fn every_kind_has_a_status_type_and_fallback_rule() {
    let cases = [
        (LlmError::rate_limited("x"), 429, "rate_limit_error", true),
        (LlmError::timeout("x"), 504, "timeout_error", true),
        (
            LlmError::unavailable("x"),
            503,
            "service_unavailable_error",
            true,
        ),
        (LlmError::overloaded("x"), 503, "overloaded_error", true),
        (LlmError::transport("x"), 502, "upstream_error", true),
        (
            LlmError::bad_request("x"),
            400,
            "invalid_request_error",
            false,
        ),
        (
            LlmError::context_length_exceeded("x"),
            400,
            "invalid_request_error",
            false,
        ),
        (
            LlmError::content_filtered("x"),
            400,
            "invalid_request_error",
            false,
        ),
        (LlmError::auth("x"), 401, "authentication_error", false),
        (LlmError::not_found("x"), 404, "not_found_error", false),
        (
            LlmError::invalid_output("x", "out"),
            502,
            "invalid_output_error",
            false,
        ),
        (
            LlmError::budget_exceeded("x"),
            429,
            "insufficient_quota",
            false,
        ),
        (LlmError::cancelled("x"), 499, "cancelled", false),
        (LlmError::internal("x"), 500, "server_error", false),
    ];
    for (err, status, ty, falls_back) in cases {
        assert_eq!(err.status(), status, "{err}");
        assert_eq!(err.should_fall_back(), falls_back, "{err}");
        assert_eq!(err.is_retryable(), falls_back, "{err}");
        let body = err.to_openai_json();
        assert_eq!(body["error"]["type"], ty);
        assert_eq!(body["error"]["message"], "x");
        assert!(body["error"].as_object().unwrap().contains_key("param"));
        assert!(body["error"].as_object().unwrap().contains_key("code"));
    }
}

#[test]
fn codes_params_and_retry_after() {
    let e = LlmError::context_length_exceeded("too long").with_param("messages");
    let body = e.to_openai_json();
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    assert_eq!(body["error"]["param"], "messages");
    let e = LlmError::rate_limited("slow")
        .with_retry_after(Duration::from_secs(3))
        .with_code("custom");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
    assert_eq!(e.code(), Some("custom"));
    assert!(LlmError::bad_request("b").to_openai_json()["error"]["code"].is_null());
}

#[test]
fn invalid_output_keeps_the_output() {
    let e = LlmError::invalid_output("not JSON: expected value at line 1", "Sure! {");
    assert_eq!(e.kind(), ErrorKind::InvalidOutput);
    assert_eq!(e.output(), Some("Sure! {"));
}

#[test]
fn all_failed_lists_every_attempt() {
    let attempts = vec![
        LlmError::rate_limited("429 from primary")
            .with_provider("openai")
            .with_retry_after(Duration::from_secs(20)),
        LlmError::unavailable("503")
            .with_provider("anthropic")
            .with_retry_after(Duration::from_secs(5)),
        LlmError::timeout("no first chunk in 10s").with_provider("openrouter"),
    ];
    let e = LlmError::all_failed(attempts);
    assert!(
        e.message()
            .starts_with("All LLM providers failed (3 attempts).")
    );
    for needle in [
        "openai",
        "429 from primary",
        "anthropic",
        "503",
        "openrouter",
        "no first chunk",
    ] {
        assert!(e.message().contains(needle), "{needle} missing from {e}");
    }
    assert_eq!(e.kind(), ErrorKind::Timeout, "kind of the last attempt");
    assert_eq!(
        e.retry_after(),
        Some(Duration::from_secs(5)),
        "soonest retry-after"
    );
    assert_eq!(e.attempts().len(), 3);
    assert_eq!(LlmError::all_failed(vec![]).kind(), ErrorKind::Unavailable);
}

#[test]
fn errors_are_small_cloneable_and_send() {
    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync::<LlmError>();
    assert_eq!(
        std::mem::size_of::<LlmError>(),
        std::mem::size_of::<usize>()
    );
    let e = LlmError::transport("reset").with_source(std::io::Error::other("io"));
    assert!(std::error::Error::source(&e).is_some());
    let copy = e.clone();
    assert_eq!(copy.to_string(), "transport: reset");
    assert_eq!(copy.kind(), e.kind());
}
