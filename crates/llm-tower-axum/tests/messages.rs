//! `POST /v1/messages` and `/v1/messages/count_tokens` driven with `oneshot` over the
//! scripted `MockLlm`: framing of answers, streams and failures in Anthropic's dialect.

use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use http::Request;
use http_body_util::BodyExt;
use llm_tower_axum::{ClientKeys, OpenAiRouter};
use llm_tower_core::dialect::messages::estimate_input_tokens;
use llm_tower_core::{Dialect, LlmError, NativeRequest};
use llm_tower_test::{MockLlm, Step};
use serde_json::{Value, json};
use tower::ServiceExt;

const HELLO: &str =
    r#"{"model":"m","max_tokens":50,"messages":[{"role":"user","content":"Hello there"}]}"#;
const HELLO_STREAM: &str = r#"{"model":"m","max_tokens":50,"stream":true,"messages":[{"role":"user","content":"Hello there"}]}"#;

fn post(path: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

async fn text(resp: Response) -> String {
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

fn events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|f| !f.trim().is_empty())
        .map(|f| {
            let (name, data) = f.split_once('\n').expect("event and data lines");
            let name = name.strip_prefix("event: ").expect("event line");
            let data = data.strip_prefix("data: ").expect("data line");
            (name.to_owned(), serde_json::from_str(data).expect(data))
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_view_reaches_the_service_and_the_answer_is_a_message() {
    let mock = MockLlm::new("p").then(Step::reply("Hi!"));
    let app = OpenAiRouter::new(mock.clone()).into_router();
    let resp = app.oneshot(post("/v1/messages", HELLO)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = serde_json::from_str(&text(resp).await).unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"], json!([{"type": "text", "text": "Hi!"}]));
    let seen = mock.last_request().unwrap();
    assert_eq!(seen.model, "m");
    assert_eq!(seen.max_tokens, Some(50));
    let native = seen.extensions.get::<NativeRequest>().unwrap();
    assert_eq!(native.dialect(), Dialect::Messages);
    assert_eq!(native.body().as_ref(), HELLO.as_bytes());
    // `anthropic-version` rides along for a provider of the dialect.
    assert_eq!(native.headers()[0].0.as_str(), "anthropic-version");
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_fails_after_it_started_ends_with_an_error_event() {
    let mock = MockLlm::new("p")
        .then(Step::stream(["one ", "two ", "three"]).fail_after(2, LlmError::overloaded("busy")));
    let app = OpenAiRouter::new(mock).into_router();
    let resp = app
        .oneshot(post("/v1/messages", HELLO_STREAM))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let evs = events(&text(resp).await);
    let (name, data) = evs.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(data["error"]["type"], "overloaded_error");
    assert!(!evs.iter().any(|(n, _)| n == "message_stop"));
    assert_eq!(evs[0].0, "message_start");
}

#[tokio::test(start_paused = true)]
async fn a_failure_before_the_first_event_is_an_http_error_in_anthropic_format() {
    let mock = MockLlm::new("p").then(Step::error(
        LlmError::rate_limited("slow down").with_retry_after(std::time::Duration::from_secs(3)),
    ));
    let app = OpenAiRouter::new(mock).into_router();
    let resp = app
        .oneshot(post("/v1/messages", HELLO_STREAM))
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "3");
    let v: Value = serde_json::from_str(&text(resp).await).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "rate_limit_error");
}

#[tokio::test(start_paused = true)]
async fn bad_bodies_are_refused_before_the_service() {
    let mock = MockLlm::new("p");
    let app = OpenAiRouter::new(mock.clone()).body_limit(64).into_router();
    let big = format!(
        r#"{{"model":"m","max_tokens":5,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(100)
    );
    let resp = app
        .clone()
        .oneshot(post("/v1/messages", &big))
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let v: Value = serde_json::from_str(&text(resp).await).unwrap();
    assert_eq!(v["error"]["type"], "request_too_large");
    for bad in ["not json", r#"{"model":"m","messages":[]}"#] {
        let resp = app
            .clone()
            .oneshot(post("/v1/messages", bad))
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{bad}");
        let v: Value = serde_json::from_str(&text(resp).await).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    assert_eq!(mock.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn keys_are_read_from_x_api_key_and_refusals_are_anthropic_errors() {
    let mock = MockLlm::new("p").otherwise(Step::reply("ok"));
    let app = OpenAiRouter::new(mock)
        .client_keys(ClientKeys::new().with_key("sk-1", "t"))
        .into_router();
    let mut req = post("/v1/messages", HELLO);
    req.headers_mut()
        .insert("x-api-key", "sk-1".parse().unwrap());
    assert_eq!(app.clone().oneshot(req).await.unwrap().status(), 200);
    let resp = app
        .clone()
        .oneshot(post("/v1/messages", HELLO))
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = serde_json::from_str(&text(resp).await).unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    // Chat keeps OpenAI's shape for the same refusal.
    let chat = Request::post("/v1/chat/completions")
        .body(Body::from(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
        ))
        .unwrap();
    let v: Value = serde_json::from_str(&text(app.oneshot(chat).await.unwrap()).await).unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
}

#[tokio::test(start_paused = true)]
async fn count_tokens_estimates_or_asks_the_counter() {
    let mock = MockLlm::new("p");
    let body = r#"{"model":"m","messages":[{"role":"user","content":"Count these words please"}]}"#;
    let app = OpenAiRouter::new(mock.clone()).into_router();
    let resp = app
        .oneshot(post("/v1/messages/count_tokens", body))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = serde_json::from_str(&text(resp).await).unwrap();
    let view = llm_tower_core::dialect::messages::count_tokens_request_from_bytes(
        bytes::Bytes::from_static(body.as_bytes()),
    )
    .unwrap();
    assert_eq!(v["input_tokens"], estimate_input_tokens(&view));
    let app = OpenAiRouter::new(mock.clone())
        .count_tokens(Arc::new(|req| {
            Box::pin(async move {
                if req.model == "m" {
                    Ok(42)
                } else {
                    Err(LlmError::not_found("no such model"))
                }
            })
        }))
        .into_router();
    let resp = app
        .clone()
        .oneshot(post("/v1/messages/count_tokens", body))
        .await
        .unwrap();
    assert_eq!(text(resp).await, r#"{"input_tokens":42}"#);
    let other = body.replace(r#""m""#, r#""x""#);
    let resp = app
        .oneshot(post("/v1/messages/count_tokens", &other))
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // Counting is not an LLM call.
    assert_eq!(mock.calls(), 0);
}
