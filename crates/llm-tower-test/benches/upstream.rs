//! Round trips through the mock upstream (real HTTP on localhost) and calls of the simulated
//! LLM with no delays: the cost the test tooling adds to tests and load tests.

use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use llm_tower_core::{ChatRequest, Message};
use llm_tower_test::{MockUpstream, SimulatedLlm};
use tower::ServiceExt;

const BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}"#;
const STREAM_BODY: &str = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Say hello to everyone in the room"}]}"#;

fn bench_upstream(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let up = rt
        .block_on(MockUpstream::builder().record_requests(false).start())
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let url = format!("{}/v1/chat/completions", up.base_url());
    let mut g = c.benchmark_group("mock_upstream");
    for (name, body) in [("json", BODY), ("sse", STREAM_BODY)] {
        g.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                let req = Request::post(&url)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(body.as_bytes())))
                    .unwrap();
                let resp = client.request(req).await.unwrap();
                resp.into_body().collect().await.unwrap().to_bytes()
            });
        });
    }
    g.finish();
}

fn bench_simulated(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let llm = SimulatedLlm::builder("sim")
        .latency(Duration::ZERO)
        .token_delay(Duration::ZERO)
        .build();
    let req = ChatRequest::new("m", vec![Message::user("Explain tower layers briefly")]);
    let mut streaming = req.clone();
    streaming.stream = Some(true);
    let mut g = c.benchmark_group("simulated_llm");
    g.bench_function("complete", |b| {
        b.to_async(&rt).iter(|| async {
            let resp = llm.clone().oneshot(req.clone()).await.unwrap();
            resp.into_complete().await.unwrap()
        });
    });
    g.bench_function("stream", |b| {
        b.to_async(&rt).iter(|| async {
            let resp = llm.clone().oneshot(streaming.clone()).await.unwrap();
            resp.into_complete().await.unwrap()
        });
    });
    g.finish();
}

criterion_group!(benches, bench_upstream, bench_simulated);
criterion_main!(benches);
