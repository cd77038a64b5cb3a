//! The llm-tower stack behind an axum handler, driven through the app's `Router`.

use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode};
use example_axum_app::{Explanation, app, llm_stack};
use llm_tower_core::LlmError;
use llm_tower_test::{MockLlm, Step};
use serde_json::Value;
use tower::ServiceExt;

async fn call(
    router: &axum::Router,
    method: &str,
    uri: &str,
    body: &str,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    (
        parts.status,
        parts.headers,
        to_bytes(body, 1 << 20).await.unwrap().to_vec(),
    )
}

#[tokio::test]
async fn explain_calls_the_stack_and_the_app_keeps_its_routes() {
    let provider = MockLlm::new("p").then(Step::reply("Tower composes services."));
    let router = app(llm_stack(provider.clone()));

    let (status, _, body) = call(&router, "POST", "/explain", r#"{"topic":"tower"}"#).await;
    assert_eq!(status, StatusCode::OK);
    let e: Explanation = serde_json::from_slice(&body).unwrap();
    assert_eq!(e.text, "Tower composes services.");
    assert_eq!(e.model, "small-model");
    let seen = provider.last_request().unwrap();
    assert_eq!(seen.task_type().map(|t| t.as_str()), Some("explain"));
    assert!(seen.messages[1].text().contains("tower"));

    // The pre-existing routes still work next to the LLM endpoint.
    let (status, _, _) = call(&router, "POST", "/notes", r#"{"text":"hello"}"#).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _, body) = call(&router, "GET", "/notes", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(String::from_utf8(body).unwrap(), r#"[{"text":"hello"}]"#);
}

#[tokio::test]
async fn a_repeated_topic_is_answered_from_the_cache() {
    let provider = MockLlm::new("p").then(Step::reply("first and only call"));
    let router = app(llm_stack(provider.clone()));
    let (_, _, a) = call(&router, "POST", "/explain", r#"{"topic":"tower"}"#).await;
    let (_, _, b) = call(&router, "POST", "/explain", r#"{"topic":"tower"}"#).await;
    let a: Explanation = serde_json::from_slice(&a).unwrap();
    let b: Explanation = serde_json::from_slice(&b).unwrap();
    assert_eq!((a.cache.as_str(), b.cache.as_str()), ("miss", "hit"));
    assert_eq!(b.text, "first and only call");
    assert_eq!(provider.calls(), 1);
}

#[tokio::test]
async fn llm_errors_become_http_errors_with_retry_after() {
    let provider = MockLlm::new("p").then(Step::error(
        LlmError::rate_limited("slow down")
            .with_retry_after(std::time::Duration::from_millis(1500)),
    ));
    let router = app(llm_stack(provider));
    let (status, headers, body) = call(&router, "POST", "/explain", r#"{"topic":"tower"}"#).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "2");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
}

#[tokio::test]
async fn bad_input_is_a_400_and_never_reaches_the_llm() {
    let provider = MockLlm::new("p");
    let router = app(llm_stack(provider.clone()));
    let (status, _, _) = call(&router, "POST", "/explain", r#"{"topic":"   "}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = call(&router, "POST", "/explain", r#"{"topc":"x"}"#).await;
    assert!(status.is_client_error());
    assert_eq!(provider.calls(), 0);
}
