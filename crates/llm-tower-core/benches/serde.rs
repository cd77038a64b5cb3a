//! JSON parse and print cost of the core types: an OpenAI `chat.completion` response, a small
//! request (through `ChatRequest::from_slice`), a stream chunk, printing the response back,
//! and the shape check that keeps an upstream's answer as sent (`EncodedResponse`).
//!
//! `cargo bench -p llm-tower-core --bench serde -- --warm-up-time 1 --measurement-time 3`
//!
//! Timings on a shared machine are noisy; instruction counts are not. With
//! `SERDE_BENCH_LOOP=<case>:<n>` the binary runs one case `n` times and exits, for
//! `valgrind --tool=callgrind` (run `n = 0` too and subtract the start-up cost). Cases:
//! `response`, `request`, `request_extra`, `chunk`, `serialize`, `usage`, `encoded`,
//! `parse_usage`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group};
use llm_tower_core::{ChatChunk, ChatRequest, ChatResponse, EncodedResponse, Usage};

const RESPONSE: &str = r#"{"id":"chatcmpl-mock000000000001","object":"chat.completion","created":1795728205,"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"mock answer to: Say hello to the benchmark","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":11,"total_tokens":18,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_mock"}"#;

const REQUEST: &str = r#"{"model":"bench","messages":[{"role":"user","content":"Say hello to the benchmark"}],"temperature":0}"#;

const CHUNK: &str = r#"{"id":"chatcmpl-mock000000000001","object":"chat.completion.chunk","created":1795728205,"model":"bench","system_fingerprint":"fp_mock","choices":[{"index":0,"delta":{"content":"hello"},"logprobs":null,"finish_reason":null}]}"#;

fn parse_response() -> ChatResponse {
    serde_json::from_str(black_box(RESPONSE)).expect("response parses")
}

// The same with fields the request type does not type (kept in `extra`), as clients send.
const REQUEST_EXTRA: &str = r#"{"model":"bench","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Say hello to the benchmark","name":"u1"}],"temperature":0,"presence_penalty":0,"frequency_penalty":0.5,"stop":["\n\n"],"logprobs":false,"metadata":{"team":"bench"},"parallel_tool_calls":true}"#;

fn parse_request_extra() -> ChatRequest {
    ChatRequest::from_slice(black_box(REQUEST_EXTRA.as_bytes())).expect("request parses")
}

fn parse_request() -> ChatRequest {
    ChatRequest::from_slice(black_box(REQUEST.as_bytes())).expect("request parses")
}

fn parse_chunk() -> ChatChunk {
    serde_json::from_str(black_box(CHUNK)).expect("chunk parses")
}

fn check_encoded() -> EncodedResponse {
    EncodedResponse::from_json(bytes::Bytes::from_static(black_box(RESPONSE.as_bytes())))
        .expect("response checks")
}

const USAGE: &str = r#"{"prompt_tokens":7,"completion_tokens":11,"total_tokens":18,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#;

fn parse_usage() -> Usage {
    serde_json::from_str(black_box(USAGE)).expect("usage parses")
}

fn bench(c: &mut Criterion) {
    c.bench_function("check_encoded_response", |b| b.iter(check_encoded));
    c.bench_function("parse_usage", |b| b.iter(parse_usage));
    c.bench_function("parse_response", |b| b.iter(parse_response));
    c.bench_function("parse_request", |b| b.iter(parse_request));
    c.bench_function("parse_request_extra", |b| b.iter(parse_request_extra));
    c.bench_function("parse_chunk", |b| b.iter(parse_chunk));
    let resp = parse_response();
    c.bench_function("serialize_response", |b| {
        b.iter(|| serde_json::to_vec(black_box(&resp)).expect("serializes"));
    });
    let usage = resp.usage.clone().expect("usage");
    c.bench_function("serialize_usage", |b| {
        b.iter(|| serde_json::to_vec(black_box(&usage)).expect("serializes"));
    });
}

criterion_group!(benches, bench);

/// Runs one case `n` times (see the module docs).
fn run_loop(spec: &str) {
    let (case, n) = spec.split_once(':').expect("SERDE_BENCH_LOOP=<case>:<n>");
    let n: usize = n.parse().expect("a count");
    let resp = parse_response();
    let usage = resp.usage.clone().expect("usage");
    for _ in 0..n {
        match case {
            "response" => drop(black_box(parse_response())),
            "request" => drop(black_box(parse_request())),
            "request_extra" => drop(black_box(parse_request_extra())),
            "chunk" => drop(black_box(parse_chunk())),
            "serialize" => drop(black_box(serde_json::to_vec(black_box(&resp)))),
            "usage" => drop(black_box(serde_json::to_vec(black_box(&usage)))),
            "encoded" => drop(black_box(check_encoded())),
            "parse_usage" => drop(black_box(parse_usage())),
            other => panic!("unknown case {other}"),
        }
    }
}

fn main() {
    if let Ok(spec) = std::env::var("SERDE_BENCH_LOOP") {
        run_loop(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
