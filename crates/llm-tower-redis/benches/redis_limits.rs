//! The Redis round trip per request for rate limits and budgets (needs REDIS_URL).
//!
//! `REDIS_URL=redis://127.0.0.1:6379 cargo bench -p llm-tower-redis --bench redis_limits`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use llm_tower::cost::{BudgetCharge, BudgetStore, Hold};
use llm_tower::rate_limit::{BucketCheck, RateLimitLayer, RateLimitStore, Rule};
use llm_tower::{ChatRequest, ChatResponse, LlmError, LlmResponse, Message};
use llm_tower_redis::budget::RedisBudgetStore;
use llm_tower_redis::rate_limit::RedisRateLimitStore;
use llm_tower_redis::{RedisConn, RedisOptions};
use tower::{Layer, ServiceExt};

const HUGE: u64 = 1 << 50;

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
    let store = Arc::new(RedisRateLimitStore::new(conn.clone()).fail_closed());
    let checks = vec![
        BucketCheck {
            key: "req|t=acme".into(),
            limit: HUGE,
            window: Duration::from_secs(60),
            amount: 1,
            held: false,
        },
        BucketCheck {
            key: "tok|t=acme".into(),
            limit: HUGE,
            window: Duration::from_secs(60),
            amount: 100,
            held: true,
        },
    ];
    c.bench_function("redis/rate_limit_acquire_2_buckets", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                store
                    .acquire(Hold::new(Duration::from_secs(600)), &checks)
                    .await,
            )
        });
    });

    let layer = RateLimitLayer::new()
        .store(store.clone())
        .rule(Rule::requests(HUGE, Duration::from_secs(60)).per_tenant())
        .rule(Rule::tokens(HUGE, Duration::from_secs(60)).per_tenant());
    let resp = ChatResponse::from_text("m", "hi");
    let svc = layer.layer(tower::service_fn(move |_r: ChatRequest| {
        std::future::ready(Ok::<_, LlmError>(LlmResponse::complete(resp.clone())))
    }));
    let req = ChatRequest::new("m", vec![Message::user("hi")]).with_tenant("acme");
    c.bench_function("redis/rate_limit_layer_call", |b| {
        b.to_async(&rt).iter(|| {
            let svc = svc.clone();
            let req = req.clone();
            async move { black_box(svc.oneshot(req).await) }
        });
    });

    let budgets = RedisBudgetStore::new(conn).fail_closed();
    let charges = vec![BudgetCharge {
        key: "bench|total".into(),
        limit: HUGE,
        amount: 1,
        ttl: Some(Duration::from_secs(600)),
    }];
    c.bench_function("redis/budget_reserve_1", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                budgets
                    .reserve(Hold::new(Duration::from_secs(600)), &charges)
                    .await,
            )
        });
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
