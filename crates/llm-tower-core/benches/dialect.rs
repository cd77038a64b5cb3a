//! The gateway's own work per request, chat completions against Anthropic Messages served
//! by a provider of the same dialect: parse the client's body into the view the layers read
//! and write the body sent upstream; then check the upstream's answer, kept as it came.
//!
//! `cargo bench -p llm-tower-core --bench dialect -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use llm_tower_core::dialect::messages;
use llm_tower_core::{ChatRequest, EncodedResponse, NativeRequest};

const CHAT: &str = r#"{"model":"bench","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Say hello to the benchmark"}],"temperature":0,"max_tokens":256}"#;
const MESSAGES: &str = r#"{"model":"bench","max_tokens":256,"system":"Be brief.","messages":[{"role":"user","content":"Say hello to the benchmark"}],"temperature":0}"#;

const CHAT_ANSWER: &str = r#"{"id":"chatcmpl-mock000000000001","object":"chat.completion","created":1795728205,"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"mock answer to: Say hello to the benchmark","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":11,"total_tokens":18,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_mock"}"#;
const MESSAGES_ANSWER: &str = r#"{"id":"msg_mock000000000001","type":"message","role":"assistant","model":"bench","content":[{"type":"text","text":"mock answer to: Say hello to the benchmark"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":7,"output_tokens":11,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"service_tier":"standard"}}"#;

/// Chat: the typed parse, and the body an OpenAI-compatible provider sends.
fn chat_request() -> Vec<u8> {
    let mut req = ChatRequest::from_slice(black_box(CHAT.as_bytes())).expect("parses");
    req.model = "gpt-4o-mini".into();
    serde_json::to_vec(&req).expect("encodes")
}

/// Messages: the view, and the native body an Anthropic provider sends.
fn messages_request() -> Vec<u8> {
    let view = messages::request_from_bytes(Bytes::from_static(black_box(MESSAGES.as_bytes())))
        .expect("parses");
    let native = view.extensions.get::<NativeRequest>().expect("native");
    native
        .body_for(&view, "claude-haiku-4-5", &[])
        .expect("encodes")
}

fn bench(c: &mut Criterion) {
    c.bench_function("request/chat", |b| b.iter(chat_request));
    c.bench_function("request/messages", |b| b.iter(messages_request));
    c.bench_function("answer/chat", |b| {
        b.iter(|| {
            EncodedResponse::from_json(Bytes::from_static(black_box(CHAT_ANSWER.as_bytes())))
        });
    });
    c.bench_function("answer/messages", |b| {
        b.iter(|| {
            EncodedResponse::from_messages_json(Bytes::from_static(black_box(
                MESSAGES_ANSWER.as_bytes(),
            )))
        });
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
