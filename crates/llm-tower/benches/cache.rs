//! Cache benchmarks: key hashing, in-memory lookup, and a hit end to end through the layer.
//!
//! `cargo bench -p llm-tower --features cache --bench cache -- --warm-up-time 1 --measurement-time 3`
#![allow(missing_docs, clippy::print_stderr)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use llm_tower::cache::{CacheKey, CacheLayer, CacheStore, CachedEntry, MemoryStore};
use llm_tower::{ChatRequest, ChatResponse, LlmError, LlmResponse, Message, ResponseMeta, Usage};
use tower::ServiceExt;

/// A typical ~2 KB request: a system prompt, a short history and a question.
fn request_2kb() -> ChatRequest {
    let system = "You are a helpful assistant for an online bookshop. Answer briefly, cite the \
                  catalogue entry when you recommend a book, and never invent prices. "
        .repeat(3);
    let history = "I am looking for a novel set in Lisbon, ideally translated from Portuguese, \
                   not too long, something I can read on a weekend trip. "
        .repeat(8);
    let mut req = ChatRequest::new(
        "gpt-4o-mini",
        vec![
            Message::system(system),
            Message::user(history),
            Message::assistant(
                "Here are three candidates from the catalogue that match what you describe: "
                    .repeat(3),
            ),
            Message::user("Which of these is the shortest, and is it available in paperback?"),
        ],
    )
    .with_tenant("acme")
    .with_task_type("recommend");
    req.temperature = Some(0.into());
    req.max_tokens = Some(512);
    req.user = Some("user-1234".into());
    req
}

fn bench(c: &mut Criterion) {
    let req = request_2kb();
    let size = serde_json::to_vec(&req).map(|v| v.len()).unwrap_or(0);
    eprintln!("request size: {size} bytes");

    // Baselines, to read the numbers on a loaded machine: hashing the request's bytes
    // alone, and serializing it to JSON.
    let bytes = serde_json::to_vec(&req).expect("serialize");
    c.bench_function("baseline/blake3_of_2kb_bytes", |b| {
        b.iter(|| blake3::hash(black_box(&bytes)));
    });
    // One blake3 chunk: the floor of hashing any request over 1 KiB on this CPU.
    let one_kib = vec![7u8; 1024];
    c.bench_function("baseline/blake3_of_1kib", |b| {
        b.iter(|| blake3::hash(black_box(&one_kib)));
    });
    c.bench_function("baseline/serde_json_to_vec_2kb", |b| {
        b.iter(|| serde_json::to_vec(black_box(&req)).map(|v| v.len()));
    });

    c.bench_function("cache/key_2kb", |b| {
        b.iter(|| CacheKey::for_request(black_box(&req)));
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");

    // Lookup = hashing + in-memory get of a present entry.
    let store = MemoryStore::new(64 * 1024 * 1024);
    let mut resp = ChatResponse::from_text("gpt-4o-mini", "The shortest is ... ".repeat(20));
    resp.usage = Some(Usage::new(500, 120));
    let entry = Arc::new(CachedEntry::complete(
        resp.clone(),
        &ResponseMeta::default(),
    ));
    rt.block_on(store.put(
        CacheKey::for_request(&req),
        entry,
        Duration::from_secs(3600),
    ))
    .expect("put");
    c.bench_function("cache/lookup_2kb_memory_hit", |b| {
        b.iter(|| {
            let key = CacheKey::for_request(black_box(&req));
            let hit = store.get_now(&key).and_then(Result::ok).flatten();
            assert!(hit.is_some());
            hit
        });
    });

    // A hit through the layer: ready + call + await, answer materialised as a response.
    let layer = CacheLayer::in_memory(64 * 1024 * 1024);
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service_fn(move |_req: ChatRequest| {
            let resp = resp.clone();
            async move { Ok::<_, LlmError>(LlmResponse::complete(resp)) }
        });
    rt.block_on(svc.clone().oneshot(req.clone())).expect("warm");
    c.bench_function("cache/layer_hit_end_to_end_2kb", |b| {
        b.to_async(&rt).iter_batched(
            || req.clone(),
            |r| {
                let svc = svc.clone();
                async move { svc.oneshot(r).await.expect("hit") }
            },
            BatchSize::SmallInput,
        );
    });
    assert!(layer.stats().hits() > 0);
}

criterion_group!(benches, bench);
criterion_main!(benches);
