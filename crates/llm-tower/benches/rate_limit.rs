//! Overhead of the rate-limit layer with the in-memory store.
//!
//! `cargo bench -p llm-tower --features rate-limit --bench rate_limit`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use llm_tower::rate_limit::{BucketCheck, Hold, InMemoryRateLimitStore, RateLimitLayer, Rule};
use llm_tower::{ChatRequest, ChatResponse, LlmError, LlmResponse, Message};
use tower::{Layer, Service};

const HUGE: u64 = 1 << 50;

fn request(tenant: &str) -> ChatRequest {
    let mut r = ChatRequest::new(
        "gpt-4o-mini",
        vec![Message::system("You are terse."), Message::user("Say hi")],
    )
    .with_tenant(tenant);
    r.max_tokens = Some(64);
    r
}

fn inner() -> impl Service<
    ChatRequest,
    Response = LlmResponse,
    Error = LlmError,
    Future = std::future::Ready<Result<LlmResponse, LlmError>>,
> + Clone {
    // Shared, so cloning the service (as the layer does per call) stays cheap.
    let resp = std::sync::Arc::new(ChatResponse::from_text("gpt-4o-mini", "hi"));
    tower::service_fn(move |_req: ChatRequest| {
        std::future::ready(Ok::<_, LlmError>(LlmResponse::complete(
            ChatResponse::clone(&resp),
        )))
    })
}

fn bench(c: &mut Criterion) {
    // The decision alone: one request bucket and one token bucket, all or nothing.
    let store = InMemoryRateLimitStore::new();
    let checks = vec![
        BucketCheck {
            key: "req/60000ms/tenant|t=acme".into(),
            limit: HUGE,
            window: Duration::from_secs(60),
            amount: 1,
            held: false,
        },
        BucketCheck {
            key: "tok/60000ms/tenant|t=acme".into(),
            limit: HUGE,
            window: Duration::from_secs(60),
            amount: 100,
            held: true,
        },
    ];
    c.bench_function("rate_limit/decision_2_buckets", |b| {
        // A request's whole ledger work: acquire under a new hold, settle the token hold.
        b.iter(|| {
            let hold = Hold::new(Duration::from_secs(600));
            black_box(store.try_acquire(hold, black_box(&checks)));
            store.settle_now(hold, &checks[1..], 90);
        });
    });

    // The whole layer over an inner service that answers at once, vs the bare inner one.
    let layer = RateLimitLayer::new()
        .store(Arc::new(InMemoryRateLimitStore::new()))
        .rule(Rule::requests(HUGE, Duration::from_secs(60)).per_tenant())
        .rule(
            Rule::tokens(HUGE, Duration::from_secs(60))
                .per_tenant()
                .per_model(),
        );
    let req = request("acme");
    let mut bare = inner();
    c.bench_function("rate_limit/baseline_inner_only", |b| {
        b.iter(|| {
            let r = bare.call(req.clone()).now_or_never();
            black_box(r)
        });
    });
    let mut svc = layer.layer(inner());
    c.bench_function("rate_limit/layer_2_rules", |b| {
        b.iter(|| {
            let r = svc.call(req.clone()).now_or_never();
            black_box(r)
        });
    });

    // Many keys: 10 000 tenants round robin.
    let reqs: Vec<ChatRequest> = (0..10_000)
        .map(|i| request(&format!("tenant-{i}")))
        .collect();
    let mut i = 0;
    c.bench_function("rate_limit/layer_10k_tenants", |b| {
        b.iter(|| {
            i = (i + 1) % reqs.len();
            let r = svc.call(reqs[i].clone()).now_or_never();
            black_box(r)
        });
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
