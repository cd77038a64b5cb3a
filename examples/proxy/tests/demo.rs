//! The shipped demo config, built in-process and driven through its router with tokio's
//! clock paused (the simulated providers' latencies take no real time).

use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode};
use llm_tower_proxy::config::Config;
use serde_json::{Value, json};
use tower::ServiceExt;

async fn demo_router() -> axum::Router {
    let mut config = Config::from_file(concat!(env!("CARGO_MANIFEST_DIR"), "/demo.toml")).unwrap();
    // Jobs need the SQLite file and real time; the e2e tests cover them.
    config.jobs.enabled = false;
    llm_tower_proxy::build(&config, &|_: &str| None)
        .await
        .unwrap()
        .router
}

async fn post(
    router: &axum::Router,
    key: Option<&str>,
    body: &Value,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut req = Request::post("/v1/chat/completions").header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let resp = router
        .clone()
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = to_bytes(body, 1 << 20).await.unwrap();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn h<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test(start_paused = true)]
async fn demo_answers_then_hits_the_cache() {
    let router = demo_router().await;
    let body = json!({"model": "gpt-4o-mini", "temperature": 0, "messages": [{"role": "user", "content": "What is tower?"}]});
    let (status, headers, text) = post(&router, Some("sk-demo"), &body).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(h(&headers, "x-llm-cache"), "miss");
    assert_eq!(h(&headers, "x-llm-provider"), "sim-cheap");
    assert_eq!(h(&headers, "x-llm-model"), "sim-small");
    let first: Value = serde_json::from_str(&text).unwrap();

    let (_, headers, text) = post(&router, Some("sk-demo"), &body).await;
    assert_eq!(h(&headers, "x-llm-cache"), "hit");
    let second: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(first["choices"], second["choices"]);
}

#[tokio::test(start_paused = true)]
async fn demo_fallback_is_visible_on_every_third_smart_call() {
    let router = demo_router().await;
    let mut seen = Vec::new();
    for i in 0..3 {
        let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": format!("step {i}")}]});
        let (status, headers, text) = post(&router, Some("sk-demo"), &body).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        seen.push((
            h(&headers, "x-llm-provider").to_owned(),
            h(&headers, "x-llm-attempts").to_owned(),
        ));
    }
    assert_eq!(
        seen,
        [
            ("sim-primary".to_owned(), "1".to_owned()),
            ("sim-primary".to_owned(), "1".to_owned()),
            ("sim-backup".to_owned(), "2".to_owned()),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn demo_streams_and_requires_its_key() {
    let router = demo_router().await;
    let body = json!({"model": "cheap", "stream": true, "messages": [{"role": "user", "content": "Say hello"}]});
    let (status, headers, text) = post(&router, Some("sk-demo"), &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h(&headers, "content-type"), "text/event-stream");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(text.matches("data: ").count() > 3, "{text}");

    let (status, _, _) = post(&router, None, &body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = post(&router, Some("sk-other"), &body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
