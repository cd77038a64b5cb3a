//! The Redis round trip per cached request (needs REDIS_URL).
//!
//! `REDIS_URL=redis://127.0.0.1:6379 cargo bench -p llm-tower-redis --bench redis_cache -- --warm-up-time 1 --measurement-time 3`
#![allow(missing_docs, clippy::print_stderr)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use llm_tower::cache::{CacheKey, CacheLayer, CacheStore, CachedEntry};
use llm_tower::{ChatRequest, ChatResponse, LlmError, LlmResponse, Message, ResponseMeta, Usage};
use llm_tower_redis::cache::RedisCacheStore;
use llm_tower_redis::{RedisConn, RedisOptions};
use tower::{Layer, ServiceExt};

fn request() -> ChatRequest {
    let mut req = ChatRequest::new(
        "gpt-4o-mini",
        vec![
            Message::system("You are a helpful assistant. ".repeat(20)),
            Message::user("Explain what a cache stampede is, briefly. ".repeat(25)),
        ],
    )
    .with_tenant("acme");
    req.temperature = Some(0.into());
    req
}

fn bench(c: &mut Criterion) {
    let url = std::env::var("REDIS_URL").expect("REDIS_URL must be set to run this benchmark");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let opts = RedisOptions {
        key_prefix: format!("llm-tower-bench:{}:", std::process::id()),
        op_timeout: Duration::from_millis(500),
        ..RedisOptions::default()
    };
    let conn = rt
        .block_on(RedisConn::connect(&url, opts))
        .expect("connect to REDIS_URL");
    let store = RedisCacheStore::new(conn);

    let req = request();
    let key = CacheKey::for_request(&req);
    let mut resp = ChatResponse::from_text("gpt-4o-mini", "A cache stampede is ... ".repeat(40));
    resp.usage = Some(Usage::new(600, 250));
    let entry = Arc::new(CachedEntry::complete(
        resp.clone(),
        &ResponseMeta::default(),
    ));
    eprintln!("entry size: {} bytes", entry.approx_size());
    rt.block_on(store.put(key, entry, Duration::from_secs(600)))
        .expect("put");

    c.bench_function("redis/cache_get_hit", |b| {
        b.to_async(&rt).iter(|| async {
            let hit = store.get(black_box(key)).await.expect("get");
            assert!(hit.is_some());
            hit
        });
    });

    let layer = CacheLayer::new(store.clone());
    let svc = layer.layer(tower::service_fn(move |_r: ChatRequest| {
        std::future::ready(Ok::<_, LlmError>(LlmResponse::complete(resp.clone())))
    }));
    c.bench_function("redis/cache_layer_hit_end_to_end", |b| {
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
    assert_eq!(layer.stats().errors(), 0);
}

criterion_group!(benches, bench);
criterion_main!(benches);
