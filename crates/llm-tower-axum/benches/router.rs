//! Router overhead: one small JSON chat request through the whole `Router` (request id,
//! auth, body read and parse, header mapping, metrics, JSON encoding) over a zero-latency
//! service, with `oneshot`. Run with
//! `cargo bench -p llm-tower-axum --bench router -- --warm-up-time 1 --measurement-time 3`.
#![allow(missing_docs)]

use axum::body::Body;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::BodyExt;
use llm_tower_axum::{Activity, ClientKeys, Metrics, OpenAiRouter};
use llm_tower_core::{ChatRequest, ChatResponse, LlmError, LlmResponse, Usage};
use tower::ServiceExt;

const BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hi"}],"temperature":0}"#;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let llm = tower::service_fn(|req: ChatRequest| async move {
        let mut r = ChatResponse::from_text(req.model, "hi");
        r.usage = Some(Usage::new(12, 1));
        Ok::<_, LlmError>(LlmResponse::complete(r))
    });
    let full = OpenAiRouter::new(llm)
        .client_keys(ClientKeys::new().with_key("sk-bench", "bench"))
        .into_router();
    let with_activity = OpenAiRouter::new(llm)
        .client_keys(ClientKeys::new().with_key("sk-bench", "bench"))
        .activity(Activity::new())
        .into_router();
    let no_metrics = OpenAiRouter::new(llm)
        .client_keys(ClientKeys::new().with_key("sk-bench", "bench"))
        .metrics(Metrics::disabled())
        .into_router();

    // Baseline: plain axum reading the same body and answering a fixed JSON document.
    let bare = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|body: bytes::Bytes| async move {
            std::hint::black_box(body);
            ([("content-type", "application/json")], r#"{"ok":true}"#)
        }),
    );

    for (name, app) in [
        ("router_json_request", full),
        ("router_json_request_with_activity", with_activity),
        ("router_json_request_no_metrics", no_metrics),
        ("bare_axum_baseline", bare),
    ] {
        c.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let app = app.clone();
                async move {
                    let req = http::Request::post("/v1/chat/completions")
                        .header("content-type", "application/json")
                        .header("authorization", "Bearer sk-bench")
                        .header("x-llm-task", "greet")
                        .body(Body::from(BODY))
                        .expect("request");
                    let resp = app.oneshot(req).await.expect("infallible");
                    assert_eq!(resp.status(), 200);
                    resp.into_body().collect().await.expect("body").to_bytes()
                }
            });
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
