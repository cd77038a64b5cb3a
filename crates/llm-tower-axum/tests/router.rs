//! The router driven with `oneshot`, over the scripted `MockLlm`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use http::Request;
use http_body_util::BodyExt;
use llm_tower_axum::{AuthLayer, ClientKeys, Metrics, ModelEntry, OpenAiRouter};
use llm_tower_core::{
    Attempt, AttemptError, CachePolicy, CacheStatus, ChatRequest, ChatResponse, Cost, ErrorKind,
    LlmError, LlmResponse, LocalLimits, Tenant, Usage,
};
use llm_tower_test::{MockLlm, Step};
use serde_json::{Value, json};
use tower::ServiceExt;

const HELLO: &str = r#"{"model":"gpt-test","messages":[{"role":"user","content":"Hello there"}]}"#;
const HELLO_STREAM: &str =
    r#"{"model":"gpt-test","messages":[{"role":"user","content":"Hello there"}],"stream":true}"#;

fn app(mock: &MockLlm) -> Router {
    OpenAiRouter::new(mock.clone())
        .models([
            ModelEntry::new("gpt-test").owned_by("mock"),
            ModelEntry::alias("fast", "gpt-test"),
        ])
        .into_router()
}

fn chat(body: &str) -> Request<Body> {
    Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

async fn body_bytes(resp: Response) -> bytes::Bytes {
    resp.into_body().collect().await.unwrap().to_bytes()
}

async fn body_json(resp: Response) -> Value {
    let b = body_bytes(resp).await;
    serde_json::from_slice(&b).unwrap_or_else(|e| panic!("not JSON ({e}): {b:?}"))
}

fn header<'a>(resp: &'a Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

/// Splits an SSE body into its `data:` payloads, checking the framing exactly.
fn sse_frames(body: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(body).unwrap();
    assert!(text.ends_with("\n\n"), "unterminated frame: {text:?}");
    text[..text.len() - 2]
        .split("\n\n")
        .map(|frame| {
            frame
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("bad frame {frame:?}"))
                .to_owned()
        })
        .collect()
}

fn assert_openai_error(v: &Value, ty: &str) {
    let e = &v["error"];
    assert!(e["message"].is_string(), "{v}");
    assert_eq!(e["type"], ty, "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
}

#[tokio::test]
async fn complete_request_answers_json_with_headers() {
    let mock = MockLlm::new("mock").then(Step::reply("hi!").with_latency(Duration::from_millis(5)));
    let resp = app(&mock).oneshot(chat(HELLO)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), "application/json");
    assert_eq!(header(&resp, "x-llm-provider"), "mock");
    assert_eq!(header(&resp, "x-llm-model"), "gpt-test");
    assert_eq!(header(&resp, "x-llm-cache"), "none");
    assert_eq!(header(&resp, "x-llm-attempts"), "1");
    let timing = header(&resp, "server-timing");
    assert!(
        timing.starts_with("gateway;dur=") && timing.contains(", upstream;dur=5.000"),
        "{timing}"
    );
    let id = header(&resp, "x-request-id");
    let uuid = uuid::Uuid::parse_str(id).unwrap();
    assert_eq!(uuid.get_version_num(), 7);
    let v = body_json(resp).await;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "hi!");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(mock.calls(), 1);
}

#[tokio::test]
async fn request_id_is_passed_through() {
    let mock = MockLlm::new("mock");
    let mut req = chat(HELLO);
    req.headers_mut()
        .insert("x-request-id", "client-id-123".parse().unwrap());
    let resp = app(&mock).oneshot(req).await.unwrap();
    assert_eq!(header(&resp, "x-request-id"), "client-id-123");
    // Errors and unknown routes get one too.
    let resp = app(&mock)
        .oneshot(Request::get("/nope").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert!(resp.headers().contains_key("x-request-id"));
}

#[tokio::test]
async fn stream_request_is_sent_as_sse() {
    let mock = MockLlm::new("mock").then(Step::stream(["Hel", "lo"]));
    let resp = app(&mock).oneshot(chat(HELLO_STREAM)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), "text/event-stream");
    assert_eq!(header(&resp, "cache-control"), "no-cache");
    assert_eq!(header(&resp, "x-llm-provider"), "mock");
    assert!(header(&resp, "server-timing").starts_with("gateway;dur="));
    let frames = sse_frames(&body_bytes(resp).await);
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    // The client did not ask for usage: the usage-only chunk is not forwarded.
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "{chunks:?}"
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn stream_usage_is_forwarded_when_asked() {
    let mock = MockLlm::new("mock").then(Step::stream(["a"]).with_usage(Usage::new(7, 3)));
    let body = r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"include_usage":true}}"#;
    let resp = app(&mock).oneshot(chat(body)).await.unwrap();
    let frames = sse_frames(&body_bytes(resp).await);
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&frames[frames.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], 7);
    assert_eq!(usage["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn complete_body_is_converted_for_a_stream_request() {
    let mock = MockLlm::new("mock").then(Step::respond(|req: &ChatRequest| {
        Ok(LlmResponse::complete(ChatResponse::from_text(
            req.model.clone(),
            "whole answer",
        )))
    }));
    let resp = app(&mock).oneshot(chat(HELLO_STREAM)).await.unwrap();
    assert_eq!(header(&resp, "content-type"), "text/event-stream");
    let frames = sse_frames(&body_bytes(resp).await);
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let text: String = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str::<Value>(f).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "whole answer");
}

/// An upstream's answer, with its own key order and spacing.
const UPSTREAM_JSON: &str = r#"{ "model": "gpt-test", "id": "c1", "choices": [{"message": {"content": "as sent", "role": "assistant"}, "finish_reason": "stop", "index": 0}], "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}, "x_vendor": [1, 2] }"#;

fn upstream_json() -> Step {
    Step::respond(|_| {
        let body = llm_tower_core::EncodedResponse::from_json(UPSTREAM_JSON.as_bytes().into())
            .map_err(|e| LlmError::transport(e.to_string()))?;
        Ok(LlmResponse::encoded(body))
    })
}

#[tokio::test]
async fn an_answer_kept_as_json_is_forwarded_byte_for_byte() {
    let mock = MockLlm::new("mock").then(upstream_json());
    let resp = app(&mock).oneshot(chat(HELLO)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), "application/json");
    assert_eq!(header(&resp, "x-llm-model"), "gpt-test");
    assert_eq!(body_bytes(resp).await, UPSTREAM_JSON.as_bytes());
}

#[tokio::test]
async fn an_answer_kept_as_json_is_converted_for_a_stream_request() {
    let mock = MockLlm::new("mock").then(upstream_json());
    let resp = app(&mock).oneshot(chat(HELLO_STREAM)).await.unwrap();
    assert_eq!(header(&resp, "content-type"), "text/event-stream");
    let frames = sse_frames(&body_bytes(resp).await);
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let first: Value = serde_json::from_str(&frames[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["content"], "as sent");
}

#[tokio::test]
async fn stream_body_is_aggregated_for_a_json_request() {
    let mock = MockLlm::new("mock").then(Step::stream(["Hel", "lo"]).with_usage(Usage::new(4, 2)));
    let resp = app(&mock).oneshot(chat(HELLO)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let v = body_json(resp).await;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello");
    assert_eq!(v["usage"]["total_tokens"], 6);
}

#[tokio::test]
async fn stream_failing_midway_ends_with_an_error_event_and_no_done() {
    let mock = MockLlm::new("mock").then(
        Step::stream(["one", "two", "three"])
            .fail_after(2, LlmError::transport("connection reset")),
    );
    let resp = app(&mock).oneshot(chat(HELLO_STREAM)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let frames = sse_frames(&body_bytes(resp).await);
    assert_eq!(frames.len(), 3, "{frames:?}");
    assert!(!frames.iter().any(|f| f == "[DONE]"));
    let err: Value = serde_json::from_str(&frames[2]).unwrap();
    assert_openai_error(&err, "upstream_error");
    assert_eq!(err["error"]["message"], "connection reset");
}

#[tokio::test]
async fn stream_failing_before_the_first_chunk_is_an_http_error() {
    let mock = MockLlm::new("mock").then(Step::stream(["one"]).fail_after(
        0,
        LlmError::overloaded("busy").with_retry_after(Duration::from_secs(3)),
    ));
    let resp = app(&mock).oneshot(chat(HELLO_STREAM)).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(header(&resp, "retry-after"), "3");
    assert_eq!(header(&resp, "content-type"), "application/json");
    assert_openai_error(&body_json(resp).await, "overloaded_error");
}

#[tokio::test]
async fn aggregated_stream_failure_is_an_http_error() {
    let mock = MockLlm::new("mock")
        .then(Step::stream(["a", "b"]).fail_after(1, LlmError::timeout("stalled")));
    let resp = app(&mock).oneshot(chat(HELLO)).await.unwrap();
    assert_eq!(resp.status(), 504);
    assert_openai_error(&body_json(resp).await, "timeout_error");
}

#[tokio::test]
async fn every_error_kind_maps_to_status_body_and_retry_after() {
    let cases: Vec<(LlmError, u16, &str, Option<&str>)> = vec![
        (
            LlmError::rate_limited("slow down").with_retry_after(Duration::from_millis(1200)),
            429,
            "rate_limit_error",
            Some("2"),
        ),
        (LlmError::timeout("late"), 504, "timeout_error", None),
        (
            LlmError::unavailable("down").with_retry_after(Duration::from_secs(5)),
            503,
            "service_unavailable_error",
            Some("5"),
        ),
        (LlmError::overloaded("busy"), 503, "overloaded_error", None),
        (
            LlmError::bad_request("bad"),
            400,
            "invalid_request_error",
            None,
        ),
        (
            LlmError::context_length_exceeded("too long"),
            400,
            "invalid_request_error",
            None,
        ),
        (
            LlmError::content_filtered("no"),
            400,
            "invalid_request_error",
            None,
        ),
        (
            LlmError::auth("upstream key"),
            401,
            "authentication_error",
            None,
        ),
        (
            LlmError::not_found("no model"),
            404,
            "not_found_error",
            None,
        ),
        (
            LlmError::invalid_output("not JSON", "{oops"),
            502,
            "invalid_output_error",
            None,
        ),
        (
            LlmError::budget_exceeded("spent"),
            429,
            "insufficient_quota",
            None,
        ),
        (LlmError::transport("reset"), 502, "upstream_error", None),
        (LlmError::cancelled("gone"), 499, "cancelled", None),
        (LlmError::internal("bug"), 500, "server_error", None),
    ];
    for (err, status, ty, retry) in cases {
        let kind = err.kind();
        let code = err.code().map(str::to_owned);
        let mock = MockLlm::new("mock").then(Step::error(err.with_provider("p1")));
        let resp = app(&mock).oneshot(chat(HELLO)).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{kind:?}");
        assert_eq!(
            resp.headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap()),
            retry,
            "{kind:?}"
        );
        assert_eq!(header(&resp, "x-llm-provider"), "p1");
        assert!(header(&resp, "server-timing").starts_with("gateway;dur="));
        assert!(resp.headers().contains_key("x-request-id"));
        let v = body_json(resp).await;
        assert_openai_error(&v, ty);
        assert_eq!(
            v["error"]["code"].as_str().map(str::to_owned),
            code,
            "{kind:?}"
        );
    }
}

#[tokio::test]
async fn all_failed_reports_attempts_and_soonest_retry() {
    let err = LlmError::all_failed(vec![
        LlmError::rate_limited("a")
            .with_provider("one")
            .with_retry_after(Duration::from_secs(9)),
        LlmError::unavailable("b")
            .with_provider("two")
            .with_retry_after(Duration::from_millis(2500)),
    ]);
    let mock = MockLlm::new("mock").then(Step::error(err));
    let resp = app(&mock).oneshot(chat(HELLO)).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(header(&resp, "retry-after"), "3");
    assert_eq!(header(&resp, "x-llm-attempts"), "2");
}

#[tokio::test]
async fn meta_becomes_headers() {
    let mock = MockLlm::new("mock").then(Step::respond(|req: &ChatRequest| {
        let mut r = LlmResponse::complete(ChatResponse::from_text("served-model", "x"));
        r.meta.provider = Some(Arc::from("openai"));
        r.meta.cache = CacheStatus::Hit;
        r.meta.cost = Some(Cost {
            nano_usd: 1_234_500,
            saved_nano_usd: 0,
        });
        r.meta.limits = Some(LocalLimits {
            remaining_requests: Some(41),
            remaining_tokens: Some(9000),
        });
        r.meta.upstream_time = Some(Duration::from_millis(800));
        r.meta.attempts = vec![
            Attempt {
                target: Arc::from("primary"),
                model: Some(req.model.clone()),
                error: Some(AttemptError {
                    kind: ErrorKind::RateLimited,
                    message: "429".into(),
                    skipped: false,
                }),
            },
            Attempt {
                target: Arc::from("openai"),
                model: Some("served-model".into()),
                error: None,
            },
        ];
        Ok(r)
    }));
    let resp = app(&mock).oneshot(chat(HELLO)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-llm-provider"), "openai");
    assert_eq!(header(&resp, "x-llm-model"), "served-model");
    assert_eq!(header(&resp, "x-llm-cache"), "hit");
    assert_eq!(header(&resp, "x-llm-attempts"), "2");
    assert_eq!(header(&resp, "x-llm-cost-usd"), "0.0012345");
    assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), "41");
    assert_eq!(header(&resp, "x-ratelimit-remaining-tokens"), "9000");
    assert!(header(&resp, "server-timing").ends_with("upstream;dur=800.000"));
}

#[tokio::test]
async fn request_headers_map_into_extensions() {
    let mock = MockLlm::new("mock");
    let mut req = chat(HELLO);
    let h = req.headers_mut();
    h.insert("x-llm-task", "classify".parse().unwrap());
    h.insert("idempotency-key", "idem-1".parse().unwrap());
    h.insert("cache-control", "no-cache".parse().unwrap());
    // A client cannot pick its tenant.
    h.insert("x-tenant", "someone-else".parse().unwrap());
    assert_eq!(app(&mock).oneshot(req).await.unwrap().status(), 200);
    let seen = mock.last_request().unwrap();
    assert_eq!(seen.task_type().unwrap().as_str(), "classify");
    assert_eq!(seen.idempotency_key().unwrap().as_str(), "idem-1");
    assert_eq!(seen.cache_policy(), CachePolicy::NoCache);
    assert_eq!(seen.tenant().unwrap().as_str(), "anonymous");

    let mut req = chat(HELLO);
    req.headers_mut()
        .insert("cache-control", "no-cache, no-store".parse().unwrap());
    app(&mock).oneshot(req).await.unwrap();
    let seen = mock.last_request().unwrap();
    assert_eq!(seen.cache_policy(), CachePolicy::NoStore);
    assert!(seen.task_type().is_none());

    // Unknown request fields reach the service unchanged.
    let body =
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"logit_bias":{"50256":-100}}"#;
    app(&mock).oneshot(chat(body)).await.unwrap();
    let seen = serde_json::to_value(mock.last_request().unwrap()).unwrap();
    assert_eq!(seen["logit_bias"]["50256"], -100);
}

#[tokio::test]
async fn bad_task_header_is_a_bad_request() {
    let mock = MockLlm::new("mock");
    let mut req = chat(HELLO);
    req.headers_mut()
        .insert("x-llm-task", "x".repeat(1000).parse().unwrap());
    let resp = app(&mock).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    let v = body_json(resp).await;
    assert_eq!(v["error"]["param"], "x-llm-task");
    assert_eq!(mock.calls(), 0);
}

fn keyed(mock: &MockLlm) -> Router {
    OpenAiRouter::new(mock.clone())
        .client_keys(
            ClientKeys::new()
                .with_key("sk-team-a", "team-a")
                .with_key("sk-team-b", "team-b"),
        )
        .into_router()
}

#[tokio::test]
async fn auth_refuses_missing_and_wrong_keys() {
    let mock = MockLlm::new("mock");
    for auth in [
        None,
        Some("Bearer sk-wrong"),
        Some("Basic c2stdGVhbS1h"),
        Some("Bearer "),
    ] {
        let mut req = chat(HELLO);
        if let Some(a) = auth {
            req.headers_mut()
                .insert("authorization", a.parse().unwrap());
        }
        let resp = keyed(&mock).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
        assert_eq!(header(&resp, "www-authenticate"), "Bearer");
        let v = body_json(resp).await;
        assert_openai_error(&v, "authentication_error");
        assert!(!v.to_string().contains("sk-wrong"));
    }
    let resp = keyed(&mock)
        .oneshot(Request::get("/v1/models").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(mock.calls(), 0);
    // Probes and scrapes need no key.
    for path in ["/healthz", "/metrics"] {
        let resp = keyed(&mock)
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn auth_propagates_the_tenant_of_the_key() {
    let mock = MockLlm::new("mock");
    let mut req = chat(HELLO);
    req.headers_mut()
        .insert("authorization", "Bearer sk-team-b".parse().unwrap());
    req.headers_mut()
        .insert("x-tenant", "team-a".parse().unwrap());
    let resp = keyed(&mock).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        mock.last_request().unwrap().tenant().unwrap().as_str(),
        "team-b"
    );
}

#[tokio::test]
async fn auth_layer_wraps_another_router() {
    let auth = AuthLayer::new(ClientKeys::new().with_key("sk-j", "jobs-tenant"));
    let jobs = Router::new()
        .route(
            "/v1/jobs",
            post(
                |Extension(t): Extension<Tenant>, Json(body): Json<Value>| async move {
                    Json(json!({"tenant": t.as_str(), "echo": body}))
                },
            ),
        )
        .route("/v1/jobs/{id}", get(|| async { "job" }));
    let mock = MockLlm::new("mock");
    let app = OpenAiRouter::new(mock.clone())
        .auth(auth)
        .merge_authenticated(jobs)
        .merge(Router::new().route("/public", get(|| async { "public" })))
        .into_router();

    let req = Request::post("/v1/jobs")
        .header("authorization", "Bearer sk-j")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"a":1}"#))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(body_json(resp).await["tenant"], "jobs-tenant");

    let req = Request::post("/v1/jobs").body(Body::from("{}")).unwrap();
    assert_eq!(app.clone().oneshot(req).await.unwrap().status(), 401);

    // A plain-text axum rejection from the merged router becomes OpenAI JSON.
    let req = Request::post("/v1/jobs")
        .header("authorization", "Bearer sk-j")
        .header("content-type", "application/json")
        .body(Body::from("{not json"))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(header(&resp, "content-type"), "application/json");
    assert_openai_error(&body_json(resp).await, "invalid_request_error");

    // A wrong method on a merged route is a JSON 405.
    let req = Request::delete("/v1/jobs")
        .header("authorization", "Bearer sk-j")
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 405);
    assert_openai_error(&body_json(resp).await, "not_found_error");

    let req = Request::get("/public").body(Body::empty()).unwrap();
    assert_eq!(app.oneshot(req).await.unwrap().status(), 200);
}

#[tokio::test]
async fn oversized_body_is_a_json_413() {
    let mock = MockLlm::new("mock");
    let app = OpenAiRouter::new(mock.clone())
        .body_limit(1024)
        .into_router();
    let big = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(4096)
    );
    // Announced by content-length…
    let req = Request::post("/v1/chat/completions")
        .header("content-length", big.len())
        .body(Body::from(big.clone()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    let v = body_json(resp).await;
    assert_openai_error(&v, "invalid_request_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("1024"));
    // …or found while reading.
    let req = Request::post("/v1/chat/completions")
        .body(Body::from(big))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    assert_openai_error(&body_json(resp).await, "invalid_request_error");
    assert_eq!(mock.calls(), 0);
    // A body under the limit passes.
    assert_eq!(app.oneshot(chat(HELLO)).await.unwrap().status(), 200);
}

#[tokio::test]
async fn malformed_bodies_are_400_naming_the_problem() {
    let mock = MockLlm::new("mock");
    let cases = [
        ("{not json", "invalid request body"),
        ("", "invalid request body"),
        (r#"{"messages":[{"role":"user","content":"x"}]}"#, "model"),
        (r#"{"model":"m","messages":"hello"}"#, "messages"),
        (
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
            "temperature",
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#,
            "max_tokens",
        ),
        (r#"{"model":"m","messages":[]}"#, "messages"),
    ];
    for (body, needle) in cases {
        let resp = app(&mock).oneshot(chat(body)).await.unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let v = body_json(resp).await;
        assert_openai_error(&v, "invalid_request_error");
        let msg = v["error"]["message"].as_str().unwrap();
        let param = v["error"]["param"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle) || param == needle,
            "{body}: {msg} / {param}"
        );
    }
    assert_eq!(mock.calls(), 0);
}

#[tokio::test]
async fn unknown_route_and_wrong_method_are_json() {
    let mock = MockLlm::new("mock");
    let resp = app(&mock)
        .oneshot(
            Request::get("/v1/completions-nope")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(header(&resp, "content-type"), "application/json");
    let v = body_json(resp).await;
    assert_openai_error(&v, "not_found_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/completions-nope")
    );

    let resp = app(&mock)
        .oneshot(
            Request::get("/v1/chat/completions")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_openai_error(&body_json(resp).await, "not_found_error");
}

#[tokio::test]
async fn a_panicking_service_gives_a_json_500() {
    #[derive(Clone)]
    struct Panics;
    impl tower::Service<ChatRequest> for Panics {
        type Response = LlmResponse;
        type Error = LlmError;
        type Future = std::future::Ready<Result<LlmResponse, LlmError>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), LlmError>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: ChatRequest) -> Self::Future {
            panic!("boom")
        }
    }
    let app = OpenAiRouter::new(Panics).into_router();
    let resp = app.oneshot(chat(HELLO)).await.unwrap();
    assert_eq!(resp.status(), 500);
    assert!(resp.headers().contains_key("x-request-id"));
    assert_openai_error(&body_json(resp).await, "server_error");
}

#[tokio::test]
async fn healthz_and_models() {
    let mock = MockLlm::new("mock");
    let resp = app(&mock)
        .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(body_json(resp).await, json!({"status": "ok"}));

    let resp = app(&mock)
        .oneshot(Request::get("/v1/models").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v = body_json(resp).await;
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["id"], "gpt-test");
    assert_eq!(data[0]["object"], "model");
    assert_eq!(data[0]["owned_by"], "mock");
    assert!(data[0].get("alias_for").is_none());
    assert_eq!(data[1]["id"], "fast");
    assert_eq!(data[1]["alias_for"], "gpt-test");
    assert!(data[1]["created"].is_u64());
}

async fn scrape(app: &Router) -> String {
    let resp = app
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(header(&resp, "content-type").starts_with("text/plain"));
    String::from_utf8(body_bytes(resp).await.to_vec()).unwrap()
}

#[tokio::test]
async fn metrics_count_requests_tokens_cost_and_failures() {
    let mock = MockLlm::new("mock")
        .then(Step::reply("hi").with_usage(Usage::new(11, 5)))
        .then(Step::stream(["a", "b"]).with_usage(Usage::new(20, 8)))
        .then(Step::error(LlmError::rate_limited("slow")))
        .then(Step::error(LlmError::invalid_output("bad", "x")))
        .then(Step::respond(|_req: &ChatRequest| {
            let mut r = LlmResponse::complete(ChatResponse::from_text("m2", "x"));
            r.meta.cache = CacheStatus::Hit;
            r.meta.cost = Some(Cost {
                nano_usd: 500,
                saved_nano_usd: 100,
            });
            r.meta.attempts = vec![Attempt {
                target: Arc::from("primary"),
                model: None,
                error: Some(AttemptError {
                    kind: ErrorKind::Timeout,
                    message: "late".into(),
                    skipped: false,
                }),
            }];
            Ok(r)
        }));
    let app = OpenAiRouter::new(mock.clone()).into_router();
    let with_task = |body: &str| {
        let mut r = chat(body);
        r.headers_mut()
            .insert("x-llm-task", "summarize".parse().unwrap());
        r
    };
    assert_eq!(
        app.clone()
            .oneshot(with_task(HELLO))
            .await
            .unwrap()
            .status(),
        200
    );
    let resp = app.clone().oneshot(with_task(HELLO_STREAM)).await.unwrap();
    body_bytes(resp).await; // the stream's tokens are counted when it ends
    assert_eq!(
        app.clone().oneshot(chat(HELLO)).await.unwrap().status(),
        429
    );
    assert_eq!(
        app.clone().oneshot(chat(HELLO)).await.unwrap().status(),
        502
    );
    assert_eq!(
        app.clone().oneshot(chat(HELLO)).await.unwrap().status(),
        200
    );
    assert_eq!(app.clone().oneshot(chat("{")).await.unwrap().status(), 400);

    let page = scrape(&app).await;
    let has = |needle: &str| {
        assert!(page.contains(needle), "missing {needle} in:\n{page}");
    };
    has(
        r#"llm_requests_total{task="summarize",model="gpt-test",provider="mock",tenant="anonymous",status="ok"} 2"#,
    );
    has(
        r#"llm_input_tokens_total{task="summarize",model="gpt-test",provider="mock",tenant="anonymous"} 31"#,
    );
    has(
        r#"llm_output_tokens_total{task="summarize",model="gpt-test",provider="mock",tenant="anonymous"} 13"#,
    );
    has(r#"status="rate_limited"} 1"#);
    has(r#"llm_rate_limited_total{task="none",model="gpt-test",provider="",tenant="anonymous"} 1"#);
    has(
        r#"llm_validation_failures_total{task="none",model="gpt-test",provider="",tenant="anonymous"} 1"#,
    );
    has(
        r#"llm_cache_total{task="none",model="m2",provider="mock",tenant="anonymous",cache="hit"} 1"#,
    );
    has(
        r#"llm_cost_nano_usd_total{task="none",model="m2",provider="mock",tenant="anonymous"} 500"#,
    );
    has(
        r#"llm_fallbacks_total{task="none",model="m2",tenant="anonymous",provider="primary",reason="timeout",skipped="false"} 1"#,
    );
    has(r#"status="bad_request"} 1"#);
    has("llm_request_duration_seconds_bucket");
    has("llm_upstream_duration_seconds_bucket");
    has("# TYPE llm_requests_total counter");
}

#[tokio::test]
async fn dropped_stream_is_counted_as_dropped() {
    let mock = MockLlm::new("mock")
        .then(Step::stream(["a", "b", "c"]).chunk_delay(Duration::from_secs(3600)));
    let app = OpenAiRouter::new(mock).into_router();
    let resp = app.clone().oneshot(chat(HELLO_STREAM)).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp); // the client goes away after the headers
    let page = scrape(&app).await;
    assert!(page.contains(r#"status="dropped"} 1"#), "{page}");
}

#[tokio::test]
async fn disabled_metrics_answer_404() {
    let app = OpenAiRouter::new(MockLlm::new("mock"))
        .metrics(Metrics::disabled())
        .into_router();
    let resp = app
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test(start_paused = true)]
async fn slow_service_is_waited_for() {
    let mock = MockLlm::new("mock").then(Step::reply("late").with_latency(Duration::from_secs(30)));
    let resp = app(&mock).oneshot(chat(HELLO)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(header(&resp, "server-timing").contains("upstream;dur=30000.000"));
}

#[tokio::test]
async fn request_id_reaches_the_service() {
    let mock = MockLlm::new("mock");
    let mut req = chat(HELLO);
    req.headers_mut()
        .insert("x-request-id", "abc-1".parse().unwrap());
    app(&mock).oneshot(req).await.unwrap();
    let seen = mock.last_request().unwrap();
    let id = seen
        .extensions
        .get::<tower_http::request_id::RequestId>()
        .unwrap();
    assert_eq!(id.header_value(), "abc-1");
}

#[tokio::test(start_paused = true)]
async fn client_going_away_while_waiting_is_counted() {
    let mock = MockLlm::new("mock").then(Step::reply("late").with_latency(Duration::from_secs(60)));
    let app = OpenAiRouter::new(mock.clone()).into_router();
    let waited =
        tokio::time::timeout(Duration::from_secs(1), app.clone().oneshot(chat(HELLO))).await;
    assert!(waited.is_err(), "the client gave up first");
    let page = scrape(&app).await;
    assert!(
        page.contains(r#"llm_requests_total{task="none",model="gpt-test",provider="",tenant="anonymous",status="client_closed"} 1"#),
        "{page}"
    );
}

#[tokio::test]
async fn unknown_task_names_share_one_other_series() {
    let mock = MockLlm::new("mock").otherwise(Step::reply("ok"));
    let metrics = Metrics::prometheus();
    let app = OpenAiRouter::new(mock.clone())
        .metrics(metrics)
        .known_tasks(["classify"])
        .known_models(["gpt-test"])
        .merge(Router::new().route(
            "/echo-task",
            get(|h: http::HeaderMap| async move {
                h.get("x-llm-task")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default()
            }),
        ))
        .into_router();
    for i in 0..500 {
        let body =
            format!(r#"{{"model":"made-up-{i}","messages":[{{"role":"user","content":"hi"}}]}}"#);
        let mut req = chat(&body);
        req.headers_mut()
            .insert("x-llm-task", format!("task-{i}").parse().unwrap());
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let mut req = chat(HELLO);
    req.headers_mut()
        .insert("x-llm-task", " classify ".parse().unwrap());
    assert_eq!(app.clone().oneshot(req).await.unwrap().status(), 200);

    // The service saw `other` (and the known name as sent).
    let tasks: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| r.task_type().unwrap().as_str().to_owned())
        .collect();
    assert!(tasks[..500].iter().all(|t| t == "other"), "{tasks:?}");
    assert_eq!(tasks[500], "classify");
    // The request's model itself is untouched.
    assert_eq!(mock.requests()[7].model, "made-up-7");

    let page = scrape(&app).await;
    let series: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("llm_requests_total{"))
        .collect();
    assert_eq!(series.len(), 2, "{series:?}");
    assert!(
        page.contains(r#"llm_requests_total{task="other",model="other",provider="mock",tenant="anonymous",status="ok"} 500"#),
        "{page}"
    );
    assert!(!page.contains("task-1") && !page.contains("made-up"));

    // Merged routers see the normalized header too (the jobs router reads it).
    let req = Request::get("/echo-task")
        .header("x-llm-task", "whatever")
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(body_bytes(resp).await, "other");
}

#[tokio::test]
async fn metrics_behind_a_bearer_token_or_on_a_router_of_their_own() {
    use llm_tower_axum::MetricsAccess;
    let mock = MockLlm::new("mock").otherwise(Step::reply("ok"));
    let metrics = Metrics::prometheus();
    let app = OpenAiRouter::new(mock.clone())
        .metrics(metrics.clone())
        .metrics_access(MetricsAccess::bearer("scrape-me"))
        .into_router();
    let get_metrics = |auth: Option<&str>| {
        let mut req = Request::get("/metrics");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        req.body(Body::empty()).unwrap()
    };
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("scrape-me"),
        Some("Basic scrape-me"),
    ] {
        let resp = app.clone().oneshot(get_metrics(auth)).await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
        assert_eq!(header(&resp, "www-authenticate"), "Bearer");
        assert_openai_error(&body_json(resp).await, "authentication_error");
    }
    assert_eq!(
        app.clone().oneshot(chat(HELLO)).await.unwrap().status(),
        200
    );
    let resp = app
        .clone()
        .oneshot(get_metrics(Some("Bearer scrape-me")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(String::from_utf8_lossy(&body_bytes(resp).await).contains("llm_requests_total"));

    // Off on the API router, served by a router of its own (another listener).
    let app = OpenAiRouter::new(mock.clone())
        .metrics(metrics.clone())
        .metrics_access(MetricsAccess::off())
        .into_router();
    let resp = app.clone().oneshot(get_metrics(None)).await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_openai_error(&body_json(resp).await, "not_found_error");
    let admin = metrics.standalone_router(MetricsAccess::public());
    let resp = admin.clone().oneshot(get_metrics(None)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(String::from_utf8_lossy(&body_bytes(resp).await).contains("llm_requests_total"));
    let resp = admin
        .oneshot(Request::get("/v1/models").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}
