//! The providers' own cost per request, against the local mock upstream.
//!
//! - `round_trip/raw_hyper`: a bare hyper-util pooled client POSTing the same bytes to the
//!   same mock and reading the body: the baseline.
//! - `round_trip/openai`, `round_trip/anthropic`: the provider's full call (map, serialize,
//!   pooled round trip, parse into `ChatResponse`, meta). Provider − baseline = the cost the
//!   client adds.
//! - `client_cpu/openai`, `client_cpu/anthropic`: the same client work without the network
//!   (body building + response parsing), stable on a busy machine.
//! - `sse/parse`: the SSE parser's throughput on a typical chat-completions stream, fed in
//!   16 KiB reads; `sse/parse_and_decode_chunk`: parser + JSON decode per chunk.
//!
//! Run: `cargo bench -p llm-tower-providers --bench providers -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use llm_tower_core::{ChatChunk, ChatRequest, ChatResponse, Message};
use llm_tower_providers::anthropic::from_messages_response;
use llm_tower_providers::sse::SseParser;
use llm_tower_providers::{
    AnthropicConfig, AnthropicProvider, ApiKey, HttpClient, OpenAiConfig, OpenAiProvider,
};
use llm_tower_test::{MockUpstream, Scenario};
use tower::ServiceExt;

fn small_request() -> ChatRequest {
    ChatRequest::new(
        "gpt-4o-mini",
        vec![
            Message::system("You are terse."),
            Message::user("Say hello"),
        ],
    )
}

fn round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let up: MockUpstream = rt.block_on(async {
        let up = MockUpstream::builder()
            .record_requests(false)
            .start()
            .await
            .unwrap();
        up.set_default(Scenario::ok().text("Hello!"));
        up
    });
    let client = HttpClient::with_defaults().unwrap();
    let openai = OpenAiProvider::new(
        OpenAiConfig::new(format!("{}/v1", up.base_url()))
            .api_key(ApiKey::new("sk-bench"))
            .api_key_env(None),
        &client,
    )
    .unwrap();
    let anthropic = AnthropicProvider::new(
        AnthropicConfig::new(up.base_url())
            .api_key(ApiKey::new("sk-ant-bench"))
            .api_key_env(None),
        &client,
    )
    .unwrap();

    // The baseline: the same bytes, a bare pooled hyper client, no parsing.
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true); // as the providers' client does
    let raw: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .build(conn);
    let body = Bytes::from(openai.request_body(&small_request()).unwrap());
    let uri: http::Uri = format!("{}/v1/chat/completions", up.base_url())
        .parse()
        .unwrap();

    let mut g = c.benchmark_group("round_trip");
    g.bench_function("raw_hyper", |b| {
        b.to_async(&rt).iter(|| async {
            let req = http::Request::post(uri.clone())
                .header("content-type", "application/json")
                .header("authorization", "Bearer sk-bench")
                .header("accept", "application/json")
                .header("user-agent", "llm-tower/0.1.0")
                .body(Full::new(body.clone()))
                .unwrap();
            let resp = raw.request(req).await.unwrap();
            black_box(resp.into_body().collect().await.unwrap().to_bytes())
        });
    });
    g.bench_function("openai", |b| {
        b.to_async(&rt).iter(|| async {
            let resp = openai.clone().oneshot(small_request()).await.unwrap();
            black_box(resp)
        });
    });
    g.bench_function("anthropic", |b| {
        b.to_async(&rt).iter(|| async {
            let resp = anthropic.clone().oneshot(small_request()).await.unwrap();
            black_box(resp)
        });
    });
    g.finish();
}

/// The client's own CPU work per small request, without the network: building the body
/// (model mapping + serialization) and parsing a typical response. Noise-free, unlike
/// the round trips on a busy machine.
fn client_cpu(c: &mut Criterion) {
    let client = HttpClient::with_defaults().unwrap();
    let openai = OpenAiProvider::new(
        OpenAiConfig::new("http://127.0.0.1:9/v1").api_key_env(None),
        &client,
    )
    .unwrap();
    let anthropic = AnthropicProvider::new(
        AnthropicConfig::new("http://127.0.0.1:9").api_key_env(None),
        &client,
    )
    .unwrap();
    let openai_resp = br#"{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion","created":1741569952,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I assist you today?","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_06737a9306"}"#;
    let anthropic_resp = br#"{"id":"msg_013Zva2CMHLNnXjNJJKqJ2EF","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"Hello! How can I assist you today?"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":19,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":10}}"#;
    let req = small_request();
    let mut g = c.benchmark_group("client_cpu");
    g.bench_function("openai", |b| {
        b.iter(|| {
            let body = openai.request_body(black_box(&req)).unwrap();
            let resp: ChatResponse = serde_json::from_slice(black_box(openai_resp)).unwrap();
            black_box((body, resp))
        });
    });
    g.bench_function("anthropic", |b| {
        b.iter(|| {
            let body =
                serde_json::to_vec(&anthropic.request_body(black_box(&req)).unwrap()).unwrap();
            let v: serde_json::Value = serde_json::from_slice(black_box(anthropic_resp)).unwrap();
            let resp = from_messages_response(&v, "anthropic").unwrap();
            black_box((body, resp))
        });
    });
    g.finish();
}

/// A typical stream: role chunk, ~200 content chunks, finish chunk, usage chunk, [DONE].
fn sample_stream() -> Vec<u8> {
    let mut s = String::new();
    let head = r#"{"id":"chatcmpl-AbC123","object":"chat.completion.chunk","created":1732600000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":[{"index":0,"delta":"#;
    s.push_str(&format!(
        "data: {head}{{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
    ));
    for i in 0..200 {
        s.push_str(&format!(
            "data: {head}{{\"content\":\" word{i}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
        ));
        if i % 50 == 0 {
            s.push_str(": keep-alive\n\n");
        }
    }
    s.push_str(&format!(
        "data: {head}{{}},\"logprobs\":null,\"finish_reason\":\"stop\"}}],\"usage\":null}}\n\n"
    ));
    s.push_str("data: {\"id\":\"chatcmpl-AbC123\",\"object\":\"chat.completion.chunk\",\"created\":1732600000,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":200,\"total_tokens\":212}}\n\n");
    s.push_str("data: [DONE]\n\n");
    s.into_bytes()
}

fn sse(c: &mut Criterion) {
    let stream = sample_stream();
    let reads: Vec<&[u8]> = stream.chunks(16 * 1024).collect();
    let events = {
        let mut p = SseParser::new();
        p.push(&stream);
        let mut n = 0;
        while p.next_event().unwrap().is_some() {
            n += 1;
        }
        n
    };
    let mut g = c.benchmark_group("sse");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("parse", |b| {
        b.iter(|| {
            let mut p = SseParser::new();
            let mut n = 0usize;
            for r in &reads {
                p.push(r);
                while let Some(ev) = p.next_event().unwrap() {
                    n += ev.data().len();
                }
            }
            black_box(n)
        });
    });
    g.throughput(Throughput::Elements(events));
    g.bench_function("parse_and_decode_chunk", |b| {
        b.iter(|| {
            let mut p = SseParser::new();
            let mut n = 0usize;
            for r in &reads {
                p.push(r);
                while let Some(ev) = p.next_event().unwrap() {
                    if ev.data() != b"[DONE]" {
                        let chunk: ChatChunk = serde_json::from_slice(ev.data()).unwrap();
                        n += chunk.choices.len();
                    }
                }
            }
            black_box(n)
        });
    });
    g.finish();
}

criterion_group!(benches, round_trip, client_cpu, sse);
criterion_main!(benches);
